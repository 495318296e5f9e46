"""Where image bytes live: a directory tree written atomically.

Layout under the storage root::

    images/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c.jpeg
    thumbnails/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c/231x231.jpeg
    staging/<random>.upload and <random>.jpeg   (work in progress, swept at start-up)

Two levels of two hex digits keep every directory small (about 15 entries each at a
million images). A file reaches ``images/`` or ``thumbnails/`` only by ``os.replace`` from
``staging/`` after its bytes are fsynced, so a reader never sees a partial file. That
last step, ``place_durably``, runs in the worker that made the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import uuid
from collections.abc import AsyncIterable
from pathlib import Path
from typing import BinaryIO, NamedTuple, cast


def write_durably(path: str | os.PathLike[str], data: bytes, *, cached: bool = True) -> None:
    """Write a new file and make sure its bytes are on disk before returning; with
    ``cached=False``, let its pages go from the page cache once they are."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
        if not cached:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class Placement(NamedTuple):
    """Where a new file goes (``final``), where it is written first (``staging``), and
    whether its pages stay in the page cache once it is on disk."""

    staging: str
    final: str
    cached: bool


def place_durably(data: bytes, placement: Placement) -> None:
    """Put ``data`` at its final place by way of staging, atomically and durably: once
    this returns, the file and its directory entry survive a power cut."""
    final_directory = Path(placement.final).parent
    try:
        write_durably(placement.staging, data, cached=placement.cached)
        created = _make_parents(final_directory)
        os.replace(placement.staging, placement.final)
    except BaseException:
        Path(placement.staging).unlink(missing_ok=True)
        raise
    _fsync_directory(final_directory)
    for directory in created:
        _fsync_directory(directory.parent)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created."""
    created = []
    while not directory.exists():
        created.append(directory)
        directory = directory.parent
    for new in reversed(created):
        new.mkdir(exist_ok=True)
    return created


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def open_file(path: Path, mode: str) -> BinaryIO:
    """Open a file off the event loop. If the caller is cancelled meanwhile, the file is
    closed once open, instead of being left to the garbage collector."""

    def open_it() -> BinaryIO:
        return cast(BinaryIO, open(path, mode))

    opening = asyncio.get_running_loop().run_in_executor(None, open_it)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # Let the open finish, so that the caller's clean-up (removing a file it was
        # creating, say) comes after it, not before.
        with contextlib.suppress(OSError):
            (await opening).close()
        raise


class Blobs:
    def __init__(self, root: Path) -> None:
        self._images = root / "images"
        self._thumbnails = root / "thumbnails"
        self._staging = root / "staging"
        self._run = uuid.uuid4().hex[:12]
        self._serial = itertools.count()

    def open(self) -> None:
        """Create the directories and remove whatever an interrupted upload left in staging."""
        self._images.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        for leftover in self._staging.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, image_id: str) -> Path:
        return self._images / image_id[:2] / image_id[2:4] / f"{image_id}.jpeg"

    def _thumbnail_directory(self, image_id: str) -> Path:
        return self._thumbnails / image_id[:2] / image_id[2:4] / image_id

    def thumbnail_path(self, image_id: str, width: int, height: int) -> Path:
        return self._thumbnail_directory(image_id) / f"{width}x{height}.jpeg"

    def image_placement(self, image_id: str) -> Placement:
        # A new original is written once and read seldom; its pages are better spent on
        # thumbnails and the images being served. Freed at once, they are also reused for
        # the next upload instead of the cache growing: on the development VM, writing
        # into fresh page cache took 8 ms of CPU per 5 MB against 1.8 ms into reused pages.
        return Placement(str(self.staging_path(".jpeg")), str(self.path(image_id)), cached=False)

    def thumbnail_placement(self, image_id: str, width: int, height: int) -> Placement:
        # A thumbnail is made because someone is waiting to be sent it.
        final = self.thumbnail_path(image_id, width, height)
        return Placement(str(self.staging_path(".jpeg")), str(final), cached=True)

    def staging_path(self, suffix: str) -> Path:
        # Unique within this process, and apart from any earlier run's (swept anyway).
        return self._staging / f"{self._run}-{next(self._serial)}{suffix}"

    async def stage(self, chunks: AsyncIterable[bytes]) -> tuple[Path, int]:
        """Write a stream to a new staging file as it arrives; return its path and size."""
        path = self.staging_path(".upload")
        size = 0
        try:
            with await open_file(path, "xb") as file:
                async for chunk in chunks:
                    await asyncio.to_thread(file.write, chunk)
                    size += len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, size

    async def existing(self, path: Path) -> Path | None:
        return path if await asyncio.to_thread(path.is_file) else None

    async def discard(self, path: str | os.PathLike[str]) -> None:
        await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    async def discard_thumbnail(self, path: Path) -> None:
        """Remove a thumbnail file, and its image's directory if that leaves it empty."""
        await asyncio.to_thread(self._discard_thumbnail, path)

    def _discard_thumbnail(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty, or already gone
            path.parent.rmdir()

    async def delete(self, image_id: str) -> None:
        """Remove an image's file and all its thumbnails."""
        await asyncio.to_thread(self._delete, image_id)

    def _delete(self, image_id: str) -> None:
        self.path(image_id).unlink(missing_ok=True)
        shutil.rmtree(self._thumbnail_directory(image_id), ignore_errors=True)

    async def is_writable(self) -> bool:
        return await asyncio.to_thread(self._probe)

    def free_bytes(self) -> int:
        stats = os.statvfs(self._staging)
        return stats.f_bavail * stats.f_frsize

    def _probe(self) -> bool:
        probe = self.staging_path(".probe")
        try:
            write_durably(probe, b"")
            probe.unlink()
        except OSError:
            return False
        return True
