"""Writing files so that they survive a crash, and opening them off the event loop.

A file reaches its final place only by ``os.replace`` from a staging file whose bytes
are fsynced, so a reader never sees a partial file; then the directory entry is fsynced
too, so that the file survives a power cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import BinaryIO, cast


def write_durably(path: str | os.PathLike[str], data: bytes, *, cached: bool = True) -> None:
    """Write a new file and make sure its bytes are on disk before returning; with
    ``cached=False``, let its pages go from the page cache once they are."""
    with open(path, "xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
        if not cached:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def place_durably(data: bytes, staging: str, final: str, *, cached: bool) -> None:
    """Put ``data`` at ``final`` by way of ``staging``, atomically and durably: once this
    returns, the file and its directory entry survive a power cut."""
    final_directory = Path(final).parent
    try:
        write_durably(staging, data, cached=cached)
        created = _make_parents(final_directory)
        os.replace(staging, final)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    fsync_directory(final_directory)
    for directory in created:
        fsync_directory(directory.parent)


def move_into_place(staging: str, final: str) -> list[Path]:
    """Rename a file whose bytes are fsynced to ``final``, creating its directory if need
    be; return the directories whose entries changed. The caller fsyncs them, once each,
    before it relies on the file being there: after many files, that is fewer fsyncs."""
    final_directory = Path(final).parent
    created = _make_parents(final_directory)
    os.replace(staging, final)
    return [final_directory, *(directory.parent for directory in created)]


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; return those created."""
    created = []
    while not directory.exists():
        created.append(directory)
        directory = directory.parent
    for new in reversed(created):
        new.mkdir(exist_ok=True)
    return created


def fsync_directory(path: Path) -> None:
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
