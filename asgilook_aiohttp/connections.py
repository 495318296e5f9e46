"""What a connection may cost the server: how many are served at once, and when one is
closed rather than read on.

Each connection takes a file descriptor. Past the cap, which stays below the open-file
limit, a new connection is answered 503 by a protocol that parses nothing and holds
nothing, and closed; so a flood of idle connections can neither exhaust the descriptors
that uploads and the index need nor crowd out the requests already being served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .caching import Pace
from .config import Config

_log = logging.getLogger(__name__)

# Descriptors kept for what is not a connection: the index, files being sent or
# staged, the worker processes' pipes, the event loop's own.
SPARE_DESCRIPTORS = 256
# How long a shed connection may take to send its request head before it is closed
# anyway: reading the head first lets the 503 reach the client instead of a reset.
_SHED_WAIT = 1.0
_MOST_WAITING_TO_SHED = 64
_LINGER = 2.0


def connection_options(config: Config) -> dict[str, Any]:
    """aiohttp's own connection settings, for its ``AppRunner`` or ``TestServer``."""
    return {
        # Also the time to send a whole request head: aiohttp closes a connection whose
        # next request has not fully arrived when its keep-alive time runs out.
        "keepalive_timeout": config.idle_timeout,
        # How long the rest of a refused body is dropped as it arrives, so that the
        # answer reaches a client still sending before the connection is closed.
        "lingering_time": _LINGER,
        # Uploads with a Content-Encoding are refused, so nothing is ever inflated; left
        # on, aiohttp would inflate what arrives with the request head before the
        # refusal, many times over what a gzip bomb sends.
        "auto_decompress": False,
    }


def raise_open_file_limit() -> int:
    """Raise the open-file limit as far as it goes; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an unlimited hard limit is more than the kernel allows
            pass
    return soft


def connection_cap(wanted: int) -> int:
    """Raise the open-file limit as far as it goes, and return how many connections fit
    within it beside the descriptors the process needs otherwise."""
    soft = raise_open_file_limit()
    # A connection may hold a second descriptor: the file it is being sent, or its upload's
    # staging file.
    fits = max(1, (soft - SPARE_DESCRIPTORS) // 2)
    if wanted > fits:
        _log.warning(
            "serving at most %d connections, not %d: the open-file limit is %d "
            "(raise it with LimitNOFILE= or ulimit -n)",
            fits,
            wanted,
            soft,
        )
    return min(wanted, fits)


def capped(server: web.Server, cap: int) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for ``server`` that sheds connections past ``cap``."""
    shedding: set[_Shed] = set()

    def protocol() -> asyncio.BaseProtocol:
        if len(server.connections) < cap:
            return server()
        return _Shed(shedding)

    return protocol


def _overloaded() -> bytes:
    body = json.dumps(
        {
            "type": "tag:asgilook-aiohttp,2026:too-many-connections",
            "title": HTTPStatus.SERVICE_UNAVAILABLE.phrase,
            "status": 503,
            "detail": "the server has as many connections open as it serves; try again shortly",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/problem+json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_OVERLOADED = _overloaded()


class _Shed(asyncio.Protocol):
    """Answers 503 to whatever arrives first, or to nothing within a second, and closes;
    at once when many are waiting already, so that shedding holds few descriptors."""

    def __init__(self, shedding: set[_Shed]) -> None:
        self._shedding = shedding

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer: asyncio.TimerHandle | None = None
        if len(self._shedding) >= _MOST_WAITING_TO_SHED:
            self._answer()
            return
        self._shedding.add(self)
        self._timer = asyncio.get_running_loop().call_later(_SHED_WAIT, self._answer)

    def data_received(self, data: bytes) -> None:
        self._answer()

    def _answer(self) -> None:
        self._stop_waiting()
        if not self._transport.is_closing():
            self._transport.write(_OVERLOADED)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._shedding.discard(self)


async def close_if_body_unread(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a request answered before its body was read to the end
    (refused for its size, its pace, its token...) ends its connection. What more of the
    body arrives is dropped unparsed until aiohttp's lingering time is up, so that a
    client busy sending still gets to read the answer, and then the connection is
    closed."""
    if not request.content.is_eof():
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"  # its headers are made already
        request.protocol.close()  # from now on, aiohttp drops what arrives, unparsed


def sent_at_pace(pace: Pace) -> Middleware:
    """A middleware that sends each answer held in memory (JSON, problems) itself, and
    closes the connection of a client that does not take it at ``pace``. Left to aiohttp,
    what the socket did not take would wait in memory, the connection open, for as long
    as the client never read; stored images keep their own pace as they are sent."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        transport = request.transport
        if not isinstance(response, web.Response) or transport is None:
            return response
        # With no room in its buffer, the answer's last write waits until the socket has
        # taken every byte.
        transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(pace.seconds_for(response.content_length or 0)):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            transport.abort()  # aiohttp then finds the connection gone, and moves on
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits()
        return response

    return middleware
