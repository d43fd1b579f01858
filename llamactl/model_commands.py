"""``llamactl models`` and ``llamactl show``: what is configured, and what a model is.

``show`` reads the model's GGUF header itself (llamactl runs as the same user on
the same machine; the path comes from llamad's status reply), so
``llamad.gguf_info`` is imported only by the commands that need it and
``llamactl status`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamactl.client import Client, ClientError, resolve_socket
from llamactl.output import print_json
from llamad.protocol import ModelMemory, ModelStatus, Ok, Reload, Status, StatusReply

if TYPE_CHECKING:
    from llamad.gguf_info import GGUFInfo


def add_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    reading: argparse.ArgumentParser,
) -> None:
    """``models`` (with ``add`` and ``remove``) and ``show``."""
    models = commands.add_parser(
        "models", parents=[reading], help="configured and found models, their files and sizes"
    )
    edits = models.add_subparsers(dest="models_action", metavar="[add|remove]")
    editing = argparse.ArgumentParser(add_help=False, parents=[common])
    editing.add_argument(
        "--config", metavar="FILE", help="the models.toml to change (default: llamad's own)"
    )
    add = edits.add_parser(
        "add", parents=[editing], help="add a [models.NAME] entry to models.toml and reload"
    )
    add.add_argument("name")
    add.add_argument("path", type=Path, help="the GGUF file (any part of a split model)")
    add.add_argument("--ctx-size", type=int, metavar="N")
    add.add_argument("--n-gpu-layers", "-ngl", type=int, metavar="N")
    add.add_argument("--parallel", type=int, metavar="N")
    add.add_argument("--mmproj", type=Path, metavar="FILE", help="a vision projector")
    add.add_argument("--alias", action="append", default=[], metavar="NAME")
    add.add_argument("--args", metavar="'ARGS'", help="llama-server arguments, one string")
    defaults = add.add_argument_group("generation defaults for chats that do not set them")
    for option, kind in _SAMPLING_OPTIONS.items():
        defaults.add_argument(f"--{option.replace('_', '-')}", dest=option, type=kind)
    remove = edits.add_parser(
        "remove", parents=[editing], help="remove a model's entry from models.toml and reload"
    )
    remove.add_argument("name")
    show = commands.add_parser(
        "show", parents=[reading], help="what a model's GGUF file says, and its memory estimate"
    )
    show.add_argument("model", help="model name or alias, or the path of a GGUF file")


def without_daemon(args: argparse.Namespace) -> int | None:
    """Run a command that does not need llamad; None when it does."""
    if args.command == "show" and _looks_like_a_file(args.model):
        return _show_file(Path(args.model), args)
    if args.command == "models" and args.models_action is not None:
        return _edit_config(args)  # works with or without llamad
    return None


def _looks_like_a_file(text: str) -> bool:
    return ("/" in text or text.endswith(".gguf")) and Path(text).exists()


# ------------------------------------------------------------------ models


def _size(count: int | None) -> str:
    """Bytes on disk, as file managers and model hubs write them (decimal)."""
    if count is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            value = count / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{count} B"


def _memory(count: int) -> str:
    """Bytes of memory, in binary units as free(1) and nvidia-smi show them."""
    if count >= 1 << 30:
        return f"{count / (1 << 30):.1f} GiB"
    return f"{count / (1 << 20):.0f} MiB"


def _context(tokens: int | None) -> str:
    if not tokens:
        return "?"
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _row(model: ModelStatus, width: int = 16) -> str:
    context = _context(model.context_length)
    if model.ctx_size and model.ctx_size != model.context_length:
        context = f"{_context(model.ctx_size)}/{context}"
    aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
    missing = "" if model.file_exists else "  MISSING FILE"
    if model.file_exists and any("not a GGUF" in w for w in model.warnings):
        missing = "  NOT A GGUF FILE"
    extras = [*(["vision"] if model.vision else []), *(f"tool {t}" for t in model.tools)]
    if any(w.startswith("base model") for w in model.warnings):
        extras.append("base model")
    can = f"  [{', '.join(extras)}]" if extras else ""
    where = model.endpoint if model.remote else model.path
    if model.remote:
        missing = ""
    return (
        f"{model.name:<{width}} {model.state:<9} {_size(model.size):>7} "
        f"{model.quantization or '-':<7} ctx {context:<8} {model.source or '-':<11} "
        f"{where}{missing}{aliases}{can}"
    )


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    if args.json:
        print_json(reply.models)
        return 0
    width = max([16, *(len(m.name) for m in reply.models)])
    for model in reply.models:
        print(_row(model, width))
    return 0


# -------------------------------------------------------------------- show


def _find(reply: StatusReply, name: str) -> ModelStatus | None:
    for model in reply.models:
        if model.name == name:
            return model
    return next((m for m in reply.models if name in m.aliases), None)


def cmd_show(client: Client, args: argparse.Namespace) -> int:
    reply = client.call(lambda i: Status(id=i))
    assert isinstance(reply, StatusReply)
    status = _find(reply, args.model)
    if status is None:
        known = ", ".join(m.name for m in reply.models) or "none configured"
        print(
            f"llamactl: unknown model {args.model!r}; configured models: {known}", file=sys.stderr
        )
        return 1
    return _show(Path(status.path), status, args)


def _show_file(path: Path, args: argparse.Namespace) -> int:
    return _show(path, None, args)


def _show(path: Path, status: ModelStatus | None, args: argparse.Namespace) -> int:
    from llamad.errors import ModelFileInvalid
    from llamad.gguf_info import read_gguf

    try:
        info = read_gguf(path)
    except ModelFileInvalid as exc:
        print(f"llamactl: {exc}", file=sys.stderr)
        return 1
    projector = None
    if status is not None and status.mmproj:
        try:
            projector = read_gguf(Path(status.mmproj))
        except ModelFileInvalid as exc:
            print(f"llamactl: projector {exc}", file=sys.stderr)
    if args.json:
        print_json(_as_json(info, status, projector))
    else:
        print("\n".join(_describe(info, status, projector)))
    return 0


def _as_json(
    info: GGUFInfo, status: ModelStatus | None, projector: GGUFInfo | None
) -> dict[str, Any]:
    return {
        "name": status.name if status else None,
        "source": status.source if status else None,
        "path": str(info.path),
        "parts": [str(p) for p in info.parts],
        "file_size": info.file_size,
        "architecture": info.architecture,
        "model_name": info.name,
        "size_label": info.size_label,
        "parameters": info.parameters,
        "quantization": info.quantization,
        "dominant_type": info.dominant_type,
        "context_length": info.context_length,
        "ctx_size": status.ctx_size if status else None,
        "layers": info.block_count,
        "embedding_length": info.embedding_length,
        "head_count": info.head_count,
        "head_count_kv": info.head_count_kv,
        "key_length": info.key_length,
        "value_length": info.value_length,
        "sliding_window": info.sliding_window,
        "chat_template": info.has_chat_template,
        "supports_tools": info.supports_tools,
        "base_model": not info.has_chat_template and not info.is_projector,
        "tokenizer": info.tokenizer,
        "vocab_size": info.vocab_size,
        "license": info.license,
        "projector": str(projector.path) if projector else None,
        "memory_estimate": (
            {"host": status.memory.estimated_host, "gpu": status.memory.estimated_gpu}
            if status
            else None
        ),
        "warnings": _warnings(info, status),
    }


def _count(parameters: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{unit}"
    return str(parameters)


def _describe(info: GGUFInfo, status: ModelStatus | None, projector: GGUFInfo | None) -> list[str]:
    title = status.name if status else info.path.name
    lines = [f"{title}" + (f"  (from {status.source})" if status and status.source else "")]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label:<14} {value}")

    parts = f", {len(info.parts)} parts" if len(info.parts) > 1 else ""
    row("file", f"{info.path} ({_size(info.file_size)}{parts})")
    if info.name:
        row("name", info.name)
    if info.is_projector:
        row("kind", "a vision projector (mmproj), not a model: give it as mmproj")
    labelled = f" ({info.size_label})" if info.size_label else ""
    row("architecture", f"{info.architecture}, {_count(info.parameters)} parameters{labelled}")
    mostly = (
        f", tensors mostly {info.dominant_type}" if info.dominant_type != info.quantization else ""
    )
    row("quantization", f"{info.quantization}{mostly}")
    context = f"{info.context_length:,} trained" if info.context_length else "not stated"
    if status and status.ctx_size:
        context += f"; runs with {status.ctx_size:,}"
    row("context", context)
    if info.block_count:
        heads = f"{info.head_count} heads, {info.head_count_kv} KV heads" if info.head_count else ""
        size = f", head size {info.key_length}" if info.key_length else ""
        row("layers", f"{info.block_count}, embedding {info.embedding_length}; {heads}{size}")
    if info.sliding_window:
        swa = sum(info.swa_layers)
        window = f"sliding window of {info.sliding_window} tokens"
        row("attention", f"{window} in {swa} of {info.layers} layers")
    if info.has_chat_template:
        tools = "supports tools" if info.supports_tools else "no tool support"
        row("chat template", f"yes ({tools})")
    elif not info.is_projector:
        row("chat template", "none")
    tokenizer = info.tokenizer or "?"
    if info.tokenizer_pre:
        tokenizer += f" ({info.tokenizer_pre})"
    if info.vocab_size:
        tokenizer += f", {info.vocab_size:,} tokens"
    row("tokenizer", tokenizer)
    row("license", info.license or "not stated in the file")
    if projector is not None:
        row("vision", f"projector {projector.path.name} ({_size(projector.file_size)})")
    elif status is not None:
        row("vision", "no projector (mmproj)")
    if status is not None and status.memory.estimated_host:
        row("memory", _estimate(status.memory, status))
    elif status is None and not info.is_projector:
        row("memory", _bare_estimate(info))
    lines += [f"  {warning}" for warning in _warnings(info, status)]
    return lines


def _bare_estimate(info: GGUFInfo) -> str:
    """For a file no models.toml entry describes: llamad's default context, and the full one."""
    from llamad.gguf_info import estimate_memory

    contexts = sorted({min(2048, info.context_length or 2048), info.context_length or 2048})
    figures = [
        f"{_memory(estimate_memory(info, ctx_size=ctx, parallel=None, n_gpu_layers=0).host)}"
        f" at ctx {ctx:,}"
        for ctx in contexts
    ]
    return f"about {'; '.join(figures)} (host, estimated)"


def _warnings(info: GGUFInfo, status: ModelStatus | None) -> list[str]:
    """llamad's warnings for a configured model; for a bare file, the template one."""
    from llamad.gguf_info import NO_TEMPLATE

    if status is not None:
        return list(status.warnings)
    return [] if info.has_chat_template or info.is_projector else [NO_TEMPLATE]


def _estimate(memory: ModelMemory, status: ModelStatus) -> str:
    where = f"{_memory(memory.estimated_host)} host"
    if memory.estimated_gpu:
        where += f" + {_memory(memory.estimated_gpu)} GPU"
    text = f"about {where} (estimated for ctx {status.ctx_size:,})"
    if memory.measured_pss:
        text += f"; {_memory(memory.measured_pss)} measured (PSS) while it runs"
    return text


# ------------------------------------------------------- models add / remove

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[")


def _header_key(line: str) -> tuple[str, ...] | None:
    """The key path of a ``[table]`` header line, as tomllib reads it; None otherwise."""
    if _ARRAY_HEADER.match(line):
        return ("[[",)
    match = _HEADER.match(line)
    if match is None:
        return None
    import tomllib

    try:
        parsed = tomllib.loads(f"[{match[1]}]\n")
    except tomllib.TOMLDecodeError:
        return None
    keys: list[str] = []
    while isinstance(parsed, dict) and len(parsed) == 1:
        key = next(iter(parsed))
        keys.append(key)
        parsed = parsed[key]
    return tuple(keys)


def render_entry(name: str, fields: dict[str, Any]) -> str:
    """The ``[models.NAME]`` table as TOML text (tomlkit quotes what needs quoting)."""
    import tomlkit

    document = tomlkit.document()
    models = tomlkit.table(is_super_table=True)
    table = tomlkit.table()
    for key, value in fields.items():
        table.add(key, value)
    models.add(name, table)
    document.add("models", models)
    return tomlkit.dumps(document).strip() + "\n"


def add_entry(text: str, name: str, fields: dict[str, Any]) -> str:
    """``text`` with a new ``[models.NAME]`` table appended; every other byte kept.

    Raises ``ValueError`` when the file already has that model.
    """
    if name in _models_in(text):
        raise ValueError(f"model {name!r} is already in the file; remove it first or pick a name")
    body = text if not text or text.endswith("\n") else text + "\n"
    separator = "\n" if body.strip() else ""
    return body + separator + render_entry(name, fields)


def remove_entry(text: str, name: str) -> str:
    """``text`` without the ``[models.NAME]`` table (and its sub-tables and the comment
    block right above it); everything else kept as it was.

    Raises ``ValueError`` when there is no such table header in the file.
    """
    lines = text.splitlines(keepends=True)
    wanted = ("models", name)
    start = next((i for i, line in enumerate(lines) if _header_key(line) == wanted), None)
    if start is None:
        if name in _models_in(text):
            raise ValueError(f"model {name!r} is not written as a [models.{name}] table")
        raise ValueError(f"no model {name!r} in the file")
    end = start + 1
    while end < len(lines):
        key = _header_key(lines[end])
        if key is not None and key[: len(wanted)] != wanted:
            break
        end += 1
    # The comments right above the next table describe it: they stay.
    while end > start + 1 and lines[end - 1].lstrip().startswith("#"):
        end -= 1
    # The comments right above this table describe it: they go with it.
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    kept = lines[:start] + lines[end:]
    if end == len(lines):  # it was the last table: no blank lines left at the end
        while kept and not kept[-1].strip():
            kept.pop()
    # One blank line where the table was, not two.
    while (
        start > 0 and start < len(kept) and not kept[start - 1].strip() and not kept[start].strip()
    ):
        del kept[start]
    return "".join(kept)


def _models_in(text: str) -> dict[str, Any]:
    import tomllib

    try:
        models = tomllib.loads(text).get("models", {})
    except tomllib.TOMLDecodeError:
        return {}
    return models if isinstance(models, dict) else {}


_SAMPLING_OPTIONS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "max_tokens": int,
    "system_prompt": str,
}


def _entry_fields(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    fields: dict[str, Any] = {"path": str(path)}
    for option, key in (("ctx_size", "ctx_size"), ("n_gpu_layers", "n_gpu_layers")):
        if getattr(args, option) is not None:
            fields[key] = getattr(args, option)
    if args.parallel is not None:
        fields["parallel"] = args.parallel
    if args.mmproj is not None:
        fields["mmproj"] = str(args.mmproj.expanduser().absolute())
    if args.alias:
        fields["aliases"] = list(args.alias)
    if args.args:
        import shlex

        fields["args"] = shlex.split(args.args)
    for option in _SAMPLING_OPTIONS:
        if getattr(args, option) is not None:
            fields[option] = getattr(args, option)
    return fields


def _edit_config(args: argparse.Namespace) -> int:
    """``models add`` / ``models remove``: change models.toml, check it, ask llamad to reload."""
    from llamad.errors import ConfigError

    try:
        client: Client | None = Client(resolve_socket(args.socket))
    except ClientError:
        client = None  # llamad is not running: it will read the file when it starts
    try:
        _apply_edit(args, client)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"llamactl: {problem}", file=sys.stderr)
        return 1
    except (ValueError, OSError, ClientError) as exc:
        print(f"llamactl: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    return 0


def _apply_edit(args: argparse.Namespace, client: Client | None) -> None:
    from llamad.config import find_config, parse_config

    if args.config is not None:
        source = Path(args.config)
    elif client is not None:
        reply = client.call(lambda i: Status(id=i))
        assert isinstance(reply, StatusReply)
        source = Path(reply.config_path)
    else:
        source = find_config(None)
    text = source.read_text(encoding="utf-8")
    if args.models_action == "add":
        changed = add_entry(text, args.name, _entry_fields(args, _model_file(args.path)))
    else:
        changed = remove_entry(text, args.name)
    parse_config(changed, source=source)  # never write a file llamad would refuse
    _write_atomically(source, changed)
    what = "added" if args.models_action == "add" else "removed"
    print(f"{what} [models.{args.name}] in {source}")
    if client is None:
        print("llamad is not running; it will read the file when it starts")
        return
    client.set_timeout(None)
    reloaded = client.call(lambda i: Reload(id=i))
    assert isinstance(reloaded, Ok)
    print(reloaded.message)


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _model_file(path: Path) -> Path:
    """The file to write: absolute, the first part of a split model, a real GGUF."""
    from llamad.errors import ModelFileInvalid
    from llamad.gguf_info import read_gguf

    try:
        info = read_gguf(path.expanduser().absolute())
    except ModelFileInvalid as exc:
        raise ValueError(str(exc)) from None
    if info.is_projector:
        raise ValueError(f"{path} is a vision projector, not a model: give it with --mmproj")
    return info.path


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` so that a crash leaves the old file or the new one, never half."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
