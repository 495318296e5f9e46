"""The scratch directory, ``staging/`` under the storage path: upload bodies that did
not fit in memory, and files on their way into local blob storage.

Several processes of one server share it, each naming its files after its pid. Nothing
in it outlives the process that wrote it: what one that is gone left is removed when
the next one starts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterable
from pathlib import Path

from .durable import open_file, write_durably


class Scratch:
    def __init__(self, storage_path: Path) -> None:
        self.directory = storage_path / "staging"
        self._pid = os.getpid()
        self._run = uuid.uuid4().hex[:12]
        self._serial = itertools.count()

    def open(self) -> None:
        """Create the directory and remove whatever processes that are gone left in it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.leftovers(mine=True):
            entry.unlink(missing_ok=True)

    def leftovers(self, *, mine: bool = False) -> list[Path]:
        """What processes that are gone left in the directory (and, with ``mine``, what an
        earlier process of this pid did)."""
        found = []
        for entry in self.directory.iterdir():
            owner, _, _ = entry.name.partition("-")
            pid = int(owner) if owner.isdigit() else 0
            if pid <= 0 or (pid == self._pid and mine) or not _is_running(pid):
                found.append(entry)
        return found

    def path(self, suffix: str) -> Path:
        # Unique within this process, and apart from any earlier run's (swept anyway).
        return self.directory / f"{self._pid}-{self._run}-{next(self._serial)}{suffix}"

    async def stage(self, chunks: AsyncIterable[bytes]) -> tuple[Path, int]:
        """Write a stream to a new file as it arrives; return its path and size."""
        path = self.path(".upload")
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

    async def discard(self, path: str | os.PathLike[str]) -> None:
        await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    def free_bytes(self) -> int:
        stats = os.statvfs(self.directory)
        return stats.f_bavail * stats.f_frsize

    async def is_writable(self) -> bool:
        return await asyncio.to_thread(self._probe)

    def _probe(self) -> bool:
        probe = self.path(".probe")
        try:
            write_durably(probe, b"")
            probe.unlink()
        except OSError:
            return False
        return True


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: not one of ours, but not ours to judge
        return True
    return True
