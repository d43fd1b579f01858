"""Workers: the rpc-server's supervision with the real binary, and the pure parts."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from llamad.config import WorkerConfig, parse_config
from llamad.errors import ServerBinaryNotFound
from llamad.events import EventHub
from llamad.placement import MIB, Memory
from llamad.workers import (
    Layers,
    RpcServerKind,
    Workers,
    find_rpc_server,
    local_share,
    remote_weight,
)
from tests.conftest import free_port, short_tempdir


def _worker_config(rpc_server_binary: Path, body: str) -> str:
    tmp = short_tempdir()
    return (
        f'[daemon]\nruntime_dir = "{tmp}"\nrpc_server = "{rpc_server_binary}"\n'
        "health_interval_sec = 0.3\nrestart_sec = 0.05\nstop_timeout_sec = 2\n" + body
    )


@asynccontextmanager
async def running_workers(rpc_server_binary: Path, body: str) -> AsyncIterator[Workers]:
    text = _worker_config(rpc_server_binary, body)
    config = parse_config(text, source=Path("/tmp/models.toml"), env=os.environ)
    workers = Workers(config, config.daemon.runtime_dir / "workers", EventHub())
    async with trio.open_nursery() as nursery:
        await nursery.start(workers.run)
        try:
            yield workers
        finally:
            with trio.move_on_after(10):
                await workers.shutdown()
            nursery.cancel_scope.cancel()


async def wait_state(workers: Workers, name: str, state: str, seconds: float = 20) -> None:
    supervisor = workers.supervisors[name]
    with trio.fail_after(seconds):
        await supervisor.wait_until(lambda: supervisor.state == state)


async def test_a_worker_is_supervised_like_a_model_server(rpc_server_binary: Path) -> None:
    port = free_port()
    async with running_workers(
        rpc_server_binary, f"[workers.w]\nport = {port}\nthreads = 1\n"
    ) as workers:
        await wait_state(workers, "w", "ready")
        supervisor = workers.supervisors["w"]
        status = supervisor.status()
        assert status.version.startswith("7.")
        assert status.devices and status.devices[0].name == "CPU"
        assert status.devices[0].total
        assert supervisor.pidfile.is_file()
        first = status.pid
        assert first is not None
        # Killed: restarted by the policy, the port answers again.
        os.kill(first, signal.SIGKILL)
        await wait_state(workers, "w", "backoff")
        assert workers.local_problem(f"127.0.0.1:{port}") == (
            f"worker w (127.0.0.1:{port}) went away (killed by SIGKILL)"
        )
        await wait_state(workers, "w", "ready")
        assert supervisor.status().pid not in (None, first)
        assert supervisor.status().restarts == 1
        assert await workers.check(f"127.0.0.1:{port}") is None
        # Health checks connect every 0.3 s; their lines stay out of `llamactl logs`.
        await trio.sleep(1.0)
        assert not [line for line in supervisor.output if "client connection" in line]
        assert any("Starting RPC server" in line for line in supervisor.output)


async def test_a_worker_whose_port_is_taken_fails_with_its_own_words(
    rpc_server_binary: Path,
) -> None:
    with trio.socket.socket() as squatter:
        await squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        body = f"[workers.w]\nport = {port}\nstart_limit_burst = 2\n"
        async with running_workers(rpc_server_binary, body) as workers:
            await wait_state(workers, "w", "failed")
            reason = workers.supervisors["w"].reason
            assert reason.startswith("crash loop: 2 starts within 60 s")
            assert "before it was ready" in reason


async def test_mem_on_a_build_without_it_is_refused_by_name(rpc_server_binary: Path) -> None:
    body = f'[workers.w]\nport = {free_port()}\nmem = "2GiB"\n'
    async with running_workers(rpc_server_binary, body) as workers:
        await wait_state(workers, "w", "failed")
        assert "has no --mem option" in workers.supervisors["w"].reason


def test_the_command_line(tmp_path: Path) -> None:
    worker = WorkerConfig(
        name="gpu0",
        host="0.0.0.0",
        port=50052,
        devices=("CUDA0", "CUDA1"),
        threads=8,
        mem="8GiB",
        cache=True,
        allow_network=True,
        args=("--verbose",),
    )
    kind = RpcServerKind(worker, tmp_path / "ggml-rpc-server", lambda: None)
    assert kind.command() == [
        str(tmp_path / "ggml-rpc-server"),
        *("--host", "0.0.0.0", "--port", "50052", "--device", "CUDA0,CUDA1"),
        *("--threads", "8", "--mem", "8192", "--cache", "--verbose"),
    ]
    assert worker.address == "127.0.0.1:50052"
    assert not kind.keep_line("Accepted client connection")
    assert kind.keep_line("recv failed (bytes_recv=0, size_to_recv=1)")


def test_the_rpc_server_is_found_like_llama_server(tmp_path: Path) -> None:
    not_executable = tmp_path / "ggml-rpc-server"
    not_executable.write_text("")
    with pytest.raises(ServerBinaryNotFound, match=r"rpc_server = .* is not an executable file"):
        find_rpc_server(not_executable)
    beside = tmp_path / "bin"
    beside.mkdir()
    for name in ("llama-server", "ggml-rpc-server"):
        (beside / name).write_text("#!/bin/sh\n")
        (beside / name).chmod(0o755)
    if os.environ.get("PATH", "").find("ggml-rpc-server") < 0:
        found = find_rpc_server(None, beside / "llama-server")
        assert found.path.name == "ggml-rpc-server"


# --------------------------------------------------- memory of a split model


def test_what_stays_local_when_every_layer_goes_to_workers() -> None:
    layers = Layers(blocks=(100 * MIB,) * 4, other=50 * MIB)
    whole = Memory(host=layers.total + 200 * MIB)  # 200 MiB of KV cache and buffers
    assert local_share(whole, layers, 99, 1.0) == Memory(host=50 * MIB)


def test_the_first_layers_stay_when_fewer_are_offloaded() -> None:
    layers = Layers(blocks=(100 * MIB,) * 4, other=50 * MIB)
    whole = Memory(host=layers.total + 200 * MIB)
    # The last two layers and half of the rest go; half of them to the workers.
    assert local_share(whole, layers, 2, 0.5) == Memory(host=whole.host - 150 * MIB)
    assert local_share(whole, layers, 0, 1.0) == whole


def test_the_split_follows_tensor_split_or_free_memory() -> None:
    assert remote_weight((), 2, rpc_free=8, local_gpu_free=0) == 1.0  # a CPU-only host
    assert remote_weight((), 2, rpc_free=24, local_gpu_free=8) == 0.75
    # RPC devices come first in llama-server's list of devices.
    assert remote_weight((1, 1, 2), 2, rpc_free=0, local_gpu_free=8) == 0.5


async def test_a_reload_restarts_only_the_workers_whose_process_changed(
    rpc_server_binary: Path,
) -> None:
    ports = (free_port(), free_port())
    body = f"[workers.a]\nport = {ports[0]}\n[workers.b]\nport = {ports[1]}\n"
    async with running_workers(rpc_server_binary, body) as workers:
        await wait_state(workers, "a", "ready")
        await wait_state(workers, "b", "ready")
        pids = {n: s.status().pid for n, s in workers.supervisors.items()}
        text = _worker_config(rpc_server_binary, "")
        text += f"[workers.a]\nport = {ports[0]}\nthreads = 1\n"  # a new command line
        text += f"[workers.b]\nport = {ports[1]}\nhealth_failures = 9\n"  # llamad's own key
        text += f"[workers.c]\nport = {free_port()}\n"
        new = parse_config(text, source=Path("/tmp/models.toml"), env=os.environ)
        changes = await workers.reload(new)
        assert changes == ["changed worker a", "updated worker b, process kept", "added worker c"]
        await wait_state(workers, "a", "ready")
        await wait_state(workers, "c", "ready")
        assert workers.supervisors["a"].status().pid != pids["a"]
        assert workers.supervisors["b"].status().pid == pids["b"]
        gone = await workers.reload(
            parse_config(text.split("[workers.a]")[0], source=Path("/tmp/m.toml"), env=os.environ)
        )
        assert sorted(gone) == ["removed worker a", "removed worker b", "removed worker c"]
        assert workers.supervisors == {}
