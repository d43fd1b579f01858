"""Real answers from real models, intact through llamad: SmolLM2-135M-Instruct and Gemma 3 270M.

The files come from PyPI (scripts/fetch-models, run by scripts/bootstrap); a
missing file fails these tests, it never skips them.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from trio_websocket import open_websocket_url

from llamad.protocol import ChatDone, ChatOptions, ContextTrimmed, Status, StatusReply
from tests.conftest import Llamad
from tests.test_chat import run_chat

pytestmark = [pytest.mark.server, pytest.mark.real_model]

MakeLlamad = Callable[..., Llamad]
QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant."  # SmolLM2's defaults in the repository's models.toml


def _real_daemon(
    make_llamad: MakeLlamad, real_models: dict[str, Path], daemon_extra: str = "", **smol: object
) -> Llamad:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in smol.items())
    daemon = make_llamad(
        textwrap.dedent(
            f"""\
            [models.smol]
            path = "{real_models["smol"]}"
            ctx_size = 2048
            args = ["--threads", "2"]
            """
        )
        + extra
        + textwrap.dedent(
            f"""
            [models.gemma]
            path = "{real_models["gemma"]}"
            ctx_size = 2048
            args = ["--threads", "2"]
            """
        ),
        'default_model = "smol"\n' + daemon_extra,
    )
    daemon.start()
    daemon.wait_for("smol", lambda s: s.state == "ready", timeout=60)
    return daemon


def test_smollm2_answers_paris_through_llamactl(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    daemon = _real_daemon(make_llamad, real_models)
    result = daemon.ctl(
        "chat", "-v", "-s", SYSTEM, "-t", "0", "--seed", "42", "--max-tokens", "64", QUESTION
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "complete" in result.stderr and "finish stop" in result.stderr


def test_a_reply_cut_at_the_cap_says_length(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    daemon = _real_daemon(make_llamad, real_models)
    result = daemon.ctl("chat", "-v", "-s", SYSTEM, "-t", "0", "--max-tokens", "5", QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is"
    assert "5 tokens" in result.stderr and "finish length" in result.stderr


async def test_smollm2_answers_paris_through_the_websocket(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    daemon = _real_daemon(make_llamad, real_models)
    with daemon.client() as client:
        status = client.call(lambda i: Status(id=i))
    assert isinstance(status, StatusReply) and status.websocket is not None
    token = (daemon.runtime_dir / "token").read_text().strip()
    async with open_websocket_url(f"ws://{status.websocket}/?token={token}") as ws:
        await ws.send_message(
            json.dumps(
                {
                    "type": "chat",
                    "id": 7,
                    "content": QUESTION,
                    "options": {"temperature": 0, "seed": 42, "system": SYSTEM, "max_tokens": 64},
                }
            )
        )
        deltas = ""
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "chat_delta":
                deltas += message["text"]
            elif message["type"] in ("chat_done", "error"):
                break
    assert message["type"] == "chat_done", message
    stored = message["message"]
    assert stored["status"] == "complete"
    assert stored["parts"] == [{"type": "text", "text": "The capital of France is Paris."}]
    assert deltas == "The capital of France is Paris."  # every delta arrived, in order
    assert stored["stats"]["finish_reason"] == "stop"


def test_switch_smollm2_and_gemma_both_answer(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    # Room for one model: each chat naming the other model swaps them.
    daemon = _real_daemon(make_llamad, real_models, "max_models = 1\n")
    base = daemon.ctl("chat", "-v", "-m", "gemma", "-t", "0", "--max-tokens", "24", QUESTION)
    assert base.returncode == 0, base.stderr
    assert base.stdout.strip()  # a base model rambles, but it answers
    assert "· gemma ·" in base.stderr or "[gemma" in base.stderr
    assert daemon.status("gemma").state == "ready"
    assert daemon.status("smol").state == "stopped"
    back = daemon.ctl("chat", "-m", "smol", "-s", SYSTEM, "-t", "0", "--seed", "42", QUESTION)
    assert back.returncode == 0, back.stderr
    assert "Paris" in back.stdout
    assert daemon.status("smol").state == "ready"


def test_gemma_is_flagged_as_a_base_model(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    daemon = _real_daemon(make_llamad, real_models)
    assert daemon.status("gemma").warnings == [
        "base model: no chat template; chat replies will be poor"
    ]
    assert daemon.status("smol").warnings == []
    assert daemon.ctl("load", "gemma").returncode == 0
    assert "gemma: base model: no chat template; chat replies will be poor" in daemon.log()


def test_context_fitting_with_the_real_tokenizer_drops_just_the_oldest_turn(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    """A 512-token context: a long turn (about 300 tokens), a short one, then a
    medium one (about 170) that does not fit beside the long one (the prompt
    would be about 540 tokens of the 496 left beside a 16-token reply): the
    long turn, and only it, is left out. Dropping the short turn too would be
    wrong; not trimming would overflow the context.
    """
    daemon = _real_daemon(make_llamad, real_models)
    # A context of 512, as the user wrote it in models.toml.
    daemon.config_path.write_text(
        daemon.config_path.read_text().replace("ctx_size = 2048", "ctx_size = 512", 1)
    )
    assert daemon.ctl("reload").returncode == 0
    daemon.wait_for("smol", lambda s: s.state in ("ready", "stopped"), timeout=60)
    endpoint = daemon.status("smol").endpoint

    long_message = "Tell me about this list: " + ", ".join(f"item {n}" for n in range(60))
    medium = "And about this one: " + ", ".join(f"thing {n}" for n in range(35))
    turns = [long_message, "What is two plus two?", medium]
    options = ChatOptions(temperature=0, seed=1, max_tokens=16, system=SYSTEM)
    conversation = None
    trimmed: list[int] = []
    done: ChatDone | None = None
    for content in turns:
        with daemon.client(timeout=120) as client:
            messages = run_chat(
                client, content=content, conversation=conversation, options=options, model="smol"
            )
        done = messages[-1]  # type: ignore[assignment]
        assert isinstance(done, ChatDone), messages[-1]
        assert done.message.status == "complete", done.message.error
        conversation = done.message.conversation
        trimmed += [m.dropped_turns for m in messages if isinstance(m, ContextTrimmed)]
    with httpx.Client(transport=httpx.HTTPTransport(uds=endpoint), base_url="http://x") as raw:
        long_tokens = len(raw.post("/tokenize", json={"content": long_message}).json()["tokens"])
    assert 250 < long_tokens < 350 < len(long_message)
    # The long first turn had to go on the last message, and only it.
    assert trimmed == [1]
    assert done is not None and done.message.stats is not None
    prompt_tokens = done.message.stats.prompt_tokens
    assert prompt_tokens is not None and prompt_tokens < long_tokens  # it was left out
    with httpx.Client(transport=httpx.HTTPTransport(uds=endpoint), base_url="http://x") as raw:
        medium_tokens = len(raw.post("/tokenize", json={"content": medium}).json()["tokens"])
    # The medium message, the short turn (question and reply) and the system prompt.
    assert prompt_tokens > medium_tokens + 20


# Per-model generation defaults (models.toml) reach a chat (llamad.sampling).


def test_models_toml_defaults_answer_paris(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    daemon = _real_daemon(
        make_llamad, real_models, system_prompt=SYSTEM, temperature=0.0, max_tokens=64
    )
    result = daemon.ctl("chat", QUESTION)  # no options: the model's own defaults
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."


def test_the_reply_cap_stops_a_runaway_model(
    make_llamad: MakeLlamad, real_models: dict[str, Path]
) -> None:
    # Greedy SmolLM2 without a system prompt loops ("la femme au roi, la femme
    # au roi, ...") until the context is full: the model's max_tokens stops it.
    daemon = _real_daemon(make_llamad, real_models, temperature=0.0, max_tokens=40)
    result = daemon.ctl("chat", "-v", QUESTION, timeout=30)  # uncapped: minutes
    assert result.returncode == 0, result.stderr
    assert "40 tokens" in result.stderr and "finish length" in result.stderr
