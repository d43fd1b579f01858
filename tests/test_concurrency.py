"""``ThreadCall``: starts its thread at once, otherwise behaves as ``in_thread``."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from llamad.concurrency import ThreadCall


def test_the_call_runs_before_the_task_that_started_it_yields() -> None:
    async def main() -> None:
        began = threading.Event()
        call = ThreadCall(lambda: began.set() or threading.get_ident())
        # No checkpoint since: only a thread started by the constructor can set it.
        assert began.wait(timeout=10)
        assert await call.result() != threading.get_ident()

    trio.run(main)


def test_its_exception_comes_out_of_result() -> None:
    def fails() -> None:
        raise KeyError("no such conversation")

    async def main() -> None:
        call = ThreadCall(fails)
        with pytest.raises(KeyError, match="no such conversation"):
            await call.result()
        assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0

    trio.run(main)


def test_with_the_thread_limiter_full_it_starts_when_awaited() -> None:
    async def main() -> None:
        limiter = trio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = 1
        holder = object()
        limiter.acquire_on_behalf_of_nowait(holder)
        calls: list[int] = []
        call = ThreadCall(lambda: calls.append(1) or len(calls))
        await trio.testing.wait_all_tasks_blocked()
        assert calls == []  # not started: no thread beyond the limit
        limiter.release_on_behalf_of(holder)
        assert await call.result() == 1

    trio.run(main)


def test_a_cancelled_wait_still_sees_the_call_through() -> None:
    """As ``in_thread``: a commit that began is finished, never abandoned halfway."""

    async def main() -> None:
        release = threading.Event()
        finished = threading.Event()

        def commit() -> str:
            release.wait(timeout=10)
            finished.set()
            return "stored"

        call = ThreadCall(commit)
        with trio.CancelScope() as scope:
            scope.cancel()
            trio.lowlevel.current_trio_token().run_sync_soon(release.set)
            assert await call.result() == "stored"
        assert finished.is_set()

    trio.run(main)
