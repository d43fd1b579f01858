"""The ``file_search`` tool: find files by name and/or text, only under the roots.

Read-only and bounded in every direction a model (or a file tree) could push:
files looked at, bytes read per file and in all, hits returned, and wall time.

The walk never leaves the configured roots, even while the tree changes under
it: every folder and file is opened relative to the descriptor of the folder
it was listed in (``dir_fd``), with ``O_NOFOLLOW`` (and ``O_DIRECTORY`` for
folders), so a file or folder swapped for a symlink between the listing and
the open is not followed but skipped; what was opened is checked with
``fstat`` to be the very regular file that was listed (same device and inode).
Symlinked directories are never descended (which also makes loops harmless); a
symlinked file is read only when its target is inside a root, and then opened
component by component from that root's descriptor, again without following
anything. Only regular files are opened (a FIFO would block forever).

A hard link inside a root to a file outside looks exactly like any other file
(it *is* the same file) and is read; only the roots' owner can make one.
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
    needle = text.casefold() if text else None
    pattern = name.casefold() if name else None
    deadline = clock() + limits.time_budget_sec
    result = SearchResult()
    with _Roots(real_roots) as opened:
        for listed in _walk_all(opened, _starting_points(opened, path)):
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
            file_name = listed.path.name.casefold()
            if pattern is not None and not fnmatch.fnmatchcase(file_name, pattern):
                continue
            if needle is None:
                result.hits.append(Hit(listed.path))
                continue
            budget = min(limits.max_bytes_per_file, limits.max_total_bytes - result.bytes_read)
            content = _read_prefix(opened, listed, budget)
            if content is None:
                continue
            result.bytes_read += len(content)
            room = limits.max_results - len(result.hits)
            result.hits.extend(_matching_lines(listed.path, content, needle, limits, room))
    return result


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should the file have become a FIFO since it was listed, the open
# still returns at once (and fstat then refuses it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_DEPTH = 64  # folders deeper than this are not entered (one descriptor per level)


class _Roots:
    """The roots' real paths and an open descriptor for each, for the length of a search."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.fds: list[int | None] = []

    def __enter__(self) -> _Roots:
        for path in self.paths:
            try:
                self.fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError:
                self.fds.append(None)  # a root that is gone is simply empty
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd in self.fds:
            if fd is not None:
                os.close(fd)

    def containing(self, path: Path) -> tuple[int, tuple[str, ...]] | None:
        """The descriptor of the root holding ``path`` and the parts below it."""
        for root, fd in zip(self.paths, self.fds, strict=True):
            if fd is not None and (path == root or path.is_relative_to(root)):
                return fd, path.relative_to(root).parts
        return None


def _open_beneath(root_fd: int, parts: Sequence[str], last_flags: int) -> int:
    """Open ``parts`` below ``root_fd`` one component at a time, following no symlink."""
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            following = os.open(part, last_flags if last else _DIRECTORY_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = following
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Start:
    fd: int  # owned by the walk, which closes it
    path: Path


def _starting_points(roots: _Roots, path: str | None) -> list[_Start]:
    if not path:
        return [
            _Start(os.dup(fd), root)
            for root, fd in zip(roots.paths, roots.fds, strict=True)
            if fd is not None
        ]
    if "\x00" in path:
        raise ToolInputError("the path contains a NUL character")
    # Lexically: ".." cannot climb out of a root, and a symlink is never followed.
    if os.path.isabs(path):
        candidates = [Path(os.path.normpath(path))]
    else:
        candidates = [Path(os.path.normpath(root / path)) for root in roots.paths]
    starts: list[_Start] = []
    seen: set[tuple[int, int]] = set()
    for candidate in candidates:
        found = roots.containing(candidate)
        if found is None:
            continue
        root_fd, parts = found
        try:
            fd = _open_beneath(root_fd, parts, _DIRECTORY_FLAGS) if parts else os.dup(root_fd)
        except OSError:
            continue  # not there, not a folder, or reached through a symlink
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) in seen:
            os.close(fd)
            continue
        seen.add((info.st_dev, info.st_ino))
        starts.append(_Start(fd, candidate))
    if not starts:
        listing = ", ".join(str(root) for root in roots.paths)
        raise ToolInputError(f"{path!r} is not a folder inside the searchable roots ({listing})")
    return starts


@dataclass(frozen=True)
class _Listed:
    """A regular file as the walk listed it; ``dir_fd`` is valid until the walk resumes."""

    path: Path
    dir_fd: int
    name: str
    stat: os.stat_result
    target: tuple[int, tuple[str, ...]] | None = None  # a symlink's target: root fd, parts


def _walk_all(roots: _Roots, starts: list[_Start]) -> Iterator[_Listed]:
    try:
        for start in starts:
            yield from _walk(roots, start)
    finally:
        for start in starts:
            os.close(start.fd)


def _walk(roots: _Roots, start: _Start) -> Iterator[_Listed]:
    """Regular files under ``start``: each folder's files by name, then its subfolders."""
    frames: list[tuple[int, Path, list[str]]] = []  # open folders, subfolders still to visit
    fd, path = start.fd, start.path
    try:
        while True:
            subfolders: list[str] = []
            try:
                with os.scandir(fd) as listing:
                    entries = sorted(listing, key=lambda entry: entry.name)
            except OSError:
                entries = []  # unreadable folder: skip it, as grep -s would
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in SKIPPED_DIRECTORIES:
                            subfolders.append(entry.name)
                        continue
                    listed = _regular_file(roots, fd, path, entry)
                except OSError:
                    continue
                if listed is not None:
                    yield listed
            frames.append((fd, path, subfolders[::-1]))
            while frames:
                top_fd, top_path, todo = frames[-1]
                if not todo or len(frames) > MAX_DEPTH:
                    frames.pop()
                    if top_fd != start.fd:
                        os.close(top_fd)
                    continue
                name = todo.pop()
                try:
                    # O_NOFOLLOW | O_DIRECTORY: a folder swapped for a symlink is skipped.
                    fd = os.open(name, _DIRECTORY_FLAGS, dir_fd=top_fd)
                except OSError:
                    continue
                path = top_path / name
                break
            else:
                return
    finally:
        for frame_fd, _, _ in frames:
            if frame_fd != start.fd:
                os.close(frame_fd)


def _regular_file(
    roots: _Roots, dir_fd: int, folder: Path, entry: os.DirEntry[str]
) -> _Listed | None:
    path = folder / entry.name
    if entry.is_symlink():
        target = Path(os.path.realpath(path))
        inside = roots.containing(target)
        if inside is None or not inside[1]:
            return None  # a link out of the roots is not followed
        stat_result = os.stat(target)
        if not stat.S_ISREG(stat_result.st_mode):
            return None
        return _Listed(path, dir_fd, entry.name, stat_result, inside)
    stat_result = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(stat_result.st_mode):
        return None  # FIFOs, sockets and devices could block or never end
    return _Listed(path, dir_fd, entry.name, stat_result)


def _read_prefix(roots: _Roots, listed: _Listed, budget: int) -> bytes | None:
    if budget <= 0:
        return None
    try:
        if listed.target is not None:
            fd = _open_beneath(listed.target[0], listed.target[1], _FILE_FLAGS)
        else:
            fd = os.open(listed.name, _FILE_FLAGS, dir_fd=listed.dir_fd)
    except OSError:
        return None  # gone, or swapped for a symlink since it was listed
    try:
        opened = os.fstat(fd)
        same = (opened.st_dev, opened.st_ino) == (listed.stat.st_dev, listed.stat.st_ino)
        if not stat.S_ISREG(opened.st_mode) or not same:
            return None  # not the regular file that was listed
        content = os.read(fd, min(budget, max(opened.st_size, 1)))
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
