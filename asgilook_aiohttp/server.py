"""Running the app as a server process: bind, announce, wait for a signal, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from .app import create_app
from .config import Config
from .inflight import InFlight
from .keys import IN_FLIGHT

_log = logging.getLogger(__name__)
_LAST_MOMENT = 0.5


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and stop."""
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout)
    # Startup (index, sweep, worker processes) completes before the socket is bound, so
    # the first connection accepted can already be served.
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        urls = ", ".join(_url(address) for address in runner.addresses)
        print(f"asgilook-aiohttp listening on {urls}", flush=True)
        await stop.wait()

        await _drain(runner, app[IN_FLIGHT], config.shutdown_timeout)
    finally:
        await runner.cleanup()  # closes what is left, then the app's cleanup stops the workers


async def _drain(runner: web.AppRunner, in_flight: InFlight, grace: float) -> None:
    """Stop accepting, then give requests in progress ``grace`` seconds in all to end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for site in list(runner.sites):
        await site.stop()
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
