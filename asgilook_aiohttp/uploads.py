"""Reading an upload out of a request: a raw body or a multipart form, streamed to disk.

The byte limit holds for the whole request body as it arrives, so an oversized upload is
refused after at most one chunk beyond the limit, never buffered whole. The body must
also arrive in time: within the body timeout in all, and at the minimum rate over every
window, so that a client that stalls or trickles cannot hold its connection and what it
sent for long.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from .config import Config
from .errors import Problem, bad_request, payload_too_large
from .spool import Staged
from .store import Store

_CHUNK = 256 * 1024
# A form of more parts than this is not an upload form; parsing thousands of tiny fields
# would only keep the event loop busy.
_MAX_PARTS = 32
# What aiohttp raises for a body it cannot parse or decode.
_UNREADABLE = (ValueError, HttpProcessingError, web.RequestPayloadError)
# Images are compressed already: a coded body gains nothing, while undoing it would cost
# the server CPU for every byte it makes, and a bomb makes many for each one sent.
_AS_IS = frozenset({"", "identity"})


async def receive(request: web.Request, store: Store, config: Config) -> Staged:
    """Stage the uploaded file; the caller owns the result and must add or discard it."""
    limit = config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    store.check_room()  # a full disk refuses the upload before its body is read
    codings = ", ".join(request.headers.getall(hdrs.CONTENT_ENCODING, ()))
    if any(coding.strip().lower() not in _AS_IS for coding in codings.split(",")):
        raise Problem(
            415,
            "unsupported-encoding",
            f"uploads are taken as they are, not with Content-Encoding {codings!r}; images "
            "are compressed already, so send the file itself",
            {hdrs.ACCEPT_ENCODING: "identity"},
        )
    try:
        with _in_time(request, config):
            if request.content_type == "multipart/form-data":
                staged = await _receive_multipart(request, store, limit)
            else:
                staged = await store.stage(_body_chunks(request, limit))
    except _UNREADABLE as error:
        raise bad_request("malformed-body", f"the request body cannot be read: {error}") from None
    if staged.size == 0:
        await store.discard(staged)
        raise bad_request(
            "empty-upload",
            "the upload is empty; send the image bytes as the request body, or as a "
            "multipart/form-data file part named 'image'",
        )
    return staged


async def _receive_multipart(request: web.Request, store: Store, limit: int) -> Staged:
    """The part named ``image``, else the first part that carries a file name."""
    chosen: Staged | None = None
    named_image = False
    try:
        reader = await request.multipart()
        parts = 0
        # Read to the closing boundary: a form cut short is not a whole upload.
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > _MAX_PARTS:
                raise ValueError(f"the form has more than {_MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart bodies are not supported")
            if not named_image and (
                part.name == "image" or (chosen is None and part.filename is not None)
            ):
                replaced, chosen = chosen, await store.stage(_part_chunks(request, part, limit))
                if replaced is not None:
                    await store.discard(replaced)
                named_image = part.name == "image"
            else:
                await _drain(_part_chunks(request, part, limit))
    except BaseException:
        if chosen is not None:
            await store.discard(chosen)
        raise
    if chosen is None:
        raise bad_request(
            "no-file-part",
            "the multipart form has no file; send the image in a part named 'image'",
        )
    return chosen


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


async def _body_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(_CHUNK):
        _check_total(request, limit)
        yield chunk


async def _part_chunks(
    request: web.Request, part: BodyPartReader, limit: int
) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        _check_total(request, limit)
        yield chunk


def _check_total(request: web.Request, limit: int) -> None:
    if request.content.total_bytes > limit:
        raise _too_large(limit)


@contextmanager
def _in_time(request: web.Request, config: Config) -> Iterator[None]:
    """Stop the reading task with 408 once the body has taken the body timeout, or
    brought fewer than the minimum rate of bytes a second over the last window."""
    task = asyncio.current_task()
    assert task is not None
    arrival = _Arrival(request, task, config)
    try:
        yield
    except asyncio.CancelledError:
        if arrival.verdict and task.uncancel() == 0:
            raise Problem(408, "body-too-slow", f"{arrival.verdict}; nothing was stored") from None
        raise
    finally:
        arrival.stop()


class _Arrival:
    """Checks a body's progress once a window, and cancels its reader if it falls behind."""

    def __init__(self, request: web.Request, reader: asyncio.Task[Any], config: Config) -> None:
        self._content = request.content
        self._reader = reader
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + config.body_timeout
        self._received = self._content.total_bytes
        self.verdict = ""
        self._next_check()

    def _next_check(self) -> None:
        at = min(self._loop.time() + self._config.body_rate_window, self._deadline)
        self._check = self._loop.call_at(at, self._judge)

    def _judge(self) -> None:
        if self._content.is_eof():
            return  # all of it is here: what is left is the server's own work
        config = self._config
        arrived = self._content.total_bytes - self._received
        self._received += arrived
        if self._loop.time() >= self._deadline:
            self.verdict = f"the body took longer than this server's {config.body_timeout:g} s"
        elif arrived < config.min_body_rate * config.body_rate_window:
            self.verdict = (
                f"the body arrived at {arrived / config.body_rate_window:.0f} bytes/s over "
                f"{config.body_rate_window:g} s; this server needs at least "
                f"{config.min_body_rate} bytes/s"
            )
        if self.verdict:
            self._reader.cancel()
        else:
            self._next_check()

    def stop(self) -> None:
        self._check.cancel()


def _too_large(limit: int) -> Exception:
    return payload_too_large(
        f"the request body is larger than this server's limit of {limit:,} bytes"
    )
