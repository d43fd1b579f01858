"""The TUI's pure view: keys to intents, and the layout at fixed sizes."""

from __future__ import annotations

import msgspec
import pytest

from llama_tui.markdown import display_width
from llama_tui.view import (
    CancelReply,
    CopyLastReply,
    Delete,
    Export,
    LoadModel,
    OpenConversation,
    Quit,
    Rename,
    SearchAll,
    Send,
    View,
)
from llamad.protocol import (
    Conversation,
    ImagePart,
    Message,
    MessageStats,
    ModelStatus,
    SearchHit,
    TextPart,
)


def text_of(rows: list[tuple[object, ...]]) -> list[str]:
    return ["".join(span.text for span in row) for row in rows]  # type: ignore[attr-defined]


def message(seq: int, role: str, text: str) -> Message:
    return Message(conversation="c1", seq=seq, role=role, parts=[TextPart(text=text)])  # type: ignore[arg-type]


def view_with_chat() -> View:
    view = View()
    view.conversations = [
        Conversation(id="c1", title="first chat"),
        Conversation(id="c2", title="second"),
    ]
    view.current = "c1"
    view.set_messages("c1", [message(1, "user", "hello"), message(2, "assistant", "**hi** there")])
    view.models = {"demo": ModelStatus(name="demo", state="ready", since=0.0)}
    view.active_model = "demo"
    view.connection = "connected"
    view.connected = True
    return view


def type_text(view: View, text: str) -> None:
    for char in text:
        view.key("", char)


def sent_text(intent: object) -> str:
    assert isinstance(intent, Send), intent
    return intent.item.text


def test_enter_sends_and_clears_the_input() -> None:
    view = view_with_chat()
    type_text(view, "what now")
    intent = view.key("KEY_ENTER", "\r")
    assert sent_text(intent) == "what now"
    assert view.outbox == [intent.item] and intent.item.conversation == "c1"  # type: ignore[union-attr]
    assert view.input == ""
    assert view.key("KEY_ENTER", "\r") is None  # nothing to send


def test_ctrl_j_adds_a_line_and_up_recalls() -> None:
    view = view_with_chat()
    type_text(view, "one")
    view.key("KEY_ENTER", "\n")  # Ctrl+J, as blessed names it
    type_text(view, "two")
    assert view.input == "one\ntwo"
    assert sent_text(view.key("KEY_ENTER", "\r")) == "one\ntwo"
    view.key("KEY_UP", "")  # on an empty input: the last stored message, to edit
    assert view.input == "hello" and view.editing
    view.key("KEY_UP", "")  # again: earlier prompts
    assert view.input == "one\ntwo" and not view.editing


def test_ctrl_c_stops_then_quits() -> None:
    view = view_with_chat()
    view.generating.add("c1")
    assert view.key("", "\x03") == CancelReply("c1")
    assert view.key("", "\x03") == Quit()
    assert view.key("", "\x11") == Quit()  # Ctrl+Q


def test_model_picker() -> None:
    view = view_with_chat()
    view.models["demo-b"] = ModelStatus(name="demo-b", state="stopped", since=0.0)
    view.key("", "\x0c")
    assert view.mode == "picker"
    view.key("KEY_DOWN", "")
    assert view.key("KEY_ENTER", "\r") == LoadModel("demo-b")
    assert view.mode == "chat"
    type_text(view, "/model")
    assert view.key("KEY_ENTER", "\r") is None and view.mode == "picker"


def test_new_and_switch_conversation() -> None:
    view = view_with_chat()
    assert view.key("KEY_CTRL_DOWN", "") == OpenConversation("c2")
    assert view.key("", "\x0e") == OpenConversation(None)
    assert view.current is None  # from a new conversation, the next is the newest
    assert view.key("KEY_CTRL_DOWN", "") == OpenConversation("c1")


@pytest.mark.parametrize(("width", "height"), [(80, 24), (120, 40), (60, 15)])
def test_layout_fills_the_screen_exactly(width: int, height: int) -> None:
    rows = view_with_chat().layout(width, height, now=10.0)
    assert len(rows) == height
    assert all(display_width(text) <= width for text in text_of(rows))
    screen = "\n".join(text_of(rows))
    assert "hello" in screen and "hi there" in screen
    assert "Conversations" in screen if width >= 80 else "Conversations" not in screen
    assert text_of(rows)[-1].startswith("demo ready │ connected")


def test_status_bar_shows_loading_time_and_stats() -> None:
    view = view_with_chat()
    view.models["demo-b"] = ModelStatus(name="demo-b", state="starting", since=10.0)
    view.last_stats = MessageStats(tokens_per_second=1450.0, time_to_first_token_ms=4.0)
    status = text_of(view.layout(100, 20, now=10.4))[-1]
    assert status.startswith("Loading demo-b… 0.4 s")
    assert "1450 tok/s" in status and "first token 4 ms" in status


def test_streaming_shows_a_spinner_then_text_and_marks_new_text_below() -> None:
    view = view_with_chat()
    view.add_user("c1", message(3, "user", "more please"))
    assert "thinking…" in "\n".join(text_of(view.layout(90, 20, now=1.0)))
    view.scroll = 5
    view.add_delta("c1", "streamed words")
    assert view.new_below
    view.key("KEY_END", "")
    assert "streamed words" in "\n".join(text_of(view.layout(90, 20, now=1.0)))
    assert "c1" in view.generating
    view.finish("c1", message(4, "assistant", "streamed words, done"))
    assert "c1" not in view.generating


def long_view() -> View:
    view = view_with_chat()
    messages = [message(n, "user" if n % 2 else "assistant", f"line {n}") for n in range(1, 80)]
    messages[4] = message(5, "user", "the Zebra sentence")
    view.set_messages("c1", messages)
    return view


def test_find_jumps_to_the_hit_and_highlights_it() -> None:
    view = long_view()
    view.key("", "\x06")  # Ctrl+F
    assert view.mode == "find"
    type_text(view, "zebra")
    view.key("KEY_ENTER", "\r")
    rows = view.layout(90, 20, now=1.0)
    screen = "\n".join(text_of(rows))
    assert "the Zebra sentence" in screen  # scrolled up to it
    highlighted = [s for row in rows for s in row if "reverse" in s.style and s.text == "Zebra"]
    assert highlighted
    assert "find 'zebra': 1/1" in text_of(rows)[-1]
    view.key("KEY_ESCAPE", "")
    assert view.find_query == ""


def test_search_results_open_a_conversation() -> None:
    view = view_with_chat()
    type_text(view, "/search needle")
    assert view.key("KEY_ENTER", "\r") == SearchAll("needle")
    hit = SearchHit(conversation="c2", title="second", seq=3, role="assistant", snippet="a needle")
    view.show_results([hit], "needle")
    assert "a needle" in "\n".join(text_of(view.layout(90, 20, now=1.0)))
    assert view.key("KEY_ENTER", "\r") == OpenConversation("c2")
    assert view.find_query == "needle"


def test_rename_delete_export_copy_commands() -> None:
    view = view_with_chat()
    type_text(view, "/rename Trip plans")
    assert view.key("KEY_ENTER", "\r") == Rename("c1", "Trip plans")
    type_text(view, "/delete")
    assert view.key("KEY_ENTER", "\r") is None and view.mode == "confirm"
    assert view.key("", "n") is None and view.mode == "chat"
    type_text(view, "/delete")
    view.key("KEY_ENTER", "\r")
    assert view.key("", "y") == Delete("c1")
    type_text(view, "/export /tmp/x.md")
    assert view.key("KEY_ENTER", "\r") == Export("c1", "/tmp/x.md")
    type_text(view, "/copy")
    assert view.key("KEY_ENTER", "\r") == CopyLastReply()


def test_paste_goes_in_whole_and_the_wheel_scrolls() -> None:
    view = long_view()
    assert view.key("BRACKETED_PASTE", "first line\r\nsecond line") is None
    assert view.input == "first line\nsecond line"  # not sent, newlines kept
    view.key("MOUSE_SCROLL_UP", "")
    view.key("MOUSE_SCROLL_UP", "")
    assert view.scroll == 6
    view.key("MOUSE_SCROLL_DOWN", "")
    assert view.scroll == 3
    type_text(view, "")
    view.input = "/copy code 2"
    assert view.key("KEY_ENTER", "\r") == CopyLastReply(2)


def test_tool_calls_collapse_to_one_line_and_expand_with_ctrl_t() -> None:
    from llama_tui.view import AnswerToolCall
    from llamad.protocol import ToolCall

    view = View(current="c")
    call = ToolCall(id="t1", name="calculator", arguments='{"expression": "2**64"}')
    view.tool_call("c", msgspec.structs.replace(call, status="awaiting_approval"))
    screen = "\n".join(text_of(view.layout(100, 12, now=0)))
    assert "Allow calculator(2**64)? y / n" in screen
    assert view.key("", "q") is None and view.mode == "approve"  # a stray key is ignored
    assert view.key("", "y") == AnswerToolCall("c", "t1", approve=True)
    view.tool_call("c", msgspec.structs.replace(call, status="ok", result="18446744073709551616"))
    screen = "\n".join(text_of(view.layout(100, 12, now=0)))
    assert "▸ calculator(2**64) → 18446744073709551616" in screen
    view.key("", "\x14")
    screen = "\n".join(text_of(view.layout(100, 12, now=0)))
    assert "▾ calculator [ok]" in screen and "result: 18446744073709551616" in screen


def test_image_command_and_tab_completion_become_intents() -> None:
    from llama_tui.view import AttachImage, CompletePath

    view = View()
    view.input = "/image ~/Pictures/ca"
    assert view.key("KEY_TAB", "\t") == CompletePath("~/Pictures/ca")
    view.input = "/image ~/Pictures/cat.png"
    assert view.key("KEY_ENTER", "\r") == AttachImage("~/Pictures/cat.png")
    view.attachments.append(ImagePart(name="cat.png", data=b"x" * 2048))
    assert "attached: cat.png (3 KB)" in "\n".join(text_of(view.layout(100, 12, now=0)))


# ------------------------------------------------ issue 11: chat that never surprises


def screen_of(view: View, width: int = 90, height: int = 20, now: float = 1.0) -> str:
    return "\n".join(text_of(view.layout(width, height, now=now)))


def test_unknown_commands_are_refused_with_the_list_and_nothing_is_sent() -> None:
    view = view_with_chat()
    type_text(view, "/foo bar")
    assert view.key("KEY_ENTER", "\r") is None
    assert view.outbox == []
    assert view.input == "/foo bar"  # kept, to be corrected
    assert "unknown command /foo" in view.notice and "/retry" in view.notice
    assert "/model" in view.notice and "/system" in view.notice
    view.input = "//foo is a path"
    assert sent_text(view.key("KEY_ENTER", "\r")) == "/foo is a path"


def test_commands_without_their_argument_say_how_and_send_nothing() -> None:
    view = view_with_chat()
    for command in ("/find", "/search", "/rename", "/image"):
        view.input = command
        assert view.key("KEY_ENTER", "\r") is None, command
        assert command.removeprefix("/") in view.notice or "path" in view.notice
    assert view.outbox == []


def test_model_command_sets_this_conversations_model() -> None:
    view = view_with_chat()
    view.models["demo-b"] = ModelStatus(name="demo-b", state="stopped", since=0.0, aliases=["b"])
    view.input = "/model nonesuch"
    assert view.key("KEY_ENTER", "\r") is None
    assert "unknown model 'nonesuch'" in view.notice and view.input == "/model nonesuch"
    view.input = "/model b"  # an alias
    assert view.key("KEY_ENTER", "\r") == LoadModel("demo-b")
    assert text_of(view.layout(100, 20, now=1.0))[-1].startswith("demo-b stopped")
    type_text(view, "hi")
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send) and intent.item.model == "demo-b"
    view.key("KEY_CTRL_DOWN", "")  # another conversation keeps its own choice
    view.current = "c2"
    assert view.chosen_model() is None


def test_system_command_starts_a_new_conversation_with_that_prompt() -> None:
    view = view_with_chat()
    view.input = "/system You answer in French."
    assert view.key("KEY_ENTER", "\r") == OpenConversation(None)
    assert view.current is None
    assert "You answer in French." in screen_of(view)
    type_text(view, "bonjour")
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send)
    assert (intent.item.conversation, intent.item.system) == (None, "You answer in French.")


def test_retry_and_edit_replace_the_last_turn() -> None:
    view = view_with_chat()
    view.input = "/retry"
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send) and intent.item.kind == "retry"
    view.outbox.clear()
    view.input = "/edit"
    assert view.key("KEY_ENTER", "\r") is None
    assert view.input == "hello" and view.editing
    assert "editing your last message" in screen_of(view)
    view.input = "hello again"
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send) and intent.item.kind == "edit"
    assert intent.item.text == "hello again" and not view.editing
    # llamad answers with the replaced turn's seq: the old turn leaves the screen.
    view.outbox.clear()
    view.add_user("c1", message(1, "user", "hello again"))
    assert "hi there" not in screen_of(view)
    assert screen_of(view).count("you") == 1


def test_a_message_typed_while_disconnected_waits_visibly_and_goes_later() -> None:
    view = view_with_chat()
    view.connected = False
    type_text(view, "are you there")
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send)
    assert "will send when llamad is back" in screen_of(view)
    assert "are you there" in screen_of(view)
    assert "1 unsent" in text_of(view.layout(120, 20, now=1.0))[-1]
    view.connected = True
    (item,) = view.sendable()
    view.mark_sent(item, 7, now=100.0)
    assert view.sendable() == []
    # The connection drops before llamad confirmed it: it may or may not have arrived.
    view.connection_lost()
    assert item.state == "unsure"
    view.reconcile("c1", [message(1, "user", "hello")])  # not stored: it goes again
    assert item.state == "queued" and view.sendable() == [item]
    view.mark_sent(item, 8, now=100.0)
    view.connection_lost()
    stored = msgspec.structs.replace(message(3, "user", "are you there"), created=100.5)
    view.reconcile("c1", [stored])  # stored: not sent twice
    assert view.outbox == []


def test_quitting_with_unsent_messages_asks_twice() -> None:
    view = view_with_chat()
    view.connected = False
    type_text(view, "not yet sent")
    view.key("KEY_ENTER", "\r")
    assert view.key("", "\x11") is None  # Ctrl+Q
    assert "1 message not sent yet would be lost" in view.notice
    assert view.key("", "\x11") == Quit()


def test_messages_wait_for_the_reply_before_them_and_esc_takes_one_back() -> None:
    view = view_with_chat()
    view.generating.add("c1")
    type_text(view, "next question")
    view.key("KEY_ENTER", "\r")
    assert view.sendable() == []
    assert "waiting for the reply before it to end" in screen_of(view)
    view.generating.discard("c1")
    assert [i.text for i in view.sendable()] == ["next question"]
    view.key("KEY_ESCAPE", "")
    assert view.outbox == [] and view.input == "next question"


def test_refused_message_comes_back_into_the_input() -> None:
    view = view_with_chat()
    type_text(view, "a message")
    intent = view.key("KEY_ENTER", "\r")
    assert isinstance(intent, Send)
    view.mark_sent(intent.item, 3, now=1.0)
    assert view.refused(3, "unknown model 'x'")
    assert view.input == "a message" and view.outbox == []
    assert "unknown model 'x'" in view.notice


def test_first_messages_of_a_new_conversation_follow_it() -> None:
    view = View(connected=True)
    type_text(view, "first")
    first = view.key("KEY_ENTER", "\r")
    type_text(view, "second")
    view.key("KEY_ENTER", "\r")
    assert isinstance(first, Send) and view.sendable() == [first.item]
    view.mark_sent(first.item, 1, now=1.0)
    assert view.sendable() == []  # the second waits until the conversation has an id
    assert view.started(1, "new-id") is first.item
    assert view.current == "new-id"
    (second,) = view.outbox
    assert second.conversation == "new-id"


def test_scrolled_up_the_view_holds_still_while_a_reply_streams() -> None:
    view = long_view()
    view.add_user("c1", message(80, "user", "go on"))
    view.key("KEY_PGUP", "")
    before = view.layout(90, 20, now=1.0)[:-3]  # the conversation: no input, no bar
    for n in range(10):
        view.add_delta("c1", f"streamed paragraph {n}\n\n")
        after = view.layout(90, 20, now=1.0)[:-3]
        assert text_of(after)[:-1] == text_of(before)[:-1]  # the last row shows "↓ new"
    assert "↓ new" in text_of(after)[-1]
    view.key("KEY_END", "")
    assert "streamed paragraph 9" in screen_of(view)


def test_user_messages_are_shown_as_typed() -> None:
    view = view_with_chat()
    code = "def f(x):\n    if x:\n        return x * 2\n    return 0"
    view.set_messages("c1", [message(1, "user", code), message(2, "assistant", "ok")])
    rows = text_of(view.layout(90, 20, now=1.0))
    for line in code.splitlines():
        assert any(row.split("│", 1)[-1] == line for row in rows), line


def test_notices_expire_and_never_push_help_off_the_bar() -> None:
    view = view_with_chat()
    view.notice = "5 messages contain 'paris'"
    now = view.notice_expires() or 0.0
    status = text_of(view.layout(100, 20, now=now - 1.0))[-1]
    assert "5 messages contain" in status and status.rstrip().endswith("F1 help")
    assert "paris" not in text_of(view.layout(100, 20, now=now + 0.1))[-1]
    # Too long for the bar: shown whole above the input, the bar keeps its help.
    view.notice = "unknown command /foo; commands: " + " ".join(f"/word{n}" for n in range(30))
    rows = text_of(view.layout(100, 20, now=now - 1.0))
    assert rows[-1].rstrip().endswith("F1 help") and "/foo" not in rows[-1]
    shown = " ".join(row.split("│", 1)[-1] for row in rows[-7:-1])
    assert "/word0" in shown and "/word29" in shown


def test_a_streaming_reply_is_marked_as_writing_not_incomplete() -> None:
    view = view_with_chat()
    view.add_user("c1", message(3, "user", "more"))
    view.add_delta("c1", "partial")
    screen = screen_of(view)
    assert "writing" in screen and "[incomplete]" not in screen
    view.generating.discard("c1")  # e.g. llamad died mid-reply: what was kept is cut off
    assert "[incomplete]" in screen_of(view)


def test_help_is_aligned_and_scrolls_at_70_by_20() -> None:
    view = view_with_chat()
    view.key("KEY_F1", "")
    rows = text_of(view.layout(70, 20, now=1.0))
    assert "more" in rows[0]  # it does not fit: it says there is more
    shown = [row for row in rows[2:-3] if row.strip()]  # not the separator, input, bar
    column = rows[2].index("send the message")
    assert all(row[column - 1] == " " for row in shown if row[:column].strip())
    for _ in range(5):
        view.key("KEY_PGDOWN", "")
    assert view.mode == "help"
    assert "this help" in screen_of(view, 70, 20)  # the last entry, reached by scrolling
    view.key("", "x")
    assert view.mode == "chat"


def test_a_stopped_models_old_reason_is_not_shown() -> None:
    view = view_with_chat()
    view.models["demo-b"] = ModelStatus(
        name="demo-b", state="stopped", since=100.0, reason="switching to demo"
    )
    view.key("", "\x0c")
    assert "stopped: switching to demo" in screen_of(view, now=110.0)
    later = screen_of(view, now=100.0 + 11 * 60)
    assert "switching to demo" not in later and "demo-b" in later
