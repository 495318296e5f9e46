"""Blobs in a local directory tree, written atomically by the worker that made them.

Layout under the storage root::

    images/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c.jpeg
    thumbnails/5c/fd/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c/231x231.jpeg
    set-aside/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c.jpeg    (set aside by a repair)

Two levels of two hex digits keep every directory small (about 15 entries each at a
million images). A file reaches its place only by ``os.replace`` from the node's scratch
directory after its bytes are fsynced (``durable.place_durably``, run in the worker), so
a reader never sees a partial file.

A blob is opened and, if small, read on the event loop when that needs no disk access
(its path and its pages are in the kernel's caches): a hot blob costs no thread hop, and
a cold one never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import BinaryIO, NamedTuple

from .durable import fsync_directory, place_durably
from .ports import (
    SET_ASIDE,
    BlobMissing,
    BytesBody,
    Destination,
    FileBody,
    Stored,
    blob_key,
    set_aside_name,
    thumbnail_of,
)
from .scratch import Scratch

IN_MEMORY_BYTES = 256 * 1024
"""Bodies up to this size are read into memory and written to the socket with their
headers; larger ones are sent from the file with sendfile."""
_READ = 1024 * 1024
IN_MEMORY_TOTAL = 16 * 1024 * 1024
"""What bodies read into memory may hold at once, in each process. Past it, small ones
are sent with sendfile too: clients that stop reading must not pin the server's memory
by the quarter megabyte, only its descriptors, which the connection limit bounds."""


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

    def __init__(self, root: Path, scratch: Scratch, *, in_memory: int = IN_MEMORY_TOTAL) -> None:
        # Paths are built as text: pathlib's joining cost more than opening the file.
        self._images = str(root / "images")
        self._thumbnails = str(root / "thumbnails")
        self._scratch = scratch
        self._in_memory_room = in_memory

    async def open(self) -> None:
        await asyncio.to_thread(os.makedirs, self._images, exist_ok=True)

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
            return Placement(staging, self._path(key), cached=True)
        # A new original is written once and read seldom; its pages are better spent on
        # thumbnails and the images being served. Freed at once, they are also reused for
        # the next upload instead of the cache growing: on the development VM, writing
        # into fresh page cache took 8 ms of CPU per 5 MB against 1.8 ms into reused pages.
        return Placement(staging, self._path(key), cached=False)

    async def keep(self, key: str, handed_back: bytes | None) -> None:
        if handed_back is not None:
            raise TypeError(f"{key}: a local destination is written by the worker, not kept")

    async def abandon(self, destination: Destination) -> None:
        if not isinstance(destination, Placement):
            raise TypeError(f"not a local destination: {destination!r}")
        await asyncio.to_thread(Path(destination.staging).unlink, missing_ok=True)

    async def source(self, key: str) -> str:
        path = self._path(key)
        if not await asyncio.to_thread(os.path.isfile, path):
            raise BlobMissing(key)
        return path

    async def body(self, key: str, offset: int, count: int) -> FileBody | BytesBody:
        path = self._path(key)
        in_memory = count <= min(IN_MEMORY_BYTES, self._in_memory_room)
        fd = _open_cached(path)
        if fd is not None:
            try:
                if not in_memory:
                    return FileBody(os.fdopen(fd, "rb"), offset, count)
                data = bytearray(count)
                complete = _read_cached(fd, data, offset) == count
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if complete:
                return self._held(data)
        try:
            opened = await _open_off_the_loop(path, offset, count if in_memory else None)
        except FileNotFoundError:
            raise BlobMissing(key) from None
        if isinstance(opened, bytearray):
            return self._held(opened)
        return FileBody(opened, offset, count)

    def _held(self, data: bytearray) -> BytesBody:
        self._in_memory_room -= len(data)
        return BytesBody(data, self._let_go)

    def _let_go(self, count: int) -> None:
        self._in_memory_room += count

    async def delete(self, keys: Collection[str]) -> None:
        await asyncio.to_thread(self._delete, keys)

    def _delete(self, keys: Collection[str]) -> None:
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if thumbnail_of(key) is not None:
                with contextlib.suppress(OSError):  # not empty, or already gone
                    os.rmdir(os.path.dirname(path))

    async def delete_image(self, image_id: str) -> None:
        await asyncio.to_thread(self._delete_image, image_id)

    def _delete_image(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._image_path(image_id))
        shutil.rmtree(self._thumbnail_directory(image_id), ignore_errors=True)

    async def stored(self) -> AsyncIterator[list[Stored]]:
        root = os.path.dirname(self._images)
        for top in (self._images, self._thumbnails):
            listing = await asyncio.to_thread(_listing, top)
            yield self._named(root, listing)
            # One directory of the first level at a time: a batch of about 1/256th.
            for directory in listing.directories:
                yield self._named(root, await asyncio.to_thread(_everything_under, directory))

    def _named(self, root: str, listing: _Listing) -> list[Stored]:
        found = []
        for path, nbytes in listing.files:
            name = os.path.relpath(path, root)
            parts = name.split("/")
            key = "/".join([parts[0], *parts[3:]])
            held = len(parts) in (4, 5) and blob_key(key) and self._path(key) == path
            found.append(Stored(name, key if held else None, nbytes))
        for path, why in listing.unlisted:
            found.append(Stored(os.path.relpath(path, root), None, 0, unlisted=why))
        return found

    async def digest(self, key: str) -> tuple[int, str]:
        try:
            return await asyncio.to_thread(_digest, self._path(key))
        except FileNotFoundError:
            raise BlobMissing(key) from None

    async def set_aside(self, key: str) -> str:
        return await asyncio.to_thread(self._set_aside, key)

    def _set_aside(self, key: str) -> str:
        path = self._path(key)
        root = os.path.dirname(self._images)
        made = _made_directory(f"{root}/{SET_ASIDE}")
        attempt = 0
        while not _linked(key, path, f"{root}/{set_aside_name(key, attempt)}"):
            attempt += 1
        # Its new entry made durable before its old one's removal is.
        fsync_directory(Path(root, SET_ASIDE))
        if made:
            fsync_directory(Path(root))
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile: it is set aside
            os.unlink(path)
        fsync_directory(Path(path).parent)
        return set_aside_name(key, attempt)

    async def set_aside_count(self) -> int:
        return await asyncio.to_thread(self._set_aside_count)

    def _set_aside_count(self) -> int:
        root = os.path.dirname(self._images)
        try:
            return len(os.listdir(f"{root}/{SET_ASIDE}"))
        except (FileNotFoundError, NotADirectoryError):
            return 0

    def _path(self, key: str) -> str:
        if (thumbnail := thumbnail_of(key)) is not None:
            image_id, width, height = thumbnail
            return f"{self._thumbnail_directory(image_id)}/{width}x{height}.jpeg"
        prefix, _, name = key.partition("/")
        if prefix != "images" or not name.endswith(".jpeg"):
            raise ValueError(f"not a blob key: {key!r}")
        return self._image_path(name.removesuffix(".jpeg"))

    def _image_path(self, image_id: str) -> str:
        return f"{self._images}/{image_id[:2]}/{image_id[2:4]}/{_checked(image_id)}.jpeg"

    def _thumbnail_directory(self, image_id: str) -> str:
        return f"{self._thumbnails}/{image_id[:2]}/{image_id[2:4]}/{_checked(image_id)}"


class _Listing(NamedTuple):
    files: list[tuple[str, int]]
    """Paths and sizes."""
    directories: list[str]
    unlisted: list[tuple[str, str]]
    """Paths that could not be listed, or looked at, and why."""


def _listing(top: str) -> _Listing:
    """The files directly in ``top``, the directories in it, and what could not be read."""
    listing = _Listing([], [], [])
    try:
        with os.scandir(top) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        listing.directories.append(entry.path)
                    else:
                        nbytes = entry.stat(follow_symlinks=False).st_size
                        listing.files.append((entry.path, nbytes))
                except FileNotFoundError:  # removed meanwhile
                    pass
                except OSError as error:
                    listing.unlisted.append((entry.path, _why(error)))
    except FileNotFoundError:
        pass
    except OSError as error:
        listing.unlisted.append((top, _why(error)))
    return listing


def _everything_under(directory: str) -> _Listing:
    everything = _listing(directory)
    for below in everything.directories:
        listing = _everything_under(below)
        everything.files.extend(listing.files)
        everything.unlisted.extend(listing.unlisted)
    return everything


def _why(error: OSError) -> str:
    return error.strerror or str(error)


def _linked(key: str, path: str, link: str) -> bool:
    """Link the blob ``key`` at ``path`` to ``link`` too, unless that name is taken;
    whether it was linked."""
    # A link, not a rename: it fails if the name is taken, where a rename replaces what
    # is there. Within the storage directory, so on its file system.
    try:
        os.link(path, link, follow_symlinks=False)
    except FileExistsError:
        return False
    except FileNotFoundError:
        raise BlobMissing(key) from None
    return True


def _made_directory(path: str) -> bool:
    """Create the directory ``path`` unless it is there; whether it was created."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    return True


def _digest(path: str) -> tuple[int, str]:
    sha256 = hashlib.sha256()
    size = 0
    buffer = bytearray(_READ)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while read := file.readinto(buffer):
            sha256.update(view[:read])
            size += read
    return size, sha256.hexdigest()


def _checked(image_id: str) -> str:
    # Keys become paths: none may climb out of its directory.
    if not image_id or "/" in image_id or image_id.startswith("."):
        raise ValueError(f"not an image id: {image_id!r}")
    return image_id


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_AT_FDCWD = -100
_RESOLVE_CACHED = 0x20


class _CachedOpener:
    """Opens a file if that needs no disk access (Linux's openat2 with RESOLVE_CACHED)."""

    def __init__(self) -> None:
        self._how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC, 0, _RESOLVE_CACHED)
        self._libc: ctypes.CDLL | None = None
        if sys.platform == "linux":
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._libc.syscall.restype = ctypes.c_long
            self._libc.syscall.argtypes = (
                ctypes.c_long,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_void_p,
                ctypes.c_size_t,
            )

    def __call__(self, path: str) -> int | None:
        """A descriptor of the file; None if opening it would need the disk, if it is not
        there, or if this system cannot tell: then the caller opens it off the loop, and
        learns which."""
        if self._libc is None:
            return None
        how = self._how
        fd = int(
            self._libc.syscall(
                _SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
            )
        )
        if fd >= 0:
            return fd
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # an older kernel, or a filter
            self._libc = None
        return None


_open_cached = _CachedOpener()


def _read_cached(fd: int, buffer: bytearray, offset: int) -> int:
    """Read what the page cache holds of ``len(buffer)`` bytes from ``offset`` without
    waiting for the disk; how many bytes were read."""
    try:
        return os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except (BlockingIOError, OSError) as error:
        if isinstance(error, BlockingIOError) or error.errno == errno.EOPNOTSUPP:
            return 0  # nothing cached, or a file system that cannot tell
        raise


def _read(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``, or as much of it as the file holds; how many bytes
    were read."""
    done = 0
    while done < len(view) and (step := os.preadv(fd, [view[done:]], offset + done)):
        done += step
    return done


def _open_and_read(path: str, offset: int, count: int | None) -> BinaryIO | bytearray:
    """The ``count`` bytes from ``offset``; or, with None, the file opened."""
    if count is None:
        return open(path, "rb")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = bytearray(count)
        del data[_read(fd, memoryview(data), offset) :]
    finally:
        os.close(fd)
    return data


async def _open_off_the_loop(path: str, offset: int, count: int | None) -> BinaryIO | bytearray:
    """``_open_and_read`` in a thread. If the caller is cancelled meanwhile, a file left
    open is closed once it is, instead of being left to the garbage collector."""
    opening = asyncio.get_running_loop().run_in_executor(None, _open_and_read, path, offset, count)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            opened = await opening
            if not isinstance(opened, bytearray):
                opened.close()
        raise
