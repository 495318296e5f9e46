"""Room on the storage file system: what a full one looks like, and the space kept aside
so that the index can still be written on it.

A full disk shows as ENOSPC or EDQUOT from the system (in a worker too), as SQLITE_FULL
from the index, or as SQLITE_IOERR_SHMSIZE when SQLite cannot make its shared-memory
file. Deleting an image frees space but first needs a little of it, for the index's
write-ahead log: the reserve, a file of ``RESERVE_BYTES`` beside the index, is given up
for such a write when it finds no room, and taken again once there is.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Room for a deletion's transaction in the write-ahead log and for the index's
# shared-memory file, with a wide margin (docs/internals.md has the figures).
RESERVE_BYTES = 1024 * 1024

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_SQLITE_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE)


class StorageFull(Exception):
    """There is no room for this on the storage file system; nothing was stored."""


def is_full(error: BaseException) -> bool:
    """Whether ``error`` means the storage file system has no room."""
    if isinstance(error, StorageFull):
        return True
    if isinstance(error, sqlite3.Error):
        return error.sqlite_errorcode in _FULL_SQLITE_CODES
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


@contextmanager
def unless_full() -> Iterator[None]:
    """Skip the rest of the block when the storage is full: for writes that can wait."""
    try:
        yield
    except Exception as error:
        if not is_full(error):
            raise


class Reserve:
    """Space set aside in a file of its own; all calls block, so run them in a thread."""

    def __init__(self, path: Path, nbytes: int = RESERVE_BYTES) -> None:
        self._path = path
        self._nbytes = nbytes
        self.held = False

    def take(self) -> bool:
        """Set the space aside, unless it is already; whether it is now."""
        if not self.held:
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    # Allocated, not written: as quick as it can be, and it is never read.
                    os.posix_fallocate(fd, 0, self._nbytes)
                finally:
                    os.close(fd)
            except OSError as error:
                self._path.unlink(missing_ok=True)
                if not is_full(error):
                    raise
                return False
            self.held = True
        return True

    def release(self) -> bool:
        """Give the space back to the file system; whether there was any to give."""
        released, self.held = self.held, False
        self._path.unlink(missing_ok=True)
        return released
