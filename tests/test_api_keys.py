"""API keys: the keys file, llamad's own key, constant-time lookup, model limits."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import pytest

from llamad.api_keys import (
    ApiKey,
    KeyRing,
    ensure_own_key,
    key_ring,
    offered_key,
    parse_keys_file,
    read_keys_file,
)
from llamad.config import Config, parse_config
from llamad.errors import ConfigError, StartupError

KEY_A = "sk-aaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-bbbbbbbbbbbbbbbbbbbbbbbb"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return parse_config(
        '[models.demo]\npath = "d.gguf"\naliases = ["d"]\n[models.demo-b]\npath = "b.gguf"\n',
        source=tmp_path / "models.toml",
    )


def test_keys_file_with_model_limits_resolved_through_aliases(config: Config) -> None:
    text = f"""
    [[keys]]
    name = "editor"
    key = "{KEY_A}"
    models = ["d"]

    [[keys]]
    key = "{KEY_B}"
    """
    editor, anyone = parse_keys_file(text, "keys.toml", config)
    assert editor.name == "editor" and editor.models == frozenset({"demo"})
    assert editor.allows("demo") and not editor.allows("demo-b")
    assert anyone.unrestricted and anyone.allows("demo-b")
    ring = KeyRing([editor, anyone])
    assert ring.find(KEY_A) is editor and ring.find(KEY_B) is anyone
    assert ring.find("sk-cccccccccccccccccccccccc") is None and ring.find("") is None


def test_a_key_is_never_shown(config: Config) -> None:
    (key,) = parse_keys_file(f'[[keys]]\nname = "n"\nkey = "{KEY_A}"\n', "k", config)
    assert KEY_A not in repr(key) and "digest" not in repr(key)


def test_every_problem_in_the_keys_file_is_listed_without_the_keys(config: Config) -> None:
    text = f"""
    [[keys]]
    key = "short"
    [[keys]]
    key = "{KEY_A}"
    models = ["nope"]
    [[keys]]
    name = "twin"
    key = "{KEY_B}"
    [[keys]]
    key = "{KEY_B}"
    colour = "red"
    """
    with pytest.raises(ConfigError) as caught:
        parse_keys_file(text, "keys.toml", config)
    problems = caught.value.problems
    assert any("keys[0].key" in p and "at least 16" in p for p in problems)
    assert any("unknown model 'nope'" in p and "demo, demo-b" in p for p in problems)
    assert any("same key as 'twin'" in p for p in problems)
    assert any("unknown key 'colour'" in p for p in problems)
    assert not any(KEY_A in p or KEY_B in p or "short" in p for p in problems)


def test_the_keys_file_must_be_private(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nkey = "{KEY_A}"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"readable by other users.*chmod 600"):
        read_keys_file(path, config)
    path.chmod(0o600)
    assert len(read_keys_file(path, config)) == 1
    with pytest.raises(ConfigError, match="no such file"):
        read_keys_file(tmp_path / "missing.toml", config)


def test_own_key_is_made_once_private_and_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "api_key"
    made = ensure_own_key(path)
    assert made.startswith("sk-llamad-") and len(made) > 40
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert ensure_own_key(path) == made
    path.chmod(0o640)
    with pytest.raises(StartupError, match="chmod 600"):
        ensure_own_key(path)
    ring = key_ring(made, [])
    found = ring.find(made)
    assert found is not None and found.unrestricted


def test_keys_come_from_either_header() -> None:
    assert offered_key({"authorization": "Bearer abc"}) == "abc"
    assert offered_key({"authorization": "bearer  abc "}) == "abc"
    assert offered_key({"x-api-key": "abc"}) == "abc"  # Anthropic's SDK
    assert offered_key({"authorization": "Basic abc"}) is None
    assert offered_key({}) is None


def test_lookup_compares_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # No early exit: the time taken does not depend on which key matched.
    keys = [ApiKey.from_secret(f"k{i}", f"sk-key-number-{i:08d}") for i in range(50)]
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert KeyRing(keys).find("sk-key-number-00000000") is keys[0]
    assert compared == [key.digest for key in keys]
