"""systemd's service protocols, spoken directly (no libsystemd).

Everything here is synchronous and trio-free; the daemon decides when to call
it (READY after the control socket listens, WATCHDOG from a trio task at
``Notifier.watchdog_interval``, RELOADING/READY around a SIGHUP reload,
STOPPING on shutdown).

The protocols are small and stable:

* ``sd_notify(3)``: newline-separated ``KEY=VALUE`` fields in one datagram to
  the ``AF_UNIX``/``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or
  ``@name`` for the abstract namespace).
* ``sd_listen_fds(3)``: when ``$LISTEN_PID`` is our pid, fds 3 ..
  ``3 + $LISTEN_FDS - 1`` are sockets passed by a ``.socket`` unit, named by
  the colon-separated ``$LISTEN_FDNAMES``.
* ``$JOURNAL_STREAM`` (``systemd.exec(5)``): ``dev:inode`` of the stream that
  stdout/stderr go to when they are connected to the journal; lines there may
  start with ``<N>`` to carry a syslog priority.

None of it is an error to be missing: outside systemd the ``Notifier`` is a
no-op, ``listen_sockets`` returns ``[]`` and logging goes to a plain terminal
format.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from types import TracebackType

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
"""The first fd a socket unit passes (after stdin, stdout, stderr)."""

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

CHILD_ENV_DROP: frozenset[str] = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
    }
)
"""systemd's per-process variables: they describe llamad, never its children."""

# Prefixes dropped as well, for the variables newer systemd versions add
# alongside these (e.g. LISTEN_PIDFDID, WATCHDOG_...); none is meant for a child.
_CHILD_ENV_DROP_PREFIXES = ("LISTEN_", "WATCHDOG_")
_TOKEN_VAR = "LLAMAD_TOKEN"


# --- sd_notify


def _notify_address(value: str) -> bytes | None:
    """The sendto() address for a ``$NOTIFY_SOCKET`` value, or None if unusable."""
    if value.startswith("@"):
        # Abstract namespace: the leading '@' stands for the NUL byte.
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    # systemd also knows "vsock:CID:PORT" (for VMs); a user daemon never gets one.
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings, as ``sd_watchdog_enabled(3)`` decides whether to ping."""
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.debug("ignoring unparsable WATCHDOG_USEC=%r", usec_text)
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError:
            log.debug("ignoring unparsable WATCHDOG_PID=%r", pid_text)
            return None
        # The watchdog belongs to another process (we were forked or exec'd
        # by it without the variables being cleaned): pinging for it would
        # only confuse the manager.
        if pid != os.getpid():
            return None
    # Half the timeout, as sd_watchdog_enabled(3) recommends: one late ping
    # must not be fatal.
    return usec / 2 / 1_000_000


class Notifier:
    """Sends ``sd_notify`` state changes to the service manager.

    Construct with ``Notifier.from_env()``. Without ``$NOTIFY_SOCKET`` (not run
    by systemd, or not ``Type=notify``) every method is a silent no-op, so the
    daemon calls them unconditionally.

    Sends never raise: a failed notification is logged at debug level. The
    daemon must keep serving even if the manager is briefly away (e.g. during
    ``systemctl --user daemon-reexec``).
    """

    def __init__(
        self, address: bytes | None = None, watchdog_interval: float | None = None
    ) -> None:
        """Notify ``address`` (a ``sendto`` address; None makes a no-op notifier)."""
        self._address = address
        self.watchdog_interval: float | None = watchdog_interval
        """Seconds between ``watchdog()`` calls, or None when no watchdog is armed for us."""
        self._sock: socket.socket | None = None
        if address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.debug("cannot create the notify socket: %s", exc)
            else:
                # Non-blocking: this is called from the trio loop, which must
                # never stall on a full manager queue. A dropped WATCHDOG=1 is
                # made good by the next one, and the manager's queue is deep.
                self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] = os.environ) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        ``env`` is only read: the children's environment is cleaned by
        ``child_environment`` instead, so that the daemon's own view of its
        environment stays truthful.
        """
        value = env.get("NOTIFY_SOCKET", "")
        address = _notify_address(value) if value else None
        if value and address is None:
            log.debug("ignoring unsupported NOTIFY_SOCKET=%r", value)
        # A watchdog is only useful if its pings can be delivered.
        interval = _watchdog_interval(env) if address is not None else None
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere."""
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``fields`` (each ``KEY=VALUE``) as one datagram, newline-separated."""
        if self._sock is None or self._address is None or not fields:
            return
        message = "\n".join(fields).encode("utf-8", "replace")
        try:
            # sendto() each time rather than connect() once: the address is
            # resolved anew, so a manager that re-executed (and re-created its
            # socket at the same path) still hears from us.
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", fields, exc)

    def ready(self, status: str | None = None) -> None:
        """Tell the manager that startup (or a reload) has finished: ``READY=1``."""
        if status is None:
            self.send("READY=1")
        else:
            self.send("READY=1", _status_field(status))

    def status(self, text: str) -> None:
        """Set the free-form line ``systemctl --user status`` shows: ``STATUS=``."""
        self.send(_status_field(text))

    def reloading(self) -> None:
        """Announce a configuration reload: ``RELOADING=1``; follow with ``ready()``.

        ``MONOTONIC_USEC`` is what systemd >= 253 wants with it (to tell this
        reload from an older one); systemd 252 ignores the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Announce that shutdown has begun: ``STOPPING=1``."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Keep the ``WatchdogSec=`` timer from expiring: ``WATCHDOG=1``."""
        self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        """Use as a context manager that closes the socket on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the socket."""
        self.close()


def _status_field(text: str) -> str:
    # A newline would end the STATUS= field and let the rest of the text be
    # read as further fields (e.g. a model name containing "\nREADY=1").
    return "STATUS=" + " ".join(text.splitlines())


# --- sd_listen_fds


def listen_sockets_with_names(
    env: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets passed by socket activation, each with its ``FileDescriptorName=``.

    Follows ``sd_listen_fds_with_names(3)``: nothing unless ``$LISTEN_PID`` is
    our pid; names are ``"unknown"`` when ``$LISTEN_FDNAMES`` is missing or
    does not match the count. Each fd gets ``FD_CLOEXEC`` so that spawned
    llama-servers never inherit the control socket. An fd that is not a socket
    (a ``ListenFIFO=``, say) is logged and left out.

    With ``unset`` (the default) ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from ``env`` whatever the outcome, as
    libsystemd does, so no child can mistake them for its own.
    """
    try:
        return _listen_sockets(env)
    finally:
        if unset:
            for name in _LISTEN_VARS:
                env.pop(name, None)


def _listen_sockets(env: Mapping[str, str]) -> list[tuple[str, socket.socket]]:
    pid_text = env.get("LISTEN_PID")
    fds_text = env.get("LISTEN_FDS")
    if not pid_text or not fds_text:
        return []
    try:
        pid = int(pid_text)
        count = int(fds_text)
    except ValueError:
        log.warning("ignoring unparsable LISTEN_PID=%r LISTEN_FDS=%r", pid_text, fds_text)
        return []
    if pid != os.getpid():
        # Meant for another process: inherited through a parent that did not
        # clean its environment.
        return []
    if count <= 0:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if "LISTEN_FDNAMES" in env else []
    if len(names) != count:
        if names:
            log.warning(
                "LISTEN_FDNAMES has %d names for %d fds; ignoring the names", len(names), count
            )
        names = ["unknown"] * count
    result: list[tuple[str, socket.socket]] = []
    for offset, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + offset
        try:
            os.set_inheritable(fd, False)  # sets FD_CLOEXEC
        except OSError as exc:
            log.warning("passed fd %d (%s) is unusable: %s", fd, name, exc)
            continue
        try:
            # fileno= alone makes Python ask the kernel for family, type and
            # protocol (SO_DOMAIN/SO_TYPE/SO_PROTOCOL).
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            if exc.errno != errno.ENOTSOCK:
                raise
            log.warning("passed fd %d (%s) is not a socket; ignoring it", fd, name)
            continue
        result.append((name, sock))
    return result


def listen_sockets(
    env: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[socket.socket]:
    """The sockets passed by socket activation (``sd_listen_fds(3)``), in order.

    See ``listen_sockets_with_names`` for the details and for the names.
    """
    return [sock for _, sock in listen_sockets_with_names(env, unset=unset)]


# --- children


def child_environment(
    env: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
) -> dict[str, str]:
    """The environment for a child (llama-server): ``env`` without what is llamad's alone.

    Dropped: ``CHILD_ENV_DROP``, anything starting with ``LISTEN_`` or
    ``WATCHDOG_`` (so the child can neither notify as us nor claim our fds or
    watchdog), ``LLAMAD_TOKEN`` (a secret the child has no use for) and the
    names in ``drop``. Then ``extra`` (the model's own ``env``) is laid on top,
    so a model configuration can still set any of these on purpose.
    """
    dropped = CHILD_ENV_DROP | {_TOKEN_VAR} | set(drop)
    result = {
        name: value
        for name, value in env.items()
        if name not in dropped and not name.startswith(_CHILD_ENV_DROP_PREFIXES)
    }
    if extra:
        result.update(extra)
    return result


# --- logging


def under_systemd(env: Mapping[str, str] = os.environ) -> bool:
    """Whether stderr goes to the journal (``$JOURNAL_STREAM`` names fd 2's ``dev:inode``).

    Checking the inode, not merely the variable, matters: the variable is
    inherited by anything started from a service, e.g. a shell in a
    ``systemd-run --user --pty``, whose stderr is a terminal.
    """
    value = env.get("JOURNAL_STREAM", "")
    dev_text, sep, ino_text = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_text), int(ino_text)
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a logging level (anything between rounds down)."""
    if levelno >= logging.CRITICAL:
        return 2  # LOG_CRIT
    if levelno >= logging.ERROR:
        return 3  # LOG_ERR
    if levelno >= logging.WARNING:
        return 4  # LOG_WARNING
    if levelno >= logging.INFO:
        return 6  # LOG_INFO
    return 7  # LOG_DEBUG


class JournalFormatter(logging.Formatter):
    """Prefixes every line with ``<N>``, the syslog priority the journal parses.

    journald reads a stream line by line and takes a leading ``<N>`` as that
    line's priority (``SyslogLevelPrefix=``, on by default), so every line of
    a multi-line message (a traceback, say) carries it; otherwise those lines
    would land at the stream's default priority, info.
    """

    def __init__(self, fmt: str | None = "%(name)s: %(message)s") -> None:
        """Format with ``fmt``; no timestamp by default, since the journal adds one."""
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        """The record as formatted, each line prefixed with its priority."""
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_DATEFMT = "%H:%M:%S"


def configure_logging(level: int = logging.INFO, env: Mapping[str, str] = os.environ) -> None:
    """Log to stderr at ``level``: journal priorities under systemd, a terminal format otherwise.

    Replaces the root logger's handlers, so calling it again is harmless.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if under_systemd(env):
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter(TERMINAL_FORMAT, TERMINAL_DATEFMT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Removed, not closed: they may belong to someone else (a test harness).
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
