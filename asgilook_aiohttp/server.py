"""Running the app as a server process: bind, announce, serve until signalled, drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from . import connections, converter, systemd
from .app import create_app
from .config import Config
from .inflight import InFlight
from .keys import IN_FLIGHT
from .logs import AccessLogger

_log = logging.getLogger(__name__)
_LAST_MOMENT = 0.5


def _url(address: Any) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _listen(
    protocol: Callable[[], asyncio.BaseProtocol], config: Config
) -> list[asyncio.Server]:
    """Sockets passed by systemd if any; else the Unix socket if asked for; else TCP."""
    loop = asyncio.get_running_loop()
    if passed := systemd.listen_sockets():
        return [await loop.create_server(protocol, sock=sock) for sock in passed]
    if config.unix_path is not None:
        _remove_stale_socket(config.unix_path)
        return [await loop.create_unix_server(protocol, str(config.unix_path))]
    return [await loop.create_server(protocol, config.host, config.port, reuse_address=True)]


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a server that is gone would make binding fail; one that a
    live server answers on is not ours to take."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as probe:
        probe.setblocking(False)
        # Only a refused connection proves nobody is there; busy, another kind of socket
        # or an answer all mean the path is in use.
        if probe.connect_ex(str(path)) != errno.ECONNREFUSED:
            raise SystemExit(f"asgilook-aiohttp: {path} is a socket in use by another process")
    path.unlink()


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and stop."""
    systemd.notify("STATUS=starting: opening the storage and the worker processes")
    cap = connections.connection_cap(config.max_connections)
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        shutdown_timeout=config.shutdown_timeout,
        **connections.connection_options(config),
    )
    # Startup (index, sweep, worker processes) completes before any socket is bound, so
    # the first connection accepted can already be served.
    await runner.setup()
    assert runner.server is not None
    watchdog: asyncio.Task[None] | None = None
    listeners: list[asyncio.Server] = []
    try:
        listeners = await _listen(connections.capped(runner.server, cap), config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        urls = ", ".join(
            _url(sock.getsockname()) for listener in listeners for sock in listener.sockets
        )
        print(f"asgilook-aiohttp listening on {urls}", flush=True)
        systemd.notify("READY=1", f"STATUS=serving on {urls}")
        if (interval := systemd.watchdog_interval()) is not None:
            watchdog = asyncio.create_task(systemd.keep_alive(interval))
        await stop.wait()

        in_flight = app[IN_FLIGHT]
        systemd.notify("STOPPING=1", f"STATUS=stopping: finishing {in_flight.count} requests")
        await _drain(runner, listeners, in_flight, config.shutdown_timeout)
    finally:
        for listener in listeners:
            listener.close()
        await runner.cleanup()  # closes what is left, then the app's cleanup stops the workers
        converter.stop_helper_processes()
        if watchdog is not None:
            watchdog.cancel()


async def _drain(
    runner: web.AppRunner, listeners: list[asyncio.Server], in_flight: InFlight, grace: float
) -> None:
    """Stop accepting, then give requests in progress ``grace`` seconds in all to end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for listener in listeners:
        listener.close()
    _log.info("stopping: waiting for %d requests in progress", in_flight.count)
    try:
        async with asyncio.timeout_at(deadline):
            await in_flight.wait_idle()
    except TimeoutError:
        _log.warning("stopping with %d requests unfinished", in_flight.count)
    # Handlers are done; responses may still be on their way out. aiohttp stops reading
    # from connections here, which is why uploads were waited for above.
    if runner.server is not None:
        runner.server.pre_shutdown()
        # aiohttp reads a timeout of 0 as "none": what is left of the grace, or a moment.
        await runner.server.shutdown(max(_LAST_MOMENT, deadline - loop.time()))
