"""Small structured-concurrency helpers shared by the daemon's modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")


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
