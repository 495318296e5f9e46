"""Receiving upload bodies for their worker: into the shared arena as they arrive, as long
as its pages last; past that, streamed to a staging file.

The arena bounds what bodies may hold in memory while they arrive and wait for a worker,
however many come at once. A body that does not fit any more goes to disk as a whole,
with what it already had in memory written first. There, bodies have a bound of their
own, and must leave the room a conversion needs free: a client that sends slowly or
never finishes can hold only that much disk, never the room of uploads received in full.
A body that would pass either is refused as it does, and its file removed.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .arena import Arena, InArena, pages_for
from .config import MiB
from .space import StorageFull
from .storage.scratch import Scratch


@dataclass(frozen=True)
class Staged:
    """An upload received in full and waiting for conversion: in the arena, or in a
    staging file."""

    body: InArena | Path
    size: int


class Spool:
    def __init__(self, scratch: Scratch, arena: Arena, *, disk_bytes: int, keep_free: int) -> None:
        """Bodies may take ``disk_bytes`` in staging files, leaving ``keep_free`` bytes of
        the file system free for conversions."""
        self._scratch = scratch
        self._arena = arena
        # Last freed, first taken: those pages are resident already.
        self._free = list(range(arena.page_count))
        self._held = 0
        self._disk_bytes = disk_bytes
        self._keep_free = keep_free
        self._staged = 0

    @property
    def held_bytes(self) -> int:
        """Bytes of bodies held in memory now."""
        return self._held

    @property
    def staged_bytes(self) -> int:
        """Bytes of bodies held in staging files now."""
        return self._staged

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
        staged = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal held
            for piece in self._arena.copies(pages, size):
                yield admitted(piece)
            self._let_go(pages, size)
            held = False
            yield admitted(chunk)
            async for later in rest:
                yield admitted(later)

        def admitted(piece: bytes) -> bytes:
            nonlocal staged
            self._admit(len(piece))
            staged += len(piece)
            self._staged += len(piece)
            return piece

        try:
            path, total = await self._scratch.stage(body())
        except BaseException:
            self._staged -= staged
            raise
        finally:
            if held:
                self._let_go(pages, size)
        return Staged(path, total)

    def _admit(self, size: int) -> None:
        """Refuse ``size`` more bytes of a body on disk if they do not fit."""
        if self._staged + size > self._disk_bytes:
            raise StorageFull(
                f"uploads still arriving or waiting hold all {self._disk_bytes // MiB} MiB "
                "of disk this server sets aside for them; nothing was stored, try again later"
            )
        if self._scratch.free_bytes() - size < self._keep_free:
            raise StorageFull(
                "the server's storage has too little room left to receive this upload; "
                "nothing was stored, try again later"
            )

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
        else:
            self._staged -= staged.size

    async def discard(self, staged: Staged) -> None:
        """Let go of a body no worker has taken, or whose worker did not finish."""
        self.release(staged)
        if isinstance(staged.body, Path):
            await self._scratch.discard(staged.body)
