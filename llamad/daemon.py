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

from llamad.chat import ChatEngine
from llamad.concurrency import first_leaf
from llamad.config import Config, load_config
from llamad.dispatch import Dispatcher
from llamad.errors import LlamadError, StartupError, UnknownModelError
from llamad.events import EventHub
from llamad.history import HistoryStore
from llamad.llama_server import find_server_binary, reap_stale
from llamad.manager import ModelManager
from llamad.systemd import Notifier, listen_sockets
from llamad.transport.unix import ControlServer, bind_control_socket
from llamad.transport.websocket import WebSocketServer, parse_listen_address, write_token

log = logging.getLogger(__name__)


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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One line per health probe would drown the journal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Socket activation first: LISTEN_* must be gone before any child is spawned.
        activated = listen_sockets(self.environ)
        binary = find_server_binary(self.config.daemon.llama_server)
        log.info("using llama-server %s (found via %s)", binary.path, binary.source)
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
        manager = ModelManager(self.config, binary, sockets_dir, self.hub, self.environ)
        history_path = _private_dir(self.config.daemon.data_dir) / "history.lmdb"
        store = await trio.to_thread.run_sync(HistoryStore, history_path)
        token_path = self.config.daemon.runtime_dir / "token"
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(manager.run)
                    engine = ChatEngine(manager, store, self.hub)
                    await nursery.start(engine.run)
                    websocket = await self._start_websocket(nursery, token_path)
                    dispatcher = Dispatcher(
                        manager, engine, nursery, self.reload_config, websocket=websocket
                    )
                    if self._websocket_server is not None:
                        self._websocket_server.dispatcher = dispatcher
                    await nursery.start(ControlServer(dispatcher).serve, listener)
                    log.info("listening on %s", self.socket_path)
                    nursery.start_soon(self._report_status, manager)
                    if self.notifier.watchdog_interval is not None:
                        nursery.start_soon(self._watchdog, self.notifier.watchdog_interval)
                    self.notifier.ready(_status_line(manager))
                    task_status.started()
                    default = self.config.daemon.default_model
                    if default is not None:
                        nursery.start_soon(dispatcher.load_in_background, default, False)
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            nursery.start_soon(self._reload_on_signal, manager)
                            continue
                        log.info("%s received, stopping", signal.Signals(signum).name)
                        break
                    self.notifier.stopping()
                    await manager.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            if not activated:
                self.socket_path.unlink(missing_ok=True)
            token_path.unlink(missing_ok=True)
            listener.close()
            store.close()
            self.notifier.close()

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

    async def reload_config(self) -> Config:
        """Re-read models.toml; on error the old configuration stays in force."""
        source = self.config.source
        if source is None:
            raise LlamadError("llamad was started without a models.toml; nothing to reload")
        self.notifier.reloading()
        try:
            self.config = load_config(source, self.environ)
        finally:
            self.notifier.ready()
        return self.config

    async def _reload_on_signal(self, manager: ModelManager) -> None:
        try:
            config = await self.reload_config()
        except LlamadError as exc:
            # A user mistake, not a bug: the message says it all, no traceback.
            log.error("reload rejected, keeping the old configuration:\n%s", exc)  # noqa: TRY400
            return
        changes = await manager.reload(config)
        log.info("reloaded %s: %s", config.source, "; ".join(changes) or "no model changed")

    async def _report_status(self, manager: ModelManager) -> None:
        with self.hub.subscribe(frozenset({"state"})) as subscription:
            async for _event in subscription.receive:
                self.notifier.status(_status_line(manager))

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: if the loop hangs, systemd notices.
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)


def _status_line(manager: ModelManager) -> str:
    if manager.active is None:
        return "no model loaded"
    try:
        supervisor = manager.resolve(manager.active)
    except (KeyError, UnknownModelError):
        # A reload that removes or replaces the active model publishes its last
        # states while the new configuration (or supervisor) is not in place.
        return f"{manager.active}: reloading"
    reason = f" ({supervisor.reason})" if supervisor.reason else ""
    return f"{manager.active}: {supervisor.state}{reason}"
