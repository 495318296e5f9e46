"""The Store: the one place that knows an image is a file plus an index row (and its
thumbnails, likewise).

An upload is received into memory shared with the workers (or, past it, a staging file)
and given an id already journaled as pending; a worker converts it and moves the JPEG
into place durably, and only then is it recorded in the index. A crash at any point
leaves either nothing visible or a complete image. A deletion removes the row first and
journals the id until the files are gone. ``open`` finishes whatever a crash interrupted.

A full disk fails the writes that need room with ``StorageFull`` (or the system's ENOSPC)
and leaves nothing behind, but never the reads, nor a deletion, nor start-up: what can
wait for room (journal entries to clear, the reserve to set aside again, the index to
share) is tried again every ``CATCH_UP_SECONDS`` until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from . import imaging
from .arena import Arena
from .blobs import Blobs
from .config import Config, MiB
from .converter import Converter
from .index import ImageRecord, Index, ThumbnailRecord
from .metrics import Metrics
from .space import Reserve, StorageFull, is_full, unless_full
from .spool import Spool, Staged
from .thumbnails import Thumbnails, thumbnail_sizes

T = TypeVar("T")

_log = logging.getLogger(__name__)


def _token_hash(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough, no password stretching needed.
    return hashlib.sha256(token.encode()).hexdigest()


INDEX_FILE = "index.sqlite3"
# Beside the index, whose writes it keeps room for.
RESERVE_FILE = f"{INDEX_FILE}-reserve"
# How often what a full disk put off is tried again.
CATCH_UP_SECONDS = 1.0
# Image ids journaled as pending in one write, ahead of the uploads that will take them.
SPARE_IDS = 64


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
        spool: Spool,
        converter: Converter,
        thumbnails: Thumbnails,
        reserve: Reserve,
    ) -> None:
        self._config = config
        self._index = index
        self._blobs = blobs
        self._spool = spool
        self._reserve = reserve
        self.converter = converter
        self._thumbnails = thumbnails
        self._unfinished: set[asyncio.Task[Any]] = set()
        self._spare_ids: list[str] = []
        # Journaled ids whose files are gone, still to be cleared from the journal.
        self._stale_ids: set[str] = set()
        self._journaling = asyncio.Lock()
        self._image_count = 0
        self._image_bytes = 0

    def _watch(self, metrics: Metrics) -> None:
        converter = self.converter
        metrics.gauge("asgilook_images_stored", "Images stored.", lambda: self._image_count)
        metrics.gauge(
            "asgilook_image_bytes_stored", "Bytes of stored images.", lambda: self._image_bytes
        )
        metrics.gauge(
            "asgilook_thumbnail_bytes_stored",
            "Bytes of kept thumbnails.",
            lambda: self._thumbnails.kept_bytes,
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
            blobs = Blobs(config.storage_path)
            index = Index(config.storage_path / INDEX_FILE)
            resources.push_async_callback(index.close)
            reserve = Reserve(config.storage_path / RESERVE_FILE)
            try:
                blobs.open()  # creates the directories, empties staging
                await asyncio.to_thread(reserve.take)
                await _with_reserve(reserve, index.open)
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
            leftover = await index.pending()  # what a crash left half-done, if anything
            for image_id in leftover:
                await blobs.delete(image_id)
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
            thumbnails = Thumbnails(
                index,
                blobs,
                converter,
                budget_bytes=config.thumbnail_budget_mb * MiB,
                quality=config.jpeg_quality,
            )
            await thumbnails.open()
            spool = Spool(
                blobs,
                arena,
                disk_bytes=config.upload_disk_mb * MiB,
                keep_free=config.max_upload_bytes,  # for a conversion, as readiness counts
            )
            store = cls(
                config,
                index=index,
                blobs=blobs,
                spool=spool,
                converter=converter,
                thumbnails=thumbnails,
                reserve=reserve,
            )
            await store._unjournal(leftover)
            store._image_count, store._image_bytes = await index.totals()
            store._watch(metrics)
            catching_up = asyncio.create_task(store._catch_up_while_open())
            resources.push_async_callback(_cancelled, catching_up)
            yield store
            await store._finish_unfinished()
            await store._unjournal(store._spare_ids)

    async def stage(self, chunks: AsyncIterable[bytes]) -> Staged:
        return await self._spool.receive(chunks)

    async def discard(self, staged: Staged) -> None:
        await self._spool.discard(staged)

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` to its end even if the request awaiting it is cancelled, so that
        it never stops half-way between the files and the index."""
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
        """Convert a staged upload and store it; the staged file is removed either way.

        Returns the image and its delete token, which is kept only as a hash.
        """
        delete_token = secrets.token_urlsafe(32)
        record = await self._to_the_end(self._add(staged, _token_hash(delete_token)))
        return record, delete_token

    async def _add(self, staged: Staged, delete_token_sha256: str) -> ImageRecord:
        try:
            self.check_room()
            image_id = await self._new_id()
            placement = self._blobs.image_placement(image_id)
            try:
                converted = await self.converter.run(
                    imaging.convert_upload,
                    staged.body,
                    placement,
                    self._config.max_pixels,
                    self._config.jpeg_quality,
                )
                record = ImageRecord(
                    id=image_id,
                    uploaded=int(time.time()),
                    width=converted.width,
                    height=converted.height,
                    nbytes=converted.nbytes,
                    sha256=converted.sha256,
                    delete_token_sha256=delete_token_sha256,
                )
                await self._index.add(record)
            except imaging.ImageRejected:
                # Refused before the worker wrote anything: the id is as good as new, and
                # keeping it spares a refusal the index write and file checks below.
                self._spare_ids.append(image_id)
                raise
            except BaseException:
                await self._blobs.discard(placement.staging)  # its worker may have died
                await self._blobs.delete(image_id)
                await self._unjournal([image_id])
                raise
        except BaseException:
            await self._spool.discard(staged)  # the worker removes a file, unless it died first
            raise
        self._spool.release(staged)
        self._image_count += 1
        self._image_bytes += record.nbytes
        return record

    async def _new_id(self) -> str:
        """A fresh image id, already journaled as pending.

        The worker moves an upload's file into place, and if anything stops before its
        index row is in, the next start-up deletes the files of every pending id. Ids are
        journaled ahead, a batch in one write, so that an upload need not wait for one.
        """
        async with self._journaling:
            if not self._spare_ids:
                batch = [str(uuid.uuid4()) for _ in range(SPARE_IDS)]
                await self._index.add_pending(batch)
                self._spare_ids.extend(batch)  # beside any a refusal gave back meanwhile
            return self._spare_ids.pop()

    async def get(self, image_id: str) -> ImageRecord | None:
        return await self._index.get(image_id)

    async def page(self, limit: int, after: str | None) -> tuple[list[ImageRecord], bool]:
        return await self._index.page(limit, after)

    def image_path(self, record: ImageRecord) -> Path:
        return self._blobs.path(record.id)

    def may_delete(self, record: ImageRecord, delete_token: str | None) -> bool:
        """Whether ``delete_token`` is this image's own (None: the caller needs none)."""
        if delete_token is None:
            return True
        return record.delete_token_sha256 is not None and hmac.compare_digest(
            record.delete_token_sha256, _token_hash(delete_token)
        )

    async def delete(self, image_id: str, delete_token: str | None = None) -> bool:
        """Remove an image with its thumbnails and files.

        With ``delete_token``, only if it is the image's own. False if nothing matched.
        """
        token_sha256 = None if delete_token is None else _token_hash(delete_token)
        return await self._to_the_end(self._delete(image_id, token_sha256))

    async def _delete(self, image_id: str, token_sha256: str | None) -> bool:
        # It frees space, but its index write needs a little first: on a full disk, the
        # reserve's.
        deleted = await _with_reserve(
            self._reserve, lambda: self._index.delete(image_id, token_sha256)
        )
        if deleted is None:
            return False
        self._image_count -= 1
        self._image_bytes -= deleted.image_bytes
        self._thumbnails.forget(deleted.thumbnail_bytes)
        await self._blobs.delete(image_id)
        await self._unjournal([image_id])
        return True

    async def _unjournal(self, image_ids: Iterable[str]) -> None:
        """Clear ids whose files are gone from the journal, now or, failing that, later:
        never failing the caller, whose work is done (a start-up sweeps them anyway)."""
        self._stale_ids.update(image_ids)
        stale = list(self._stale_ids)
        if not stale:
            return
        try:
            await self._index.drop_pending(stale)
        except Exception as error:
            if not is_full(error):
                _log.exception("could not clear %d ids from the journal", len(stale))
            return
        self._stale_ids.difference_update(stale)

    def check_room(self) -> None:
        """Refuse work that takes space while the reserve is given up: what room is left
        belongs to deletions until it is set aside again."""
        if not self._reserve.held:
            raise StorageFull(
                "the server's storage is full: the room left is kept for deletions; "
                "nothing was stored, try again later"
            )

    async def _catch_up_while_open(self) -> None:
        while True:
            await asyncio.sleep(CATCH_UP_SECONDS)
            try:
                await self._catch_up()
            except Exception:
                _log.exception("could not finish what a full disk put off; trying again")

    async def _catch_up(self) -> None:
        """Do what a full disk put off, as far as there is room for it now."""
        if not self._index.shared:
            with unless_full():
                await self._index.share()
        await self._unjournal(())
        if not self._reserve.held:
            await asyncio.to_thread(self._reserve.take)

    def _put_off(self) -> list[str]:
        """What a full disk put off that uploads or operators are waiting for."""
        waiting = []
        if not self._reserve.held:
            waiting.append(
                "the room kept for deletions on a full disk is in use; uploads wait until "
                "it is set aside again"
            )
        if not self._index.shared:
            waiting.append(
                "the index is held by this process alone for lack of room for its shared "
                "memory; backups wait"
            )
        return waiting

    def thumbnail_sizes(self, record: ImageRecord) -> list[tuple[int, int]]:
        return thumbnail_sizes(record.width, record.height, self._config.min_thumbnail_side)

    async def image_and_thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        """An image and its kept thumbnail of this size, if there are."""
        return await self._thumbnails.lookup(image_id, width, height)

    async def make_thumbnail(
        self, record: ImageRecord, width: int, height: int
    ) -> ThumbnailRecord | None:
        """A thumbnail of a listed size, made now; None if the image has gone meanwhile."""
        self.check_room()
        return await self._thumbnails.make(record, width, height)

    def thumbnail_path(self, thumbnail: ThumbnailRecord) -> Path:
        return self._thumbnails.path(thumbnail)

    async def readiness_problems(self) -> list[str]:
        """Why the store cannot take uploads now; empty when it can."""
        problems = []
        if not await self._blobs.is_writable():
            problems.append(f"the storage directory {self._config.storage_path} is not writable")
        # An upload needs room for itself and for its converted copy at once.
        elif (free := self._blobs.free_bytes()) < 2 * self._config.max_upload_bytes:
            problems.append(
                f"the storage directory {self._config.storage_path} has {free // MiB} MiB free; "
                f"an upload may need {2 * self._config.max_upload_bytes // MiB} MiB"
            )
        problems += self._put_off()
        if not await self.converter.is_working():
            problems.append("no conversion worker is running")
        return problems


async def _with_reserve(reserve: Reserve, write: Callable[[], Awaitable[T]]) -> T:
    """Run an index write that must not wait for room: on a full disk, give up the
    reserve for it and run it again."""
    try:
        return await write()
    except Exception as error:
        if not is_full(error) or not await asyncio.to_thread(reserve.release):
            raise
    return await write()
