"""Counting requests in progress, so that a stopping server can wait for them.

aiohttp's own graceful shutdown stops reading from open connections first, so an upload
whose body is still arriving could never finish; the server waits here instead, with the
listening socket already closed, before it lets aiohttp close the connections.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler


class InFlight:
    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self._count += 1
        if self._count == 1:
            self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no request is in progress."""
        await self._idle.wait()
