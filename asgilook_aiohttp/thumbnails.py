"""Thumbnails: which sizes an image offers, and a bounded store of those made so far.

A thumbnail is made in a worker the first time it is asked for, kept as a blob, and
served like an image afterwards. Of the nodes asked for one at once, the one that claims
its key in the journal makes it; requests on the same node wait for that conversion, and
other nodes look in the index until its record is there. Kept thumbnails are bounded by
a byte budget shared by all nodes: past it, the least recently served go first.
Recency is recorded at most once per ``TOUCH_INTERVAL`` per thumbnail, so serving a
popular thumbnail does not mean a write every time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable

from . import imaging
from .converter import Converter, ConverterUnavailable
from .journal import Journal
from .space import unless_full
from .storage.ports import (
    BlobMissing,
    Blobs,
    ImageRecord,
    Index,
    ThumbnailRecord,
    Totals,
    holds,
    image_key,
    thumbnail_key,
)

TOUCH_INTERVAL = 3600
# How often a node waiting for another's conversion looks for its record, at first and
# at most: most thumbnails take tens of milliseconds, a 50 MP one a second or two.
_FIRST_LOOK_SECONDS = 0.01
_LAST_LOOK_SECONDS = 0.25
# How often it checks meanwhile that the object store answers.
_STORE_CHECK_SECONDS = 1.0


def thumbnail_sizes(width: int, height: int, min_side: int) -> list[tuple[int, int]]:
    """Halvings of the image while both sides stay at least ``min_side``; largest first."""
    sizes = []
    factor = 2
    while width // factor >= min_side and height // factor >= min_side:
        sizes.append((width // factor, height // factor))
        factor *= 2
    return sizes


class MadeElsewhere(ConverterUnavailable):
    """Another node has been making this thumbnail for longer than it may take."""


class Thumbnails:
    def __init__(
        self,
        index: Index,
        blobs: Blobs,
        journal: Journal,
        converter: Converter,
        *,
        budget_bytes: int,
        quality: int,
        conversion_timeout: float,
        counted: Callable[[Totals], None],
    ) -> None:
        """``counted`` is told the index's totals whenever a thumbnail made here changed
        them."""
        self._index = index
        self._blobs = blobs
        self._journal = journal
        self._converter = converter
        self._budget = budget_bytes
        self._quality = quality
        # A claim outlives its conversion only when its node stops: then its lease.
        self._longest_wait = conversion_timeout + journal.lease
        self._making: dict[str, asyncio.Task[ThumbnailRecord | None]] = {}
        self._eviction = asyncio.Lock()
        self._counted = counted

    async def lookup(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        """The image and its kept thumbnail of this size, if there are."""
        image, kept = await self._index.image_and_thumbnail(image_id, width, height)
        if kept is not None:
            now = int(time.time())
            # Recency only orders evictions: on a full disk, serving goes on without it.
            if now - kept.last_used >= TOUCH_INTERVAL:
                with unless_full():
                    await self._index.touch_thumbnail(kept, now)
        return image, kept

    async def make(self, image: ImageRecord, width: int, height: int) -> ThumbnailRecord | None:
        """Make and keep a thumbnail, or wait for the node making it; None if the image
        has gone meanwhile."""
        key = thumbnail_key(image.id, width, height)
        making = self._making.get(key)
        if making is None:
            making = asyncio.create_task(self._claim_and_make(key, image, width, height))
            self._making[key] = making
            making.add_done_callback(lambda done: self._made(key, done))
        # One waiter going away must not cancel the conversion the others wait for.
        return await asyncio.shield(making)

    def _made(self, key: str, done: asyncio.Task[ThumbnailRecord | None]) -> None:
        del self._making[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so it is not logged when no one waits

    async def _claim_and_make(
        self, key: str, image: ImageRecord, width: int, height: int
    ) -> ThumbnailRecord | None:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._longest_wait
        pause = _FIRST_LOOK_SECONDS
        store_checked_at = -math.inf
        while not await self._journal.claim(key):
            found, kept = await self._index.image_and_thumbnail(image.id, width, height)
            if found is None or kept is not None:
                return kept
            if loop.time() - store_checked_at >= _STORE_CHECK_SECONDS:
                # A node that cannot reach the object store keeps its claim until it can
                # clear it, and this node could not serve the thumbnail either: while the
                # store is down, that is a 503 now, not once the claim runs out.
                if not await holds(self._blobs, image_key(image.id)):
                    return None
                store_checked_at = loop.time()
            if loop.time() >= give_up_at:
                raise MadeElsewhere(
                    f"another server has been making this thumbnail for over "
                    f"{self._longest_wait:g} s; try again shortly"
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, _LAST_LOOK_SECONDS)
        try:
            found, kept = await self._index.image_and_thumbnail(image.id, width, height)
            if found is None or kept is not None:  # made, or deleted, before the claim
                await self._journal.undo([key])
                return kept
            made = await self._make(key, image, width, height)
        except BaseException as error:
            await self._journal.undo([key], cause=error)  # what a failed conversion left
            raise
        if made is not None:
            # Evicting needs an index write too; on a full disk the next thumbnail tries again.
            with unless_full():
                await self._keep_within_budget()
        return made

    async def _make(
        self, key: str, image: ImageRecord, width: int, height: int
    ) -> ThumbnailRecord | None:
        try:
            source = await self._blobs.source(image_key(image.id))
        except BlobMissing:  # the image was deleted meanwhile
            await self._journal.undo([key])
            return None
        destination = self._blobs.destination(key)
        try:
            made = await self._converter.run(
                imaging.make_thumbnail, source, destination, width, height, self._quality
            )
        except FileNotFoundError:  # deleted as the worker opened it
            await self._journal.undo([key])
            return None
        finally:
            await self._blobs.abandon(destination)
        await self._blobs.keep(key, made.handed_back)
        record = ThumbnailRecord(
            image.id, width, height, made.nbytes, made.sha256, int(time.time())
        )
        if await self._index.add_thumbnail(record, self._journal.owner) is None:
            await self._journal.undo([key])  # the image was deleted meanwhile
            return None
        self._journal.done(key)
        return record

    async def _keep_within_budget(self) -> None:
        async with self._eviction:
            totals = await self._index.totals()
            excess = totals.thumbnail_bytes - self._budget
            if excess > 0:
                # Those being made here (the caller's own among them) are about to be
                # served; those in hand here are being made or undone.
                journal = self._journal
                evicted = await journal.take(
                    lambda in_hand: self._index.evict_thumbnails(
                        excess, in_hand | set(self._making), journal.owner, journal.lease
                    ),
                    _key_of,
                )
                freed = sum(record.nbytes for record in evicted)
                totals = dataclasses.replace(totals, thumbnail_bytes=totals.thumbnail_bytes - freed)
                await self._journal.undo([_key_of(record) for record in evicted])
            self._counted(totals)


def _key_of(record: ThumbnailRecord) -> str:
    return thumbnail_key(record.image_id, record.width, record.height)
