"""Receiving upload bodies into staging files: held in memory while they arrive and
written in one go, as long as a shared memory budget lasts; streamed to disk beyond it.

Written at once, a body costs the event loop at most one thread hop, not one per chunk.
The budget bounds what many slow uploads arriving together can hold; past it, bodies are
written chunk by chunk as they come. Either way a worker gets a file to read: the page
cache hands it over far more cheaply than the executor's pipe would carry the bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .blobs import Blobs


@dataclass(frozen=True)
class Staged:
    """An upload received in full and waiting for conversion, in a staging file."""

    path: Path
    size: int


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
        """Take a whole body into a staging file; the caller owns it and must remove it."""
        stream = aiter(chunks)
        held: list[bytes] = []
        reserved = 0
        try:
            async for chunk in stream:
                if len(chunk) > self._available:
                    path, size = await self._blobs.stage(_chained(held, chunk, stream))
                    return Staged(path, size)
                self._available -= len(chunk)
                reserved += len(chunk)
                held.append(chunk)
            return Staged(await self._blobs.stage_at_once(held, reserved), reserved)
        finally:
            self._available += reserved

    async def discard(self, staged: Staged) -> None:
        await self._blobs.discard(staged.path)


async def _chained(
    held: list[bytes], chunk: bytes, rest: AsyncIterator[bytes]
) -> AsyncIterator[bytes]:
    for earlier in held:
        yield earlier
    yield chunk
    async for later in rest:
        yield later
