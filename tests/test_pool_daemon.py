"""The model pool through the real daemon and the real llama-server.

Budgets are set from the daemon's own estimates of the demo models, so "room
for two" means exactly that on any machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from llamad.protocol import Chat, ChatDone, ChatOptions, ServerMessage
from tests.conftest import Llamad, demo_config

MakeLlamad = Callable[..., Llamad]


def three_models(demo_models: dict[str, Path], **overrides: object) -> dict[str, Path]:
    third = demo_models["demo"].with_name("demo-c.gguf")
    if not third.exists():
        shutil.copy(demo_models["demo"], third)
    return {**demo_models, "demo-c": third}


def estimates(daemon: Llamad) -> dict[str, int]:
    status = json.loads(daemon.ctl("status", "--json").stdout)
    return {m["name"]: m["memory"]["estimated_host"] for m in status["models"]}


def set_budget(daemon: Llamad, extra: str) -> None:
    text = daemon.config_path.read_text().replace("[daemon]\n", f"[daemon]\n{extra}\n", 1)
    daemon.config_path.write_text(text)
    reloaded = daemon.ctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr


def load(daemon: Llamad, *args: str) -> subprocess.CompletedProcess[str]:
    result = daemon.ctl("load", *args)
    assert "Traceback" not in result.stderr
    return result


def states(daemon: Llamad) -> dict[str, str]:
    status = json.loads(daemon.ctl("status", "--json").stdout)
    return {m["name"]: m["state"] for m in status["models"]}


def test_a_third_model_evicts_the_least_recently_used_idle_one(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(three_models(demo_models)))
    daemon.start()
    sizes = estimates(daemon)
    room_for_two = sizes["demo"] + sizes["demo-b"] + sizes["demo-c"] // 2
    set_budget(daemon, f'memory_budget = "{room_for_two}"')
    assert load(daemon, "demo").returncode == 0
    assert load(daemon, "demo-b").returncode == 0
    assert states(daemon) == {"demo": "ready", "demo-b": "ready", "demo-c": "stopped"}
    chat = daemon.ctl("chat", "-m", "demo", "--max-tokens", "2", "hi")  # demo used last
    assert chat.returncode == 0, chat.stderr
    third = load(daemon, "demo-c")
    assert third.returncode == 0, third.stderr
    # The load says what it evicted and why.
    assert "demo-b: stopping (evicted for demo-c)" in third.stderr
    assert states(daemon) == {"demo": "ready", "demo-b": "stopped", "demo-c": "ready"}
    assert len(daemon.children()) == 2
    ps = daemon.ctl("ps")
    assert ps.returncode == 0
    lines = ps.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "STATE", "MEMORY"]
    assert {line.split()[0] for line in lines[1:3]} == {"demo", "demo-c"}
    assert lines[-1].startswith("memory ") and "used of" in lines[-1]


def _stream(daemon: Llamad, model: str, tokens: int, out: list[ServerMessage]) -> None:
    with daemon.client(timeout=120) as client:
        options = ChatOptions(max_tokens=tokens, ignore_eos=True)
        out.extend(client.stream(lambda i: Chat(id=i, content="go", model=model, options=options)))


def test_a_streaming_chat_is_never_cut_by_a_load_that_needs_its_room(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models), "max_models = 1\n")
    daemon.start()
    assert load(daemon, "demo").returncode == 0
    messages: list[ServerMessage] = []
    chatting = threading.Thread(target=_stream, args=(daemon, "demo", 400, messages))
    chatting.start()
    deadline = time.monotonic() + 30
    while daemon.status("demo").in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    result = load(daemon, "demo-b")  # waits for the chat, then evicts demo
    waited = time.monotonic() - began
    chatting.join(timeout=120)
    assert result.returncode == 0, result.stderr
    done = messages[-1]
    assert isinstance(done, ChatDone)
    assert done.message.status == "complete"
    assert done.message.stats is not None and done.message.stats.completion_tokens == 400
    assert waited > 0.1
    assert states(daemon) == {"demo": "stopped", "demo-b": "ready"}


def test_idle_models_unload_and_pinned_ones_stay(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    body = demo_config(demo_models).replace(
        "[models.demo]\n", "[models.demo]\npinned = true\nttl_sec = 0.5\n", 1
    )
    daemon = make_llamad(body, "ttl_sec = 1\n")
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")  # pinned: loaded at start
    assert load(daemon, "demo-b").returncode == 0
    unload_at = daemon.status("demo-b").unload_at
    assert unload_at is not None and 0 < unload_at - time.time() <= 1.5
    stopped = daemon.wait_for("demo-b", lambda s: s.state == "stopped", timeout=10)
    assert stopped.reason == "idle for 1 s"
    time.sleep(1)
    assert daemon.status("demo").state == "ready"  # pinned: its ttl does not apply
    health = daemon.ctl("health")
    assert health.returncode == 0, health.stdout  # an idle unload is planned, not a failure


def test_a_corrupt_model_is_refused_before_anything_is_evicted(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(os.urandom(100_000))
    body = demo_config(demo_models) + f'[models.corrupt]\npath = "{corrupt}"\n'
    daemon = make_llamad(body, 'default_model = "demo"\nmax_models = 1\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    refused = load(daemon, "corrupt")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"llamactl: model 'corrupt' failed: {corrupt} is not a GGUF model file (a GGUF file "
        "begins with the letters GGUF); fix its path in models.toml"
    )
    assert daemon.status("demo").state == "ready"
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_model_that_dies_loading_says_why_in_llama_servers_words(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(demo_models["demo"].read_bytes()[:20_000])  # a GGUF, cut short
    body = demo_config(demo_models) + f'[models.broken]\npath = "{broken}"\nrestart = "no"\n'
    daemon = make_llamad(body, 'default_model = "demo"\nmax_models = 1\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    refused = load(daemon, "broken")
    assert refused.returncode == 1
    # Followed by llama-server's own line, read although it exits at once.
    assert re.search(
        r"before it was ready: .*(failed to load|corrupted|model loading error)", refused.stderr
    )
    # demo was evicted to make room, and comes back.
    daemon.wait_for("demo", lambda s: s.state == "ready")


def test_what_the_user_loaded_comes_back_after_a_restart(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    assert load(daemon, "demo-b").returncode == 0
    assert daemon.stop() == 0
    daemon.start()
    daemon.wait_for("demo-b", lambda s: s.state == "ready")
    assert daemon.status("demo").state == "stopped"
    chat = daemon.ctl("chat", "-v", "--max-tokens", "2", "hi")
    assert chat.stderr.rstrip().splitlines()[-1].startswith("[demo-b · complete")


def test_health_is_never_critical_through_a_switch(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models), 'default_model = "demo"\nmax_models = 1\n')
    daemon.start()
    daemon.wait_for("demo", lambda s: s.state == "ready")
    codes: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            result = subprocess.run(
                [sys.executable, "-m", "llamactl", "health"],
                env=daemon.env,
                capture_output=True,
                check=False,
            )
            codes.append(result.returncode)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for name in ("demo-b", "demo", "demo-b", "demo"):
            assert load(daemon, name).returncode == 0
    finally:
        stop.set()
        watcher.join()
    assert codes and 2 not in codes and 3 not in codes
    assert daemon.ctl("health").returncode == 0
    one = daemon.ctl("health", "demo-b")
    assert (one.returncode, one.stdout.strip()) == (
        1,
        "WARNING: demo-b is not loaded (evicted for demo)",
    )
    assert daemon.ctl("health", "demo").returncode == 0
