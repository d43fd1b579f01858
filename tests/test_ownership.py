"""Trust checks on paths and peers (llamad/ownership.py), against the real file system."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llamad.ownership import (
    UntrustedPath,
    UntrustedPeer,
    check_server_peer,
    ensure_private_dir,
    ensure_safe_dir,
    port_served_by,
    read_private_file,
    socket_inodes,
    tcp_peer_uid,
)
from tests.faults.other_user import AS_NOBODY, NOBODY, require_root

UID = os.getuid()


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_creates_a_private_directory(tmp_path: Path) -> None:
    made = ensure_private_dir(tmp_path / "a" / "llamad")
    assert mode(made) == 0o700 and os.lstat(made).st_uid == UID
    assert ensure_private_dir(made) == made  # and accepts it again


def test_a_directory_others_may_read_is_refused_or_repaired(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.mkdir()
    os.chmod(path, 0o755)
    with pytest.raises(UntrustedPath, match=r"open to other users \(mode 0755\); `chmod 700"):
        ensure_private_dir(path)
    ensure_private_dir(path, repair=True)
    assert mode(path) == 0o700


def test_a_safe_directory_may_be_readable_but_not_writable_by_others(tmp_path: Path) -> None:
    readable = tmp_path / "home"
    readable.mkdir()
    os.chmod(readable, 0o755)
    assert ensure_safe_dir(readable) == readable
    assert mode(readable) == 0o755  # left as the user keeps it
    os.chmod(readable, 0o775)
    with pytest.raises(UntrustedPath, match=r"writable by other users \(mode 0775\)"):
        ensure_safe_dir(readable)
    assert mode(ensure_safe_dir(tmp_path / "new")) == 0o700
    link = tmp_path / "link"
    link.symlink_to(readable)
    with pytest.raises(UntrustedPath, match="symbolic link"):
        ensure_safe_dir(link)


def test_a_directory_others_could_write_is_refused_unless_repair(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    path.mkdir()
    os.chmod(path, 0o777)
    with pytest.raises(UntrustedPath, match=r"writable by other users \(mode 0777\)"):
        ensure_private_dir(path, hint="set X")
    assert mode(path) == 0o777
    ensure_private_dir(path, repair=True)
    assert mode(path) == 0o700


def test_a_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UntrustedPath, match="is a symbolic link, not a directory"):
        ensure_private_dir(link)


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UntrustedPath, match="is not a directory"):
        ensure_private_dir(tmp_path / "file")


def test_another_users_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    require_root()
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UntrustedPath) as refused:
        ensure_private_dir(path, hint="set XDG_RUNTIME_DIR")
    assert str(refused.value) == (
        f"{path} belongs to uid {NOBODY}, not to you (uid {UID}): another user may have "
        f"created it to intercept llamad; set XDG_RUNTIME_DIR, or have it removed "
        f"(`sudo rm -r {path}`)"
    )


def test_a_parent_others_can_rename_in_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)  # no sticky bit: anyone may rename our directory away
    with pytest.raises(UntrustedPath, match="which anyone may write to"):
        ensure_private_dir(parent / "llamad")
    os.chmod(parent, 0o1777)  # sticky, like /tmp: fine
    ensure_private_dir(parent / "llamad")


def test_read_private_file(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("abc\n")
    os.chmod(secret, 0o600)
    assert read_private_file(secret) == b"abc\n"
    os.chmod(secret, 0o640)
    with pytest.raises(UntrustedPath, match="readable by other users"):
        read_private_file(secret)
    os.chmod(secret, 0o600)
    link = tmp_path / "link"
    link.symlink_to(secret)
    with pytest.raises(UntrustedPath, match="symbolic link"):
        read_private_file(link)
    with pytest.raises(FileNotFoundError):
        read_private_file(tmp_path / "missing")
    with pytest.raises(UntrustedPath, match="belongs to uid"):
        read_private_file(secret, uid=UID + 1)


def test_server_peer_must_be_us_or_root() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        check_server_peer(ours, "the socket")  # us
    require_root()
    # A socket served by nobody: a Unix server run under setpriv.
    script = (
        "import socket,sys,time\n"
        "s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('ok', flush=True); c,_=s.accept(); time.sleep(5)\n"
    )
    path = Path(f"/tmp/llamad-peer-{os.getpid()}.sock")
    path.unlink(missing_ok=True)
    server = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", script, str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ok"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            with pytest.raises(UntrustedPeer, match=f"served by uid {NOBODY}, not by you"):
                check_server_peer(client, "the socket")
    finally:
        server.kill()
        server.communicate()
        path.unlink(missing_ok=True)


def test_tcp_peer_uid_names_the_local_user_at_the_other_end() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as _client:
            accepted, remote = listener.accept()
            with accepted:
                assert tcp_peer_uid(accepted.getsockname(), remote) == UID
        require_root()
        client = subprocess.Popen(
            [
                *AS_NOBODY,
                sys.executable,
                "-c",
                f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); "
                "time.sleep(5)",
            ]
        )
        try:
            accepted, remote = listener.accept()
            with accepted:
                assert tcp_peer_uid(accepted.getsockname(), remote) == NOBODY
        finally:
            client.kill()
            client.wait()


def test_a_peer_on_another_machine_has_no_uid() -> None:
    assert tcp_peer_uid(("127.0.0.1", 1), ("127.0.0.1", 2)) is None  # no such connection


def test_port_served_by_reads_the_kernels_tables(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_served_by(os.getpid(), port) is None  # ours: this process holds it
        assert os.fstat(listener.fileno()).st_ino in socket_inodes(os.getpid())
        other = port_served_by(1, port)  # pid 1 does not hold our socket
        assert other is not None and f"uid {UID}" in other
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert port_served_by(os.getpid(), free) == f"nothing listens on 127.0.0.1:{free}"


def test_port_served_by_counts_wildcard_listeners_too(tmp_path: Path) -> None:
    """A fake /proc: ours on 127.0.0.1, someone else's on 0.0.0.0 and [::] of the same port."""
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    (proc / "42" / "fd").mkdir(parents=True)
    (proc / "42" / "fd" / "3").symlink_to("socket:[1001]")
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    rest = "00000000:00000000 00:00000000 00000000"
    ours = f"   0: 0100007F:1F90 00000000:0000 0A {rest}     0        0 1001\n"
    theirs = f"   1: 00000000:1F90 00000000:0000 0A {rest} 65534        0 2002\n"
    (proc / "net" / "tcp").write_text(header + ours)
    (proc / "net" / "tcp6").write_text(header)
    assert port_served_by(42, 8080, proc) is None
    (proc / "net" / "tcp").write_text(header + ours + theirs)
    assert "uid 65534" in (port_served_by(42, 8080, proc) or "")
    v6 = (
        "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 "
        f"0A {rest} 65534        0 3003\n"
    )
    (proc / "net" / "tcp").write_text(header + ours)
    (proc / "net" / "tcp6").write_text(header + v6)
    assert "uid 65534" in (port_served_by(42, 8080, proc) or "")
