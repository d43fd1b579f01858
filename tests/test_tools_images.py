"""Tools and images through a real llamad.

The tool loop and the vision path run against ``scripted_llama_server.py``:
a random-weights model cannot be told to call ``calculator`` with ``2**64`` or
to be a vision model, and these tests check exactly what llamad sends back
upstream. The real llama-server covers the parts it can: refusing images for a
model without a projector, and the request shape it accepts.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llamactl.client import Client, RequestFailed
from llamad.protocol import (
    ApproveTool,
    Chat,
    ChatDone,
    ChatOptions,
    ChatStarted,
    GetConversation,
    ImagePart,
    Ok,
    ServerMessage,
    Status,
    StatusReply,
    TextPart,
    ToolCallEvent,
)
from tests.conftest import Llamad, ready_daemon
from tests.test_tui import Tmux, tui  # noqa: F401 - the fixture

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]
SCRIPTED = Path(__file__).parent / "scripted_llama_server.py"


def scripted_daemon(
    make_llamad: MakeLlamad,
    tmp_path: Path,
    script: list[dict[str, Any]],
    *,
    model_extra: str = 'tools = ["calculator", "file_search"]\n',
    tools_extra: str = "",
    vision: bool = False,
) -> tuple[Llamad, Path]:
    (tmp_path / "script.json").write_text(json.dumps(script))
    record = tmp_path / "requests.jsonl"
    args = ["--script", str(tmp_path / "script.json"), "--record", str(record)]
    if vision:
        args.append("--vision")
    model = tmp_path / "scripted.gguf"
    model.write_bytes(b"GGUF\x03\x00\x00\x00")  # the scripted server never reads it
    notes = tmp_path / "notes"
    notes.mkdir(exist_ok=True)
    (notes / "todo.md").write_text("groceries\nTODO: call the plumber\n")
    daemon = make_llamad(
        f"""
        [models.scripted]
        path = "{model}"
        args = {json.dumps(args)}
        {model_extra}
        [tools.file_search]
        roots = ["{notes}"]
        {tools_extra}
        """,
        'default_model = "scripted"\n',
        binary=SCRIPTED,
    )
    daemon.start()
    daemon.wait_for("scripted", lambda s: s.state == "ready")
    return daemon, record


def chat(client: Client, **fields: object) -> list[ServerMessage]:
    return list(client.stream(lambda i: Chat(id=i, **fields)))  # type: ignore[arg-type]


def requests_sent(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_tool_calls_run_are_streamed_stored_and_sent_back(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    daemon, record = scripted_daemon(
        make_llamad,
        tmp_path,
        [
            {
                "tool_calls": [
                    {"name": "calculator", "arguments": {"expression": "2**64"}},
                    {"name": "file_search", "arguments": {"text": "plumber"}},
                ]
            },
            {"text": "It is 18446744073709551616 and the plumber note is in todo.md"},
        ],
    )
    with daemon.client() as client:
        replies = chat(client, content="what is 2**64, and where did I note the plumber?")
    events = [m.call for m in replies if isinstance(m, ToolCallEvent)]
    assert [(e.name, e.status) for e in events] == [
        ("calculator", "running"),
        ("calculator", "ok"),
        ("file_search", "running"),
        ("file_search", "ok"),
    ]
    done = replies[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete"
    calculator, search = done.message.tool_calls
    assert calculator.result == "18446744073709551616"
    assert calculator.summary() == "calculator(2**64) → 18446744073709551616"
    assert search.result == f"{tmp_path}/notes/todo.md:2: TODO: call the plumber"
    assert done.message.text.startswith("It is 18446744073709551616")

    first, second = requests_sent(record)
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "file_search"]
    # The second request carries the calls and their results, OpenAI style.
    assistant, *results = second["messages"][-3:]
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["calculator", "file_search"]
    assert [(r["role"], r["tool_call_id"], r["content"]) for r in results] == [
        ("tool", "call_0_0", "18446744073709551616"),
        ("tool", "call_0_1", f"{tmp_path}/notes/todo.md:2: TODO: call the plumber"),
    ]

    # Stored, and replayed to the model on the next turn.
    with daemon.client() as client:
        stored = client.call(
            lambda i: GetConversation(id=i, conversation=done.message.conversation)
        )
        chat(client, content="thanks", conversation=done.message.conversation)
    assert stored.messages[-1].tool_calls == done.message.tool_calls  # type: ignore[union-attr]
    third = requests_sent(record)[2]
    roles = [m["role"] for m in third["messages"]]
    assert roles == ["user", "assistant", "tool", "tool", "assistant", "user"]


def test_hostile_tool_input_is_refused_to_the_model_and_the_chat_goes_on(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    daemon, record = scripted_daemon(
        make_llamad,
        tmp_path,
        [
            {
                "tool_calls": [
                    {"name": "calculator", "arguments": {"expression": "9**9**9"}},
                    {"name": "calculator", "arguments": {"expression": "__import__('os')"}},
                    {"name": "file_search", "arguments": {"text": "root", "path": "../.."}},
                    {"name": "shell", "arguments": {"command": "rm -rf ~"}},
                ]
            },
            {"text": "sorry"},
        ],
    )
    with daemon.client() as client:
        done = chat(client, content="try everything")[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete"
    outcomes = [(c.status, c.result) for c in done.message.tool_calls]
    assert outcomes[0] == (
        "error",
        "error: the power would have more than 4000 digits; use a smaller exponent",
    )
    assert outcomes[1][0] == "error" and "unexpected" in outcomes[1][1]
    assert outcomes[2][0] == "error"
    assert "not a folder inside the searchable roots" in outcomes[2][1]
    assert outcomes[3] == ("error", "there is no tool 'shell' in this chat")
    assert len(requests_sent(record)) == 2


def test_tool_rounds_are_capped_then_the_model_must_answer(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    again = {"tool_calls": [{"name": "calculator", "arguments": {"expression": "1+1"}}]}
    daemon, record = scripted_daemon(
        make_llamad,
        tmp_path,
        [again] * 10,
        model_extra='tools = ["calculator"]\nmax_tool_rounds = 2\n',
    )
    with daemon.client() as client:
        done = chat(client, content="loop forever")[-1]
    assert isinstance(done, ChatDone)
    assert [c.round for c in done.message.tool_calls] == [1, 2]
    sent = requests_sent(record)
    assert len(sent) == 3
    assert "tool_choice" not in sent[1] and sent[2]["tool_choice"] == "none"


def test_confirmed_tool_waits_for_approval_and_a_denial_reaches_the_model(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    calls = {
        "tool_calls": [
            {"name": "file_search", "arguments": {"name": "*.md"}},
            {"name": "file_search", "arguments": {"text": "groceries"}},
        ]
    }
    daemon, record = scripted_daemon(
        make_llamad, tmp_path, [calls, {"text": "ok"}], tools_extra="confirm = true\n"
    )
    seen: list[ServerMessage] = []
    with daemon.client() as client:
        for message in client.stream(lambda i: Chat(id=i, content="find my notes")):
            seen.append(message)
            if isinstance(message, ToolCallEvent) and message.call.status == "awaiting_approval":
                approve = message.call.id.endswith("_0")  # allow the first, deny the second
                answer = threading.Thread(
                    target=_answer, args=(daemon, message.conversation, message.call.id, approve)
                )
                answer.start()
                answer.join()
    done = seen[-1]
    assert isinstance(done, ChatDone)
    statuses = [(m.call.status) for m in seen if isinstance(m, ToolCallEvent)]
    assert statuses == ["awaiting_approval", "running", "ok", "awaiting_approval", "denied"]
    allowed, denied = done.message.tool_calls
    assert allowed.result == f"{tmp_path}/notes/todo.md"
    assert denied.result == "the user did not allow this call"
    assert requests_sent(record)[1]["messages"][-1]["content"] == "the user did not allow this call"


def _answer(daemon: Llamad, conversation: str, call: str, approve: bool) -> None:
    with daemon.client() as other:
        reply = other.call(
            lambda i: ApproveTool(id=i, conversation=conversation, call=call, approve=approve)
        )
        assert isinstance(reply, Ok)
        with pytest.raises(RequestFailed) as again:  # the first answer counts
            other.call(
                lambda i: ApproveTool(id=i, conversation=conversation, call=call, approve=True)
            )
        assert again.value.error.code == "not_found"


def test_tools_can_be_chosen_per_chat(make_llamad: MakeLlamad, tmp_path: Path) -> None:
    daemon, record = scripted_daemon(make_llamad, tmp_path, [{"text": "hi"}, {"text": "hi"}])
    with daemon.client() as client:
        chat(client, content="no tools", options=ChatOptions(tools=[]))
        chat(client, content="calculator only", options=ChatOptions(tools=["calculator"]))
        with pytest.raises(RequestFailed) as refused:
            chat(client, content="x", options=ChatOptions(tools=["shell"]))
    first, second = requests_sent(record)
    assert "tools" not in first
    assert [t["function"]["name"] for t in second["tools"]] == ["calculator"]
    assert str(refused.value) == "no tool named 'shell'; built-in tools: calculator, file_search"


# ------------------------------------------------------------------ images


def png(size: tuple[int, int] = (640, 480)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def test_image_reaches_a_vision_model_and_is_stored_once(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    daemon, record = scripted_daemon(
        make_llamad, tmp_path, [{"text": "a blue square"}] * 3, model_extra="", vision=True
    )
    assert daemon.status("scripted").vision is True
    assert "[vision]" in daemon.ctl("models").stdout
    picture = png()
    image_file = tmp_path / "cat.png"
    image_file.write_bytes(picture)
    result = daemon.ctl("chat", "--image", str(image_file), "what is this?")
    assert result.returncode == 0, result.stderr
    assert "a blue square" in result.stdout
    (sent,) = requests_sent(record)
    text, image = sent["messages"][-1]["content"]
    assert text == {"type": "text", "text": "what is this?"}
    assert image["type"] == "image_url"
    assert image["image_url"]["url"].startswith("data:image/png;base64,iVBORw0KGgo")

    with daemon.client() as client:
        started = chat(client, content=[TextPart(text="again"), ImagePart(data=picture, name="x")])
    first = started[0]
    assert isinstance(first, ChatStarted)
    (stored,) = first.user.images
    assert (stored.mime, stored.width, stored.height, stored.data) == ("image/png", 640, 480, b"")
    shown = daemon.ctl("history", "show", first.conversation.id)
    assert "[image: x 640×480]" in shown.stdout
    daemon.stop()
    from llamad.history import HistoryStore

    with HistoryStore(daemon.runtime_dir / "data" / "history.lmdb") as store:
        assert store.image_count() == 1  # the same picture twice is stored once


def test_images_are_refused_clearly_and_nothing_is_stored(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)  # the real llama-server, no projector
    with daemon.client() as client:
        status = client.call(lambda i: Status(id=i))
        assert isinstance(status, StatusReply)
        assert next(m for m in status.models if m.name == "demo").vision is False
        cases = [
            ([ImagePart(data=png(), name="cat.png")], "model 'demo' does not take images"),
            ([ImagePart(data=b"%PDF-1.4", name="cat.png")], "cat.png is a PDF; attach a PNG"),
            ([ImagePart(data=b"", name="e.png")], "e.png is empty"),
        ]
        for parts, expected in cases:
            with pytest.raises(RequestFailed) as refused:
                chat(client, content=parts)
            assert refused.value.error.code == "bad_request"
            assert expected in str(refused.value)
    listing = daemon.ctl("history", "list", "--json")
    assert json.loads(listing.stdout) == []
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    result = daemon.ctl("chat", "--image", str(not_an_image), "what is this?")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "PNG, JPEG, WebP or GIF" in result.stderr


# -------------------------------------------------------------- llama-tui


def test_tui_attaches_an_image_asks_before_a_tool_and_shows_the_call(
    make_llamad: MakeLlamad,
    tmp_path: Path,
    tui: Callable[..., Tmux],  # noqa: F811 - the fixture imported above
) -> None:
    daemon, record = scripted_daemon(
        make_llamad,
        tmp_path,
        [
            {"tool_calls": [{"name": "calculator", "arguments": {"expression": "2**64"}}]},
            {"text": "The answer is 18446744073709551616"},
        ],
        model_extra='tools = ["calculator"]\n',
        tools_extra="[tools.calculator]\nconfirm = true\n",
        vision=True,
    )
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "kitten.png").write_bytes(png((320, 200)))
    screen = tui(daemon)
    screen.wait_for("scripted")
    screen.type(f"/image {tmp_path}/pic")
    screen.send("Tab")  # completes the folder...
    screen.wait_for("/pictures/")  # the input shows its end when it is long
    screen.send("Tab")  # ...then the only file in it
    screen.wait_for("kitten.png")
    screen.send("Enter")
    screen.wait_for("attached: kitten.png")
    screen.type("what is 2**64?")
    screen.send("Enter")
    screen.wait_for("[image: kitten.png 320×200]")
    screen.wait_for("Allow calculator(2**64)? y / n")
    screen.type("x")  # a stray key does not answer
    time.sleep(0.2)
    assert "Allow calculator(2**64)? y / n" in screen.screen()
    screen.type("y")
    shown = screen.wait_for("The answer is 18446744073709551616")
    assert "▸ calculator(2**64) → 18446744073709551616" in shown
    screen.send("C-t")  # expanded: the arguments as the model wrote them
    screen.wait_for('arguments: {"expression": "2**64"}')
    first = requests_sent(record)[0]
    assert first["messages"][-1]["content"][1]["type"] == "image_url"


def test_reload_changes_tools_without_restarting_the_server(
    make_llamad: MakeLlamad, tmp_path: Path
) -> None:
    daemon, _ = scripted_daemon(make_llamad, tmp_path, [], model_extra="")
    pid = daemon.status("scripted").pid
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("args = ", 'tools = ["calculator"]\nargs = ', 1))
    reloaded = daemon.ctl("reload")
    assert "updated scripted (tools), server kept" in reloaded.stdout, reloaded.stderr
    status = daemon.status("scripted")
    assert (status.pid, status.tools) == (pid, ["calculator"])
