"""Blobs in a local directory tree, written atomically by the worker that made them.

Layout under the storage root::

    images/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c.jpeg
    thumbnails/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c/231x231.jpeg

Two levels of two hex digits keep every directory small (about 15 entries each at a
million images). A file reaches its place only by ``os.replace`` from the node's scratch
directory after its bytes are fsynced (``durable.place_durably``, run in the worker), so
a reader never sees a partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple

from .durable import open_file, place_durably
from .ports import BlobMissing, Destination, FileBody, thumbnail_of
from .scratch import Scratch


class Placement(NamedTuple):
    """Where a worker writes a new file (``staging``), where it then goes (``final``), and
    whether its pages stay in the page cache once it is on disk."""

    staging: str
    final: str
    cached: bool

    def put(self, data: bytes) -> None:
        place_durably(data, self.staging, self.final, cached=self.cached)


class LocalBlobs:
    name = "the storage directory"

    def __init__(self, root: Path, scratch: Scratch) -> None:
        self._images = root / "images"
        self._thumbnails = root / "thumbnails"
        self._scratch = scratch

    async def open(self) -> None:
        await asyncio.to_thread(self._images.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        pass

    async def problem(self) -> str | None:
        # Files arrive by way of the scratch directory, on the same file system, which
        # the node checks.
        return None

    def destination(self, key: str) -> Placement:
        staging = str(self._scratch.path(".jpeg"))
        if thumbnail_of(key) is not None:
            # A thumbnail is made because someone is waiting to be sent it.
            return Placement(staging, str(self._path(key)), cached=True)
        # A new original is written once and read seldom; its pages are better spent on
        # thumbnails and the images being served. Freed at once, they are also reused for
        # the next upload instead of the cache growing: on the development VM, writing
        # into fresh page cache took 8 ms of CPU per 5 MB against 1.8 ms into reused pages.
        return Placement(staging, str(self._path(key)), cached=False)

    async def keep(self, key: str, handed_back: bytes | None) -> None:
        if handed_back is not None:
            raise TypeError(f"{key}: a local destination is written by the worker, not kept")

    async def abandon(self, destination: Destination) -> None:
        if not isinstance(destination, Placement):
            raise TypeError(f"not a local destination: {destination!r}")
        await asyncio.to_thread(Path(destination.staging).unlink, missing_ok=True)

    async def source(self, key: str) -> str:
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise BlobMissing(key)
        return str(path)

    async def body(self, key: str, offset: int, count: int) -> FileBody:
        try:
            file = await open_file(self._path(key), "rb")
        except FileNotFoundError:
            raise BlobMissing(key) from None
        return FileBody(file, offset, count)

    async def delete(self, keys: Collection[str]) -> None:
        await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: Collection[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            if thumbnail_of(key) is not None:
                with contextlib.suppress(OSError):  # not empty, or already gone
                    path.parent.rmdir()

    async def delete_image(self, image_id: str) -> None:
        await asyncio.to_thread(self._delete_image, image_id)

    def _delete_image(self, image_id: str) -> None:
        self._image_path(image_id).unlink(missing_ok=True)
        shutil.rmtree(self._thumbnail_directory(image_id), ignore_errors=True)

    def _path(self, key: str) -> Path:
        if (thumbnail := thumbnail_of(key)) is not None:
            image_id, width, height = thumbnail
            return self._thumbnail_directory(image_id) / f"{width}x{height}.jpeg"
        prefix, _, name = key.partition("/")
        if prefix != "images" or not name.endswith(".jpeg"):
            raise ValueError(f"not a blob key: {key!r}")
        return self._image_path(name.removesuffix(".jpeg"))

    def _image_path(self, image_id: str) -> Path:
        return self._images / image_id[:2] / image_id[2:4] / f"{_checked(image_id)}.jpeg"

    def _thumbnail_directory(self, image_id: str) -> Path:
        return self._thumbnails / image_id[:2] / image_id[2:4] / _checked(image_id)


def _checked(image_id: str) -> str:
    # Keys become paths: none may climb out of its directory.
    if not image_id or "/" in image_id or image_id.startswith("."):
        raise ValueError(f"not an image id: {image_id!r}")
    return image_id
