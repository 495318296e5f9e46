"""Running the app as a server process: bind, announce, wait for a signal, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web

from .app import create_app
from .config import Config
from .keys import IN_FLIGHT

_log = logging.getLogger(__name__)


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

        for running_site in list(runner.sites):
            await running_site.stop()
        in_flight = app[IN_FLIGHT]
        _log.info("stopping: waiting for %d requests in progress", in_flight.count)
        try:
            async with asyncio.timeout(config.shutdown_timeout):
                await in_flight.wait_idle()
        except TimeoutError:
            _log.warning("stopping with %d requests unfinished", in_flight.count)
    finally:
        # Closes idle connections, gives responses still being sent up to the shutdown
        # timeout, then stops the worker processes.
        await runner.cleanup()
