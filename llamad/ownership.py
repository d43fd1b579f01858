"""Trust checks on paths and peers, shared by llamad and its clients.

Another local user must not be able to stand in for llamad, for llama-server,
or for the runtime directory they share. The rules are those of ssh-agent,
tmux and systemd:

* a private directory is created with mode 0700 without following symlinks,
  then verified with ``lstat``: a real directory, owned by us, no group or
  other bits. Anything else is refused with the reason and the fix;
* a file or socket inside is trusted only if it is owned by us;
* a Unix socket's server is checked with ``SO_PEERCRED``: it must run as our
  uid (or root) before anything is sent to it.

Kept free of heavy imports: ``llamactl`` imports it on every run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
from pathlib import Path

from llamad.errors import LlamadError

_PEERCRED = struct.Struct("3i")


class UntrustedPath(LlamadError):
    """A path llamad would have to trust is not safely ours."""


class UntrustedPeer(LlamadError):
    """The process at the other end of a socket runs as another user."""


def ensure_private_dir(path: Path, *, uid: int | None = None, repair: bool = False) -> Path:
    """Create ``path`` (mode 0700) or check the existing one; raise ``UntrustedPath``.

    Parents are created as needed (with the process umask, as ``mkdir -p``
    does); ``path`` itself is never followed if it is a symlink. With
    ``repair``, a directory that is ours but open to others is chmod-ed to
    0700 instead of refused: right for a directory under the user's home,
    where nobody else could have put anything inside, and wrong for one in a
    world-writable place like ``/tmp``.
    """
    uid = os.getuid() if uid is None else uid
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    fix = f"remove it (`rm -r {path}`) or choose another directory"
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedPath(f"{path} is a symbolic link, not a directory; {fix}")
    if not stat.S_ISDIR(info.st_mode):
        raise UntrustedPath(f"{path} is not a directory; {fix}")
    if info.st_uid != uid:
        raise UntrustedPath(
            f"{path} belongs to uid {info.st_uid}, not to you (uid {uid}): another user may "
            f"have created it to intercept llamad; {fix}"
        )
    if info.st_mode & 0o077:
        if not repair:
            raise UntrustedPath(
                f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"`chmod 700 {path}`, or {fix}"
            )
        os.chmod(path, 0o700)
    return path


def owned_by(path: Path, uid: int | None = None) -> bool:
    """Whether ``path`` itself (not a symlink's target) exists and belongs to ``uid``."""
    try:
        return os.lstat(path).st_uid == (os.getuid() if uid is None else uid)
    except OSError:
        return False


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return int(uid)


def check_server_peer(sock: socket.socket, what: str) -> None:
    """Raise ``UntrustedPeer`` unless the server on ``sock`` runs as us or as root."""
    uid = peer_uid(sock)
    if uid not in (os.getuid(), 0):
        raise UntrustedPeer(
            f"{what} is served by uid {uid}, not by you (uid {os.getuid()}): refusing to "
            "talk to it, another user may be impersonating llamad"
        )
