"""File systems of a test's own, to fill to the last byte: small tmpfs mounts (root is
needed; elsewhere the test skips and says why)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest


def mount(*arguments: str) -> None:
    done = subprocess.run(["mount", *arguments], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {done.stderr.decode().strip()}")


def umount(mount_point: Path) -> None:
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A file system of its own, of the given size."""
    mount_point.mkdir()
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        umount(mount_point)


def fill(mount_point: Path, index: Path) -> Path:
    """Fill a file system to the last byte with a file at its root; return that file.
    The write-ahead log of ``index``, if there is one, is emptied first, so that every
    index write needs new room, as it does once the log has grown to its end."""
    if index.exists():
        with closing(sqlite3.connect(index)) as db:
            assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    filler = mount_point / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1024 * 1024, 4096, 1):
            while True:
                try:
                    os.write(fd, bytes(size))
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler
