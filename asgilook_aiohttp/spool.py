"""Receiving upload bodies for their worker: into the shared arena as they arrive, as long
as its pages last; past that, streamed to a staging file.

The arena bounds what bodies may hold in memory while they arrive and wait for a worker,
however many come at once. A body that does not fit any more goes to disk as a whole,
with what it already had in memory written first.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .arena import Arena, InArena, pages_for
from .blobs import Blobs


@dataclass(frozen=True)
class Staged:
    """An upload received in full and waiting for conversion: in the arena, or in a
    staging file."""

    body: InArena | Path
    size: int


class Spool:
    def __init__(self, blobs: Blobs, arena: Arena) -> None:
        self._blobs = blobs
        self._arena = arena
        # Last freed, first taken: those pages are resident already.
        self._free = list(range(arena.page_count))
        self._held = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of bodies held in memory now."""
        return self._held

    async def receive(self, chunks: AsyncIterable[bytes]) -> Staged:
        """Take a whole body; the caller owns the result and must ``release`` or
        ``discard`` it."""
        stream = aiter(chunks)
        pages: list[int] = []
        size = 0
        try:
            async for chunk in stream:
                if not self._grow(pages, size + len(chunk)):
                    break
                self._arena.write(pages, size, chunk)
                size += len(chunk)
                self._held += len(chunk)
            else:
                return Staged(InArena(tuple(pages), size), size)
        except BaseException:
            self._let_go(pages, size)
            raise
        return await self._spill(pages, size, chunk, stream)

    async def _spill(
        self, pages: list[int], size: int, chunk: bytes, rest: AsyncIterator[bytes]
    ) -> Staged:
        """Write a body that outgrew the arena to a staging file: first its part in the
        arena, let go of as soon as it is copied out, then the rest as it comes."""
        held = True

        async def body() -> AsyncIterator[bytes]:
            nonlocal held
            for piece in self._arena.copies(pages, size):
                yield piece
            self._let_go(pages, size)
            held = False
            yield chunk
            async for later in rest:
                yield later

        try:
            path, total = await self._blobs.stage(body())
        finally:
            if held:
                self._let_go(pages, size)
        return Staged(path, total)

    def _grow(self, pages: list[int], size: int) -> bool:
        """Take enough pages for ``size`` bytes, if there are."""
        wanted = pages_for(size) - len(pages)
        if wanted > len(self._free):
            return False
        pages.extend(self._free.pop() for _ in range(wanted))
        return True

    def _let_go(self, pages: Sequence[int], size: int) -> None:
        self._free.extend(reversed(pages))
        self._held -= size

    def release(self, staged: Staged) -> None:
        """Let go of a body its worker is done with (it removes a staging file itself)."""
        if isinstance(staged.body, InArena):
            self._let_go(staged.body.pages, staged.size)

    async def discard(self, staged: Staged) -> None:
        """Let go of a body no worker has taken, or whose worker did not finish."""
        self.release(staged)
        if isinstance(staged.body, Path):
            await self._blobs.discard(staged.body)
