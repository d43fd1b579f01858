"""llamad.discovery: names and pairing (pure), and each tool's real cache layout on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llamad.config import ConfigError, load_config
from llamad.demo_model import write_demo_model
from llamad.discovery import (
    FoundModel,
    find_models,
    group_folder,
    merge,
    model_name,
    ollama_name,
    pair_projectors,
)
from tests.conftest import Llamad

# ------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("stem", "name"),
    [
        ("Qwen2.5-7B-Instruct-Q4_K_M", "qwen2.5-7b-instruct:q4_k_m"),
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m-instruct:q4_1"),
        ("gemma-3-270m-q4_k_m", "gemma-3-270m:q4_k_m"),
        ("mistral-7b-v0.1.Q5_K_S", "mistral-7b-v0.1:q5_k_s"),
        ("Llama-3.2-1B-Instruct-UD-Q4_K_XL", "llama-3.2-1b-instruct:ud-q4_k_xl"),
        ("tinyllama-1.1b-chat-v1.0.fp16", "tinyllama-1.1b-chat-v1.0:fp16"),
        ("gpt-oss-20b-MXFP4", "gpt-oss-20b:mxfp4"),
        ("Phi-3-mini-4k-instruct-IQ4_XS", "phi-3-mini-4k-instruct:iq4_xs"),
        ("model-BF16", "model:bf16"),
        # llama.cpp's older -hf cache: org_repo_file
        ("ggml-org_gemma-3-1b-it-GGUF_gemma-3-1b-it-Q4_K_M", "gemma-3-1b-it:q4_k_m"),
        # the parts of a split model share one name
        ("Meta-Llama-3.1-70B-Instruct-Q4_K_M-00001-of-00002", "meta-llama-3.1-70b-instruct:q4_k_m"),
        ("phi-2", "phi-2"),
        ("Q4_K_M", "q4_k_m"),
        ("My Model/with:odd chars", "my-model-with-odd-chars"),
    ],
)
def test_model_names(stem: str, name: str) -> None:
    assert model_name(stem) == name
    assert "/" not in name and " " not in name


def test_ollama_names() -> None:
    assert ollama_name(["registry.ollama.ai", "library", "llama3.2", "3b"]) == "llama3.2:3b"
    assert ollama_name(["registry.ollama.ai", "joe", "Notes", "latest"]) == "joe-notes:latest"
    assert (
        ollama_name(["hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"])
        == "llama-3.2-1b-instruct:q4_k_m"
    )


def test_projectors_pair_with_the_models_beside_them() -> None:
    folder = Path("/m")
    one = [folder / "mmproj-model-f16.gguf"]
    models = [folder / "a-Q4_K_M.gguf", folder / "a-Q8_0.gguf"]
    assert pair_projectors(models, one) == dict.fromkeys(models, one[0])
    assert pair_projectors(models, []) == {}
    several = [
        folder / "mmproj-gemma-3-4b-it-f32.gguf",
        folder / "mmproj-gemma-3-4b-it-f16.gguf",
        folder / "mmproj-qwen2.5-vl-7b-f16.gguf",
    ]
    gemma, qwen = folder / "gemma-3-4b-it-Q4_K_M.gguf", folder / "Qwen2.5-VL-7B-Q4_K_M.gguf"
    assert pair_projectors([gemma, qwen], several) == {gemma: several[1], qwen: several[2]}


def test_a_folder_groups_split_parts_and_leaves_out_projectors() -> None:
    folder = Path("/m")
    files = [
        folder / "big-Q4_K_M-00002-of-00002.gguf",
        folder / "big-Q4_K_M-00001-of-00002.gguf",
        folder / "small.gguf",
        folder / "mmproj-F16.gguf",
        folder / "ggml-vocab-llama-bpe.gguf",
    ]
    models, projectors = group_folder(files)
    assert models == [folder / "big-Q4_K_M-00001-of-00002.gguf", folder / "small.gguf"]
    assert set(projectors.values()) == {folder / "mmproj-F16.gguf"}


def test_merge_lets_models_toml_win(tmp_path: Path) -> None:
    mine = tmp_path / "mine.gguf"
    mine.touch()
    other = tmp_path / "other.gguf"
    other.touch()
    link = tmp_path / "link.gguf"
    link.symlink_to(other)
    found = [
        FoundModel("mine:q4", mine, "models_dirs"),  # the file an entry already uses
        FoundModel("smol", other, "ollama"),  # a name an entry already uses
        FoundModel("again", link, "huggingface"),  # the same file once more
        FoundModel("x:q8", tmp_path / "x1", "lmstudio"),
        FoundModel("x:q8", tmp_path / "x2", "lmstudio"),
        FoundModel("x:q8", tmp_path / "x3", "ollama"),
    ]
    kept = merge([mine], ["smol", "smollm2"], found)
    assert [(m.name, m.source) for m in kept] == [
        ("smol@ollama", "ollama"),
        ("x:q8", "lmstudio"),
        ("x:q8@lmstudio", "lmstudio"),
        ("x:q8@ollama", "ollama"),
    ]


# ------------------------------------------------------- real layouts on disk


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small real GGUF model (the demo writer's) to put wherever a tool would."""
    return write_demo_model(tmp_path_factory.mktemp("src") / "demo.gguf", "demo").read_bytes()


def _put(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _hf_repo(hub: Path, repo: str, files: dict[str, bytes], revision: str = "a" * 40) -> Path:
    """The huggingface_hub layout: blobs by hash, a snapshot of symlinks, refs/main."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        _put(folder / "blobs" / digest, content)
        link = folder / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(folder / "blobs" / digest, link.parent))
    _put(folder / "refs" / "main", revision.encode())
    return folder


def _ollama_model(
    root: Path, parts: list[str], model: bytes, projector: bytes | None = None
) -> Path:
    """Ollama's store: blobs/sha256-HEX and a manifest naming them."""
    layers = []
    for media, content in (
        ("model", model),
        ("projector", projector),
        ("template", b"{{ .Prompt }}"),
    ):
        if content is None:
            continue
        digest = hashlib.sha256(content).hexdigest()
        _put(root / "blobs" / f"sha256-{digest}", content)
        layers.append(
            {
                "mediaType": f"application/vnd.ollama.image.{media}",
                "digest": f"sha256:{digest}",
                "size": len(content),
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": "sha256:" + "0" * 64,
            "size": 2,
        },
        "layers": layers,
    }
    return _put(root / "manifests" / Path(*parts), json.dumps(manifest).encode())


def test_models_dirs_with_splits_and_projectors(tmp_path: Path, gguf_bytes: bytes) -> None:
    root = tmp_path / "models"
    _put(root / "Foo-7B-Instruct-Q4_K_M.gguf", gguf_bytes)
    _put(root / "mmproj-foo-7b-f16.gguf", gguf_bytes)
    write_demo_model(root / "deep" / "er" / "Big-Q8_0.gguf", "demo-b", split_max_tensors=10)
    _put(root / "notes.txt", b"not a model")
    _put(root / ".git" / "hidden.gguf", gguf_bytes)
    found = find_models([root], [], {"HOME": str(tmp_path)})
    assert [(m.name, m.path.relative_to(root), m.source) for m in found] == [
        ("foo-7b-instruct:q4_k_m", Path("Foo-7B-Instruct-Q4_K_M.gguf"), "models_dirs"),
        ("big:q8_0", Path("deep/er/Big-Q8_0-00001-of-00003.gguf"), "models_dirs"),
    ]
    assert found[0].mmproj == root / "mmproj-foo-7b-f16.gguf"
    assert found[1].mmproj is None


def test_each_tools_cache(tmp_path: Path, gguf_bytes: bytes) -> None:
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    # llama.cpp's cache: a flat file from an older -hf download, and its etag file.
    cache = home / ".cache" / "llama.cpp"
    _put(cache / "ggml-org_gemma-3-1b-it-GGUF_gemma-3-1b-it-Q4_K_M.gguf", gguf_bytes)
    _put(cache / "ggml-org_gemma-3-1b-it-GGUF_gemma-3-1b-it-Q4_K_M.gguf.json", b"{}")
    # The hub: the current revision, and an older one refs/main no longer names.
    hub = home / ".cache" / "huggingface" / "hub"
    _hf_repo(
        hub,
        "bartowski/Qwen2.5-0.5B-Instruct-GGUF",
        {"Qwen2.5-0.5B-Instruct-Q4_K_M.gguf": gguf_bytes},
    )
    old = hub / "models--bartowski--Qwen2.5-0.5B-Instruct-GGUF" / "snapshots" / ("b" * 40)
    _put(old / "Qwen2.5-0.5B-Instruct-Q2_K.gguf", gguf_bytes)
    _hf_repo(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", {"config.json": b"{}"})  # no GGUF
    # LM Studio: publisher/repo folders, a model with its projector.
    studio = home / ".lmstudio" / "models" / "lmstudio-community" / "Qwen2-VL-2B-Instruct-GGUF"
    _put(studio / "Qwen2-VL-2B-Instruct-Q4_K_M.gguf", gguf_bytes)
    _put(studio / "mmproj-Qwen2-VL-2B-Instruct-f16.gguf", gguf_bytes + b"p")
    # Ollama: a library model with a projector, a user's model, one from hf.co.
    store = home / ".ollama" / "models"
    _ollama_model(
        store, ["registry.ollama.ai", "library", "llava", "7b"], gguf_bytes, gguf_bytes + b"x"
    )
    _ollama_model(store, ["registry.ollama.ai", "joe", "notes", "latest"], gguf_bytes + b"y")
    _ollama_model(
        store, ["hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"], gguf_bytes + b"z"
    )
    broken = store / "manifests" / "registry.ollama.ai" / "library" / "gone" / "latest"
    _put(
        broken,
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": "sha256:" + "f" * 64,
                    }
                ]
            }
        ).encode(),
    )

    found = find_models([], ["llama.cpp", "huggingface", "lmstudio", "ollama"], env)
    by_name = {m.name: m for m in found}
    assert list(by_name) == [  # in the order of `discover`, each cache sorted
        "gemma-3-1b-it:q4_k_m",
        "qwen2.5-0.5b-instruct:q4_k_m",
        "qwen2-vl-2b-instruct:q4_k_m",
        "llama-3.2-1b-instruct:q4_k_m",
        "joe-notes:latest",
        "llava:7b",
    ]
    assert {m.name: m.source for m in found} == {
        "gemma-3-1b-it:q4_k_m": "llama.cpp",
        "qwen2.5-0.5b-instruct:q4_k_m": "huggingface",
        "qwen2-vl-2b-instruct:q4_k_m": "lmstudio",
        "joe-notes:latest": "ollama",
        "llama-3.2-1b-instruct:q4_k_m": "ollama",
        "llava:7b": "ollama",
    }
    qwen = by_name["qwen2.5-0.5b-instruct:q4_k_m"]
    assert qwen.path.parent.name == "a" * 40 and qwen.path.read_bytes() == gguf_bytes
    assert by_name["qwen2-vl-2b-instruct:q4_k_m"].mmproj == (
        studio / "mmproj-Qwen2-VL-2B-Instruct-f16.gguf"
    )
    llava = by_name["llava:7b"]
    assert llava.path.parent == store / "blobs" and llava.path.name.startswith("sha256-")
    assert llava.mmproj is not None and llava.mmproj.read_bytes() == gguf_bytes + b"x"
    # Only what was asked for is looked at.
    assert {m.source for m in find_models([], ["ollama"], env)} == {"ollama"}
    assert find_models([], [], env) == []


def test_the_environment_moves_the_caches(tmp_path: Path, gguf_bytes: bytes) -> None:
    hub = tmp_path / "elsewhere" / "hub"
    _hf_repo(hub, "org/Thing-GGUF", {"thing-Q4_0.gguf": gguf_bytes})
    store = tmp_path / "ollama-store"
    _ollama_model(store, ["registry.ollama.ai", "library", "thing", "latest"], gguf_bytes + b"o")
    env = {"HOME": str(tmp_path / "empty"), "HF_HUB_CACHE": str(hub), "OLLAMA_MODELS": str(store)}
    assert [m.name for m in find_models([], ["huggingface", "ollama"], env)] == [
        "thing:q4_0",
        "thing:latest",
    ]
    env = {"HOME": str(tmp_path / "empty"), "HF_HOME": str(tmp_path / "elsewhere")}
    assert [m.name for m in find_models([], ["huggingface"], env)] == ["thing:q4_0"]


def test_files_of_other_users_are_not_offered(tmp_path: Path, gguf_bytes: bytes) -> None:
    root = tmp_path / "models"
    _put(root / "mine-Q4_0.gguf", gguf_bytes)
    me = os.getuid()
    assert [m.name for m in find_models([root], [], {}, uid=me)] == (
        ["mine:q4_0"] if me == root.stat().st_uid else []
    )
    # As seen by another uid, a file owned by us (not root) is someone else's.
    if me != 0:
        assert find_models([root], [], {}, uid=me + 1) == []
    else:
        os.chown(root / "mine-Q4_0.gguf", 12345, 12345)
        assert find_models([root], [], {}, uid=0) == []


# --------------------------------------------------------- in models.toml


def _write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(body)
    return path


def test_config_adds_found_models_after_its_own(tmp_path: Path, gguf_bytes: bytes) -> None:
    root = tmp_path / "found"
    _put(root / "Alpha-Q4_K_M.gguf", gguf_bytes)
    _put(root / "Beta-Q8_0.gguf", gguf_bytes + b"b")
    config = load_config(
        _write_config(
            tmp_path,
            f"""
            [daemon]
            models_dirs = ["{root}"]
            default_model = "beta:q8_0"
            restart_sec = 2
            [models."alpha:q4_k_m"]
            path = "{tmp_path / "my-own.gguf"}"
            [models.mine]
            path = "{root / "Alpha-Q4_K_M.gguf"}"
            ctx_size = 8192
            """.replace("\n            ", "\n"),
        ),
        {"HOME": str(tmp_path)},
    )
    assert list(config.models) == ["alpha:q4_k_m", "mine", "beta:q8_0"]
    assert config.models["mine"].source == "models.toml"
    assert config.models["mine"].ctx_size == 8192  # the entry, not a found copy
    beta = config.models["beta:q8_0"]
    assert (beta.source, beta.path) == ("models_dirs", root / "Beta-Q8_0.gguf")
    assert beta.supervision.restart_sec == 2  # [daemon] defaults apply
    assert config.resolve("beta:q8_0") is beta


def test_config_errors_for_discovery(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            _write_config(tmp_path, '[daemon]\ndiscover = ["olama", "docker"]\n'),
            {"HOME": str(tmp_path)},
        )
    where = f"{tmp_path / 'models.toml'}: daemon.discover"
    assert caught.value.problems == [
        f'{where}[0]: no finder "olama"; did you mean "ollama"?',
        f'{where}[1]: no finder "docker"; known: llama.cpp, huggingface, lmstudio, ollama',
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(
            _write_config(
                tmp_path, f'[daemon]\nmodels_dirs = ["{tmp_path}"]\ndefault_model = "nothing"\n'
            ),
            {"HOME": str(tmp_path)},
        )
    assert caught.value.problems == [
        f'{tmp_path / "models.toml"}: daemon.default_model: no model or alias named "nothing"; '
        "models: none configured or found"
    ]


# ----------------------------------------------- through llamad, for real


@pytest.mark.server
def test_llamad_offers_and_runs_found_models(
    make_llamad: Callable[..., Llamad], demo_models: dict[str, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    store = home / ".ollama" / "models"
    _ollama_model(
        store, ["registry.ollama.ai", "library", "tiny", "1b"], demo_models["demo-b"].read_bytes()
    )
    split_dir = tmp_path / "mine"
    write_demo_model(split_dir / "Split-Q8_0.gguf", "demo", split_max_tensors=8)
    daemon = make_llamad(
        f'[models.demo]\npath = "{demo_models["demo"]}"\nctx_size = 512\n',
        f'models_dirs = ["{split_dir}"]\ndiscover = ["ollama", "huggingface"]\n',
    )
    daemon.env["HOME"] = str(home)
    daemon.start()
    listing = daemon.ctl("models")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()}
    assert list(rows) == ["demo", "split:q8_0", "tiny:1b"]
    assert rows["demo"][7] == "models.toml"
    assert rows["split:q8_0"][7] == "models_dirs"
    assert rows["tiny:1b"][7] == "ollama"
    # The Ollama blob and the split model load in the real llama-server.
    for name in ("tiny:1b", "split:q8_0"):
        loaded = daemon.ctl("load", name)
        assert loaded.returncode == 0, loaded.stderr + daemon.log()[-2000:]
        assert f"{name} ready in" in loaded.stdout
    # A new file appears on reload.
    shutil.copy(demo_models["demo"], split_dir / "Later-F32.gguf")
    assert daemon.ctl("reload").returncode == 0
    assert "later:f32" in daemon.ctl("models").stdout
