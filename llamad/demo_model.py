"""Tiny random-weights GGUF models, so the quick start and every test run for real.

``write_demo_model`` writes a llama-architecture model (64-dim, 2 layers,
4 heads) with an SPM vocabulary of a few hundred tokens (the 256 byte tokens,
``<unk>``/``<s>``/``</s>`` and some words) and a ChatML chat template. The real
llama-server loads it in about 0.1 s and streams over a thousand tokens a
second on a laptop CPU. Its weights are random: **it talks nonsense**. The two
variants differ (seed and vocabulary) so a model switch is visible.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
    "together got group often run"
).split()

_LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class DemoSpec:
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
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces = ["▁", *(f"▁{w}" for w in spec.words), *"abcdefghijklmnopqrstuvwxyz.,!?"]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # SPM merges prefer higher scores; byte and control tokens are never merged into.
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _tensors(spec: DemoSpec, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    ones = np.ones(spec.n_embd, dtype=np.float32)
    # numpy shapes are GGUF's dimensions reversed: token_embd is {n_embd, n_vocab} in GGUF.
    tensors = {
        "token_embd.weight": weight(n_vocab, spec.n_embd),
        "output_norm.weight": ones,
        "output.weight": weight(n_vocab, spec.n_embd),
    }
    for layer in range(spec.n_layer):
        block = f"blk.{layer}"
        tensors |= {
            f"{block}.attn_norm.weight": ones,
            f"{block}.attn_q.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_k.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_v.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.attn_output.weight": weight(spec.n_embd, spec.n_embd),
            f"{block}.ffn_norm.weight": ones,
            f"{block}.ffn_gate.weight": weight(spec.n_ff, spec.n_embd),
            f"{block}.ffn_up.weight": weight(spec.n_ff, spec.n_embd),
            f"{block}.ffn_down.weight": weight(spec.n_embd, spec.n_ff),
        }
    return tensors


def write_demo_model(path: Path, variant: str = "demo") -> Path:
    """Write the ``variant`` demo model to ``path`` atomically; returns the path.

    The same variant always produces the same bytes.
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
    tokens, scores, types = _vocabulary(spec)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp_name, "llama")
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
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(_LLAMA_CHAT_TEMPLATE)
        for name, tensor in _tensors(spec, len(tokens)).items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
