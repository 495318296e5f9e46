"""One HTTP process: serve the app on the sockets the main process opened, until
signalled, then drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Sequence

from aiohttp import web

from . import connections
from .accepting import InTurn
from .app import create_app
from .config import Config
from .fleet import Fleet
from .inflight import InFlight
from .keys import IN_FLIGHT, METRICS
from .logs import AccessLogger

_log = logging.getLogger(__name__)
_LAST_MOMENT = 0.5

Tell = Callable[[str], None]
"""Tells the main process how this one is: ``ready``, then ``alive`` now and then."""


async def serve(
    config: Config,
    sockets: Sequence[socket.socket],
    fleet: Fleet,
    *,
    tell: Tell,
    heartbeat: float,
) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and stop."""
    cap = connections.connection_cap(config.max_connections)
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        shutdown_timeout=config.shutdown_timeout,
        **connections.connection_options(config),
    )
    loop = asyncio.get_running_loop()
    beating = asyncio.create_task(_beat(tell, heartbeat))
    # Startup (index, sweep, worker processes) completes before any connection is
    # accepted, so the first one can already be served.
    await runner.setup()
    assert runner.server is not None
    server = runner.server
    listeners: list[asyncio.Server | InTurn] = []
    try:
        if fleet.count > 1:
            listeners.append(await fleet.serve(app[METRICS]))
            app[METRICS].others = fleet.others_series
        protocol = connections.capped(server, cap)

        def held() -> int:
            return len(server.connections)

        for sock in sockets:
            listeners.append(InTurn(sock, protocol, fleet.board, fleet.number, held))
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        tell("ready")
        await stop.wait()
        await _drain(runner, listeners, app[IN_FLIGHT], config.shutdown_timeout)
    finally:
        for listener in listeners:
            listener.close()
        await runner.cleanup()  # closes what is left, then the app's cleanup stops the workers
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating


async def _beat(tell: Tell, interval: float) -> None:
    """Tell the main process, for as long as the event loop gets round to it, that this
    process is alive."""
    while True:
        tell("alive")
        await asyncio.sleep(interval)


async def _drain(
    runner: web.AppRunner,
    listeners: list[asyncio.Server | InTurn],
    in_flight: InFlight,
    grace: float,
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
