"""A bare aiohttp app that refuses every request at once, as cheaply as aiohttp can: where
``soak.py --ceiling`` sends its attackers, to measure what their traffic alone costs the
machine. Prints the address it serves on, and serves until killed."""

from __future__ import annotations

import asyncio

from aiohttp import web


async def refuse(request: web.Request) -> web.Response:
    return web.Response(status=415, text="refused", headers={"Connection": "close"})


async def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{anything:.*}", refuse)
    # The connection settings the real server uses, so that the attackers meet the same
    # lingering and timeouts.
    runner = web.AppRunner(
        app, access_log=None, keepalive_timeout=15, lingering_time=2.0, auto_decompress=False
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    print(f"refusing on http://{host}:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
