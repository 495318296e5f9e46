"""Running the app as a server process: bind, announce, wait for a signal, drain."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiohttp import web

from .app import create_app
from .config import Config


def _url(address: Any) -> str:
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then let in-flight requests finish and stop."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=config.shutdown_timeout)
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
        print(f"asgilook-aiohttp listening on {urls}", file=sys.stdout, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
