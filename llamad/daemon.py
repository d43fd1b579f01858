"""The daemon's top level: wire config, the model pool, sockets and systemd together.

Order matters and is what systemd sees: the runtime directory is verified, the
control socket is listening and the configuration is loaded before
``READY=1``; pinned, preloaded and remembered models load in the background
afterwards (a slow model must not make the service look hung).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
from collections.abc import MutableMapping
from pathlib import Path

import attrs
import trio

from llamad.api_keys import ensure_own_key, key_ring, read_keys_file
from llamad.concurrency import first_leaf
from llamad.config import Config, DaemonConfig, load_config
from llamad.conversations import ChatService
from llamad.dispatch import Dispatcher
from llamad.errors import HistoryOpenError, LlamadError, ServerBinaryNotFound, StartupError
from llamad.events import EventHub
from llamad.history import HistoryStore
from llamad.llama_server import ServerBinary, find_server_binary, reap_stale
from llamad.metrics import Metrics
from llamad.no_history import NoHistory
from llamad.ownership import UntrustedPath, ensure_private_dir
from llamad.paths import WEBSOCKET_ADDRESS_NAME
from llamad.pool import STATE_FILE, ModelPool
from llamad.systemd import Notifier, listen_sockets
from llamad.transport import http
from llamad.transport.accept import raise_open_file_limit
from llamad.transport.unix import ControlServer, bind_control_socket
from llamad.transport.websocket import WebSocketServer, parse_listen_address, write_token
from llamad.workers import Workers

log = logging.getLogger(__name__)

# [daemon] keys `llamactl reload` cannot apply to a running llamad.
RESTART_KEYS = ("socket", "runtime_dir", "data_dir", "http")


def prepare_runtime_dir(runtime_dir: Path) -> Path:
    """Create or verify the runtime directory and its ``models`` folder; returns the latter.

    Refuses (``UntrustedPath``) a directory another user created or can
    write to: llamad's sockets, pid files and token live there.
    """
    hint = (
        f"set XDG_RUNTIME_DIR (normally /run/user/{os.getuid()}) or [daemon] runtime_dir "
        "to a directory of your own"
    )
    try:
        ensure_private_dir(runtime_dir, hint=hint)
        # Inside a verified private directory nobody else can have made it: repair.
        return ensure_private_dir(runtime_dir / "models", repair=True, hint=hint)
    except OSError as exc:
        raise StartupError(
            f"cannot create the runtime directory {runtime_dir}: {exc.strerror or exc}; {hint}"
        ) from None


def open_history(data_dir: Path, home: Path | None = None) -> tuple[HistoryStore, str | None]:
    """The history store, or a ``NoHistory`` stand-in and the reason it is unavailable.

    The data directory is made private (repaired to 0700 under the home
    directory or when only we could write to it; refused when others could),
    and so are the LMDB files: chat history is nobody else's business. A
    directory that is someone else's stops llamad (``UntrustedPath``); one
    that cannot be written only costs the history.
    """
    home = Path.home() if home is None else home
    path = data_dir / "history.lmdb"
    hint = "set [daemon] data_dir to a directory of your own"
    try:
        try:
            mode = os.lstat(data_dir).st_mode
        except FileNotFoundError:
            mode = 0
        # Under the home directory, or writable by nobody else: nothing can have
        # been planted inside, so a mode that lets others read is fixed, not refused.
        repair = data_dir.is_relative_to(home) or not mode & 0o022
        ensure_private_dir(data_dir, repair=repair, hint=hint)
        ensure_private_dir(path, repair=True, hint=hint)
        for name in ("data.mdb", "lock.mdb"):
            _private_file(path / name)
        return HistoryStore(path), None
    except UntrustedPath:
        raise
    except OSError as exc:
        problem = f"cannot write to {exc.filename or data_dir}: {exc.strerror or exc}"
    except HistoryOpenError as exc:
        problem = str(exc)
    reason = (
        f"chat history is unavailable ({problem}); make {data_dir} writable or set "
        "[daemon] data_dir, then restart llamad"
    )
    return NoHistory(path, reason), reason


def _cannot_listen(what: str, key: str, setting: str, exc: Exception) -> StartupError:
    """A front door that could not bind ``setting``, in one line with the fix."""
    cause = first_leaf(exc)
    reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause)
    return StartupError(
        f"cannot listen for {what} on {setting}: {reason}; set [daemon] "
        f'{key} to another "HOST:PORT", or "off"'
    )


def _private_file(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise UntrustedPath(
            f"{path} is not a file of yours (uid {info.st_uid}); move the chat history "
            "aside and restart llamad"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o600)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600 from the start."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


class Daemon:
    def __init__(
        self,
        config: Config,
        socket_path: Path,
        environ: MutableMapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.socket_path = socket_path
        self.environ = environ if environ is not None else os.environ
        self.notifier = Notifier.from_env(self.environ)
        self.hub = EventHub()
        self._websocket_server: WebSocketServer | None = None
        self._websocket_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._dispatcher: Dispatcher | None = None
        self._pool: ModelPool | None = None
        self._http_api: http.HttpApi | None = None
        self._token_path = config.daemon.runtime_dir / "token"
        # The data directory llamad started with: a reload cannot move it.
        self._key_path = config.daemon.data_dir / "api_key"
        self._key: str | None = None
        self._key_failed = False
        self._reload_lock = trio.Lock()
        # Where local clients find the WebSocket (next to the token, 0600).
        self._address_path = config.daemon.runtime_dir / WEBSOCKET_ADDRESS_NAME

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One line per health probe would drown the journal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        soft, _hard = raise_open_file_limit()
        log.debug("open file limit %d", soft)
        # Socket activation first: LISTEN_* must be gone before any child is spawned.
        activated = listen_sockets(self.environ)
        # Before anything else is said or done: is the runtime directory ours?
        sockets_dir = prepare_runtime_dir(self.config.daemon.runtime_dir)
        binary = self._find_binary()
        listener: socket.socket
        if activated:
            listener = activated[0]
            log.info("control socket passed by systemd (socket activation)")
        else:
            # Binding fails if another llamad is alive, so reaping below cannot
            # touch a live daemon's servers.
            listener = bind_control_socket(self.socket_path)
        for pidfile in sockets_dir.glob("*.pid"):
            reap_stale(pidfile)
        try:
            store, history_problem = await trio.to_thread.run_sync(
                open_history, self.config.daemon.data_dir
            )
        except BaseException:  # a data directory of someone else's: no start
            listener.close()
            if not activated:
                self.socket_path.unlink(missing_ok=True)
            raise
        if history_problem is not None:
            log.warning("%s", history_problem)
        # A read-only data directory costs the history and what the pool
        # remembers across restarts, nothing else.
        state_path = None if history_problem else self.config.daemon.data_dir / STATE_FILE
        workers_dir = ensure_private_dir(self.config.daemon.runtime_dir / "workers", repair=True)
        workers = Workers(self.config, workers_dir, self.hub, self.environ)
        pool = ModelPool(
            self.config,
            binary,
            sockets_dir,
            self.hub,
            self.environ,
            state_path=state_path,
            workers=workers,
        )
        pool.history_problem = history_problem
        self._pool = pool
        token_path = self._token_path
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # Workers first: the models split over them check them before starting.
                    await nursery.start(workers.run)
                    await nursery.start(pool.run)
                    chats = ChatService(pool, store, self.hub)
                    await nursery.start(chats.run)
                    dispatcher = Dispatcher(pool, chats, nursery, self.reload)
                    self._dispatcher = dispatcher
                    self._websocket_is(await self._start_websocket(self.config.daemon))
                    dispatcher.http = await self._start_http(nursery, pool)
                    self._show_key_file(self.config)
                    await nursery.start(ControlServer(dispatcher).serve, listener)
                    log.info("listening on %s", self.socket_path)
                    nursery.start_soon(self._report_status, pool)
                    if self.notifier.watchdog_interval is not None:
                        nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                    self.notifier.ready(_status_line(pool))
                    task_status.started()
                    await pool.restore()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            nursery.start_soon(self._reload_on_signal)
                            continue
                        log.info("%s received, stopping", signal.Signals(signum).name)
                        break
                    self.notifier.stopping()
                    await pool.shutdown()
                    await workers.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            if not activated:
                self.socket_path.unlink(missing_ok=True)
            token_path.unlink(missing_ok=True)
            self._address_path.unlink(missing_ok=True)
            listener.close()
            store.close()
            self.notifier.close()

    def _find_binary(self) -> ServerBinary | None:
        """llama-server; a llamad with only workers and remote models can do without it."""
        config = self.config
        try:
            binary = find_server_binary(config.daemon.llama_server)
        except ServerBinaryNotFound:
            if any(not m.remote for m in config.models.values()):
                raise
            return None
        log.info("using llama-server %s (found via %s)", binary.path, binary.source)
        return binary

    async def _start_websocket(self, settings: DaemonConfig) -> str | None:
        """Listen as ``settings.websocket`` says; returns "host:port", or None when off.

        The token is written (fresh at each start) before the port opens.
        """
        setting = settings.websocket
        if setting == "off":
            return None
        assert self._nursery is not None
        host, port = parse_listen_address(setting)
        if self._websocket_server is None:
            token = write_token(self._token_path)
        else:
            token = self._websocket_server.token
        server = WebSocketServer(
            self._dispatcher, token, settings.allowed_origins, settings.allowed_hosts
        )
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            with scope:
                await server.serve(host, port, task_status=task_status)

        try:
            bound = await self._nursery.start(serve)
        except Exception as exc:  # the bind failed: OSError, maybe inside a group
            raise _cannot_listen("the WebSocket", "websocket", setting, exc) from None
        self._stop_websocket()
        self._websocket_server, self._websocket_scope = server, scope
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("WebSocket on ws://%s (token in %s)", address, self._token_path)
        return address

    def _websocket_is(self, address: str | None) -> None:
        """Tell ``status`` and local clients where the WebSocket is, or that it is off."""
        if self._dispatcher is not None:
            self._dispatcher.websocket = address
        if address is not None:
            _write_private(self._address_path, f"ws://{address}/\n")
        else:  # one left behind would send clients to a port that is not llamad's
            self._address_path.unlink(missing_ok=True)

    def _stop_websocket(self) -> None:
        """Close the WebSocket port and every connection on it."""
        if self._websocket_scope is not None:
            self._websocket_scope.cancel()
        self._websocket_server = None
        self._websocket_scope = None

    # ----------------------------------------------------------- the HTTP API

    def _show_key_file(self, config: Config) -> None:
        """Tell ``status`` (and so ``llamactl api-key``) where llamad's key is, if one is used."""
        if self._dispatcher is None:
            return
        uses_key = self._http_api is not None and config.daemon.auth == "keys"
        shown = uses_key and self._own_key() is not None
        self._dispatcher.api_key_file = str(self._key_path) if shown else None

    def _own_key(self) -> str | None:
        """llamad's own API key, made at first start in the data directory it started with.

        None when that directory cannot be written (llamad then runs without
        its history too): only keys from ``api_keys_file`` are accepted, and the
        log says so once.
        """
        if self._key is None and not self._key_failed:
            try:
                self._key = ensure_own_key(self._key_path)
            except OSError as exc:
                self._key_failed = True
                log.warning(
                    "the HTTP API's own key cannot be made at %s (%s): only keys from "
                    "[daemon] api_keys_file are accepted",
                    self._key_path,
                    exc.strerror or exc,
                )
        return self._key

    def _http_settings(self, config: Config) -> http.HttpSettings:
        """Keys and allowed origins/hosts; ``ConfigError`` for a bad keys file."""
        daemon = config.daemon
        keys = None
        if daemon.auth == "keys":
            extra = read_keys_file(daemon.api_keys_file, config) if daemon.api_keys_file else []
            keys = key_ring(self._own_key(), extra)
        return http.HttpSettings(keys, daemon.allowed_origins, daemon.allowed_hosts)

    async def _start_http(self, nursery: trio.Nursery, source: ModelPool) -> str | None:
        """Listen for the HTTP API; returns "host:port", or None when it is off."""
        setting = self.config.daemon.http
        if setting == "off":
            return None
        host, port = parse_listen_address(setting)
        metrics = Metrics(source)
        nursery.start_soon(metrics.follow, self.hub)
        self._http_api = http.HttpApi(source, self._http_settings(self.config), metrics)
        try:
            bound = await nursery.start(http.serve, self._http_api, host, port)
        except Exception as exc:  # the bind failed: OSError, maybe inside a group
            raise _cannot_listen("the HTTP API", "http", setting, exc) from None
        address = http.listen_address(host, bound)
        auth = "no API key needed" if self.config.daemon.auth == "none" else "API keys required"
        log.info("HTTP API on http://%s (%s)", address, auth)
        return address

    async def reload(self) -> str:
        """Re-read models.toml and apply it; returns the one-line summary for the user.

        What a running llamad can change, it changes: models (as the pool
        decides), the memory budget, the HTTP API's keys, the WebSocket (on,
        off, address, allowed origins and hosts), the llama-server binary and
        how many log lines are kept. Keys that only a restart can apply are
        named as such. Everything is checked before anything is applied: a
        bad models.toml, keys file or binary leaves the old configuration
        whole. Reloads run one at a time (SIGHUP and a client can overlap).
        """
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> str:
        pool = self._pool
        assert pool is not None
        source = self.config.source
        if source is None:
            raise LlamadError("llamad was started without a models.toml; nothing to reload")
        self.notifier.reloading()
        try:
            config = load_config(source, self.environ)
            old, new = self.config.daemon, config.daemon
            settings = self._http_settings(config) if self._http_api is not None else None
            binary = pool.binary
            if old.llama_server != new.llama_server:
                binary = find_server_binary(new.llama_server)
        finally:
            self.notifier.ready()
        if self._http_api is not None and settings is not None:
            self._http_api.settings = settings
        self.config = config
        self._show_key_file(config)
        notes = await self._apply_daemon_changes(old, new)
        pool.binary = binary  # the pool restarts the running models with it
        changes = await pool.reload(config)
        for name in config.models:
            pool.server(name).keep_lines(new.log_lines)
        if changes:
            notes.insert(0, "; ".join(changes))
        elif not notes:
            notes.append("nothing changed")
        return f"reloaded {config.source}: {'; '.join(notes)}"

    async def _apply_daemon_changes(self, old: DaemonConfig, new: DaemonConfig) -> list[str]:
        changed = [
            field.name
            for field in attrs.fields(DaemonConfig)
            if getattr(old, field.name) != getattr(new, field.name)
        ]
        notes: list[str] = []
        applied = [
            key
            for key in changed
            if key
            in (
                "allowed_origins",
                "allowed_hosts",
                "log_lines",
                "llama_server",
                "auth",
                "api_keys_file",
                "load_timeout_sec",
            )
        ]
        if "supervision" in changed:
            applied.append("restart and timeout defaults")
        server = self._websocket_server
        if server is not None:
            server.allowed_origins = new.allowed_origins
            server.allowed_hosts = new.allowed_hosts
        if "websocket" in changed:
            notes.append(await self._move_websocket(old.websocket, new))
        if applied:
            notes.append(f"[daemon] {', '.join(applied)} applied")
        if "default_model" in changed:
            notes.append("[daemon] default_model: new chats use it now, it loads at next start")
        if "preload" in changed:
            notes.append("[daemon] preload is loaded from the next start")
        restart = [key for key in changed if key in RESTART_KEYS]
        if restart:
            notes.append(
                f"[daemon] {', '.join(restart)} changed: restart llamad to apply "
                "(`systemctl --user restart llamad`)"
            )
        return notes

    async def _move_websocket(self, old_setting: str, new: DaemonConfig) -> str:
        if new.websocket == "off":
            self._stop_websocket()
            self._token_path.unlink(missing_ok=True)
            address = None
        else:
            try:
                address = await self._start_websocket(new)
            except StartupError as exc:
                return f"WebSocket unchanged on {old_setting}: {exc}"
        self._websocket_is(address)
        return f"WebSocket now on ws://{address}" if address else "WebSocket now off"

    async def _reload_on_signal(self) -> None:
        try:
            summary = await self.reload()
        except LlamadError as exc:
            # A user mistake, not a bug: the message says it all, no traceback.
            log.error("reload rejected, keeping the old configuration:\n%s", exc)  # noqa: TRY400
            return
        except Exception:
            # A bug must not take the daemon down with the signal that found it.
            log.exception("internal error while reloading")
            return
        log.info("%s", summary)

    async def _report_status(self, pool: ModelPool) -> None:
        if not self.notifier.enabled:
            return  # not under systemd: nobody to tell
        shown = ""
        with self.hub.subscribe(frozenset({"state", "workers"})) as subscription:
            async for _event in subscription.receive:
                line = _status_line(pool)
                if line != shown:  # most events change only counts, which it does not show
                    self.notifier.status(line)
                    shown = line

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: if the loop hangs, systemd notices.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


def _status_line(pool: ModelPool) -> str:
    shown = [s for s in pool.statuses().values() if s.expected or s.state != "stopped"]
    workers = [
        f"worker {w.name}: {w.state}" + (f" ({w.reason})" if w.reason else "")
        for w in pool.worker_statuses()
        if w.local
    ]
    models = [f"{s.name}: {s.state}" + (f" ({s.reason})" if s.reason else "") for s in shown]
    if not models and pool.config.models:
        models = ["no model loaded"]
    return "; ".join(models + workers) or "no model loaded"
