"""The file_search tool: finds what is under the roots and nothing outside them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from llamad.errors import ToolInputError
from llamad.tools.file_search import SearchLimits, search_files


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "notes" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "notes" / "todo.md").write_text("buy milk\nTODO: fix the bike\n")
    (root / "notes" / "deep" / "plan.txt").write_text("nothing\nthe todo list is long\n")
    (root / "readme.MD").write_text("# Readme\n")
    (root / ".git" / "config").write_text("todo in git internals\n")
    (root / "image.bin").write_bytes(b"\x00\x01todo\x00")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("todo: the secret\n")
    return root


def paths(result_text: str) -> list[str]:
    return [line.split(":", 1)[0] for line in result_text.splitlines()]


def test_text_search_gives_path_line_and_snippet(tree: Path) -> None:
    result = search_files([tree], text="todo")
    assert sorted(result.text().splitlines()) == [
        f"{tree}/notes/deep/plan.txt:2: the todo list is long",
        f"{tree}/notes/todo.md:2: TODO: fix the bike",
    ]  # .git skipped, binary skipped, case-insensitive


def test_name_pattern_is_case_insensitive_and_combines_with_text(tree: Path) -> None:
    assert sorted(paths(search_files([tree], name="*.md").text())) == [
        f"{tree}/notes/todo.md",
        f"{tree}/readme.MD",
    ]
    assert paths(search_files([tree], name="*.md", text="milk").text()) == [f"{tree}/notes/todo.md"]
    assert search_files([tree], name="*.rs").text() == "no matches"


def test_path_narrows_the_search_inside_a_root(tree: Path) -> None:
    assert paths(search_files([tree], text="todo", path="notes/deep").text()) == [
        f"{tree}/notes/deep/plan.txt"
    ]


@pytest.mark.parametrize("escape", ["..", "../outside", "notes/../../outside", "/etc", "/"])
def test_paths_out_of_the_roots_are_refused(tree: Path, escape: str) -> None:
    with pytest.raises(ToolInputError, match="not a folder inside the searchable roots"):
        search_files([tree], text="todo", path=escape)


def test_symlinks_out_of_the_roots_are_not_followed(tree: Path) -> None:
    outside = tree.parent / "outside"
    (tree / "link-dir").symlink_to(outside)
    (tree / "link-file.txt").symlink_to(outside / "secret.txt")
    result = search_files([tree], text="secret")
    assert result.text() == "no matches"
    with pytest.raises(ToolInputError):
        search_files([tree], text="secret", path="link-dir")


def test_a_symlink_inside_the_root_is_read(tree: Path) -> None:
    (tree / "alias.md").symlink_to(tree / "notes" / "todo.md")
    assert f"{tree}/alias.md:1: buy milk" in search_files([tree], text="milk").text()


def test_symlink_loop_ends(tree: Path) -> None:
    (tree / "notes" / "loop").symlink_to(tree)
    (tree / "self").symlink_to(tree / "self")  # a link to itself
    result = search_files([tree], text="todo")
    assert len(result.hits) == 2


def test_a_fifo_is_never_opened(tree: Path) -> None:
    os.mkfifo(tree / "pipe.txt")
    assert paths(search_files([tree], name="pipe*").text()) == ["no matches"]
    assert len(search_files([tree], text="todo").hits) == 2  # and did not block


def test_huge_file_is_read_only_up_to_the_limit(tree: Path) -> None:
    big = tree / "big.log"
    with big.open("w") as out:
        out.write("x" * 2_000_000 + "\nneedle at the end\n")
    (tree / "small.log").write_text("needle here\n")
    limits = SearchLimits(max_bytes_per_file=1024 * 1024)
    result = search_files([tree], text="needle", limits=limits)
    assert paths(result.text()) == [f"{tree}/small.log"]
    assert result.bytes_read <= 1024 * 1024 + 1024


def test_limits_stop_the_search_and_say_so(tree: Path) -> None:
    for index in range(30):
        (tree / f"file{index:02}.txt").write_text("match\n")
    result = search_files([tree], text="match", limits=SearchLimits(max_results=10))
    assert len(result.hits) == 10
    assert result.text().endswith("(search stopped early: 10 results; narrow it down)")
    few_files = search_files([tree], text="match", limits=SearchLimits(max_files=5))
    assert few_files.files_scanned == 5
    assert "5 files looked at" in few_files.stopped_early
    ticks = iter(range(1000))
    slow = search_files(
        [tree], text="match", limits=SearchLimits(time_budget_sec=3), clock=lambda: next(ticks)
    )
    assert slow.stopped_early == "3 s"


def test_long_lines_are_cut_around_the_match(tree: Path) -> None:
    (tree / "long.txt").write_text("a" * 500 + "NEEDLE" + "b" * 500 + "\n")
    (hit,) = search_files([tree], text="needle").hits
    assert "NEEDLE" in hit.snippet
    assert len(hit.snippet) <= 162


def test_input_mistakes_are_explained(tree: Path) -> None:
    with pytest.raises(ToolInputError, match="give a file name pattern"):
        search_files([tree])
    with pytest.raises(ToolInputError, match="has no roots"):
        search_files([], text="x")


def test_a_file_swapped_for_a_symlink_while_searching_never_leaks(tree: Path) -> None:
    """Another process swaps a file (and a folder) for symlinks out of the root, over
    and over, while searches run: the outside secret must never be read."""
    outside = tree.parent / "outside"
    target = tree / "notes" / "swap.txt"
    folder = tree / "notes" / "swapdir"
    folder.mkdir()
    (folder / "inner.txt").write_text("todo inside\n")
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        regular, link = tree / ".regular.tmp", tree / ".link.tmp"
        parked = tree / ".parked"
        while not stop.is_set():
            regular.write_text("todo: harmless\n")
            os.replace(regular, target)
            link.unlink(missing_ok=True)
            link.symlink_to(outside / "secret.txt")
            os.replace(link, target)  # atomically: the same name is now a symlink out
            # The folder too: renamed away, a symlink to the outside in its place.
            os.rename(folder, parked)
            folder.symlink_to(outside)
            folder.unlink()
            os.rename(parked, folder)
            swaps += 1

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        leaked = 0
        searches = 0
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline or searches < 500:
            result = search_files([tree], text="secret")
            searches += 1
            if "the secret" in result.text():
                leaked += 1
            by_path = search_files([tree], text="todo", path="notes")
            assert "the secret" not in by_path.text()
    finally:
        stop.set()
        thread.join(timeout=10)
    assert swaps > 100, f"only {swaps} swaps: the race was not exercised"
    assert leaked == 0, f"the outside secret leaked in {leaked} of {searches} searches"
