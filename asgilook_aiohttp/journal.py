"""Work in progress, as this node holds it in the index's journal: leased, renewed while
the node lives, and undone by whichever node finds its lease expired.

An upload's id is journaled before its blob is stored, and a deletion's id before its
blobs are removed; a thumbnail's key is journaled (claimed) before it is made, and before
an evicted one's blob is removed. Undoing an entry means removing whatever blobs no
record names any more, then clearing it. A node undoes its own failed work at once, or,
if a dependency is down just then, on a later ``settle``; it undoes other nodes' expired
work on ``sweep``. Ids are journaled ahead, a batch in one write, so that an upload need
not wait for one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection

from .space import is_full
from .storage.ports import Blobs, Index, Unavailable, thumbnail_of

_log = logging.getLogger(__name__)

# Image ids journaled as pending in one write, ahead of the uploads that will take them.
SPARE_IDS = 64
# Expired entries taken over in one sweep step.
_SWEEP_BATCH = 100


class Journal:
    def __init__(self, index: Index, blobs: Blobs, *, lease: float) -> None:
        self._index = index
        self._blobs = blobs
        self.owner = uuid.uuid4().hex
        self.lease = lease
        self._spare_ids: list[str] = []
        self._issuing = asyncio.Lock()
        # This node's entries whose undoing failed (a dependency was down): tried again.
        self._to_undo: set[str] = set()

    @property
    def spare_ids(self) -> int:
        return len(self._spare_ids)

    async def new_id(self) -> str:
        """A fresh image id, already journaled for this node."""
        async with self._issuing:
            if not self._spare_ids:
                batch = [str(uuid.uuid4()) for _ in range(SPARE_IDS)]
                await self._index.journal(batch, self.owner, self.lease)
                self._spare_ids.extend(batch)  # beside any a refusal gave back meanwhile
            return self._spare_ids.pop()

    def give_back(self, image_id: str) -> None:
        """An id whose upload was refused before anything was stored: as good as new."""
        self._spare_ids.append(image_id)

    async def claim(self, key: str) -> bool:
        return await self._index.claim(key, self.owner, self.lease)

    async def undo(self, keys: Collection[str]) -> None:
        """Remove the blobs of these entries that no record names, then clear them; what
        cannot be done now is done by a later ``settle``. Never fails the caller."""
        self._to_undo.update(keys)
        await self.settle()

    async def settle(self) -> None:
        """Undo what this node could not undo earlier."""
        pending = list(self._to_undo)
        if not pending:
            return
        try:
            # An entry another node took over while this one was stopped is theirs to undo:
            # its blob may be theirs by now.
            held = [key for key in pending if await self._index.claim(key, self.owner, self.lease)]
            await self._undo(held)
        except Exception as error:
            if not isinstance(error, Unavailable) and not is_full(error):
                _log.exception("could not undo %d journaled entries", len(pending))
            return
        self._to_undo.difference_update(pending)

    async def _undo(self, keys: Collection[str]) -> None:
        for key in keys:
            if (thumbnail := thumbnail_of(key)) is not None:
                _, kept = await self._index.image_and_thumbnail(*thumbnail)
                if kept is None:
                    await self._blobs.delete([key])
            elif await self._index.get(key) is None:
                await self._blobs.delete_image(key)
        await self._index.unjournal(keys, self.owner)

    async def sweep(self) -> int:
        """Take over the entries of other nodes (or of this one's earlier runs) whose
        lease expired, and undo them; how many."""
        swept = 0
        while taken := await self._index.take_expired(self.owner, self.lease, _SWEEP_BATCH):
            try:
                await self._undo(taken)
            except Exception:
                self._to_undo.update(taken)  # held by this node now: settled later
                raise
            swept += len(taken)
            if len(taken) < _SWEEP_BATCH:
                break
        return swept

    async def renew(self) -> None:
        await self._index.renew(self.owner, self.lease)

    async def close(self) -> None:
        """Let go of the ids journaled ahead and not used: no blob has any of them."""
        spare, self._spare_ids = self._spare_ids, []
        try:
            await self._index.unjournal(spare, self.owner)
        except Exception:  # the next node to start sweeps them once their lease expires
            _log.exception("could not clear %d spare ids from the journal", len(spare))
