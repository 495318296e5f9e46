"""The HTTP resources: thin views that parse a request, ask the Store, shape the answer."""

from __future__ import annotations

import functools
import uuid
from typing import Any

from aiohttp import web

from . import auth, caching, uploads
from .caching import http_date
from .config import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from .errors import Problem, bad_request, not_found
from .keys import CONFIG, SEND_PACE, STORE
from .storage.ports import ImageRecord, UnknownCursor
from .store import Store


class _Resource(web.View):
    """A resource that answers GET, and so HEAD (aiohttp leaves out the body)."""

    @property
    def store(self) -> Store:
        return self.request.app[STORE]

    async def get(self) -> web.StreamResponse:
        raise NotImplementedError

    async def head(self) -> web.StreamResponse:
        return await self.get()

    async def record(self) -> ImageRecord:
        image_id = self.request.match_info["image_id"]
        record = await self.store.get(image_id)
        if record is None:
            raise not_found(f"there is no image with id {image_id}")
        return record

    def image_object(self, record: ImageRecord) -> dict[str, Any]:
        # The named routes' patterns, filled in directly: url_for() would quote and parse
        # each URL, which dominated the cost of a page; ids and sizes need no quoting.
        router = self.request.app.router
        image_file = router["image-file"].canonical
        thumbnail = router["thumbnail"].canonical
        return {
            "id": record.id,
            "image": image_file.format(image_id=record.id),
            "modified": http_date(record.uploaded),
            "size": [record.width, record.height],
            "thumbnails": [
                thumbnail.format(image_id=record.id, width=w, height=h)
                for w, h in self.store.thumbnail_sizes(record)
            ],
        }


class ImageCollection(_Resource):
    async def get(self) -> web.StreamResponse:
        limit, after, order = _page_query(self.request)
        try:
            records, more = await self.store.page(limit, after, newest_first=order == "newest")
        except UnknownCursor:
            raise bad_request(
                "unknown-cursor",
                f"after={after} names no stored image; start again without 'after'",
            ) from None
        headers = {}
        if more:
            next_page = (
                self.request.app.router["images"]
                .url_for()
                .with_query(limit=limit, after=records[-1].id, **_ORDERS[order])
            )
            headers["Link"] = f'<{next_page}>; rel="next"'
        return caching.json_response(
            self.request, [self.image_object(record) for record in records], headers
        )

    async def post(self) -> web.StreamResponse:
        config = self.request.app[CONFIG]
        auth.check_upload(self.request, config.write_token)
        staged = await uploads.receive(self.request, self.store, config)
        record, delete_token = await self.store.add(staged)
        body = {**self.image_object(record), "delete_token": delete_token}
        return web.json_response(body, status=201, headers={"Location": body["image"]})


class ImageItem(_Resource):
    async def get(self) -> web.StreamResponse:
        return caching.json_response(self.request, self.image_object(await self.record()))

    async def delete(self) -> web.StreamResponse:
        image_id = self.request.match_info["image_id"]
        token = auth.bearer_token(self.request)
        if token is None:
            raise auth.unauthorized(
                "deleting needs 'Authorization: Bearer <token>', with the delete_token "
                "returned by the upload or the write token"
            )
        writer = auth.is_write_token(token, self.request.app[CONFIG].write_token)
        delete_token = None if writer else token
        # Preconditions count only for a request that would otherwise succeed (RFC 9110
        # 13.2.1): a missing image or a wrong token is answered as without them.
        if caching.has_change_conditions(self.request):
            record = await self.store.get(image_id)
            if record is not None and self.store.may_delete(record, delete_token):
                caching.require_for_change(self.request, self.image_object(record), record.uploaded)
        if not await self.store.delete(image_id, delete_token):
            if writer:
                raise not_found(f"there is no image with id {image_id}")
            raise auth.forbidden("this token may not delete this image")
        return web.Response(status=204)


class ImageFile(_Resource):
    async def get(self) -> web.StreamResponse:
        record = await self.record()
        return caching.blob_response(
            self.request,
            functools.partial(self.store.image_body, record),
            record.nbytes,
            caching.validators(record.sha256, record.uploaded),
            gone=f"there is no image with id {record.id}",
            pace=self.request.app[SEND_PACE],
        )


class Thumbnail(_Resource):
    async def get(self) -> web.StreamResponse:
        record, thumbnail = await self.store.thumbnail(
            self.request.match_info["image_id"],
            int(self.request.match_info["width"]),
            int(self.request.match_info["height"]),
        )
        # Made again after an eviction, or on another server, a thumbnail may differ in its
        # bytes but not in its date: the date is no strong validator.
        found = caching.validators(thumbnail.sha256, record.uploaded, strong_date=False)
        return caching.blob_response(
            self.request,
            functools.partial(self.store.thumbnail_body, thumbnail),
            thumbnail.nbytes,
            found,
            gone=f"the {thumbnail.width}x{thumbnail.height} thumbnail of image {record.id} was "
            "removed as it was about to be sent (the image deleted, or the thumbnail evicted); "
            "ask again",
            pace=self.request.app[SEND_PACE],
        )


class Health(_Resource):
    async def get(self) -> web.StreamResponse:
        return web.json_response({"status": "alive"})


class Readiness(_Resource):
    async def get(self) -> web.StreamResponse:
        if problems := await self.store.readiness_problems():
            raise Problem(503, "not-ready", "; ".join(problems), {"Retry-After": "5"})
        return web.json_response({"status": "ready"})


# The query a next page's link carries for each order: the default goes unsaid.
_ORDERS: dict[str, dict[str, str]] = {"oldest": {}, "newest": {"order": "newest"}}


def _page_query(request: web.Request) -> tuple[int, str | None, str]:
    text = request.query.get("limit")
    limit = DEFAULT_PAGE_SIZE
    if text is not None:
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PAGE_SIZE):
            raise bad_request(
                "bad-limit", f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, not {text!r}"
            )
        limit = int(text)
    after = request.query.get("after")
    if after is not None and not _is_canonical_uuid(after):
        raise bad_request("unknown-cursor", f"after={after!r} is not an image id")
    order = request.query.get("order", "oldest")
    if order not in _ORDERS:
        raise bad_request("bad-order", f"order must be 'oldest' or 'newest', not {order!r}")
    return limit, after, order


def _is_canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
