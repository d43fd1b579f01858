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
    return view


def type_text(view: View, text: str) -> None:
    for char in text:
        view.key("", char)


def test_enter_sends_and_clears_the_input() -> None:
    view = view_with_chat()
    type_text(view, "what now")
    assert view.key("KEY_ENTER", "\r") == Send("what now")
    assert view.input == ""
    assert view.key("KEY_ENTER", "\r") is None  # nothing to send


def test_ctrl_j_adds_a_line_and_up_recalls() -> None:
    view = view_with_chat()
    type_text(view, "one")
    view.key("KEY_ENTER", "\n")  # Ctrl+J, as blessed names it
    type_text(view, "two")
    assert view.input == "one\ntwo"
    assert view.key("KEY_ENTER", "\r") == Send("one\ntwo")
    view.key("KEY_UP", "")
    assert view.input == "one\ntwo"


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
    assert view.key("", "\x0e") == OpenConversation(None)
    assert view.key("KEY_CTRL_DOWN", "") == OpenConversation("c2")


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
    assert '▾ calculator [ok]' in screen and "result: 18446744073709551616" in screen


def test_image_command_and_tab_completion_become_intents() -> None:
    from llama_tui.view import AttachImage, CompletePath

    view = View()
    view.input = "/image ~/Pictures/ca"
    assert view.key("KEY_TAB", "\t") == CompletePath("~/Pictures/ca")
    view.input = "/image ~/Pictures/cat.png"
    assert view.key("KEY_ENTER", "\r") == AttachImage("~/Pictures/cat.png")
    view.attachments.append(("cat.png", 2048))
    assert "attached: cat.png (3 KB)" in "\n".join(text_of(view.layout(100, 12, now=0)))
