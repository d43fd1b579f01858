"""The daemon's top level: wire config, supervisors, socket and systemd together.

Order matters and is what systemd sees: the control socket is listening and
the configuration is loaded before ``READY=1``; the default model loads in the
background afterwards (a slow model must not make the service look hung).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import MutableMapping
from pathlib import Path

import trio

from llamad.api_keys import ensure_own_key, key_ring, read_keys_file
from llamad.concurrency import first_leaf
from llamad.config import Config, load_config
from llamad.conversations import ChatService
from llamad.dispatch import Dispatcher
from llamad.errors import LlamadError, ServerBinaryNotFound, StartupError
from llamad.events import EventHub
from llamad.history import HistoryStore
from llamad.llama_server import ServerBinary, find_server_binary, reap_stale
from llamad.metrics import Metrics
from llamad.paths import WEBSOCKET_ADDRESS_NAME
from llamad.pool import STATE_FILE, ModelPool
from llamad.systemd import Notifier, listen_sockets
from llamad.transport import http
from llamad.transport.unix import ControlServer, bind_control_socket
from llamad.transport.websocket import WebSocketServer, parse_listen_address, write_token
from llamad.workers import Workers

log = logging.getLogger(__name__)


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600 from the start."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


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
        self._http_api: http.HttpApi | None = None
        self._dispatcher: Dispatcher | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One line per health probe would drown the journal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Socket activation first: LISTEN_* must be gone before any child is spawned.
        activated = listen_sockets(self.environ)
        binary = self._find_binary()
        listener: socket.socket
        if activated:
            listener = activated[0]
            log.info("control socket passed by systemd (socket activation)")
        else:
            # Binding fails if another llamad is alive, so reaping below cannot
            # touch a live daemon's servers.
            listener = bind_control_socket(self.socket_path)
        sockets_dir = _private_dir(self.config.daemon.runtime_dir / "models")
        for pidfile in sockets_dir.glob("*.pid"):
            reap_stale(pidfile)
        data_dir = _private_dir(self.config.daemon.data_dir)
        workers_dir = _private_dir(self.config.daemon.runtime_dir / "workers")
        workers = Workers(self.config, workers_dir, self.hub, self.environ)
        pool = ModelPool(
            self.config,
            binary,
            sockets_dir,
            self.hub,
            self.environ,
            state_path=data_dir / STATE_FILE,
            workers=workers,
        )
        history_path = data_dir / "history.lmdb"
        store = await trio.to_thread.run_sync(HistoryStore, history_path)
        token_path = self.config.daemon.runtime_dir / "token"
        address_path = self.config.daemon.runtime_dir / WEBSOCKET_ADDRESS_NAME
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    # Workers first: the models split over them check them before starting.
                    await nursery.start(workers.run)
                    await nursery.start(pool.run)
                    chats = ChatService(pool, store, self.hub)
                    await nursery.start(chats.run)
                    websocket = await self._start_websocket(nursery, token_path)
                    if websocket is not None:
                        _write_private(address_path, f"ws://{websocket}/\n")
                    else:  # one left by a llamad that was killed would mislead clients
                        address_path.unlink(missing_ok=True)
                    http_address = await self._start_http(nursery, pool)
                    dispatcher = Dispatcher(
                        pool, chats, nursery, self.reload_config, websocket=websocket
                    )
                    dispatcher.http = http_address
                    self._dispatcher = dispatcher
                    self._show_key_file(self.config)
                    if self._websocket_server is not None:
                        self._websocket_server.dispatcher = dispatcher
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
                            nursery.start_soon(self._reload_on_signal, pool)
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
            address_path.unlink(missing_ok=True)
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

    async def _start_websocket(self, nursery: trio.Nursery, token_path: Path) -> str | None:
        """Write a fresh token, then listen; returns "host:port" or None when off."""
        setting = self.config.daemon.websocket
        if setting == "off":
            return None
        host, port = parse_listen_address(setting)
        token = write_token(token_path)
        self._websocket_server = WebSocketServer(
            None,
            token,
            self.config.daemon.allowed_origins,
            self.config.daemon.allowed_hosts,
        )
        try:
            bound = await nursery.start(self._websocket_server.serve, host, port)
        except Exception as exc:  # the bind failed: OSError, maybe inside a group
            cause = first_leaf(exc)
            reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause)
            raise StartupError(
                f"cannot listen for the WebSocket on {setting}: {reason}; set [daemon] "
                'websocket to another "HOST:PORT", or "off"'
            ) from None
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
        log.info("WebSocket on ws://%s (token in %s)", address, token_path)
        return address

    # ----------------------------------------------------------- the HTTP API

    def _show_key_file(self, config: Config) -> None:
        """Tell ``status`` (and so ``llamactl api-key``) where llamad's key is, if one is used."""
        if self._dispatcher is None:
            return
        uses_key = self._http_api is not None and config.daemon.auth == "keys"
        key_file = config.daemon.data_dir / "api_key"
        self._dispatcher.api_key_file = str(key_file) if uses_key else None

    def _http_settings(self, config: Config) -> http.HttpSettings:
        """Keys and allowed origins/hosts; ``ConfigError`` for a bad keys file."""
        daemon = config.daemon
        keys = None
        if daemon.auth == "keys":
            extra = read_keys_file(daemon.api_keys_file, config) if daemon.api_keys_file else []
            keys = key_ring(ensure_own_key(_private_dir(daemon.data_dir) / "api_key"), extra)
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
            cause = first_leaf(exc)
            reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause)
            raise StartupError(
                f"cannot listen for the HTTP API on {setting}: {reason}; set [daemon] "
                'http to another "HOST:PORT", or "off"'
            ) from None
        address = http.listen_address(host, bound)
        auth = "no API key needed" if self.config.daemon.auth == "none" else "API keys required"
        log.info("HTTP API on http://%s (%s)", address, auth)
        return address

    async def reload_config(self) -> Config:
        """Re-read models.toml; on error the old configuration stays in force."""
        source = self.config.source
        if source is None:
            raise LlamadError("llamad was started without a models.toml; nothing to reload")
        self.notifier.reloading()
        try:
            config = load_config(source, self.environ)
            if self._http_api is not None:
                # A bad keys file rejects the whole reload, like a bad models.toml.
                self._http_api.settings = self._http_settings(config)
            self.config = config
            self._show_key_file(config)
        finally:
            self.notifier.ready()
        return self.config

    async def _reload_on_signal(self, pool: ModelPool) -> None:
        try:
            config = await self.reload_config()
        except LlamadError as exc:
            # A user mistake, not a bug: the message says it all, no traceback.
            log.error("reload rejected, keeping the old configuration:\n%s", exc)  # noqa: TRY400
            return
        changes = await pool.reload(config)
        log.info("reloaded %s: %s", config.source, "; ".join(changes) or "no model changed")

    async def _report_status(self, pool: ModelPool) -> None:
        with self.hub.subscribe(frozenset({"state", "workers"})) as subscription:
            async for _event in subscription.receive:
                self.notifier.status(_status_line(pool))

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
