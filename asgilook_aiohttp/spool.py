"""Upload bodies on their way to a worker: held in memory while a shared budget lasts,
spilled to a staging file beyond it.

A body in memory goes to its worker through the executor's pipe: the event loop spends no
thread hop per chunk written and the worker reads no file. The budget bounds what many
slow or queued uploads can hold at once; past it, bodies stream to disk as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .blobs import Blobs


@dataclass(frozen=True)
class Staged:
    """An upload received in full and waiting for conversion: its bytes, or the staging
    file that holds them."""

    size: int
    data: bytes | None = None
    path: Path | None = None

    @property
    def source(self) -> bytes | str:
        """What the worker converts: the bytes, or the file's path."""
        return self.data if self.data is not None else str(self.path)


class Spool:
    def __init__(self, blobs: Blobs, budget_bytes: int) -> None:
        self._blobs = blobs
        self._budget = budget_bytes
        self._available = budget_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of bodies held in memory now."""
        return self._budget - self._available

    async def receive(self, chunks: AsyncIterable[bytes]) -> Staged:
        """Take a whole body; the caller owns the result and must ``release`` it."""
        stream = aiter(chunks)
        held: list[bytes] = []
        reserved = 0
        try:
            async for chunk in stream:
                if len(chunk) > self._available:
                    path, size = await self._blobs.stage(_chained(held, chunk, stream))
                    return Staged(size, path=path)
                self._available -= len(chunk)
                reserved += len(chunk)
                held.append(chunk)
            data = b"".join(held)
            staged, reserved = Staged(len(data), data=data), 0  # now the caller's to release
            return staged
        finally:
            self._available += reserved

    async def release(self, staged: Staged) -> None:
        if staged.path is not None:
            await self._blobs.discard(staged.path)
        else:
            self._available += staged.size


async def _chained(
    held: list[bytes], chunk: bytes, rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    for earlier in held:
        yield earlier
    yield chunk
    async for later in rest:
        yield later
