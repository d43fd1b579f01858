"""Workers and remote models through the real daemon, with the real binaries on loopback.

Two supervised ggml-rpc-servers and a demo model split across them (every layer
offloaded, so the weights really live in the workers); a worker SIGKILLed under
a chat; a model whose worker is absent; a model served by another server;
a llamad with only workers. The network-namespace test at the end puts a
worker behind a real network interface.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from llamad.protocol import (
    Chat,
    ChatDone,
    ChatOptions,
    ConversationReply,
    GetConversation,
    ServerMessage,
    Status,
    StatusReply,
    WorkerStatus,
)
from tests.conftest import Llamad, demo_config, free_port
from tests.test_daemon_systemd import _datagrams
from tests.test_remote import start_llama_server

MakeLlamad = Callable[..., Llamad]


def workers(daemon: Llamad) -> dict[str, WorkerStatus]:
    with daemon.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    return {w.name: w for w in reply.workers}


def wait_worker(
    daemon: Llamad, name: str, predicate: Callable[[WorkerStatus], bool], timeout: float = 30
) -> WorkerStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = workers(daemon)[name]
        if predicate(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last {status}\n{daemon.log()[-3000:]}")
        time.sleep(0.02)


def split_config(demo: Path, ports: tuple[int, int]) -> str:
    # GGML_RPC_DEBUG: the workers log each buffer and tensor they receive.
    debug = 'env = { GGML_RPC_DEBUG = "1" }\n'
    return (
        f"[workers.w1]\nport = {ports[0]}\nthreads = 1\n{debug}"
        f"[workers.w2]\nport = {ports[1]}\nthreads = 1\n{debug}"
        f'[models.split]\npath = "{demo}"\nworkers = ["w1", "w2"]\nn_gpu_layers = 99\n'
        'ctx_size = 8192\nargs = ["--threads", "1"]\n'
    )


def chat(daemon: Llamad, model: str, tokens: int, out: list[ServerMessage]) -> None:
    with daemon.client(timeout=120) as client:
        options = ChatOptions(max_tokens=tokens, ignore_eos=True)
        out.extend(client.stream(lambda i: Chat(id=i, content="go", model=model, options=options)))


def test_a_model_split_over_two_workers_answers_and_outlives_a_lost_worker(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    ports = (free_port(), free_port())
    daemon = make_llamad(split_config(demo_models["demo"], ports), "restart_sec = 0.05\n")
    daemon.start()
    for name in ("w1", "w2"):
        wait_worker(daemon, name, lambda w: w.state == "ready")
    loaded = daemon.ctl("load", "split")
    assert loaded.returncode == 0, loaded.stderr + daemon.log()[-3000:]
    answer = daemon.ctl("chat", "-m", "split", "--max-tokens", "8", "hello")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr

    # The layers went to the workers: each says it received weights and computed.
    server = daemon.status("split")
    assert server.rpc == [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]
    for name in ("w1", "w2"):
        logs = daemon.ctl("logs", name, "-n", "1000").stdout
        assert "[alloc_buffer] device: 0, size:" in logs, logs[-2000:]
        assert "[set_tensor]" in logs and "[graph_compute]" in logs, logs[-2000:]
    before = workers(daemon)
    assert {w.serving for w in before.values()} == {"split"}
    assert all(w.used_by == ["split"] and w.devices and w.version for w in before.values())
    ps = daemon.ctl("ps").stdout
    assert "WORKER" in ps and f"127.0.0.1:{ports[1]}" in ps

    # w2 is SIGKILLed while a reply streams: the reply ends with the reason, what came
    # is kept, the model backs off naming w2, and is back once w2's supervisor restarted it.
    messages: list[ServerMessage] = []
    chatting = threading.Thread(target=chat, args=(daemon, "split", 50_000, messages))
    chatting.start()
    daemon.wait_for("split", lambda s: s.in_flight == 1)
    time.sleep(0.3)  # a reply that fills the 8,192-token context takes several seconds
    assert chatting.is_alive()
    w2 = before["w2"].pid
    assert w2 is not None
    os.kill(w2, signal.SIGKILL)
    backoff = daemon.wait_for("split", lambda s: s.state == "backoff", timeout=10)
    assert backoff.reason.startswith(f"worker w2 (127.0.0.1:{ports[1]}) went away"), backoff
    chatting.join(timeout=60)
    done = messages[-1]
    assert isinstance(done, ChatDone), messages[-3:]
    assert done.message.status == "error"
    assert f"worker w2 (127.0.0.1:{ports[1]}) went away" in done.message.error
    streamed = "".join(getattr(m, "text", "") for m in messages if type(m).__name__ == "ChatDelta")
    assert streamed and done.message.text == streamed
    with daemon.client() as client:
        stored = client.call(
            lambda i: GetConversation(id=i, conversation=done.message.conversation)
        )
    assert isinstance(stored, ConversationReply)
    assert stored.messages[-1].text == streamed  # nothing stored is lost

    ready = daemon.wait_for("split", lambda s: s.state == "ready", timeout=30)
    assert ready.restarts == 1
    assert wait_worker(daemon, "w2", lambda w: w.state == "ready").restarts == 1
    again = daemon.ctl("chat", "-m", "split", "--max-tokens", "8", "hello again")
    assert again.returncode == 0 and again.stdout.strip(), again.stderr
    assert daemon.ctl("health").returncode == 0


def test_a_model_whose_worker_is_absent_is_refused_before_anything_is_evicted(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    absent = f"127.0.0.1:{free_port()}"
    body = (
        f'[models.demo]\npath = "{demo_models["demo"]}"\nargs = ["--threads", "1"]\n'
        f'[models.split]\npath = "{demo_models["demo-b"]}"\nrpc = ["{absent}"]\n'
        "n_gpu_layers = 99\n"
    )
    daemon = make_llamad(body, "max_models = 1\n")
    daemon.start()
    assert daemon.ctl("load", "demo").returncode == 0
    pid = daemon.status("demo").pid
    refused = daemon.ctl("load", "split")
    assert refused.returncode != 0
    assert refused.stderr.strip() == (
        f"llamactl: model 'split' cannot start: worker {absent} is not answering: "
        "connection refused"
    )
    demo = daemon.status("demo")
    assert (demo.state, demo.pid, demo.expected) == ("ready", pid, True)
    status = workers(daemon)[absent]
    assert (status.local, status.state, status.used_by) == (False, "backoff", ["split"])


def test_a_remote_model_answers_and_comes_back_after_its_server_restarts(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], llama_server_binary: Path
) -> None:
    upstream, port = start_llama_server(llama_server_binary, demo_models["demo"], "upstream")
    try:
        body = (
            f'[models.far]\nurl = "http://127.0.0.1:{port}"\nremote_model = "upstream"\n'
            "health_interval_sec = 0.3\nhealth_failures = 2\n"
        )
        daemon = make_llamad(body)
        daemon.start()
        assert daemon.ctl("load", "far").returncode == 0
        answer = daemon.ctl("chat", "-m", "far", "--max-tokens", "8", "hello")
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
        far = daemon.status("far")
        assert far.remote and far.endpoint == f"http://127.0.0.1:{port}" and far.pid is None
        assert far.memory.estimated_host == 0
        upstream.kill()
        upstream.wait()
        down = daemon.wait_for(
            "far", lambda s: s.state == "backoff" and "starting again" in s.reason, timeout=15
        )
        assert down.reason.startswith(
            f"remote server http://127.0.0.1:{port} is not answering: connection refused"
        )
        health = daemon.ctl("health")
        assert health.returncode == 1 and "far restarting" in health.stdout
        upstream, _ = start_llama_server(
            llama_server_binary, demo_models["demo"], "upstream", port=port
        )
        daemon.wait_for("far", lambda s: s.state == "ready", timeout=15)
        again = daemon.ctl("chat", "-m", "far", "--max-tokens", "8", "hello again")
        assert again.returncode == 0 and again.stdout.strip(), again.stderr
        logs = daemon.ctl("logs", "far").stdout
        assert "answers again" in logs
    finally:
        upstream.kill()
        upstream.wait()


def test_a_llamad_with_only_workers_supervises_them_and_leaves_no_orphan(
    make_llamad: MakeLlamad,
) -> None:
    port = free_port()
    daemon = make_llamad(f"[workers.gpu0]\nport = {port}\nthreads = 1\n", "restart_sec = 0.05\n")
    daemon.start()
    first = wait_worker(daemon, "gpu0", lambda w: w.state == "ready")
    assert first.local and first.address == f"127.0.0.1:{port}"
    status = daemon.ctl("status")
    assert f"worker gpu0 127.0.0.1:{port}: ready" in status.stdout
    assert "no model loaded" not in status.stdout
    health = daemon.ctl("health")
    assert (health.returncode, health.stdout.strip()) == (0, "OK: worker gpu0 ready")
    logs = daemon.ctl("logs", "gpu0")
    assert "Starting RPC server v7" in logs.stdout
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    second = wait_worker(daemon, "gpu0", lambda w: w.state == "ready" and w.pid != first.pid)
    assert second.restarts == 1
    assert second.pid is not None
    pidfile = daemon.runtime_dir / "workers" / "gpu0.pid"
    assert pidfile.is_file()
    # llamad SIGKILLed: its worker goes with it (PR_SET_PDEATHSIG), nothing is orphaned.
    daemon.stop(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while psutil.pid_exists(second.pid) and psutil.Process(second.pid).status() != "zombie":
        assert time.monotonic() < deadline, "the worker outlived llamad"
        time.sleep(0.02)
    # The next llamad finds the pid file of a worker that is gone and starts afresh.
    daemon.start()
    third = wait_worker(daemon, "gpu0", lambda w: w.state == "ready")
    assert third.pid not in (first.pid, second.pid)
    assert daemon.stop() == 0
    assert not pidfile.exists()
    assert not psutil.pid_exists(third.pid or 0) or psutil.Process(third.pid).status() == "zombie"


# -------------------------------------------------- across a network interface


class Namespace:
    """A network namespace joined to this one by a veth pair: another machine, nearly."""

    def __init__(self, tag: str) -> None:
        self.name = f"llamad-t-{tag}"
        self.host_if, self.ns_if = f"lt{tag}h", f"lt{tag}n"
        octet = int(tag, 16) % 250 + 1
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def __enter__(self) -> Namespace:
        for command in (
            f"ip netns add {self.name}",
            f"ip netns exec {self.name} ip link set lo up",
            f"ip link add {self.host_if} type veth peer name {self.ns_if}",
            f"ip link set {self.ns_if} netns {self.name}",
            f"ip addr add {self.host_ip}/30 dev {self.host_if}",
            f"ip link set {self.host_if} up",
            f"ip netns exec {self.name} ip addr add {self.ns_ip}/30 dev {self.ns_if}",
            f"ip netns exec {self.name} ip link set {self.ns_if} up",
        ):
            subprocess.run(command.split(), check=True, capture_output=True)
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def test_a_worker_in_its_own_network_namespace_across_a_veth_link(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    assert os.geteuid() == 0, "this test needs root (ip netns): CI runs as root"
    port = free_port()
    with Namespace(f"{os.getpid() % 4096:03x}") as ns:
        # The worker host: a llamad with only a worker, listening on its veth address.
        worker_host = make_llamad(
            f'[workers.far]\nhost = "{ns.ns_ip}"\nport = {port}\nallow_network = true\n'
            "threads = 1\n",
            "restart_sec = 0.05\n",
        )
        assert worker_host.process is None
        with worker_host.log_path.open("ab") as log:
            worker_host.process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", ns.name, sys.executable, "-m", "llamad"),
                    *("--config", str(worker_host.config_path)),
                ],
                env=worker_host.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker_host.wait_listening()
        far = wait_worker(worker_host, "far", lambda w: w.state == "ready")
        assert "not on loopback: never expose the RPC server" in worker_host.log()
        # The model host, in this namespace, splits a model over it.
        address = f"{ns.ns_ip}:{port}"
        daemon = make_llamad(
            f'[models.split]\npath = "{demo_models["demo"]}"\nrpc = ["{address}"]\n'
            'n_gpu_layers = 99\nctx_size = 512\nargs = ["--threads", "1"]\n'
        )
        daemon.start()
        assert daemon.ctl("load", "split").returncode == 0, daemon.log()[-3000:]
        answer = daemon.ctl("chat", "-m", "split", "--max-tokens", "8", "hello")
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
        pid = daemon.status("split").pid
        assert pid is not None
        remote_ends = {
            (c.laddr.ip, c.raddr.ip)
            for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port
        }
        assert remote_ends == {(ns.host_ip, ns.ns_ip)}  # through the veth pair
        assert workers(worker_host)["far"].serving is None  # that llamad runs no model
        # The worker dies over there: the model here backs off naming it, and is back
        # once the worker host's llamad restarted it.
        assert far.pid is not None
        os.kill(far.pid, signal.SIGKILL)
        down = daemon.wait_for("split", lambda s: s.state == "backoff", timeout=10)
        assert down.reason.startswith(f"worker {address} closed its connection"), down
        daemon.wait_for("split", lambda s: s.state == "ready", timeout=30)
        again = daemon.ctl("chat", "-m", "split", "--max-tokens", "8", "hello again")
        assert again.returncode == 0 and again.stdout.strip(), again.stderr
        daemon.stop()
        worker_host.stop()


HTTP_API = "http" in StatusReply.__struct_fields__


@pytest.mark.skipif(
    not HTTP_API, reason="llamad's HTTP API (issue 13) is not merged into this branch yet"
)
def test_a_remote_model_served_by_another_llamad(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    far_side = make_llamad(demo_config(demo_models))
    far_side.start()
    with far_side.client() as client:
        reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    address = getattr(reply, "http", None)
    assert address, "the far llamad's HTTP API is off"
    key = far_side.ctl("api-key").stdout.strip()
    assert key
    near = make_llamad(
        f'[models.far]\nurl = "http://{address}/v1"\napi_key = "{key}"\nremote_model = "demo-b"\n'
    )
    near.start()
    loaded = near.ctl("load", "far")
    assert loaded.returncode == 0, loaded.stderr + near.log()[-3000:]
    answer = near.ctl("chat", "-m", "far", "--max-tokens", "8", "hello")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    # The far llamad loaded its demo-b for the request; our llamad ran nothing.
    assert far_side.status("demo-b").state == "ready"
    assert near.status("far").remote and near.children() == []
    wrong = make_llamad(f'[models.far]\nurl = "http://{address}"\napi_key = "nope"\n')
    wrong.start()
    refused = wrong.ctl("load", "far")
    assert refused.returncode != 0 and "refused our API key (HTTP 401)" in refused.stderr


def test_a_worker_serves_one_model_at_a_time(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    port = free_port()
    body = f"[workers.w]\nport = {port}\nthreads = 1\n" + "".join(
        f'[models.{name}]\npath = "{path}"\nworkers = ["w"]\nn_gpu_layers = 99\n'
        'ctx_size = 8192\nargs = ["--threads", "1"]\n'
        for name, path in demo_models.items()
    )
    daemon = make_llamad(body)
    daemon.start()
    wait_worker(daemon, "w", lambda w: w.state == "ready")
    assert daemon.ctl("load", "demo").returncode == 0
    # demo is idle: it makes way for demo-b on the shared worker.
    switched = daemon.ctl("load", "demo-b")
    assert switched.returncode == 0, switched.stderr
    demo = daemon.status("demo")
    assert (demo.state, demo.reason) == (
        "stopped",
        "evicted for demo-b (it needs the same workers)",
    )
    assert workers(daemon)["w"].serving == "demo-b"
    answer = daemon.ctl("chat", "-m", "demo-b", "--max-tokens", "4", "hi")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    # Busy: a load of the other model is refused rather than cutting the reply.
    messages: list[ServerMessage] = []
    chatting = threading.Thread(target=chat, args=(daemon, "demo-b", 4_000, messages))
    chatting.start()
    daemon.wait_for("demo-b", lambda s: s.in_flight == 1)
    refused = daemon.ctl("load", "demo")
    assert chatting.is_alive()
    assert refused.returncode != 0
    assert (
        f"worker w (127.0.0.1:{port}) is serving model demo-b, which has requests in flight"
        in refused.stderr
    )
    chatting.join(timeout=120)
    done = messages[-1]
    assert isinstance(done, ChatDone) and done.message.status == "complete"


def test_systemd_hears_of_the_workers(make_llamad: MakeLlamad) -> None:
    daemon = make_llamad(f"[workers.gpu0]\nport = {free_port()}\nthreads = 1\n")
    notify_path = daemon.runtime_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        daemon.env.update(NOTIFY_SOCKET=str(notify_path))
        daemon.start(wait=False)
        got = _datagrams(notify, lambda r: any("STATUS=worker gpu0: ready" in m for m in r), 20)
        assert any("READY=1" in m for m in got)
        pid = workers(daemon)["gpu0"].pid
        assert pid is not None
        # The worker's environment is scrubbed of systemd's variables like a model's.
        assert "NOTIFY_SOCKET" not in psutil.Process(pid).environ()
        os.kill(pid, signal.SIGKILL)
        got = _datagrams(
            notify,
            lambda r: any("STATUS=worker gpu0: backoff (killed by SIGKILL" in m for m in r),
            10,
        )
        assert got


def test_a_remote_model_loaded_before_a_restart_waits_for_its_server(
    make_llamad: MakeLlamad, demo_models: dict[str, Path], llama_server_binary: Path
) -> None:
    upstream, port = start_llama_server(llama_server_binary, demo_models["demo"], "upstream")
    try:
        daemon = make_llamad(
            f'[models.far]\nurl = "http://127.0.0.1:{port}"\nremote_model = "upstream"\n'
            "health_interval_sec = 0.3\n"
        )
        daemon.start()
        assert daemon.ctl("load", "far").returncode == 0
        assert daemon.stop() == 0
        upstream.kill()
        upstream.wait()
        daemon.start()
        # Remembered as loaded: it waits for its server instead of being dropped.
        waiting = daemon.wait_for("far", lambda s: s.state == "backoff", timeout=15)
        assert waiting.expected
        assert "starting again when it answers" in waiting.reason
        upstream, _ = start_llama_server(
            llama_server_binary, demo_models["demo"], "upstream", port=port
        )
        daemon.wait_for("far", lambda s: s.state == "ready", timeout=15)
    finally:
        upstream.kill()
        upstream.wait()
