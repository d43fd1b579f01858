"""Small structured-concurrency helpers shared by the daemon's modules."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Generic, ParamSpec, TypeVar

import outcome
import trio

T = TypeVar("T")
P = ParamSpec("P")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one blocking call (a whole LMDB transaction) in a worker thread.

    LMDB write transactions belong to the thread that began them, so each call
    is one complete transaction, and the event loop never waits on the disk.
    """
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


class ThreadCall(Generic[T]):
    """One blocking call started in a worker thread now, its result awaited later.

    ``in_thread`` starts the thread only when the awaiting task next runs,
    after whatever else is runnable: started from synchronous code, the call
    (a commit's fsync) runs beside the rest of that task's work instead.
    Threads are counted against trio's default thread limiter; when it is
    full, the call starts when ``result`` is first awaited, as ``in_thread``
    would.
    """

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._done = trio.Event()
        self._outcome: outcome.Outcome[T] | None = None
        self._limiter = trio.to_thread.current_default_thread_limiter()
        try:
            self._limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            self._started = False
            return
        self._started = True
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
            token.run_sync_soon(self._finish, result)

        trio.lowlevel.start_thread_soon(fn, deliver)

    def _finish(self, result: outcome.Outcome[T]) -> None:
        self._limiter.release_on_behalf_of(self)
        self._outcome = result
        self._done.set()

    async def result(self) -> T:
        """The call's return value or exception; waits (uncancellable, like ``in_thread``)."""
        if not self._started:
            self._started = True
            self._outcome = await outcome.acapture(trio.to_thread.run_sync, self._fn)
            self._done.set()
        with trio.CancelScope(shield=True):
            await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()


def first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def beside(main: Callable[[], Awaitable[T]], background: Callable[[], Awaitable[None]]) -> T:
    """Run ``background`` only while ``main`` runs; return ``main``'s result.

    An exception from ``main`` comes out as itself, not wrapped in the
    ExceptionGroup a nursery would make, so callers can catch it by type.
    An exception from ``background`` cancels ``main`` and propagates likewise.
    """
    outcome: list[T] = []
    failure: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def watched_background() -> None:
            try:
                await background()
            except Exception as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()

        nursery.start_soon(watched_background)
        try:
            outcome.append(await main())
        except Exception as exc:
            failure.append(exc)
        finally:
            nursery.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return outcome[0]


def consists_of(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """True when ``exc`` is one of ``kinds`` or a (nested) group made only of them."""
    if isinstance(exc, BaseExceptionGroup):
        return all(consists_of(inner, kinds) for inner in exc.exceptions)
    return isinstance(exc, kinds)
