"""Storage faults: a map that is too small, and writes that fail.

The map: LMDB refuses a write that does not fit its memory map; the store then
doubles the map and retries, so a tiny map only costs time. llamad itself opens
the history with 64 MiB and has no setting for it, so the drill runs twice: on
the store directly with a tiny map, and through a running llamad pushed past
its 64 MiB.

Failing writes: tests may run as root, for whom permission bits and read-only
directories mean nothing. A file-size limit (RLIMIT_FSIZE, set on the running
llamad with prlimit) stops root too: a write that would grow the LMDB file past
it fails with EFBIG, exactly like a full disk. (CPython ignores SIGXFSZ, so the
daemon sees the error instead of dying of the signal.)
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from llamactl.client import RequestFailed
from llamad.history import HistoryStore
from llamad.protocol import (
    Chat,
    ChatDone,
    ChatOptions,
    Conversation,
    ConversationReply,
    Conversations,
    GetConversation,
    ListConversations,
    Message,
    RenameConversation,
    Status,
    StatusReply,
    TextPart,
)
from tests.conftest import Llamad, demo_config, ready_daemon
from tests.faults.other_user import require_root
from tests.faults.util import MakeLlamad

pytestmark = pytest.mark.server

MiB = 2**20


# ------------------------------------------------------------ a tiny map


def test_tiny_map_grows_under_concurrent_writers_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "history"
    tiny = 64 * 1024
    with HistoryStore(path, map_size=tiny) as store:
        conversations = [
            store.create_conversation(model="demo", system_prompt=None) for _ in range(4)
        ]
        expected: dict[str, list[str]] = {c.id: [] for c in conversations}

        def writer(conversation: str, worker: int) -> None:
            # What a chat does: the user message, a placeholder, flushes that
            # grow the reply, the final commit. One value is bigger than the
            # whole starting map.
            for turn in range(15):
                user = f"{worker}.{turn} " + "question " * 50
                store.append_message(conversation, role="user", parts=[TextPart(text=user)])
                reply = store.append_message(
                    conversation, role="assistant", parts=[], status="incomplete"
                )
                text = ""
                for piece in range(5):
                    text += f"[{piece}]" + "answer " * (200 if turn != 7 else 40000)
                    store.update_message(conversation, reply.seq, parts=[TextPart(text=text)])
                store.update_message(conversation, reply.seq, status="complete")
                expected[conversation] += [user, text]

        threads = [
            threading.Thread(target=writer, args=(c.id, n)) for n, c in enumerate(conversations)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert store.map_size >= 16 * tiny  # grew, several times
    # Reopened with the tiny size again: the file's own size wins, all is there.
    with HistoryStore(path, map_size=tiny) as store:
        for conversation, texts in expected.items():
            messages = store.all_messages(conversation)
            assert [m.text for m in messages] == texts
            assert all(m.status == "complete" for m in messages)


def test_llamad_grows_its_map_past_64_mib_and_keeps_everything(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    ids = []
    with daemon.client(timeout=60) as client:
        for n in range(20):
            messages = list(
                client.stream(
                    lambda i: Chat(id=i, content=f"chat {n}", options=ChatOptions(max_tokens=4))  # noqa: B023
                )
            )
            done = messages[-1]
            assert isinstance(done, ChatDone)
            ids.append(done.message.conversation)
        # 20 titles of 4 MiB: 80 MiB of live data in a 64 MiB map.
        titles = {conversation: f"{n:02d} " + "t" * (4 * MiB) for n, conversation in enumerate(ids)}
        for conversation, title in titles.items():
            client.call(lambda i: RenameConversation(id=i, conversation=conversation, title=title))  # noqa: B023
    data_file = daemon.runtime_dir / "data" / "history.lmdb" / "data.mdb"
    assert data_file.stat().st_size > 64 * MiB  # the map grew to hold it

    def check(daemon: Llamad) -> None:
        with daemon.client(timeout=60) as client:
            for conversation, title in titles.items():
                reply = client.call(lambda i: GetConversation(id=i, conversation=conversation))  # noqa: B023
                assert isinstance(reply, ConversationReply)
                assert reply.conversation.title == title
                assert [m.status for m in reply.messages] == ["complete", "complete"]

    check(daemon)
    assert daemon.stop() == 0
    daemon.start()  # reopens the grown store
    check(daemon)


# -------------------------------------------------------------- failed writes


Stored = tuple[Conversation, list[Message]]


def _snapshot(daemon: Llamad) -> dict[str, Stored]:
    """Every conversation with every message, as llamad reads them back."""
    with daemon.client() as client:
        page = client.call(lambda i: ListConversations(id=i, limit=100))
        assert isinstance(page, Conversations)
        stored = {}
        for conversation in page.conversations:
            target = conversation.id
            reply = client.call(lambda i: GetConversation(id=i, conversation=target))  # noqa: B023
            assert isinstance(reply, ConversationReply)
            stored[target] = (reply.conversation, reply.messages)
    return stored


def _chat(daemon: Llamad, content: str, conversation: str | None = None) -> ChatDone:
    with daemon.client(timeout=60) as client:
        messages = list(
            client.stream(
                lambda i: Chat(
                    id=i,
                    content=content,
                    conversation=conversation,
                    options=ChatOptions(max_tokens=8),
                )
            )
        )
    done = messages[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete", done
    return done


def test_failed_disk_write_is_one_clear_error_and_damages_nothing(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = ready_daemon(make_llamad, demo_models)
    first = _chat(daemon, "first conversation").message.conversation
    _chat(daemon, "and its second turn", conversation=first)
    _chat(daemon, "second conversation")
    before = _snapshot(daemon)
    assert len(before) == 2
    # The "disk" fills up: llamad may not grow any file past this size. Room
    # is left for its log and a small message; a big one cannot fit.
    data_file = daemon.runtime_dir / "data" / "history.lmdb" / "data.mdb"
    limit = max(data_file.stat().st_size, daemon.log_path.stat().st_size) + 1 * MiB
    big = "x" * (limit - data_file.stat().st_size + 2 * MiB)
    assert daemon.process is not None
    llamad = psutil.Process(daemon.process.pid)
    _, hard = llamad.rlimit(psutil.RLIMIT_FSIZE)
    llamad.rlimit(psutil.RLIMIT_FSIZE, (limit, hard))
    try:
        # Continuing a conversation and starting one: both refused, code storage.
        for conversation in (first, None):
            with daemon.client() as client, pytest.raises(RequestFailed) as refused:
                client.call(lambda i: Chat(id=i, content=big, conversation=conversation))  # noqa: B023
            error = refused.value.error
            assert error.code == "storage"
            assert "\n" not in error.message
            assert error.message.startswith("cannot write chat history to ")
            # (LMDB reports the short write past the limit as an I/O error.)
            assert error.message.endswith("nothing already stored was changed")
        # llamactl prints it as one line and exits 1.
        result = subprocess.run(
            [sys.executable, "-m", "llamactl", "chat", "-c", first],
            input=big,
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "cannot write chat history" in result.stderr
        # The daemon carries on: status answers, stored conversations read back
        # identical, and a chat that fits still works.
        with daemon.client() as client:
            assert isinstance(client.call(lambda i: Status(id=i)), StatusReply)
        assert _snapshot(daemon) == before  # nothing changed, nothing littered
        during = _chat(daemon, "a small one", conversation=first)
    finally:
        llamad.rlimit(psutil.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    after = _snapshot(daemon)
    assert after.keys() == before.keys()
    old_messages, new_messages = before[first][1], after[first][1]
    assert new_messages[: len(old_messages)] == old_messages
    assert [m.text for m in new_messages[len(old_messages) :]] == [
        "a small one",
        during.message.text,
    ]
    others = [c for c in before if c != first]
    assert all(after[c] == before[c] for c in others)
    assert "Traceback" not in daemon.log()
    # And on disk, read by a fresh llamad: the same.
    assert daemon.stop() == 0
    daemon.start()
    assert _snapshot(daemon) == after


# ------------------------------------------------------ a full disk, a read-only one

REPO = Path(__file__).resolve().parents[2]

FILL_THE_DISK = r"""
import sys
from pathlib import Path
from llamad.errors import HistoryWriteError
from llamad.history import HistoryStore
from llamad.protocol import TextPart
store = HistoryStore(Path(sys.argv[1]) / "history.lmdb", map_size=8 * 2**20)
conversation = store.create_conversation(model="demo", system_prompt=None)
stored = 0
try:
    for n in range(1000):
        store.append_message(conversation.id, role="user", parts=[TextPart(text="x" * 100_000)])
        stored += 1
except HistoryWriteError as exc:
    print(exc)
store.close()
store = HistoryStore(Path(sys.argv[1]) / "history.lmdb", map_size=8 * 2**20)
assert len(store.all_messages(conversation.id)) == stored
"""


def test_a_full_disk_is_called_a_full_disk() -> None:
    """A 2 MiB file system (tmpfs, in a private mount namespace) fills up: LMDB
    says `mdb_txn_commit: Input/output error`; llamad says the disk is full."""
    require_root()
    where = Path(tempfile.mkdtemp(prefix="llamad-full-", dir="/var/tmp"))
    try:
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount -t tmpfs -o size=2m tmpfs {where} && exec "$0" -c "$1" {where}',
                sys.executable,
                FILL_THE_DISK,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(where, ignore_errors=True)
    assert done.returncode == 0, done.stderr  # and what was stored reads back
    line = done.stdout.strip()
    assert line.startswith(f"cannot write chat history to {where}/history.lmdb: the disk is full (")
    assert "MiB free where the history is stored); free some space" in line
    assert line.endswith("nothing already stored was changed")


def test_a_read_only_data_directory_costs_only_the_history(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """llamad starts and supervises; chats and history requests are refused with
    the reason and the fix; `health` says WARNING (exit 1)."""
    require_root()
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\n')
    data = daemon.runtime_dir / "data"
    data.mkdir(mode=0o700)
    command = [sys.executable, "-m", "llamad", "--config", str(daemon.config_path)]
    with daemon.log_path.open("ab") as log:
        daemon.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount --bind -o ro {data} {data} && exec "$@"',
                "sh",
                *command,
            ],
            env=daemon.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon.wait_listening()
    daemon.wait_for("demo", lambda s: s.state == "ready")  # supervision goes on
    reason = (
        f"chat history is unavailable (cannot write to {data}/history.lmdb: Read-only file "
        f"system); make {data} writable or set [daemon] data_dir, then restart llamad"
    )
    with daemon.client() as client:
        for request in (
            lambda i: Chat(id=i, content="hello"),
            lambda i: ListConversations(id=i),
        ):
            with pytest.raises(RequestFailed) as refused:
                client.call(request)
            assert refused.value.error.code == "history_unavailable"
            assert refused.value.error.message == reason
        assert isinstance(client.call(lambda i: Status(id=i)), StatusReply)
    chat = daemon.ctl("chat", "hello")
    assert chat.returncode == 1 and chat.stderr == f"llamactl: {reason}\n"
    health = daemon.ctl("health")
    assert health.returncode == 1, health.stdout + health.stderr
    assert "history is unavailable" in health.stdout
    assert daemon.ctl("status").returncode == 0
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0
