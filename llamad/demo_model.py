"""Tiny random-weights GGUF models, so the quick start and every test run for real.

A supervisor for llama-server is only tested honestly against llama-server
itself, and that needs a model: one small enough to generate in a test, load in
a tenth of a second and fit in a repository-free quick start. ``write_demo_model``
writes one: llama architecture (64-dim, 2 or 3 layers, 4 heads, f32, a 64k
trained context so long replies stay possible), an SPM vocabulary of a few
hundred tokens (``<unk>``/``<s>``/``</s>``, the 256 byte tokens, some English
words and letters) and a ChatML chat template, so ``/v1/chat/completions``
works. On two CPU cores llama-server loads it in about 0.1 s and generates over
a thousand tokens a second.

Its weights are random: **it talks nonsense**. Two things are arranged on
purpose so tests can rely on them: it never chooses a control or byte token, so
a reply always runs to ``max_tokens`` (no early end-of-sequence) and is plain
words, letters and punctuation (valid UTF-8, no control characters); and the
same variant always gives the same bytes. The variants differ (seed, layer
count, vocabulary) so a model switch is visible.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# A word list reads better as prose than as a 250-item literal.
_WORDS = (  # noqa: SIM905
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an "
    "each which she do how their if will up other about out many then them these so some "
    "her would make like him into time has look two more write go see number no way "
    "could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me "
    "back give most very after thing our just name good sentence man think say great "
    "where help through much before line right too mean old any same tell boy follow "
    "came want show also around form three small set put end does another well large "
    "must big even such because turn here why ask went men read need land different home "
    "us move try kind hand picture again change off play spell air away animal house "
    "point page letter mother answer found study still learn should world high every "
    "near add food between own below country plant last school father keep tree never "
    "start city earth eye light thought head under story saw left few while along might "
    "close something seem next hard open example begin life always those both paper "
    "together got group often run hello"
).split()

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_UNK, _BOS, _EOS = 0, 1, 2
_N_SPECIAL = 3 + 256  # control tokens, then the byte tokens; never generated

# Embedding dimension 0 carries a constant that no layer writes to, so the final
# hidden state always has a positive component there; output rows with a large
# negative weight on it get a logit far below every other token's.
_CONSTANT_DIM = 0
_CONSTANT = 1.0
_SUPPRESS = -10.0
_WEIGHT_STD = 0.05


@dataclass(frozen=True)
class DemoSpec:
    """One demo model: its seed, its word list and its (tiny) dimensions."""

    seed: int
    words: tuple[str, ...]
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 65536  # trained context: lets tests and benchmarks run long replies


DEMO_VARIANTS: Mapping[str, DemoSpec] = {
    "demo": DemoSpec(seed=1, words=tuple(_WORDS)),
    "demo-b": DemoSpec(seed=2, words=tuple(reversed(_WORDS[:200])), n_layer=3),
}


def _vocabulary(spec: DemoSpec) -> tuple[list[str], list[float], list[int]]:
    """Tokens, SPM scores and token types: specials, the 256 bytes, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["▁", *(f"▁{w}" for w in spec.words), *"abcdefghijklmnopqrstuvwxyz.,!?"]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SPM merges prefer higher scores; byte and control tokens are never merged into.
    scores = [0.0] * _N_SPECIAL + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _tensors(spec: DemoSpec, n_vocab: int) -> dict[str, np.ndarray[Any, np.dtype[np.float32]]]:
    """Random weights, in numpy's row-major shapes (GGUF lists dimensions reversed)."""
    rng = np.random.default_rng(spec.seed)

    def weight(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * _WEIGHT_STD).astype(np.float32)

    def not_into_constant(matrix: np.ndarray[Any, np.dtype[np.float32]]) -> None:
        matrix[_CONSTANT_DIM, :] = 0.0  # numpy row = output feature

    ones = np.ones(spec.n_embd, dtype=np.float32)
    # token_embd is {n_embd, n_vocab} in GGUF, (n_vocab, n_embd) here.
    token_embd = weight(n_vocab, spec.n_embd)
    token_embd[:, _CONSTANT_DIM] = _CONSTANT
    output = weight(n_vocab, spec.n_embd)
    output[:, _CONSTANT_DIM] = 0.0
    output[:_N_SPECIAL, _CONSTANT_DIM] = _SUPPRESS
    tensors = {
        "token_embd.weight": token_embd,
        "output_norm.weight": ones,
        "output.weight": output,
    }
    for layer in range(spec.n_layer):
        block = f"blk.{layer}"
        attn_output = weight(spec.n_embd, spec.n_embd)
        ffn_down = weight(spec.n_embd, spec.n_ff)
        not_into_constant(attn_output)
        not_into_constant(ffn_down)
        tensors |= {
            f"{block}.attn_norm.weight": ones,
            f"{block}.attn_q.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_k.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_v.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_output.weight": attn_output,
            f"{block}.ffn_norm.weight": ones,
            f"{block}.ffn_gate.weight": weight(spec.n_ff, spec.n_embd),
            f"{block}.ffn_up.weight": weight(spec.n_ff, spec.n_embd),
            f"{block}.ffn_down.weight": ffn_down,
        }
    return tensors


def _write(filename: Path, variant: str, spec: DemoSpec, split_max_tensors: int = 0) -> None:
    tokens, scores, types = _vocabulary(spec)
    writer = gguf.GGUFWriter(filename, "llama", split_max_tensors=split_max_tensors)
    try:
        writer.add_name(f"llamad {variant} (random weights)")
        writer.add_context_length(spec.n_ctx)
        writer.add_embedding_length(spec.n_embd)
        writer.add_block_count(spec.n_layer)
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head)
        writer.add_rope_dimension_count(spec.n_embd // spec.n_head)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(_UNK)
        writer.add_bos_token_id(_BOS)
        writer.add_eos_token_id(_EOS)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(_CHATML_TEMPLATE)
        for name, tensor in _tensors(spec, len(tokens)).items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_demo_model(path: Path, variant: str = "demo", *, split_max_tensors: int = 0) -> Path:
    """Write the ``variant`` demo model to ``path`` atomically; returns the path.

    Parent directories are created. The same variant always produces the same
    bytes. Raises ``ValueError`` for a variant not in ``DEMO_VARIANTS``.
    With ``split_max_tensors`` the model is split as llama.cpp's gguf-split does
    (``NAME-00001-of-0000N.gguf`` beside ``path``, at most that many tensors per
    file; the first part holds the metadata) and the first part is returned.
    """
    try:
        spec = DEMO_VARIANTS[variant]
    except KeyError:
        known = ", ".join(DEMO_VARIANTS)
        raise ValueError(
            f"unknown demo model variant {variant!r}; choose one of: {known}"
        ) from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if split_max_tensors:
        return _write_split(path, variant, spec, split_max_tensors)
    # Created exclusively with mode 0o666 so the umask applies, as for any file the
    # user writes (mkstemp's 0o600 would hide the model from a service user).
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        _write(temporary, variant, spec)
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def _write_split(path: Path, variant: str, spec: DemoSpec, split_max_tensors: int) -> Path:
    """The parts are written in a private folder beside ``path``, then moved in place."""
    staging = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    staging.mkdir()
    try:
        _write(staging / path.name, variant, spec, split_max_tensors)
        parts = sorted(staging.iterdir())
        for part in parts:
            os.replace(part, path.with_name(part.name))
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return path.with_name(parts[0].name)
