"""Work in progress, as this node holds it in the index's journal: leased, renewed while
the node lives, and undone by whichever node finds its lease expired.

An upload's id is journaled before its blob is stored, and a deletion's id before its
blobs are removed; a thumbnail's key is journaled (claimed) before it is made, and before
an evicted one's blob is removed. Undoing an entry means removing whatever blobs no
record names any more, then clearing it. A node undoes its own failed work at once, or,
if a dependency is down just then, on a later ``settle``; it undoes other nodes' expired
work on ``sweep``. Ids are journaled ahead, a batch in one write, so that an upload need
not wait for one.

A node renews the leases of the entries it knows of, not all that bear its name: a write
whose answer was lost (it timed out here and committed in the index) leaves an entry the
node never learns of. Its lease lapses, and a sweep, this node's own included, undoes it;
a node that stops undoes those it left at once.

The index grants a node its own entries again, so it is here that two tasks of one node
are kept from working on one key at once (making a thumbnail while it is undone, say):
a key is in hand of one task, from its claim (or the write that journaled it) until its
work is recorded or undone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from .space import is_full
from .storage.ports import Blobs, Index, Unavailable, thumbnail_of

T = TypeVar("T")

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
        # Until when, by this node's clock, the spare ids' entries are surely still its
        # own: past it, another node may have swept them while this one could not renew.
        self._spares_held_until = -math.inf
        self._issuing = asyncio.Lock()
        # Each key in hand is journaled for this node, as is each spare id.
        self._in_hand: set[str] = set()
        # Held while keys not known beforehand are journaled for this node (taken over,
        # evicted): no claim here is granted one of them before they are in hand.
        self._taking = asyncio.Lock()
        # Keys in hand whose undoing failed (a dependency was down): tried again.
        self._to_undo: set[str] = set()

    async def new_id(self) -> str:
        """A fresh image id, already journaled for this node."""
        async with self._issuing:
            if self._spare_ids and time.monotonic() >= self._spares_held_until:
                # An upload given one that was swept would fail: those still journaled
                # for this node are let go, and a fresh batch journaled. They are dropped
                # even if the clearing fails here, as it may have committed there; left
                # unrenewed, they lapse.
                stale, self._spare_ids = self._spare_ids, []
                await self._index.unjournal(stale, self.owner)
            if not self._spare_ids:
                journaling = time.monotonic()
                batch = [str(uuid.uuid4()) for _ in range(SPARE_IDS)]
                await self._index.journal(batch, self.owner, self.lease)
                self._spare_ids.extend(batch)  # beside any a refusal gave back meanwhile
                self._spares_held_until = journaling + self.lease
            image_id = self._spare_ids.pop()
            self._in_hand.add(image_id)
            return image_id

    def give_back(self, image_id: str) -> None:
        """An id whose upload was refused before anything was stored: as good as new."""
        self._in_hand.discard(image_id)
        self._spare_ids.append(image_id)

    async def claim(self, key: str) -> bool:
        """Journal ``key`` for this node unless another node holds it, or another task here
        has it in hand; whether the caller has it in hand now. It lets go with ``done``
        once its work is recorded, or with ``undo``."""
        async with self._taking:
            if key in self._in_hand:
                return False
            self._in_hand.add(key)
        held = False
        try:
            held = await self._index.claim(key, self.owner, self.lease)
        finally:
            if not held:
                self._in_hand.discard(key)
        return held

    def done(self, key: str) -> None:
        """Let go of a key (or an id from ``new_id``) whose work is recorded, which cleared
        its entry."""
        self._in_hand.discard(key)

    async def take(
        self,
        journaling: Callable[[frozenset[str]], Awaitable[list[T]]],
        key: Callable[[T], str],
    ) -> list[T]:
        """Journal for this node what ``journaling`` chooses, told the keys in hand here
        (to leave alone, where it can), while no claim here begins; what it took is the
        caller's in hand now, to ``undo``. A key in hand already is left to its holder,
        which has the entry now."""
        async with self._taking:
            journaled = await journaling(frozenset(self._in_hand))
            taken = [item for item in journaled if key(item) not in self._in_hand]
            self._in_hand.update(map(key, taken))
        return taken

    async def undo(self, keys: Collection[str], *, cause: BaseException | None = None) -> None:
        """Remove the blobs of these entries that no record names, then clear them and let
        go of them; what cannot be done now is done by a later ``settle``. The caller has
        the keys in hand, or journaled them itself. Never fails the caller.

        Work that failed because a dependency did (``cause`` is ``Unavailable``) is left
        to that ``settle`` at once: asking it again now would most likely hold the caller,
        already due a 503, for another whole timeout."""
        self._in_hand.update(keys)
        if isinstance(cause, Unavailable):
            self._to_undo.update(keys)
        else:
            await self._settle(keys)

    async def settle(self) -> None:
        """Undo what this node could not undo earlier."""
        await self._settle(list(self._to_undo))

    async def _settle(self, keys: Collection[str]) -> None:
        if not keys:
            return
        try:
            # An entry another node took over while this one was stopped is theirs to undo:
            # its blob may be theirs by now.
            held = [key for key in keys if await self._index.claim(key, self.owner, self.lease)]
            await self._undo(held)
        except Exception as error:
            if not isinstance(error, Unavailable) and not is_full(error):
                _log.exception("could not undo %d journaled entries", len(keys))
            self._to_undo.update(keys)
            return
        except BaseException:
            self._to_undo.update(keys)
            raise
        self._to_undo.difference_update(keys)
        self._in_hand.difference_update(keys)

    async def _undo(self, keys: Collection[str]) -> None:
        for key in keys:
            if (thumbnail := thumbnail_of(key)) is not None:
                _, kept = await self._index.image_and_thumbnail(*thumbnail)
                if kept is None:
                    await self._blobs.delete([key])
            elif await self._index.get(key) is None:
                await self._blobs.delete_image(key)
        await self._index.unjournal(keys, self.owner)

    async def sweep(self) -> None:
        """Take over the entries of other nodes (or of this one's earlier runs) whose
        lease expired, and undo them."""
        while taken := await self.take(self._take_expired, str):
            try:
                await self._undo(taken)
            except BaseException:  # a stop too: cancelled, it is settled as the node closes
                self._to_undo.update(taken)  # in hand: settled later
                raise
            self._in_hand.difference_update(taken)
            if len(taken) < _SWEEP_BATCH:
                break

    async def _take_expired(self, in_hand: frozenset[str]) -> list[str]:
        keep = in_hand.union(self._spare_ids)
        return await self._index.take_expired(self.owner, self.lease, _SWEEP_BATCH, keep)

    async def renew(self) -> None:
        renewing = time.monotonic()
        asked = self._in_hand.union(self._spare_ids)
        renewed = await self._index.renew(self.owner, self.lease, asked)
        # A spare id whose entry is gone (swept by another node while this renewal was on
        # its way) would fail the upload given it.
        gone = asked.difference(renewed)
        self._spare_ids = [image_id for image_id in self._spare_ids if image_id not in gone]
        if renewing < self._spares_held_until:  # else they may be gone already
            self._spares_held_until = renewing + self.lease

    async def close(self) -> None:
        """Let go of the ids journaled ahead and not used (no blob has any of them), and
        undo the entries of this node's that it never learnt of and those it could not
        undo before. What else is in hand is left to lapse: its work may still be
        running."""
        lost: list[str] = []
        async with self._issuing, self._taking:  # no write of this node's is unanswered
            spare, self._spare_ids = self._spare_ids, []
            try:
                await self._index.unjournal(spare, self.owner)
                entries = await self._index.journaled()
            except Exception as error:  # they lapse, and another node's sweep undoes them
                if isinstance(error, Unavailable):
                    _log.warning("could not clear this node's journal entries: %s", error)
                else:
                    _log.exception("could not clear this node's journal entries")
            else:
                lost = [
                    entry.key
                    for entry in entries
                    if entry.owner == self.owner and entry.key not in self._in_hand
                ]
                self._in_hand.update(lost)
        await self._settle([*lost, *self._to_undo])
