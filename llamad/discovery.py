"""Models found where users already keep them.

``[daemon] models_dirs = [...]`` names folders to scan for GGUF files;
``discover = [...]`` names the caches other tools fill:

- ``llama.cpp``: llama.cpp's download cache, ``$LLAMA_CACHE`` or
  ``~/.cache/llama.cpp``: flat files from ``-mu``/``-dr`` and older ``-hf``
  downloads (``org_repo_file.gguf``);
- ``huggingface``: the Hugging Face hub cache, which ``huggingface-cli``,
  ``transformers`` and llama.cpp's ``-hf`` now fill (``$HF_HUB_CACHE``,
  ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``:
  ``models--org--name/snapshots/REV/....gguf``, the revision ``refs/main``
  names);
- ``lmstudio``: ``~/.lmstudio/models/PUBLISHER/REPO/*.gguf`` (and the older
  ``~/.cache/lm-studio/models``);
- ``ollama``: ``$OLLAMA_MODELS`` or ``~/.ollama/models``, whose
  ``manifests/REGISTRY/NAMESPACE/MODEL/TAG`` JSON names the GGUF blob (and a
  vision projector) by digest under ``blobs/sha256-...``.

Each model gets a stable readable name made from its file or Ollama name
(``qwen2.5-7b-instruct:q4_k_m``, ``llama3.2:3b``). A split GGUF is one model
(its first part); a projector (``mmproj*.gguf``) beside a model is paired with
it. Entries in models.toml always win: a found file that an entry already
names is left out, and a found name that an entry already uses gets the finder
as a suffix (``name@ollama``), as does the second of two finders finding the
same name.

The walks (``find_models``) are the only I/O here; the naming and pairing
functions are pure. Files are only looked at, never opened, and only files
owned by the user or root are taken: a model file is parsed by llama.cpp.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FINDERS = ("llama.cpp", "huggingface", "lmstudio", "ollama")
MODELS_DIRS = "models_dirs"

_MAX_DEPTH = 8  # folders below a scanned root
_MAX_ENTRIES = 20_000  # directory entries looked at per root, so a wrong root cannot stall a load
_SKIP_DIRS = frozenset({".git", "node_modules", "__pycache__", ".venv", "venv", ".cache", "blobs"})
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})$")
# Quantization tags as they end file names: Q4_K_M, Q8_0, IQ4_XS, F16, BF16,
# UD-Q4_K_XL (Unsloth), Q4_0_4_4, MXFP4, TQ1_0...
_QUANT = re.compile(
    r"[-._](?P<quant>(?:ud-)?(?:i?q\d(?:_[a-z0-9]+)*|b?f(?:16|32)|fp(?:16|32)|mxfp4(?:_moe)?|tq\d_\d))$",
    re.IGNORECASE,
)
_OLLAMA_MODEL = "application/vnd.ollama.image.model"
_OLLAMA_PROJECTOR = "application/vnd.ollama.image.projector"
_DIGEST = re.compile(r"sha256[:-](?P<hex>[0-9a-f]{64})")


@dataclass(frozen=True)
class FoundModel:
    """A GGUF model found on disk, and what to call it."""

    name: str
    path: Path  # the file, or the first part of a split model
    source: str  # "models_dirs", or one of FINDERS
    mmproj: Path | None = None


# ---------------------------------------------------------------- pure parts


def split_stem(stem: str) -> tuple[str, int, int] | None:
    """``("name", 1, 3)`` for ``name-00001-of-00003``; None when not a split part."""
    match = _SPLIT.match(stem)
    if match is None:
        return None
    return match["stem"], int(match["no"]), int(match["count"])


def is_projector_name(filename: str) -> bool:
    """``mmproj-model-f16.gguf``, ``gemma-3-4b-mmproj.gguf``: a vision projector, not a model."""
    return "mmproj" in filename.lower()


def model_name(stem: str) -> str:
    """A readable, stable name from a GGUF file's stem.

    ``Qwen2.5-7B-Instruct-Q4_K_M`` -> ``qwen2.5-7b-instruct:q4_k_m``;
    ``SmolLM2-135M-Instruct.Q4_1`` -> ``smollm2-135m-instruct:q4_1``;
    llama.cpp's old cache names ``org_Repo-GGUF_file`` keep only the file part;
    split parts lose their ``-00001-of-00003``. Lower case, no spaces or
    slashes (a name is also a file name under the runtime directory).
    """
    split = split_stem(stem)
    if split is not None:
        stem = split[0]
    marker = re.search(r"-gguf_", stem, re.IGNORECASE)
    if marker is not None:
        stem = stem[marker.end() :]
    quant = _QUANT.search(stem)
    if quant is not None and _clean(stem[: quant.start()]):
        return f"{_clean(stem[: quant.start()])}:{quant['quant'].lower()}"
    return _clean(stem)


def _clean(text: str) -> str:
    text = re.sub(r"[\s/\\:]+", "-", text.strip().lower())
    return re.sub(r"-{2,}", "-", text).strip("-._")


def ollama_name(parts: Sequence[str]) -> str:
    """A name for the manifest at ``REGISTRY/NAMESPACE.../MODEL/TAG``, as Ollama spells it.

    ``registry.ollama.ai/library/llama3.2/3b`` -> ``llama3.2:3b``; another
    namespace is kept in front (``user-model:tag``); a model pulled from
    Hugging Face (``hf.co/org/Repo-GGUF/Q4_K_M``) is named after the repository
    (``repo:q4_k_m``).
    """
    *where, model, tag = parts
    registry, namespace = (where[0], where[1:]) if where else ("", [])
    tag = tag.lower()
    if registry == "hf.co" or model.lower().endswith("-gguf"):
        model = re.sub(r"-gguf$", "", model, flags=re.IGNORECASE)
        return f"{_clean(model)}:{tag}"
    if list(namespace) == ["library"]:
        return f"{_clean(model)}:{tag}"
    return f"{'-'.join(_clean(n) for n in namespace)}-{_clean(model)}:{tag}"


def pair_projectors(models: Sequence[Path], projectors: Sequence[Path]) -> dict[Path, Path]:
    """Which projector goes with which model of one folder.

    One projector serves every model beside it. With several, each model takes
    the one whose name shares the longest start with its own once ``mmproj`` is
    taken out (``mmproj-gemma-3-4b-it-f16`` for ``gemma-3-4b-it-Q4_K_M``),
    preferring f16, then bf16, then f32, then the rest by name.
    """
    if not projectors:
        return {}
    order = {"f16": 0, "bf16": 1, "f32": 2}

    def quality(projector: Path) -> tuple[int, str]:
        quant = _QUANT.search(projector.stem)
        return order.get(quant["quant"].lower() if quant else "", 3), projector.name

    ranked = sorted(projectors, key=quality)
    if len(projectors) == 1:
        return dict.fromkeys(models, ranked[0])

    def affinity(model: Path, projector: Path) -> int:
        core = _QUANT.sub("", re.sub("mmproj", "", projector.stem, flags=re.IGNORECASE))
        return _common_prefix(_clean(core), _clean(model.stem))

    return {model: max(ranked, key=lambda p: affinity(model, p)) for model in models}


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        count += 1
    return count


def group_folder(files: Iterable[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """A folder's GGUF files as models (first parts of splits) and their projectors."""
    models: list[Path] = []
    projectors: list[Path] = []
    for file in sorted(files):
        if is_projector_name(file.name):
            projectors.append(file)
        elif file.name.startswith("ggml-vocab-"):
            continue  # llama.cpp's tokenizer test files, not models
        else:
            split = split_stem(file.stem)
            if split is None or split[1] == 1:
                models.append(file)
    return models, pair_projectors(models, projectors)


def merge(
    configured_paths: Iterable[Path],
    configured_names: Iterable[str],
    found: Iterable[FoundModel],
) -> list[FoundModel]:
    """Found models in order, minus those models.toml already names, with unique names.

    A file an entry already uses is left out (the same file found twice too);
    a name already taken gets ``@source``, then ``@source-2``...
    """
    taken = set(configured_names)
    seen = {_identity(path) for path in configured_paths}
    kept: list[FoundModel] = []
    for model in found:
        identity = _identity(model.path)
        if identity in seen:
            continue
        seen.add(identity)
        name = model.name
        if name in taken:
            name = f"{model.name}@{model.source}"
            number = 2
            while name in taken:
                name = f"{model.name}@{model.source}-{number}"
                number += 1
        taken.add(name)
        kept.append(FoundModel(name, model.path, model.source, model.mmproj))
    return kept


def _identity(path: Path) -> str:
    try:
        return os.path.realpath(path)
    except OSError:
        return str(path)


# ------------------------------------------------------------------ the walks


def _trusted(path: Path, uid: int) -> bool:
    """Owned by us or root: another user's file is never handed to llama-server."""
    try:
        owner = path.stat().st_uid
    except OSError:
        return False
    if owner not in (uid, 0):
        log.info("not offering %s: it belongs to uid %d", path, owner)
        return False
    return True


def _gguf_files(root: Path, *, follow_links: bool = False) -> Iterator[Path]:
    """Every ``*.gguf`` under ``root``, bounded in depth and entries."""
    entries = 0
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as scan:
                items = sorted(scan, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in items:
            entries += 1
            if entries > _MAX_ENTRIES:
                log.warning("stopped scanning %s after %d entries", root, _MAX_ENTRIES)
                return
            try:
                if entry.is_dir(follow_symlinks=follow_links):
                    if depth < _MAX_DEPTH and entry.name not in _SKIP_DIRS:
                        stack.append((Path(entry.path), depth + 1))
                elif entry.name.lower().endswith(".gguf") and entry.is_file():
                    yield Path(entry.path)
            except OSError:
                continue


def _scan_folders(roots: Iterable[Path], source: str, uid: int) -> list[FoundModel]:
    """Plain folders (models_dirs, llama.cpp's cache, LM Studio): names from file names."""
    by_folder: dict[Path, list[Path]] = {}
    for root in roots:
        for file in _gguf_files(root):
            if _trusted(file, uid):
                by_folder.setdefault(file.parent, []).append(file)
    found = []
    for folder in sorted(by_folder):
        models, projectors = group_folder(by_folder[folder])
        found += [
            FoundModel(model_name(model.stem), model, source, projectors.get(model))
            for model in models
        ]
    return found


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def _cache_home(env: Mapping[str, str]) -> Path:
    return Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else _home(env) / ".cache"


def hf_hub_dir(env: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, found as huggingface_hub (and llama.cpp) find it."""
    for variable, below in (
        ("HF_HUB_CACHE", ""),
        ("HUGGINGFACE_HUB_CACHE", ""),
        ("HF_HOME", "hub"),
    ):
        if env.get(variable):
            return Path(env[variable]) / below if below else Path(env[variable])
    return _cache_home(env) / "huggingface" / "hub"


def _find_llama_cpp(env: Mapping[str, str], uid: int) -> list[FoundModel]:
    root = Path(env["LLAMA_CACHE"]) if env.get("LLAMA_CACHE") else _cache_home(env) / "llama.cpp"
    flat = _scan_folders([root], "llama.cpp", uid)
    # With $LLAMA_CACHE set, recent llama.cpp puts -hf downloads there in the hub layout.
    return flat + _hub_models(root, "llama.cpp", uid)


def _hub_models(hub: Path, source: str, uid: int) -> list[FoundModel]:
    """``models--org--name/snapshots/REV/...gguf``, the revision refs/main names."""
    found = []
    try:
        repos = sorted(p for p in hub.iterdir() if p.name.startswith("models--") and p.is_dir())
    except OSError:
        return []
    for repo in repos:
        snapshot = _current_snapshot(repo)
        if snapshot is None:
            continue
        files = [f for f in _gguf_files(snapshot, follow_links=False) if _trusted(f, uid)]
        by_folder: dict[Path, list[Path]] = {}
        for file in files:
            by_folder.setdefault(file.parent, []).append(file)
        for folder in sorted(by_folder):
            models, projectors = group_folder(by_folder[folder])
            found += [FoundModel(model_name(m.stem), m, source, projectors.get(m)) for m in models]
    return found


def _current_snapshot(repo: Path) -> Path | None:
    """refs/main's revision, else the newest snapshot folder."""
    snapshots = repo / "snapshots"
    try:
        revision = (repo / "refs" / "main").read_text().strip()
    except OSError:
        revision = ""
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    try:
        candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def _find_lmstudio(env: Mapping[str, str], uid: int) -> list[FoundModel]:
    home = _home(env)
    roots = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    try:  # a models folder moved in LM Studio's settings
        settings = json.loads((home / ".lmstudio" / "settings.json").read_text())
        moved = settings.get("downloadsFolder") if isinstance(settings, dict) else None
        if isinstance(moved, str) and moved:
            roots.insert(0, Path(moved).expanduser())
    except (OSError, ValueError):
        pass
    return _scan_folders(dict.fromkeys(roots), "lmstudio", uid)


def ollama_dir(env: Mapping[str, str]) -> Path:
    return (
        Path(env["OLLAMA_MODELS"])
        if env.get("OLLAMA_MODELS")
        else _home(env) / ".ollama" / "models"
    )


def _find_ollama(env: Mapping[str, str], uid: int) -> list[FoundModel]:
    root = ollama_dir(env)
    manifests = root / "manifests"
    found = []
    for manifest in sorted(_manifests(manifests)):
        parts = manifest.relative_to(manifests).parts  # registry, namespace..., model, tag
        model_path, projector = _ollama_blobs(root, manifest)
        if model_path is None or not _trusted(model_path, uid):
            continue
        found.append(FoundModel(ollama_name(parts), model_path, "ollama", projector))
    return found


def _manifests(root: Path) -> Iterator[Path]:
    """Manifest files: at least REGISTRY/NAMESPACE/MODEL/TAG below ``root``."""
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and level < 6:
                stack.append((Path(entry.path), level + 1))
            elif entry.is_file(follow_symlinks=False) and level >= 3:
                yield Path(entry.path)


def _ollama_blobs(root: Path, manifest: Path) -> tuple[Path | None, Path | None]:
    """The model blob and projector blob a manifest names (None when absent)."""
    try:
        document = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None, None
    layers = document.get("layers") if isinstance(document, dict) else None
    model = projector = None
    for layer in layers if isinstance(layers, list) else ():
        if not isinstance(layer, dict):
            continue
        digest = _DIGEST.fullmatch(str(layer.get("digest", "")))
        if digest is None:
            continue
        blob = root / "blobs" / f"sha256-{digest['hex']}"
        if not blob.is_file():
            continue
        if layer.get("mediaType") == _OLLAMA_MODEL and model is None:
            model = blob
        elif layer.get("mediaType") == _OLLAMA_PROJECTOR and projector is None:
            projector = blob
    return model, projector


_FIND = {
    "llama.cpp": _find_llama_cpp,
    "huggingface": lambda env, uid: _hub_models(hf_hub_dir(env), "huggingface", uid),
    "lmstudio": _find_lmstudio,
    "ollama": _find_ollama,
}


def find_models(
    models_dirs: Sequence[Path],
    discover: Sequence[str],
    env: Mapping[str, str] = os.environ,
    *,
    uid: int | None = None,
) -> list[FoundModel]:
    """Every model in ``models_dirs`` then in the caches ``discover`` names, in that order.

    Unnamed and unreadable folders are simply empty. Names are not yet made
    unique against models.toml: ``merge`` does that.
    """
    uid = os.getuid() if uid is None else uid
    found = _scan_folders(models_dirs, MODELS_DIRS, uid)
    for finder in discover:
        found += _FIND[finder](env, uid)
    return found
