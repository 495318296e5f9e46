"""HTTP caching: content-derived validators, conditional requests and byte ranges.

Validators come from the bytes (a SHA-256 kept in the index) and the upload time, never
from the file system, so every server holding a copy of the storage answers alike.
Preconditions (RFC 9110 section 13) and range checks are decided here, before the blob
store is asked for anything; the chosen bytes are sent with their headers from memory
(a small local file, read already), from a local file with sendfile, or as they stream
in from the object store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY

from .errors import Problem, dependency_unavailable, not_found
from .storage.ports import BlobMissing, Body, BytesBody, FileBody, StreamBody, Unavailable

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class Validators:
    etag: str
    """The entity tag's value, without quotes."""
    last_modified: int
    """Seconds since the epoch."""
    strong_date: bool = True
    """Whether the date alone pins the bytes down, so that If-Range may name it."""


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@functools.lru_cache(maxsize=4096)
def http_date(timestamp: int) -> str:
    """IMF-fixdate, as RFC 9110 wants, without email.utils' slower general path."""
    t = time.gmtime(timestamp)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def validators(sha256: str, last_modified: int, *, strong_date: bool = True) -> Validators:
    return Validators(sha256[:32], last_modified, strong_date)


def _matches(request: web.Request, header: str, etag: str, *, weak: bool) -> bool:
    """Whether the header names ``etag`` (or ``*``). A value that names no valid tag, an
    empty one among them, matches nothing: If-Match fails, If-None-Match holds."""
    tags = (request.if_match if header == hdrs.IF_MATCH else request.if_none_match) or ()
    return any(tag.value in (etag, ETAG_ANY) and (weak or not tag.is_weak) for tag in tags)


def _require_match(request: web.Request, etag: str, last_modified: int | None) -> None:
    """Raise 412 if If-Match, or failing that If-Unmodified-Since, does not hold (RFC 9110
    13.2.2, steps 1 and 2); a resource without a date passes the latter."""
    if hdrs.IF_MATCH in request.headers:
        if not _matches(request, hdrs.IF_MATCH, etag, weak=False):
            raise _precondition_failed("If-Match")
    elif (
        (since := request.if_unmodified_since)
        and last_modified is not None
        and last_modified > since.timestamp()
    ):
        raise _precondition_failed("If-Unmodified-Since")


def _not_modified(request: web.Request, etag: str, last_modified: int | None) -> bool:
    """Whether If-None-Match, or failing that If-Modified-Since, finds the client's copy
    current (steps 3 and 4)."""
    if hdrs.IF_NONE_MATCH in request.headers:
        return _matches(request, hdrs.IF_NONE_MATCH, etag, weak=True)
    since = request.if_modified_since
    return since is not None and last_modified is not None and last_modified <= since.timestamp()


def _precondition_failed(header: str) -> Problem:
    return Problem(
        412, "precondition-failed", f"the {header} condition does not hold for this resource"
    )


def has_change_conditions(request: web.Request) -> bool:
    """Whether a request that changes a resource carries conditions to check first."""
    return any(
        name in request.headers
        for name in (hdrs.IF_MATCH, hdrs.IF_NONE_MATCH, hdrs.IF_UNMODIFIED_SINCE)
    )


def json_response(
    request: web.Request, data: Any, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON answer with an ETag of its bytes and of ``headers`` (a Link, say), or the
    304 or 412 its preconditions call for."""
    extra = headers or {}
    body, etag = _json_entity(data, extra)
    return revalidated_response(request, body, etag, "application/json", extra)


def revalidated_response(
    request: web.Request,
    body: bytes,
    etag: str,
    content_type: str,
    headers: Mapping[str, str],
    *,
    charset: str | None = None,
) -> web.Response:
    """An answer held in memory that may change at its URL: ``Cache-Control: no-cache``
    and ``etag`` (a tag of ``body``), or the 304 or 412 its preconditions call for."""
    _require_match(request, etag, None)
    sent = {**headers, hdrs.CACHE_CONTROL: REVALIDATE, hdrs.ETAG: f'"{etag}"'}
    if _not_modified(request, etag, None):
        raise web.HTTPNotModified(headers=sent)
    return web.Response(body=body, content_type=content_type, charset=charset, headers=sent)


def _json_entity(data: Any, headers: dict[str, str]) -> tuple[bytes, str]:
    body = json.dumps(data).encode()
    digest = hashlib.sha256(body)
    for name, value in sorted(headers.items()):
        digest.update(f"\n{name}: {value}".encode())
    return body, digest.hexdigest()[:32]


def require_for_change(request: web.Request, data: Any, last_modified: int) -> None:
    """Raise 412 unless the request's preconditions let it change the resource whose JSON
    representation is ``data``."""
    etag = _json_entity(data, {})[1]
    _require_match(request, etag, last_modified)
    # For a change, a current copy is no reason to answer 304 but a failed condition.
    if hdrs.IF_NONE_MATCH in request.headers and _not_modified(request, etag, last_modified):
        raise _precondition_failed("If-None-Match")


Opener = Callable[[int, int], Awaitable[Body]]
"""Opens ``count`` bytes of a blob from ``offset`` for sending (count 0: only checks
that it is there)."""


def blob_response(
    request: web.Request, opener: Opener, size: int, found: Validators, *, gone: str, pace: Pace
) -> web.StreamResponse:
    """An immutable stored JPEG, whole or in part, or the 304/412/416 the request calls for.

    The blob is opened only as the response is sent, before its headers, and sent from
    what was opened, so a deletion at any moment gives either the whole blob or a 404
    with ``gone`` as detail, and an unreachable store a 503. A client that does not read
    it at ``pace`` has its connection closed.
    """
    _require_match(request, found.etag, found.last_modified)
    if _not_modified(request, found.etag, found.last_modified):
        raise web.HTTPNotModified(
            headers={
                hdrs.CACHE_CONTROL: IMMUTABLE,
                hdrs.ETAG: f'"{found.etag}"',
                hdrs.LAST_MODIFIED: http_date(found.last_modified),
            }
        )
    part = _requested_part(request, size, found)
    return _StoredBlob(opener, size, found, part, gone=gone, pace=pace)


def _requested_part(request: web.Request, size: int, found: Validators) -> slice | None:
    """The bytes the Range header asks for (None for all of them); 416 if there are none."""
    if hdrs.RANGE not in request.headers or not _if_range_holds(request, found):
        return None
    try:
        requested = request.http_range
    except ValueError:
        return None  # a Range we cannot read (several ranges, other units) is ignored
    empty_suffix = re.fullmatch(r"bytes=-0+", request.headers[hdrs.RANGE].replace(" ", "").lower())
    if empty_suffix or (requested.start is not None and requested.start >= size):
        raise Problem(
            416,
            "range-not-satisfiable",
            f"the image has {size} bytes; ask for a range that starts within them",
            {hdrs.CONTENT_RANGE: f"bytes */{size}"},
        )
    if requested.start is None:
        return None
    if requested.start < 0:  # the last bytes
        return slice(max(0, size + requested.start), size)
    return slice(requested.start, min(size, requested.stop or size))


def _if_range_holds(request: web.Request, found: Validators) -> bool:
    condition = request.headers.get(hdrs.IF_RANGE)
    if condition is None:
        return True
    if condition.startswith('"'):
        return condition == f'"{found.etag}"'
    if condition.startswith("W/") or not found.strong_date:
        return False  # only a strong validator may let a range through
    date = request.if_range
    return date is not None and int(date.timestamp()) == found.last_modified


@dataclass(frozen=True)
class Pace:
    """The slowest a body may move: ``min_rate`` bytes a second, but never less than
    ``window`` seconds allowed for it."""

    min_rate: int
    window: float

    def seconds_for(self, nbytes: int) -> float:
        return max(self.window, nbytes / self.min_rate)


# What a blob's answer says of the blob, and a problem's answer must not.
_BLOB_HEADERS = (
    hdrs.CONTENT_TYPE,
    hdrs.CONTENT_LENGTH,
    hdrs.ETAG,
    hdrs.LAST_MODIFIED,
    hdrs.CACHE_CONTROL,
    hdrs.ACCEPT_RANGES,
    hdrs.CONTENT_RANGE,
)


class _StoredBlob(web.StreamResponse):
    # The headers go out with the first bytes of the body, in one write, as those of a
    # web.Response do.
    _send_headers_immediately = False

    def __init__(
        self,
        opener: Opener,
        size: int,
        found: Validators,
        part: slice | None,
        *,
        gone: str,
        pace: Pace,
    ) -> None:
        self._part = part or slice(0, size)
        self._count = self._part.stop - self._part.start
        headers = {
            hdrs.CONTENT_TYPE: "image/jpeg",
            hdrs.CONTENT_LENGTH: str(self._count),
            hdrs.ETAG: f'"{found.etag}"',
            hdrs.LAST_MODIFIED: http_date(found.last_modified),
            hdrs.CACHE_CONTROL: IMMUTABLE,
            hdrs.ACCEPT_RANGES: "bytes",
        }
        if part is not None:
            headers[hdrs.CONTENT_RANGE] = f"bytes {part.start}-{part.stop - 1}/{size}"
        super().__init__(status=200 if part is None else 206, headers=headers)
        self._opener = opener
        self._pace = pace
        self._gone = gone

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        sending = request.method != hdrs.METH_HEAD and self._count > 0
        try:
            body = await self._opener(self._part.start, self._count if sending else 0)
        except BlobMissing:
            return await self._send_problem(request, not_found(self._gone))
        except Unavailable as error:
            return await self._send_problem(request, dependency_unavailable(error))
        except OSError as error:  # out of descriptors, say: nothing wrong with the file
            unavailable = Problem(
                503,
                "cannot-open",
                f"the server cannot open the image just now ({error.strerror}); try again",
                {"Retry-After": "1"},
            )
            return await self._send_problem(request, unavailable)
        try:
            writer = await super().prepare(request)
            if sending:
                assert writer is not None
                await self._send(request, writer, body)
            await self.write_eof()
            return writer
        finally:
            await body.close()

    async def _send(
        self, request: web.BaseRequest, writer: AbstractStreamWriter, body: Body
    ) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the connection closed before the image was sent")
        try:
            # A client that stops reading would otherwise hold its connection and the
            # open blob for as long as it likes.
            async with asyncio.timeout(self._pace.seconds_for(body.count)):
                if isinstance(body, BytesBody):
                    await self._write_all(transport, writer, body.data)
                elif isinstance(body, FileBody):
                    writer.send_headers()
                    await asyncio.get_running_loop().sendfile(
                        transport, body.file, body.offset, body.count
                    )
                else:
                    await self._stream(transport, body)
        except TimeoutError:
            transport.abort()
            raise ConnectionResetError("the client did not read the image in time") from None

    async def _write_all(
        self, transport: asyncio.Transport, writer: AbstractStreamWriter, data: bytes | bytearray
    ) -> None:
        """Write the headers and ``data``, and wait until the socket has taken all of them,
        so that none is left in memory for a client that does not read."""
        transport.set_write_buffer_limits(high=0)
        try:
            await self.write(data)
            await writer.drain()
        finally:
            transport.set_write_buffer_limits()

    async def _stream(self, transport: asyncio.Transport, body: StreamBody) -> None:
        try:
            async for chunk in body.chunks:
                await self.write(chunk)
        except Unavailable:
            # The headers are sent: all that is left is to end the connection short of the
            # promised length, so that the client knows the image did not arrive whole.
            transport.abort()
            raise ConnectionResetError("the object store stopped sending the image") from None

    async def _send_problem(
        self, request: web.BaseRequest, problem: Problem
    ) -> AbstractStreamWriter | None:
        answer = problem.response()
        self.set_status(answer.status)
        for name in _BLOB_HEADERS:
            self.headers.pop(name, None)
        self.headers.update(answer.headers)
        assert isinstance(answer.body, bytes)
        self.content_length = len(answer.body)
        writer = await super().prepare(request)
        await self.write_eof(answer.body if request.method != hdrs.METH_HEAD else b"")
        return writer
