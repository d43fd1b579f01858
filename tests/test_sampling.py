"""llamad.sampling: per-model generation defaults, the request's values winning."""

from __future__ import annotations

from pathlib import Path

import attrs

from llamad.config import DEFAULT_MAX_TOKENS, ModelConfig, Sampling
from llamad.protocol import ChatOptions
from llamad.sampling import request_defaults, system_prompt, with_system_prompt

PLAIN = ModelConfig(name="m", path=Path("/m.gguf"))
TUNED = attrs.evolve(
    PLAIN,
    sampling=Sampling(
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repeat_penalty=1.1,
        max_tokens=512,
        system_prompt="Be brief.",
    ),
)


def test_a_model_without_settings_gets_only_the_cap() -> None:
    assert request_defaults(PLAIN) == {"max_tokens": DEFAULT_MAX_TOKENS}
    assert request_defaults(PLAIN, ChatOptions()) == {"max_tokens": 4096}


def test_the_models_settings_fill_what_the_request_leaves_out() -> None:
    assert request_defaults(TUNED, ChatOptions()) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "max_tokens": 512,
    }


def test_the_requests_values_win() -> None:
    chat = request_defaults(TUNED, ChatOptions(temperature=0.0, max_tokens=5))
    assert chat["temperature"] == 0.0  # zero is a value, not "unset"
    assert chat["max_tokens"] == 5
    assert chat["top_k"] == 40
    body = {"messages": [], "top_p": 0.5, "repeat_penalty": 1.0}
    http = request_defaults(TUNED, body)
    assert (http["top_p"], http["repeat_penalty"], http["min_p"]) == (0.5, 1.0, 0.05)


def test_other_spellings_of_the_length_cap_are_respected() -> None:
    assert "max_tokens" not in request_defaults(TUNED, {"max_completion_tokens": 100})
    assert "max_tokens" not in request_defaults(TUNED, {"n_predict": 100})


def test_system_prompts() -> None:
    assert system_prompt(TUNED, None) == "Be brief."
    assert system_prompt(TUNED, "Be thorough.") == "Be thorough."
    assert system_prompt(TUNED, "") == ""  # an explicit empty prompt is a choice
    assert system_prompt(PLAIN, None) is None
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(TUNED, user) == [{"role": "system", "content": "Be brief."}, *user]
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_system_prompt(TUNED, own) == own
    assert with_system_prompt(PLAIN, user) == user
