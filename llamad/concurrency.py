"""Small structured-concurrency helpers shared by the daemon's modules."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import trio

T = TypeVar("T")
P = ParamSpec("P")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run one blocking call (a whole LMDB transaction) in a worker thread.

    LMDB write transactions belong to the thread that began them, so each call
    is one complete transaction, and the event loop never waits on the disk.
    """
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


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
