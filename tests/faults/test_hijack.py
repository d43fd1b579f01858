"""Another local user tries to stand in for llamad, its runtime directory or llama-server.

Each drill replays, for real and as the user ``nobody``, an attack that once
worked: creating ``/tmp/llamad-$UID`` first (planting a pid file that names one
of your processes, a fake model socket and a fake control socket in it),
answering on a model's TCP port before llama-server binds it, and taking over
the models folder of a running llamad. Each must be refused with one line that
names the problem and the fix, and the impostor must receive nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import trio

from llama_tui.connection import Disconnected, connect, read_token
from tests.conftest import demo_config
from tests.faults.other_user import (
    AS_NOBODY,
    IMPOSTOR_CONTROL,
    IMPOSTOR_HTTP,
    NOBODY,
    impostor,
    require_root,
    world_tmp,
)
from tests.faults.util import MakeLlamad

pytestmark = pytest.mark.server

UID = os.getuid()


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()


def _drop_box() -> Path:
    """Where nobody's impostors note what reached them: outside /tmp, which the
    first drill replaces, and writable by nobody."""
    path = Path(tempfile.mkdtemp(prefix="llamad-drop-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
    return path


def _under_tmp(*paths: Path) -> list[str]:
    """The folders in /tmp this checkout and its Python live in (a CI clone may be
    there): brought back into the drill's fresh /tmp, or nothing could run."""
    needed = (Path(__file__).resolve(), Path(sys.executable), Path(sys.prefix), *paths)
    tmp = Path("/tmp")
    return sorted({path.relative_to(tmp).parts[0] for path in needed if path.is_relative_to(tmp)})


def test_runtime_dir_created_first_by_another_user_is_refused(
    llama_server_binary: Path,
) -> None:
    """XDG_RUNTIME_DIR unset: llamad and llamactl use /tmp/llamad-$UID. nobody
    created it first, with a pid file naming one of our processes, a fake model
    socket and a fake control socket inside. (A private /tmp per drill, in a
    mount namespace, so the real one is not touched.)"""
    drop = _drop_box()
    victim = subprocess.Popen(["sleep", "120"])  # an unrelated process of ours
    try:
        info = psutil.Process(victim.pid)
        pidfile = json.dumps(
            {"pid": victim.pid, "create_time": info.create_time(), "cmdline": info.cmdline()}
        )
        config = textwrap.dedent(
            f"""\
            [daemon]
            llama_server = "{llama_server_binary}"
            data_dir = "/tmp/data"
            websocket = "off"
            [models.demo]
            path = "/nonexistent/demo.gguf"
            """
        )
        runtime = f"/tmp/llamad-{UID}"
        nobody = " ".join(AS_NOBODY)
        python = sys.executable
        script = textwrap.dedent(
            f"""\
            set -u
            mkdir {drop}/old-tmp
            mount --bind /tmp {drop}/old-tmp
            mount -t tmpfs -o mode=1777 tmpfs /tmp
            for kept in {" ".join(_under_tmp(llama_server_binary))}; do
                mkdir /tmp/$kept && mount --bind {drop}/old-tmp/$kept /tmp/$kept
            done
            {nobody} mkdir -m 0777 {runtime} {runtime}/models
            {nobody} sh -c 'printf %s "$PIDFILE" > {runtime}/models/demo.pid'
            {nobody} {python} -c "$IMPOSTOR_HTTP" {runtime}/models/demo.sock {drop}/model.txt &
            model_impostor=$!
            {nobody} {python} -c "$IMPOSTOR_CONTROL" {runtime}/control.sock {drop}/control.txt &
            control_impostor=$!
            for _ in $(seq 200); do
                [ -S {runtime}/models/demo.sock ] && [ -S {runtime}/control.sock ] && break
                sleep 0.05
            done
            printf %s "$CONFIG" > /tmp/models.toml
            {python} -m llamad --config /tmp/models.toml >{drop}/llamad.out 2>{drop}/llamad.err
            echo $? >{drop}/llamad.rc
            {python} -m llamactl chat "my secret prompt" >{drop}/ctl.out 2>{drop}/ctl.err
            echo $? >{drop}/ctl.rc
            kill $model_impostor $control_impostor
            """
        )
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("XDG_RUNTIME_DIR", "LLAMAD_SOCKET", "LLAMAD_CONFIG")
        }
        env.update(
            PIDFILE=pidfile,
            CONFIG=config,
            IMPOSTOR_HTTP=IMPOSTOR_HTTP,
            IMPOSTOR_CONTROL=IMPOSTOR_CONTROL,
            PYTHONUNBUFFERED="1",
        )
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # llamad refused to run, with one line naming the problem and the fix...
        assert (drop / "llamad.rc").read_text().strip() == "1"
        error = (drop / "llamad.err").read_text()
        assert error.count("\n") == 1 and "Traceback" not in error, error
        assert error.startswith(
            f"llamad: {runtime} belongs to uid {NOBODY}, not to you (uid {UID}): another "
            "user may have created it to intercept llamad; set XDG_RUNTIME_DIR"
        ), error
        # ...before killing what the planted pid file names, or touching the fake socket.
        assert victim.poll() is None
        assert (drop / "model.txt").read_text() == ""
        # llamactl would not talk to the fake control socket: nothing was sent to it.
        assert (drop / "ctl.rc").read_text().strip() == "1"
        ctl_error = (drop / "ctl.err").read_text()
        assert ctl_error == (
            f"llamactl: the socket {runtime}/control.sock is served by uid {NOBODY}, not by "
            f"you (uid {UID}): refusing to talk to it, another user may be impersonating "
            "llamad\n"
        )
        assert (drop / "control.txt").read_bytes() == b""
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(drop, ignore_errors=True)


def test_the_equivalent_directory_taken_over_in_other_ways_is_refused(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """The runtime directory is ours but others may write to it, or is a symlink
    another user planted: refused, and nothing inside is used."""
    world = world_tmp()
    try:
        for how in ("writable", "symlink"):
            daemon = make_llamad(demo_config(demo_models))
            runtime = world / f"llamad-{how}"
            if how == "writable":
                runtime.mkdir()
                os.chmod(runtime, 0o777)
                expected = f"llamad: {runtime} is writable by other users (mode 0777)"
            else:
                target = world / "theirs"
                subprocess.run([*AS_NOBODY, "mkdir", "-m", "0777", str(target)], check=True)
                subprocess.run([*AS_NOBODY, "ln", "-s", str(target), str(runtime)], check=True)
                expected = f"llamad: {runtime} is a symbolic link, not a directory"
            text = daemon.config_path.read_text()
            mine = f'runtime_dir = "{daemon.runtime_dir}"'
            daemon.config_path.write_text(text.replace(mine, f'runtime_dir = "{runtime}"'))
            daemon.env["LLAMAD_SOCKET"] = str(runtime / "control.sock")
            done = subprocess.run(
                [sys.executable, "-m", "llamad", "--config", str(daemon.config_path)],
                env=daemon.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 1, done.stderr
            assert done.stderr.startswith(expected), done.stderr
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    finally:
        subprocess.run(["rm", "-rf", str(world)], check=False)


def test_llama_tui_refuses_a_foreign_socket_and_token() -> None:
    world = world_tmp()
    drop = _drop_box()

    async def connect_to(fake: Path) -> str:
        async with trio.open_nursery() as nursery:
            try:
                await connect(nursery, socket_path=fake, url=None)
            except Disconnected as exc:
                return str(exc)
        return "connected"

    try:
        fake = world / "control.sock"
        with impostor(IMPOSTOR_CONTROL, str(fake), drop / "control.txt"):
            refused = trio.run(connect_to, fake)
            assert f"served by uid {NOBODY}, not by you" in refused
            time.sleep(0.2)
            assert (drop / "control.txt").read_bytes() == b""
        # A token file planted by nobody (it would send us to their server).
        token = world / "token"
        subprocess.run(
            [*AS_NOBODY, "sh", "-c", f"umask 077; echo their-token > {token}"], check=True
        )
        with pytest.raises(Disconnected, match=f"belongs to uid {NOBODY}, not to you"):
            read_token(token)
        mine = world / "mine"
        mine.write_text("secret\n")
        os.chmod(mine, 0o644)
        with pytest.raises(Disconnected, match="readable by other users"):
            read_token(mine)
        os.chmod(mine, 0o600)
        assert read_token(mine) == "secret"
        link = world / "link"
        link.symlink_to(mine)
        with pytest.raises(Disconnected, match="symbolic link"):
            read_token(link)
    finally:
        subprocess.run(["rm", "-rf", str(world), str(drop)], check=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _servers_on(port: int) -> list[psutil.Process]:
    """Live llama-servers started for ``port``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        ours = "--port" in cmdline and str(port) in cmdline and "--model" in cmdline
        if ours and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_a_model_port_answered_by_another_user_is_never_used(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    drop = _drop_box()
    port = _free_port()
    try:
        with impostor(IMPOSTOR_HTTP, str(port), drop / "model.txt"):
            daemon = make_llamad(demo_config({"demo": demo_models["demo"]}, port=port))
            daemon.start()
            load = daemon.ctl("load", "demo")
            assert load.returncode == 1
            assert (
                f"port {port} on 127.0.0.1 is also served by another process (uid {NOBODY}), "
                "not only by llama-server pid"
            ) in load.stderr, load.stderr
            assert "choose another `port` for this model" in load.stderr
            chat = daemon.ctl("chat", "-m", "demo", "my secret prompt")
            assert chat.returncode != 0
            assert "INJECTED" not in chat.stdout + chat.stderr
            status = daemon.status("demo")
            assert status.state == "failed" and status.pid is None
            assert not _servers_on(port)
        requests = (drop / "model.txt").read_text().splitlines()
        assert requests, "the impostor was never probed: the drill did not happen"
        assert all(line.startswith("GET /health") for line in requests), requests
    finally:
        shutil.rmtree(drop, ignore_errors=True)


def test_a_model_on_its_own_port_is_ready_and_chats(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    """The check that refuses an impostor accepts llama-server's own listening socket."""
    port = _free_port()
    daemon = make_llamad(demo_config({"demo": demo_models["demo"]}, port=port))
    daemon.start()
    load = daemon.ctl("load", "demo")
    assert load.returncode == 0, load.stderr
    chat = daemon.ctl("chat", "--max-tokens", "4", "hello")
    assert chat.returncode == 0, chat.stderr


def test_a_models_folder_taken_over_is_refused_before_spawning(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    daemon = make_llamad(demo_config(demo_models))
    daemon.start()
    models = daemon.runtime_dir / "models"
    os.chown(models, NOBODY, NOBODY)
    load = daemon.ctl("load", "demo")
    assert load.returncode == 1
    assert f"{models} belongs to uid {NOBODY}, not to you" in load.stderr, load.stderr
    assert daemon.children() == []
    os.chown(models, UID, os.getgid())
    assert daemon.ctl("load", "demo").returncode == 0
    assert daemon.stop(signal.SIGTERM) == 0
