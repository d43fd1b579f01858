"""Trust checks on paths and peers, shared by llamad and its clients.

Another local user must not be able to stand in for llamad, for llama-server,
or for the runtime directory they share. The rules are those of ssh-agent,
tmux and systemd:

* a private directory is created with mode 0700 without following symlinks,
  then verified with ``lstat``: a real directory, owned by us, no group or
  other bits, in a parent where nobody else can rename it away. Anything else
  is refused with the reason and the fix;
* a file or socket inside is trusted only if it is owned by us; a secret file
  (the WebSocket token) is opened without following symlinks and checked with
  ``fstat`` to be our regular file with mode 0600;
* a Unix socket's server is checked with ``SO_PEERCRED``: it must run as our
  uid (or root) before anything is sent to it;
* a loopback TCP port is trusted only when the listening socket is one of the
  expected process's file descriptors (``/proc/net/tcp`` and ``/proc/PID/fd``):
  another user may have bound the port first.

Kept free of heavy imports: ``llamactl`` imports it on every run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from pathlib import Path
from typing import NamedTuple, Protocol

from llamad.errors import LlamadError

_PEERCRED = struct.Struct("3i")


class UntrustedPath(LlamadError):
    """A path llamad would have to trust is not safely ours."""


class UntrustedPeer(LlamadError):
    """The process at the other end of a socket runs as another user."""


class _HasGetsockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def ensure_private_dir(
    path: Path, *, uid: int | None = None, repair: bool = False, hint: str = ""
) -> Path:
    """Create ``path`` (mode 0700) or check the existing one; raise ``UntrustedPath``.

    Parents are created as needed (with the process umask, as ``mkdir -p``
    does); ``path`` itself is never followed if it is a symlink. With
    ``repair``, a directory that is ours but open to others is chmod-ed to
    0700 instead of refused: right for a directory under the user's home or
    inside one already verified private, where nobody else could have put
    anything, and wrong for one in a world-writable place like ``/tmp``.
    ``hint`` names the setting that chooses another directory; it ends the
    message. ``OSError`` (a read-only or unwritable parent) is left to the
    caller, which knows what the directory is for.
    """
    uid = os.getuid() if uid is None else uid
    info = _made(path)
    elsewhere = hint or "choose another directory"
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedPath(
            f"{path} is a symbolic link, not a directory: another user may have planted it; "
            f"remove it (`rm {path}`) or {elsewhere}"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedPath(f"{path} is not a directory; remove it or {elsewhere}")
    if info.st_uid != uid:
        raise UntrustedPath(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}): another user may "
            f"have created it to intercept llamad; {elsewhere}, or have it removed "
            f"(`sudo rm -r {path}`)"
        )
    _check_parent(path, uid, elsewhere)
    if info.st_mode & 0o077:
        if not repair:
            raise UntrustedPath(_open_to_others(path, info.st_mode, elsewhere))
        os.chmod(path, 0o700, follow_symlinks=False)
    return path


def ensure_safe_dir(path: Path, *, uid: int | None = None, hint: str = "") -> Path:
    """Like ``ensure_private_dir``, but others may read it: only we may write to it.

    For a directory the user chose to hold the control socket (the socket
    itself is 0600): nobody else can then replace what llamad puts there, and
    a directory the user keeps readable (their home, say) is left as it is.
    """
    uid = os.getuid() if uid is None else uid
    info = _made(path)
    elsewhere = hint or "choose another directory"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
        ensure_private_dir(path, uid=uid, hint=hint)  # raises, with the reason
    _check_parent(path, uid, elsewhere)
    if info.st_mode & 0o022:
        raise UntrustedPath(_open_to_others(path, info.st_mode, elsewhere))
    return path


def _made(path: Path) -> os.stat_result:
    """``path`` created 0700 if it is not there (never through a symlink), then ``lstat``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    return os.lstat(path)


def _open_to_others(path: Path, mode: int, elsewhere: str) -> str:
    if mode & 0o022:
        return (
            f"{path} is writable by other users (mode {stat.S_IMODE(mode):04o}): anything "
            f"inside may have been planted; remove it (`rm -r {path}`) or {elsewhere}"
        )
    return f"{path} is open to other users (mode {stat.S_IMODE(mode):04o}); `chmod 700 {path}`"


def _check_parent(path: Path, uid: int, elsewhere: str) -> None:
    """Nobody else may rename ``path`` away and put their own in its place.

    That needs write access to the parent: refused unless the parent is ours
    or root's and, when others may write to it, sticky (as ``/tmp`` is).
    Group write is allowed: user-private groups (``drwxrwxr-x alice alice``)
    are common under home directories.
    """
    parent = path.parent
    info = os.stat(parent)
    if info.st_uid not in (uid, 0):
        raise UntrustedPath(
            f"{path} is inside {parent}, which belongs to uid {info.st_uid}: that user "
            f"could replace it; {elsewhere}"
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise UntrustedPath(
            f"{path} is inside {parent}, which anyone may write to (mode "
            f"{stat.S_IMODE(info.st_mode):04o}, no sticky bit): another user could replace "
            f"it; {elsewhere}"
        )


def owned_by(path: Path, uid: int | None = None) -> bool:
    """Whether ``path`` itself (not a symlink's target) exists and belongs to ``uid``."""
    try:
        return os.lstat(path).st_uid == (os.getuid() if uid is None else uid)
    except OSError:
        return False


def read_private_file(path: Path, *, uid: int | None = None, limit: int = 65536) -> bytes:
    """The contents of a secret file that must be ours alone (the WebSocket token).

    Opened without following a symlink, then checked with ``fstat`` on what
    was actually opened: a regular file owned by ``uid`` with no group or
    other bits. ``UntrustedPath`` otherwise; ``OSError`` when it cannot be
    read at all (``FileNotFoundError`` when it does not exist).
    """
    uid = os.getuid() if uid is None else uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedPath(
                f"{path} is a symbolic link: another user may have planted it; not reading it"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedPath(f"{path} is not a regular file; not reading it")
        if info.st_uid != uid:
            raise UntrustedPath(
                f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}): another user "
                "may be impersonating llamad; not using it"
            )
        if info.st_mode & 0o077:
            raise UntrustedPath(
                f"{path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                "restart llamad to write a fresh one"
            )
        return os.read(fd, limit)
    finally:
        os.close(fd)


def peer_uid(sock: _HasGetsockopt) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return int(uid)


def check_server_peer(sock: _HasGetsockopt, what: str) -> None:
    """Raise ``UntrustedPeer`` unless the server on ``sock`` runs as us or as root."""
    uid = peer_uid(sock)
    if uid not in (os.getuid(), 0):
        raise UntrustedPeer(
            f"{what} is served by uid {uid}, not by you (uid {os.getuid()}): refusing to "
            "talk to it, another user may be impersonating llamad"
        )


# ------------------------------------------------------ loopback TCP ports

_TCP_LISTEN = 0x0A  # the state column of /proc/net/tcp
# Listening addresses that a connection to 127.0.0.1:PORT can reach.
_REACHES_LOOPBACK_V4 = frozenset({"0100007F", "00000000"})
_REACHES_LOOPBACK_V6 = frozenset(
    {
        "00000000000000000000000000000000",  # ::  (dual-stack: IPv4 too)
        "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
    }
)


class TcpListener(NamedTuple):
    """A listening TCP socket, as ``/proc/net/tcp`` shows it.

    (A NamedTuple, not a dataclass: ``dataclasses`` imports ``inspect``, and
    every ``llamactl`` run imports this module.)
    """

    uid: int
    inode: int


def _parse_listeners(text: str, port: int, addresses: frozenset[str]) -> list[TcpListener]:
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        address, _, port_hex = fields[1].partition(":")
        try:
            if int(fields[3], 16) != _TCP_LISTEN or int(port_hex, 16) != port:
                continue
            if address.upper() not in addresses:
                continue
            found.append(TcpListener(uid=int(fields[7]), inode=int(fields[9])))
        except ValueError:
            continue
    return found


def loopback_listeners(port: int, proc: Path = Path("/proc")) -> list[TcpListener]:
    """Every listening socket that a connection to ``127.0.0.1:port`` could reach."""
    found = []
    for name, addresses in (("tcp", _REACHES_LOOPBACK_V4), ("tcp6", _REACHES_LOOPBACK_V6)):
        try:
            text = (proc / "net" / name).read_text()
        except OSError:
            continue
        found += _parse_listeners(text, port, addresses)
    return found


def socket_inodes(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """The inodes of the sockets process ``pid`` holds open (empty when it is gone)."""
    inodes = set()
    try:
        names = os.listdir(proc / str(pid) / "fd")
    except OSError:
        return set()
    for name in names:
        try:
            target = os.readlink(proc / str(pid) / "fd" / name)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def port_served_by(pid: int, port: int, proc: Path = Path("/proc")) -> str | None:
    """None when ``127.0.0.1:port`` can reach only process ``pid``; else why not."""
    listeners = loopback_listeners(port, proc)
    if not listeners:
        return f"nothing listens on 127.0.0.1:{port}"
    ours = socket_inodes(pid, proc)
    for listener in listeners:
        if listener.inode not in ours:
            return (
                f"port {port} on 127.0.0.1 is also served by another process (uid "
                f"{listener.uid}), not only by llama-server pid {pid}: another program or "
                "user took the port; choose another `port` for this model, or remove it to "
                "use a private Unix socket"
            )
    return None


# ------------------------------------------------- who is at the other end of TCP

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_HEADER = struct.Struct("=LHHLL")
_DIAG_REQUEST = struct.Struct("=BBBxI")
_DIAG_UID_OFFSET = _NLMSG_HEADER.size + 4 + 48 + 12  # header, family..retrans, sockid, 3 u32


def _packed_address(address: str) -> tuple[int, bytes]:
    packed = socket.inet_pton(socket.AF_INET6, address) if ":" in address else b""
    if packed[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:a.b.c.d is an IPv4 peer
        packed = packed[12:]
    if not packed:
        packed = socket.inet_pton(socket.AF_INET, address)
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return family, packed.ljust(16, b"\0")


def tcp_peer_uid(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the other end of a TCP connection on this machine, or None.

    For a connection between two sockets of this host (a loopback client), the
    kernel knows who owns the client's socket; ``sock_diag`` looks it up by the
    connection's four-tuple (about 25 µs, no privileges needed). None when the
    peer is on another machine or the lookup is not available.
    """
    try:
        family, peer_address = _packed_address(remote[0])
        _, our_address = _packed_address(local[0])
        request = _DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        # The peer's socket: its source is our remote end, its destination us.
        request += struct.pack(">HH", remote[1], local[1]) + peer_address + our_address
        request += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
        header = _NLMSG_HEADER.pack(
            _NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0
        )
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(1.0)
            netlink.sendto(header + request, (0, 0))
            reply = netlink.recv(8192)
    except (OSError, ValueError):
        return None
    if len(reply) < _DIAG_UID_OFFSET + 4:
        return None
    _length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(reply)
    if kind != _SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket here
    uid, inode = struct.unpack_from("=II", reply, _DIAG_UID_OFFSET)
    if inode == 0:
        # Closed by its process already (an orphan or in TIME_WAIT): the kernel
        # reports uid 0 for it, which says nothing about who made it.
        return None
    return int(uid)
