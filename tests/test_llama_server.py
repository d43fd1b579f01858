"""How llamad runs llama-server: the command line it builds, checked on the real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llamad.config import ModelConfig, load_config
from llamad.llama_server import Endpoint, build_command
from tests.conftest import Llamad, ready_daemon

MakeLlamad = Callable[..., Llamad]


def _model(tmp_path: Path, extra: str = "") -> ModelConfig:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = tmp_path / "models.toml"
    config.write_text(f'[models.m]\npath = "{model}"\n{extra}')
    return load_config(config, {}).models["m"]


@pytest.mark.parametrize(("extra", "slots"), [("", "1"), ("parallel = 3\n", "3")])
def test_parallel_is_always_passed(tmp_path: Path, extra: str, slots: str) -> None:
    command = build_command(Path("/bin/llama-server"), _model(tmp_path, extra), Endpoint(port=1))
    assert command[command.index("--parallel") + 1] == slots


@pytest.mark.server
def test_the_real_server_has_as_many_slots_as_llamad_queues_for(
    make_llamad: MakeLlamad, demo_models: dict[str, Path]
) -> None:
    # No `parallel` key: llama-server's own default is several slots; llamad assumes one.
    daemon = ready_daemon(make_llamad, demo_models)
    endpoint = daemon.status("demo").endpoint
    transport = httpx.HTTPTransport(uds=endpoint)
    with httpx.Client(transport=transport, base_url="http://llama-server") as client:
        props = client.get("/props").json()
    assert props["total_slots"] == 1, json.dumps(props)[:300]
