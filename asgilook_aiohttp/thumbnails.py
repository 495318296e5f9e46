"""Thumbnails: which sizes an image offers, and a bounded store of those made so far.

A thumbnail is made in a worker the first time it is asked for, kept on disk, and served
like an image afterwards. Requests for one that is being made wait for that conversion
instead of starting their own. Kept thumbnails are bounded by a byte budget: past it, the
least recently served go first. Recency is recorded at most once per ``TOUCH_INTERVAL``
per thumbnail, so serving a popular thumbnail does not mean a disk write every time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from . import imaging
from .blobs import Blobs
from .converter import Converter
from .index import ImageRecord, Index, ThumbnailRecord
from .space import unless_full

TOUCH_INTERVAL = 3600


def thumbnail_sizes(width: int, height: int, min_side: int) -> list[tuple[int, int]]:
    """Halvings of the image while both sides stay at least ``min_side``; largest first."""
    sizes = []
    factor = 2
    while width // factor >= min_side and height // factor >= min_side:
        sizes.append((width // factor, height // factor))
        factor *= 2
    return sizes


class Thumbnails:
    def __init__(
        self, index: Index, blobs: Blobs, converter: Converter, budget_bytes: int, quality: int
    ) -> None:
        self._index = index
        self._blobs = blobs
        self._converter = converter
        self._budget = budget_bytes
        self._quality = quality
        self._kept_bytes = 0
        self._making: dict[tuple[str, int, int], asyncio.Task[ThumbnailRecord | None]] = {}
        self._eviction = asyncio.Lock()

    async def open(self) -> None:
        self._kept_bytes = await self._index.thumbnail_bytes()

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def path(self, record: ThumbnailRecord) -> Path:
        return self._blobs.thumbnail_path(record.image_id, record.width, record.height)

    def forget(self, nbytes: int) -> None:
        """Account for thumbnails removed with their image."""
        self._kept_bytes -= nbytes

    async def lookup(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        """The image and its kept thumbnail of this size, if there are."""
        image, kept = await self._index.image_and_thumbnail(image_id, width, height)
        if kept is not None and await self._blobs.existing(self.path(kept)) is None:
            kept = None  # its file went with an eviction racing a remake: make it again
        if kept is not None:
            now = int(time.time())
            # Recency only orders evictions: on a full disk, serving goes on without it.
            if now - kept.last_used >= TOUCH_INTERVAL:
                with unless_full():
                    await self._index.touch_thumbnail(kept, now)
        return image, kept

    async def make(self, image: ImageRecord, width: int, height: int) -> ThumbnailRecord | None:
        """Make and keep a thumbnail; None if the image has gone meanwhile.

        Requests for one that is already being made wait for that conversion.
        """
        key = (image.id, width, height)
        making = self._making.get(key)
        if making is None:
            making = asyncio.create_task(self._make(image, width, height))
            self._making[key] = making
            making.add_done_callback(lambda done: self._made(key, done))
        # One waiter going away must not cancel the conversion the others wait for.
        return await asyncio.shield(making)

    def _made(self, key: tuple[str, int, int], done: asyncio.Task[ThumbnailRecord | None]) -> None:
        del self._making[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so it is not logged when no one waits

    async def _make(self, image: ImageRecord, width: int, height: int) -> ThumbnailRecord | None:
        placement = self._blobs.thumbnail_placement(image.id, width, height)
        try:
            made = await self._converter.run(
                imaging.make_thumbnail,
                str(self._blobs.path(image.id)),
                placement,
                width,
                height,
                self._quality,
            )
        except FileNotFoundError:  # the image was deleted meanwhile
            return None
        except BaseException:
            # Its worker may have died half-way, or been stopped for its time just after
            # moving the file into place: no row will name that file.
            await self._blobs.discard(placement.staging)
            await self._blobs.discard_thumbnail(Path(placement.final))
            raise
        record = ThumbnailRecord(
            image.id, width, height, made.nbytes, made.sha256, int(time.time())
        )
        try:
            replaced = await self._index.add_thumbnail(record)
        except BaseException:  # a full disk, say: no row will name the file
            await self._blobs.discard_thumbnail(Path(placement.final))
            raise
        if replaced is None:
            await self._blobs.discard_thumbnail(Path(placement.final))
            return None
        self._kept_bytes += record.nbytes - replaced
        # Evicting needs an index write too; on a full disk the next thumbnail tries again.
        with unless_full():
            await self._keep_within_budget()
        return record

    async def _keep_within_budget(self) -> None:
        async with self._eviction:
            excess = self._kept_bytes - self._budget
            if excess <= 0:
                return
            # Those being made (the caller's own among them) are about to be served: spared.
            spared = set(self._making)
            for evicted in await self._index.evict_thumbnails(excess, spared):
                self._kept_bytes -= evicted.nbytes
                await self._blobs.discard_thumbnail(self.path(evicted))
