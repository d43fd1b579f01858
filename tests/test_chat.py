"""Chat through llamad with the real llama-server: streaming, storage, several at once."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llamactl.client import Client
from llamad.history import HistoryStore
from llamad.protocol import (
    Cancel,
    Chat,
    ChatDelta,
    ChatDone,
    ChatOptions,
    ChatStarted,
    ContextTrimmed,
    ConversationReply,
    Conversations,
    GetConversation,
    ListConversations,
    QueuePosition,
    SearchHistory,
    SearchResults,
    ServerMessage,
    StateChanged,
    TextPart,
    Watch,
)
from tests.conftest import Llamad, demo_config, ready_daemon

pytestmark = pytest.mark.server

MakeLlamad = Callable[..., Llamad]
# The demo model writes ~10,000 tokens/s alone: "long" has to be really long.
LONG = ChatOptions(max_tokens=1500, ignore_eos=True, seed=7)


def run_chat(client: Client, **fields: object) -> list[ServerMessage]:
    return list(client.stream(lambda i: Chat(id=i, **fields)))  # type: ignore[arg-type]


def test_chat_streams_and_is_stored(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    result = daemon.ctl("chat", "-v", "--max-tokens", "24", "--seed", "3", "hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "24 tokens" in result.stderr and "tokens/s" in result.stderr
    listing = json.loads(daemon.ctl("history", "list", "--json").stdout)
    assert len(listing) == 1 and listing[0]["title"] == "hello there"
    conversation = listing[0]["id"]
    shown = daemon.ctl("history", "show", conversation[:8])
    assert shown.returncode == 0
    assert "user:\nhello there" in shown.stdout
    with daemon.client() as client:
        reply = client.call(lambda i: GetConversation(id=i, conversation=conversation))
    assert isinstance(reply, ConversationReply)
    _user, assistant = reply.messages
    assert assistant.status == "complete" and assistant.model == "demo"
    assert assistant.text == result.stdout.rstrip("\n")
    assert assistant.stats is not None
    assert assistant.stats.completion_tokens == 24
    assert assistant.stats.time_to_first_token_ms is not None
    # Continuing the conversation by prefix sends the history along.
    again = daemon.ctl("chat", "-c", conversation[:10], "--max-tokens", "5", "and again")
    assert again.returncode == 0, again.stderr
    with daemon.client() as client:
        reply = client.call(lambda i: GetConversation(id=i, conversation=conversation))
    assert isinstance(reply, ConversationReply)
    assert [m.role for m in reply.messages] == ["user", "assistant", "user", "assistant"]
    assert reply.messages[3].stats is not None
    assert reply.messages[3].stats.prompt_tokens is not None
    assert reply.messages[3].stats.prompt_tokens > reply.messages[1].stats.prompt_tokens  # type: ignore[union-attr]


def test_two_clients_on_one_conversation_see_the_same_deltas(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    with daemon.client() as first:
        started = run_chat(first, content="start", options=ChatOptions(max_tokens=3))
    conversation = next(m for m in started if isinstance(m, ChatStarted)).conversation.id
    watched: list[str] = []
    with daemon.client(timeout=60) as watcher:
        stream = watcher.events(lambda i: Watch(id=i, conversation=conversation))
        next(stream)  # Ok

        def watch() -> None:
            for message in stream:
                if isinstance(message, ChatDelta):
                    watched.append(message.text)
                if isinstance(message, ChatDone):
                    return

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        with daemon.client() as chatter:
            messages = run_chat(
                chatter,
                content="go on",
                conversation=conversation,
                options=ChatOptions(max_tokens=200, ignore_eos=True),
            )
        thread.join(timeout=30)
    own = [m.text for m in messages if isinstance(m, ChatDelta)]
    assert own and watched == own
    done = messages[-1]
    assert isinstance(done, ChatDone) and done.message.text == "".join(own)


def test_four_conversations_stream_together_and_a_fifth_queues(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    # 4 slots share one unified KV cache: room for four 1,500-token replies.
    daemon = ready_daemon(make_llamad, demo_models, parallel=4, ctx_size=20480)
    results: dict[int, list[tuple[float, ServerMessage]]] = {}

    def one(index: int) -> None:
        with daemon.client(timeout=60) as client:
            results[index] = [
                (time.monotonic(), m)
                for m in client.stream(lambda i: Chat(id=i, content=f"chat {index}", options=LONG))
            ]

    threads = [threading.Thread(target=one, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # a stable arrival order for the queue
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 5
    for messages in results.values():
        done = messages[-1][1]
        assert isinstance(done, ChatDone)
        assert done.message.status == "complete", done.message.error
        assert done.message.stats is not None and done.message.stats.completion_tokens == 1500
    # Four streamed at the same time; the one that found every slot busy was told
    # it is first in line.
    first_delta = {n: next(t for t, m in results[n] if isinstance(m, ChatDelta)) for n in range(5)}
    finished = {n: results[n][-1][0] for n in range(5)}
    positions = {
        n: [m.position for _, m in results[n] if isinstance(m, QueuePosition)] for n in range(5)
    }
    queued = [n for n in range(5) if positions[n]]
    assert len(queued) == 1 and positions[queued[0]] == [1]
    waiter = queued[0]
    together = [n for n in range(5) if n != waiter]
    assert max(first_delta[n] for n in together) < min(finished[n] for n in together)
    # Which one waits, and that it waits its turn, is SlotQueue's job: see test_slots.py.


def _wait_slots_idle(socket_path: str) -> float:
    """When llama-server reports no slot processing (polled every 2 ms)."""
    transport = httpx.HTTPTransport(uds=socket_path)
    with httpx.Client(transport=transport, base_url="http://x", timeout=5) as client:
        while any(slot["is_processing"] for slot in client.get("/slots").json()):
            time.sleep(0.002)
    return time.monotonic()


def test_cancel_keeps_what_came(make_llamad: MakeLlamad, demo_models: dict[str, Path]) -> None:
    daemon = ready_daemon(make_llamad, demo_models, ctx_size=8192)
    with daemon.client(timeout=60) as client, daemon.client() as canceller:
        stream = client.stream(lambda i: Chat(id=i, content="talk", options=LONG))
        received: list[str] = []
        conversation = ""
        for message in stream:
            if isinstance(message, ChatStarted):
                conversation = message.conversation.id
            if isinstance(message, ChatDelta):
                received.append(message.text)
                if len(received) == 20:
                    endpoint = daemon.status("demo").endpoint
                    idle_at: list[float] = []
                    poller = threading.Thread(
                        target=lambda: idle_at.append(_wait_slots_idle(endpoint))  # noqa: B023
                    )
                    began = time.monotonic()
                    poller.start()
                    target = conversation
                    canceller.call(lambda i: Cancel(id=i, conversation=target))  # noqa: B023
            if isinstance(message, ChatDone):
                stopped_after = time.monotonic() - began
                done = message
    poller.join(timeout=10)
    assert done.message.status == "cancelled"
    # llama-server itself stopped generating: typically within ~20 ms here; the
    # bound is loose because a busy CI machine is not a benchmark.
    assert idle_at[0] - began < 0.5
    assert done.message.text == "".join(received)
    assert 20 <= len(received) < 1500
    assert stopped_after < 0.5
    with daemon.client() as client:
        stored = client.call(lambda i: GetConversation(id=i, conversation=conversation))
    assert isinstance(stored, ConversationReply)
    assert stored.messages[-1].status == "cancelled"
    assert stored.messages[-1].text == "".join(received)


def test_chat_naming_another_model_loads_it_beside_the_first(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    with daemon.client(timeout=60) as client:
        messages = run_chat(client, content="hi", model="demo-b", options=ChatOptions(max_tokens=5))
    states = [(m.model.name, m.model.state) for m in messages if isinstance(m, StateChanged)]
    assert ("demo-b", "starting") in states and ("demo-b", "ready") in states
    done = messages[-1]
    assert isinstance(done, ChatDone)
    assert done.message.status == "complete" and done.message.model == "demo-b"
    assert daemon.status("demo").state == "ready"  # room for both: nothing was unloaded


def test_a_conversation_continues_with_its_own_model(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    first = daemon.ctl("chat", "-v", "-m", "demo-b", "--max-tokens", "3", "hi")
    assert first.returncode == 0, first.stderr
    conversation = json.loads(daemon.ctl("history", "list", "--json").stdout)[0]["id"]
    # The user moves on to demo, and even unloads demo-b...
    assert daemon.ctl("load", "--only", "demo").returncode == 0
    assert daemon.status("demo-b").state == "stopped"
    again = daemon.ctl("chat", "-v", "-c", conversation[:13], "--max-tokens", "3", "and?")
    assert again.returncode == 0, again.stderr
    # ...but the conversation is answered by its own model, loaded for it.
    assert again.stderr.rstrip().splitlines()[-1].startswith("[demo-b · complete")
    assert daemon.status("demo-b").state == "ready"
    # A new conversation goes to the model loaded last.
    fresh = daemon.ctl("chat", "-v", "--max-tokens", "3", "hello")
    assert fresh.stderr.rstrip().splitlines()[-1].startswith("[demo · complete")


def test_unknown_model_is_refused_before_anything_is_stored(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    result = daemon.ctl("chat", "-m", "nope", "hi")
    assert result.returncode == 1
    assert "unknown model 'nope'" in result.stderr
    assert json.loads(daemon.ctl("history", "list", "--json").stdout) == []


def test_llamad_killed_mid_reply_keeps_the_partial_reply(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models, ctx_size=65536)
    options = ChatOptions(max_tokens=60000, ignore_eos=True)
    deltas = 0
    with daemon.client(timeout=60) as client:
        began = 0.0
        for message in client.stream(lambda i: Chat(id=i, content="a long one", options=options)):
            if isinstance(message, ChatStarted):
                conversation = message.conversation.id
            if isinstance(message, ChatDelta):
                deltas += 1
                began = began or time.monotonic()
                if time.monotonic() - began > 0.8:  # past at least one 0.5 s flush
                    daemon.stop(signal.SIGKILL)
                    break
    daemon.start()
    with daemon.client() as client:
        stored = client.call(lambda i: GetConversation(id=i, conversation=conversation))
    assert isinstance(stored, ConversationReply)
    user, reply = stored.messages
    assert user.text == "a long one" and user.status == "complete"
    assert reply.status == "incomplete"
    assert len(reply.text) > 0
    assert len(daemon.children()) == 1


def test_list_and_search_over_a_thousand_conversations(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    data = daemon.runtime_dir / "data"
    data.mkdir()
    with HistoryStore(data / "history.lmdb") as store:
        for n in range(1000):
            conversation = store.create_conversation(model="demo", system_prompt=None)
            store.append_message(
                conversation.id, role="user", parts=[TextPart(text=f"question number {n}")]
            )
            word = "Needle" if n % 100 == 0 else "hay"
            store.append_message(
                conversation.id, role="assistant", parts=[TextPart(text=f"answer {n} {word}")]
            )
    daemon.start()
    with daemon.client() as client:
        page = client.call(lambda i: ListConversations(id=i, limit=50))
        assert isinstance(page, Conversations)
        assert [c.title for c in page.conversations[:2]] == [
            "question number 999",
            "question number 998",
        ]
        assert page.next is not None
        after = client.call(lambda i: ListConversations(id=i, limit=50, before=page.next))
        assert isinstance(after, Conversations)
        assert after.conversations[0].title == "question number 949"
        found = client.call(lambda i: SearchHistory(id=i, text="NEEDLE"))
        assert isinstance(found, SearchResults)
        assert len(found.hits) == 10
        assert all("Needle" in hit.snippet and hit.role == "assistant" for hit in found.hits)
    cli = daemon.ctl("history", "search", "needle")
    assert cli.returncode == 0 and cli.stdout.count("Needle") == 10


def test_long_history_is_trimmed_to_fit_the_context(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models, ctx_size=256)
    # The demo vocabulary spells most words letter by letter: ~90 tokens a turn,
    # so three turns overflow a 256-token context.
    filler = "the word " * 10
    conversation = None
    trimmed: list[int] = []
    for turn in range(4):
        with daemon.client(timeout=60) as client:
            messages = run_chat(
                client,
                content=f"{turn} {filler}",
                conversation=conversation,
                options=ChatOptions(max_tokens=4, ignore_eos=True),
            )
        started = next(m for m in messages if isinstance(m, ChatStarted))
        conversation = started.conversation.id
        trimmed += [m.dropped_turns for m in messages if isinstance(m, ContextTrimmed)]
        done = messages[-1]
        assert isinstance(done, ChatDone)
        assert done.message.status == "complete", done.message.error
    assert trimmed and all(n >= 1 for n in trimmed)


def test_a_message_too_big_for_the_context_is_a_clear_error(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models, ctx_size=256)
    result = daemon.ctl("chat", "the word " * 400)
    assert result.returncode == 1
    assert "raise ctx_size" in result.stderr
    assert "HTTP" not in result.stderr  # never a raw llama-server refusal
    assert result.stderr.count("\n") == 1  # one line
    assert daemon.ctl("status").returncode == 0
