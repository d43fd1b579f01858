"""The ``file_search`` tool: find files by name and/or text, only under the roots.

Read-only and bounded in every direction a model (or a file tree) could push:
files looked at, bytes read per file and in all, hits returned, and wall time.
The walk never leaves the configured roots: a ``path`` argument is resolved and
checked against them, symlinked directories are never descended (which also
makes symlink loops harmless), a symlinked file is read only when its target is
inside a root, and only regular files are opened (a FIFO would block forever).
"""

from __future__ import annotations

import fnmatch
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llamad.errors import ToolInputError

# Directories nobody means when they ask "where did I write X": version control
# internals, dependency trees and caches. They are also the largest.
SKIPPED_DIRECTORIES = frozenset(
    {".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv", ".mypy_cache", ".cache"}
)
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class SearchLimits:
    max_files: int = 20_000
    max_bytes_per_file: int = 1024 * 1024
    max_total_bytes: int = 64 * 1024 * 1024
    max_results: int = 50
    max_hits_per_file: int = 5
    time_budget_sec: float = 5.0
    snippet_chars: int = 160


@dataclass(frozen=True)
class Hit:
    path: Path
    line: int | None = None  # None for a match on the name alone
    snippet: str = ""


@dataclass
class SearchResult:
    hits: list[Hit] = field(default_factory=list)
    files_scanned: int = 0
    bytes_read: int = 0
    stopped_early: str = ""  # which limit ended the search, if one did

    def text(self) -> str:
        """The result as the model reads it: one hit per line, then any limit reached."""
        lines = [
            f"{hit.path}:{hit.line}: {hit.snippet}" if hit.line is not None else str(hit.path)
            for hit in self.hits
        ]
        if not lines:
            lines.append("no matches")
        if self.stopped_early:
            lines.append(f"(search stopped early: {self.stopped_early}; narrow it down)")
        return "\n".join(lines)


def search_files(
    roots: Sequence[Path],
    *,
    name: str | None = None,
    text: str | None = None,
    path: str | None = None,
    limits: SearchLimits = SearchLimits(),
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Files under ``roots`` (or under ``path`` inside one) matching ``name`` and ``text``.

    ``name`` is a shell pattern on the file name (``*.md``), case-insensitive;
    ``text`` a case-insensitive substring of a line. At least one is required.
    """
    if not roots:
        raise ToolInputError(
            "file_search has no roots; list the folders it may search as "
            "[tools.file_search] roots = [...] in models.toml"
        )
    if not name and not text:
        raise ToolInputError("give a file name pattern (name), a text to look for (text), or both")
    if text is not None and len(text) > 1000:
        raise ToolInputError("the text to look for is longer than 1,000 characters")
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    starts = _starting_points(real_roots, path)
    needle = text.casefold() if text else None
    pattern = name.casefold() if name else None
    deadline = clock() + limits.time_budget_sec
    result = SearchResult()
    for file_path, stat_result in _walk(starts, real_roots):
        if len(result.hits) >= limits.max_results:
            result.stopped_early = f"{limits.max_results} results"
            break
        if result.files_scanned >= limits.max_files:
            result.stopped_early = f"{limits.max_files} files looked at"
            break
        if result.bytes_read >= limits.max_total_bytes:
            result.stopped_early = f"{limits.max_total_bytes // (1024 * 1024)} MiB read"
            break
        if clock() > deadline:
            result.stopped_early = f"{limits.time_budget_sec:g} s"
            break
        result.files_scanned += 1
        if pattern is not None and not fnmatch.fnmatchcase(file_path.name.casefold(), pattern):
            continue
        if needle is None:
            result.hits.append(Hit(file_path))
            continue
        budget = min(limits.max_bytes_per_file, limits.max_total_bytes - result.bytes_read)
        content = _read_prefix(file_path, stat_result, budget)
        if content is None:
            continue
        result.bytes_read += len(content)
        room = limits.max_results - len(result.hits)
        result.hits.extend(_matching_lines(file_path, content, needle, limits, room))
    return result


def _starting_points(roots: list[Path], path: str | None) -> list[Path]:
    if not path:
        return roots
    if "\x00" in path:
        raise ToolInputError("the path contains a NUL character")
    candidates = [Path(path)] if os.path.isabs(path) else [root / path for root in roots]
    inside = []
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if any(real == root or real.is_relative_to(root) for root in roots) and real.is_dir():
            inside.append(real)
    if not inside:
        listing = ", ".join(str(root) for root in roots)
        raise ToolInputError(
            f"{path!r} is not a folder inside the searchable roots ({listing})"
        )
    return inside


def _walk(starts: list[Path], roots: list[Path]) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under ``starts``, sorted per folder, never leaving ``roots``."""
    seen_starts: set[Path] = set()
    for start in starts:
        if start in seen_starts:
            continue
        seen_starts.add(start)
        stack = [start]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name, reverse=True)
            except OSError:
                continue  # unreadable folder: skip it, as grep -s would
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in SKIPPED_DIRECTORIES:
                            stack.append(Path(entry.path))
                        continue
                    found = _regular_file(Path(entry.path), entry.is_symlink(), roots)
                except OSError:
                    continue
                if found is not None:
                    yield found
            # the stack pops the alphabetically first folder next


def _regular_file(
    path: Path, is_symlink: bool, roots: list[Path]
) -> tuple[Path, os.stat_result] | None:
    if is_symlink:
        target = Path(os.path.realpath(path))
        if not any(target.is_relative_to(root) for root in roots):
            return None  # a link out of the roots is not followed
    stat_result = os.stat(path)  # follows a link, now known to stay inside
    if not stat.S_ISREG(stat_result.st_mode):
        return None  # FIFOs, sockets and devices could block or never end
    return path, stat_result


def _read_prefix(path: Path, stat_result: os.stat_result, budget: int) -> bytes | None:
    if budget <= 0:
        return None
    try:
        # O_NONBLOCK: should the file have been swapped for a FIFO since the
        # stat, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        content = os.read(fd, min(budget, max(stat_result.st_size, 1)))
    except OSError:
        return None
    finally:
        os.close(fd)
    if b"\x00" in content[:BINARY_SNIFF_BYTES]:
        return None  # binary: only its name can match
    return content


def _matching_lines(
    path: Path, content: bytes, needle: str, limits: SearchLimits, room: int
) -> list[Hit]:
    hits: list[Hit] = []
    text = content.decode("utf-8", "replace")
    if needle not in text.casefold():
        return hits
    for number, line in enumerate(text.splitlines(), start=1):
        if needle not in line.casefold():
            continue
        hits.append(Hit(path, number, _snippet(line, needle, limits.snippet_chars)))
        if len(hits) >= min(limits.max_hits_per_file, room):
            break
    return hits


def _snippet(line: str, needle: str, width: int) -> str:
    """The line around the match, at most ``width`` characters."""
    line = line.strip()
    if len(line) <= width:
        return line
    where = max(0, line.casefold().find(needle))
    start = max(0, min(where - (width - len(needle)) // 2, len(line) - width))
    piece = line[start : start + width]
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(line) else "")
