"""Reading an upload out of a request: a raw body or a multipart form, streamed to disk.

The byte limit holds for the whole request body as it arrives (after any
Content-Encoding is undone), so an oversized upload is refused after at most one chunk
beyond the limit, never buffered whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .errors import bad_request, payload_too_large
from .spool import Staged
from .store import Store

_CHUNK = 256 * 1024
# A form that needs more parts than this to reach its file is not an upload form; parsing
# thousands of tiny fields would only keep the event loop busy.
_MAX_PARTS = 32
# What aiohttp raises for a body it cannot parse or decode.
_UNREADABLE = (ValueError, HttpProcessingError, web.RequestPayloadError)


async def receive(request: web.Request, store: Store, limit: int) -> Staged:
    """Stage the uploaded file; the caller owns the result and must add or discard it."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
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
    try:
        reader = await request.multipart()
        parts = 0
        while (part := await reader.next()) is not None:
            parts += 1
            if parts > _MAX_PARTS:
                raise ValueError(f"the form has more than {_MAX_PARTS} parts")
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart bodies are not supported")
            if part.name == "image" or (chosen is None and part.filename is not None):
                replaced, chosen = chosen, await store.stage(_part_chunks(request, part, limit))
                if replaced is not None:
                    await store.discard(replaced)
                if part.name == "image":
                    break
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


def _too_large(limit: int) -> Exception:
    return payload_too_large(
        f"the request body is larger than this server's limit of {limit:,} bytes"
    )
