"""The Store: the one place that knows an image is a blob plus an index record (and its
thumbnails, likewise), whichever implementation of each port holds them.

An upload is received into memory shared with the workers (or, past it, a staging file)
and given an id already journaled for this node; a worker converts it and puts the JPEG
at its blob's destination, and only then is it recorded in the index, which clears the
journal entry in the same transaction. A crash at any point leaves either nothing
visible or a complete image: the entry's lease expires and some node undoes the rest. A
deletion removes the record first and journals the id until the blobs are gone.

A full disk fails the writes that need room with ``StorageFull`` (or the system's ENOSPC)
and leaves nothing behind, but never the reads, nor a deletion, nor start-up. A
dependency that is down fails what needs it with ``Unavailable``. What either put off is
tried again every ``CATCH_UP_SECONDS`` until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

from . import imaging
from .arena import Arena
from .config import Config, MiB
from .converter import Converter, QueueFull
from .journal import Journal
from .metrics import Metrics
from .space import StorageFull, is_full
from .spool import Spool, Staged
from .storage.backends import backends
from .storage.ports import (
    Blobs,
    Body,
    ImageRecord,
    Index,
    ThumbnailRecord,
    Totals,
    Unavailable,
    image_key,
    thumbnail_key,
)
from .storage.scratch import Scratch
from .thumbnails import Thumbnails, thumbnail_sizes

T = TypeVar("T")

_log = logging.getLogger(__name__)

# How often what a full disk or an outage put off is tried again, and the totals that
# other nodes change are read again.
CATCH_UP_SECONDS = 1.0


class _Tally:
    """The index's totals as this node last knew them, for /metrics: read again every
    ``CATCH_UP_SECONDS`` for what other nodes changed, and kept current for what this one
    does."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals
        # Bumped by every change this node makes, so that a reading of the totals begun
        # before one does not undo it.
        self._changes = 0

    def counted(self, totals: Totals) -> None:
        self.totals = totals
        self._changes += 1

    def changed(self, *, images: int, image_bytes: int, thumbnail_bytes: int = 0) -> None:
        self.counted(
            Totals(
                self.totals.images + images,
                self.totals.image_bytes + image_bytes,
                self.totals.thumbnail_bytes + thumbnail_bytes,
            )
        )

    async def read(self, index: Index) -> None:
        changes = self._changes
        totals = await index.totals()
        if changes == self._changes:
            self.totals = totals


class NotFound(LookupError):
    """No such image or thumbnail; the message says which."""


def _token_hash(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough, no password stretching needed.
    return hashlib.sha256(token.encode()).hexdigest()


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Store:
    def __init__(
        self,
        config: Config,
        *,
        index: Index,
        blobs: Blobs,
        scratch: Scratch,
        journal: Journal,
        spool: Spool,
        converter: Converter,
        thumbnails: Thumbnails,
        tally: _Tally,
    ) -> None:
        self._config = config
        self._index = index
        self._blobs = blobs
        self._scratch = scratch
        self._journal = journal
        self._spool = spool
        self.converter = converter
        self._thumbnails = thumbnails
        self._unfinished: set[asyncio.Task[Any]] = set()
        self._tally = tally

    def _watch(self, metrics: Metrics) -> None:
        converter = self.converter
        tally = self._tally
        metrics.gauge(
            "asgilook_images_stored", "Images stored.", lambda: tally.totals.images, shared=True
        )
        metrics.gauge(
            "asgilook_image_bytes_stored",
            "Bytes of stored images.",
            lambda: tally.totals.image_bytes,
            shared=True,
        )
        metrics.gauge(
            "asgilook_thumbnail_bytes_stored",
            "Bytes of kept thumbnails.",
            lambda: tally.totals.thumbnail_bytes,
            shared=True,
        )
        metrics.gauge(
            "asgilook_upload_bytes_in_memory",
            "Bytes of upload bodies held in memory until converted.",
            lambda: self._spool.held_bytes,
        )
        metrics.gauge(
            "asgilook_upload_bytes_staged",
            "Bytes of upload bodies held in staging files until converted.",
            lambda: self._spool.staged_bytes,
        )
        metrics.gauge(
            "asgilook_conversion_queue_depth",
            "Jobs waiting for a free worker.",
            lambda: converter.waiting,
        )
        metrics.gauge(
            "asgilook_conversion_workers_busy", "Workers running a job.", lambda: converter.busy
        )

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, metrics: Metrics) -> AsyncIterator[Store]:
        async with AsyncExitStack() as resources:
            scratch = Scratch(config.storage_path)
            index, blobs = backends(config, scratch)
            try:
                scratch.open()  # creates the directory, empties it
                await index.open()
                resources.push_async_callback(blobs.close)
                await blobs.open()
            except Unavailable as error:
                raise SystemExit(f"asgilook-aiohttp: cannot start: {error}") from None
            except Exception as error:
                # Only an index that is new or must be upgraded needs room to open: with
                # none yet there is nothing to serve, and starting would hide the fault.
                if not is_full(error):
                    raise
                raise SystemExit(
                    f"asgilook-aiohttp: the storage file system is full: there is no room to "
                    f"create or upgrade the index in {config.storage_path} ({error}); "
                    "free some space there and start again"
                ) from None
            finally:
                resources.push_async_callback(index.close)
            journal = Journal(index, blobs, lease=config.lease_seconds)
            try:
                await journal.sweep()  # what a crash left half-done, if its lease is over
            except Exception as error:  # to be tried again with the rest that can wait
                if not isinstance(error, Unavailable) and not is_full(error):
                    raise
            arena = Arena(config.upload_memory_mb * MiB)
            resources.callback(arena.close)
            converter = Converter(
                workers=config.workers,
                queue_size=config.queue_size,
                timeout=config.conversion_timeout,
                memory_limit_bytes=config.worker_memory_mb * MiB,
                arena=arena,
                observe=metrics.observe_job,
            )
            await converter.start()
            resources.push_async_callback(converter.close)
            tally = _Tally(await index.totals())
            thumbnails = Thumbnails(
                index,
                blobs,
                journal,
                converter,
                budget_bytes=config.thumbnail_budget_mb * MiB,
                quality=config.jpeg_quality,
                conversion_timeout=config.conversion_timeout,
                counted=tally.counted,
            )
            spool = Spool(
                scratch,
                arena,
                disk_bytes=config.upload_disk_mb * MiB,
                keep_free=config.max_upload_bytes,  # for a conversion, as readiness counts
            )
            store = cls(
                config,
                index=index,
                blobs=blobs,
                scratch=scratch,
                journal=journal,
                spool=spool,
                converter=converter,
                thumbnails=thumbnails,
                tally=tally,
            )
            store._watch(metrics)
            resources.push_async_callback(journal.close)
            catching_up = asyncio.create_task(store._catch_up_while_open())
            resources.push_async_callback(_cancelled, catching_up)
            resources.push_async_callback(store._finish_unfinished)
            yield store

    async def stage(self, chunks: AsyncIterable[bytes]) -> Staged:
        return await self._spool.receive(chunks)

    async def discard(self, staged: Staged) -> None:
        await self._spool.discard(staged)

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to its end even if the request awaiting it is cancelled, so that
        it never stops half-way between the blobs and the index."""
        task = asyncio.ensure_future(work)
        self._unfinished.add(task)
        task.add_done_callback(self._finished)
        return await asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._unfinished.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a request that went away has no one to tell

    async def _finish_unfinished(self) -> None:
        await asyncio.gather(*self._unfinished, return_exceptions=True)

    async def add(self, staged: Staged) -> tuple[ImageRecord, str]:
        """Convert a staged upload and store it; the staged body is let go either way.

        Returns the image and its delete token, which is kept only as a hash.
        """
        delete_token = secrets.token_urlsafe(32)
        record = await self._to_the_end(self._add(staged, _token_hash(delete_token)))
        return record, delete_token

    async def _add(self, staged: Staged, delete_token_sha256: str) -> ImageRecord:
        try:
            self.check_room()
            image_id = await self._journal.new_id()
            key = image_key(image_id)
            destination = self._blobs.destination(key)
            try:
                converted = await self.converter.run(
                    imaging.convert_upload,
                    staged.body,
                    destination,
                    self._config.max_pixels,
                    self._config.jpeg_quality,
                )
                await self._blobs.keep(key, converted.handed_back)
                record = ImageRecord(
                    id=image_id,
                    uploaded=int(time.time()),
                    width=converted.width,
                    height=converted.height,
                    nbytes=converted.nbytes,
                    sha256=converted.sha256,
                    delete_token_sha256=delete_token_sha256,
                )
                await self._index.add(record, self._journal.owner)
                self._journal.done(image_id)
            except (imaging.ImageRejected, QueueFull):
                # Refused before any worker wrote anything: the id is as good as new, and
                # keeping it spares a refusal the journal and store round trips below.
                self._journal.give_back(image_id)
                raise
            except BaseException as error:
                await self._blobs.abandon(destination)  # its worker may have died
                await self._journal.undo([image_id], cause=error)
                raise
        except BaseException:
            await self._spool.discard(staged)  # the worker removes a file, unless it died first
            raise
        self._spool.release(staged)
        self._tally.changed(images=1, image_bytes=record.nbytes)
        return record

    async def get(self, image_id: str) -> ImageRecord | None:
        return await self._index.get(image_id)

    async def page(
        self, limit: int, after: str | None, *, newest_first: bool = False
    ) -> tuple[list[ImageRecord], bool]:
        return await self._index.page(limit, after, newest_first=newest_first)

    async def image_body(self, record: ImageRecord, offset: int, count: int) -> Body:
        return await self._blobs.body(image_key(record.id), offset, count)

    async def thumbnail_body(self, thumbnail: ThumbnailRecord, offset: int, count: int) -> Body:
        key = thumbnail_key(thumbnail.image_id, thumbnail.width, thumbnail.height)
        return await self._blobs.body(key, offset, count)

    def may_delete(self, record: ImageRecord, delete_token: str | None) -> bool:
        """Whether ``delete_token`` is this image's own (None: the caller needs none)."""
        if delete_token is None:
            return True
        return record.delete_token_sha256 is not None and hmac.compare_digest(
            record.delete_token_sha256, _token_hash(delete_token)
        )

    async def delete(self, image_id: str, delete_token: str | None = None) -> bool:
        """Remove an image with its thumbnails and blobs.

        With ``delete_token``, only if it is the image's own. False if nothing matched.
        """
        token_sha256 = None if delete_token is None else _token_hash(delete_token)
        return await self._to_the_end(self._delete(image_id, token_sha256))

    async def _delete(self, image_id: str, token_sha256: str | None) -> bool:
        journal = self._journal
        deleted = await self._index.delete(image_id, token_sha256, journal.owner, journal.lease)
        if deleted is None:
            return False
        self._tally.changed(
            images=-1,
            image_bytes=-deleted.image_bytes,
            thumbnail_bytes=-deleted.thumbnail_bytes,
        )
        await journal.undo([image_id])
        return True

    def check_room(self) -> None:
        """Refuse work that takes space while the index says the room left belongs to
        deletions."""
        if reason := self._index.full():
            raise StorageFull(f"the server's storage is full: {reason}; nothing was stored")

    async def _catch_up_while_open(self) -> None:
        renewed_at = time.monotonic()
        while True:
            await asyncio.sleep(CATCH_UP_SECONDS)
            try:
                if time.monotonic() - renewed_at >= self._journal.lease / 3:
                    await self._journal.renew()
                    renewed_at = time.monotonic()
                await self._catch_up()
            except Exception as error:
                if not is_full(error):
                    _log.warning("could not catch up on put-off work (%s); trying again", error)

    async def _catch_up(self) -> None:
        """Do what a full disk or an outage put off, as far as possible now."""
        # Entries first: once the index catches up on its own, it may call itself ready.
        await self._journal.settle()
        await self._index.catch_up()
        await self._journal.sweep()
        await self._tally.read(self._index)

    def thumbnail_sizes(self, record: ImageRecord) -> list[tuple[int, int]]:
        return thumbnail_sizes(record.width, record.height, self._config.min_thumbnail_side)

    async def thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord, ThumbnailRecord]:
        """An image and its thumbnail of a listed size, made now if it is not kept.
        Raises ``NotFound``."""
        record, thumbnail = await self._thumbnails.lookup(image_id, width, height)
        if record is None:
            raise NotFound(f"there is no image with id {image_id}")
        if (width, height) not in self.thumbnail_sizes(record):
            raise NotFound(
                f"image {record.id} has no {width}x{height} thumbnail; "
                "its image object lists the sizes it has"
            )
        if thumbnail is None:
            self.check_room()
            thumbnail = await self._thumbnails.make(record, width, height)
        if thumbnail is None:
            raise NotFound(f"there is no image with id {record.id}")
        return record, thumbnail

    async def readiness_problems(self) -> list[str]:
        """Why the store cannot take uploads now; empty when it can."""
        problems = []
        storage = self._config.storage_path
        if not await self._scratch.is_writable():
            problems.append(f"the storage directory {storage} is not writable")
        # An upload needs room for itself and for its converted copy at once.
        elif (free := self._scratch.free_bytes()) < 2 * self._config.max_upload_bytes:
            problems.append(
                f"the storage directory {storage} has {free // MiB} MiB free; "
                f"an upload may need {2 * self._config.max_upload_bytes // MiB} MiB"
            )
        for dependency in (self._index, self._blobs):
            if problem := await dependency.problem():
                problems.append(problem)
        if not await self.converter.is_working():
            problems.append("no conversion worker is running")
        return problems
