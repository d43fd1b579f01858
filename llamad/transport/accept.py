"""One accept loop for both transports: out of descriptors is one log line, not thousands.

trio's ``serve_listeners`` logs an error with a traceback every 100 ms for as
long as ``accept`` fails with ``EMFILE``; a flood of connections that keeps
llamad at its descriptor limit filled the journal with thousands of lines. This
loop backs off (doubling up to a second), says so once when it starts
refusing and once when it accepts again, and otherwise behaves the same: each
accepted stream is handled in its own task and closed when the handler ends.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

# accept(2) failing for lack of a resource: the connection waits in the kernel's
# backlog and can be accepted once something is freed.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
FIRST_BACKOFF_SEC = 0.05
MAX_BACKOFF_SEC = 1.0

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _run_handler(handler: Handler, stream: trio.SocketStream) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def accept_forever(
    listener: trio.SocketListener,
    handler: Handler,
    *,
    what: str,
    handler_nursery: trio.Nursery,
    sleep: Callable[[float], Awaitable[None]] = trio.sleep,
) -> NoReturn:
    """Accept connections on ``listener`` and run ``handler`` for each in ``handler_nursery``."""
    refused = 0
    backoff = FIRST_BACKOFF_SEC
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                if refused == 0:
                    log.warning(
                        "%s: cannot accept connections: %s; retrying quietly until "
                        "descriptors are free (raise LimitNOFILE= / `ulimit -n` if this persists)",
                        what,
                        os.strerror(exc.errno or 0),
                    )
                refused += 1
                await sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SEC)
                continue
            if refused:
                log.warning("%s: accepting connections again (%d retries)", what, refused)
                refused = 0
                backoff = FIRST_BACKOFF_SEC
            handler_nursery.start_soon(_run_handler, handler, stream)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns the new (soft, hard).

    systemd and most shells start services with a soft limit of 1,024 whatever
    the hard limit allows; each connection costs a descriptor.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        # An infinite hard limit cannot be a soft one above fs.nr_open; keep it sane.
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, hard
        return target, hard
    return soft, hard
