"""The index port's contract, held by both implementations: SQLite in a file, and
PostgreSQL in a database of the test's own. What only the shared index promises follows
at the end: several nodes at once, and faults answered within the timeout."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from asgilook_aiohttp.storage.ports import (
    Deleted,
    ImageRecord,
    Index,
    LeaseLost,
    ThumbnailRecord,
    Totals,
    Unavailable,
    UnknownCursor,
    thumbnail_key,
)
from asgilook_aiohttp.storage.sqlite import SqliteIndex

from engine_postgres import Postgres

if TYPE_CHECKING:
    import asyncpg

    from asgilook_aiohttp.storage.postgres import PostgresIndex

LEASE = 60.0
EXPIRED = -1.0  # a lease run out already
A, B, C = "node-a", "node-b", "node-c"

OpenIndex = Callable[[], Awaitable[Index]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenIndex]:
    """Opens an index on the test's library, as a node (re)starting would."""
    if request.param == "sqlite":

        def make() -> Index:
            return SqliteIndex(tmp_path / "index.sqlite3", tmp_path / "index.sqlite3-reserve")
    else:
        url = request.getfixturevalue("postgres_url")

        def make() -> Index:
            return postgres_index(url)

    opened: list[Index] = []

    async def open_() -> Index:
        index = make()
        await index.open()
        opened.append(index)
        return index

    yield open_
    for index in opened:
        await index.close()


@pytest.fixture
async def index(open_index: OpenIndex) -> Index:
    return await open_index()


# The extra's modules are imported where they are used, by tests that ask for PostgreSQL:
# where they are missing, its fixture skips those tests first, and the others run.


def postgres_index(url: str, timeout: float = 5) -> PostgresIndex:
    from asgilook_aiohttp.storage.postgres import PostgresIndex  # noqa: PLC0415

    return PostgresIndex(url, password=None, timeout=timeout)


async def connect(url: str) -> asyncpg.Connection[asyncpg.Record]:
    import asyncpg  # noqa: PLC0415

    return await asyncpg.connect(url)


def image(n: int, nbytes: int = 1000, *, token: str | None = None) -> ImageRecord:
    return ImageRecord(
        id=str(uuid.UUID(int=n)),
        uploaded=1_700_000_000 + n,
        width=640,
        height=480,
        nbytes=nbytes,
        sha256=f"{n:064x}",
        delete_token_sha256=token,
    )


def thumbnail(of: ImageRecord, side: int, last_used: int = 0, nbytes: int = 10) -> ThumbnailRecord:
    return ThumbnailRecord(of.id, side, side, nbytes, f"{side:064x}", last_used)


def key(record: ThumbnailRecord) -> str:
    return thumbnail_key(record.image_id, record.width, record.height)


async def store(index: Index, *records: ImageRecord, owner: str = A) -> None:
    await index.journal([record.id for record in records], owner, LEASE)
    for record in records:
        await index.add(record, owner)


async def keep(index: Index, *thumbnails: ThumbnailRecord, owner: str = A) -> None:
    for record in thumbnails:
        assert await index.claim(key(record), owner, LEASE)
        assert await index.add_thumbnail(record, owner) == 0


async def test_images_are_recorded_and_counted(index: Index) -> None:
    first, second = image(1, 1000, token="t" * 64), image(2, 2500)
    assert await index.totals() == Totals(0, 0, 0)
    await store(index, first, second)
    assert await index.get(first.id) == first
    assert await index.get(second.id) == second
    assert await index.get(image(3).id) is None
    assert await index.totals() == Totals(2, 3500, 0)


async def test_pages_newest_first_follow_upload_order_backwards(index: Index) -> None:
    assert await index.page(10, None, newest_first=True) == ([], False)
    records = [image(n) for n in (5, 3, 9, 1)]
    for record in records:
        await store(index, record)
    ids = [record.id for record in reversed(records)]

    first, more = await index.page(2, None, newest_first=True)
    assert [r.id for r in first] == ids[:2]
    assert more
    rest, more = await index.page(2, ids[1], newest_first=True)
    assert [r.id for r in rest] == ids[2:]
    assert not more
    # An image added meanwhile is newer than where the reading began: not met again.
    await store(index, image(7))
    assert await index.page(2, ids[3], newest_first=True) == ([], False)
    # A page's last image deleted: its place is remembered, the next page still follows.
    assert await index.delete(ids[1], None, A, LEASE) is not None
    rest, more = await index.page(1, ids[1], newest_first=True)
    assert [r.id for r in rest] == ids[2:3]
    assert more


async def test_pages_follow_upload_order(index: Index) -> None:
    assert await index.page(10, None) == ([], False)
    records = [image(n) for n in (5, 3, 9, 1)]
    for record in records:
        await store(index, record)
    ids = [record.id for record in records]

    first, more = await index.page(2, None)
    assert [r.id for r in first] == ids[:2]
    assert more
    rest, more = await index.page(2, ids[1])
    assert [r.id for r in rest] == ids[2:]
    assert not more
    assert await index.page(2, ids[3]) == ([], False)
    everything, more = await index.page(4, None)
    assert everything == records
    assert not more
    # A page's last image deleted: its place is remembered, the next page still follows.
    assert await index.delete(ids[1], None, A, LEASE) is not None
    rest, more = await index.page(1, ids[1])
    assert [r.id for r in rest] == ids[2:3]
    assert more
    with pytest.raises(UnknownCursor):
        await index.page(2, image(7).id)


async def test_an_image_is_added_only_by_the_holder_of_its_entry(index: Index) -> None:
    record = image(1)
    with pytest.raises(LeaseLost):
        await index.add(record, A)  # never journaled
    await index.journal([record.id], B, LEASE)
    with pytest.raises(LeaseLost):
        await index.add(record, A)
    assert await index.get(record.id) is None
    await index.add(record, B)
    assert await index.get(record.id) == record
    assert await index.totals() == Totals(1, record.nbytes, 0)


async def test_an_image_whose_entry_was_taken_over_is_not_added(index: Index) -> None:
    lost, late = image(1), image(2)
    await index.journal([lost.id, late.id], A, EXPIRED)
    assert await index.take_expired(B, LEASE, 1, []) == [lost.id]
    with pytest.raises(LeaseLost):
        await index.add(lost, A)
    assert await index.get(lost.id) is None
    # Expired but not taken over: still the owner's to finish.
    await index.add(late, A)
    assert await index.get(late.id) == late
    assert await index.take_expired(C, LEASE, 10, []) == []  # the entry went with the add
    assert await index.totals() == Totals(1, late.nbytes, 0)


async def test_delete_removes_an_image_and_journals_its_id(index: Index) -> None:
    record = image(1, 1000, token="t" * 64)
    await store(index, record)
    await keep(index, thumbnail(record, 100, nbytes=30), thumbnail(record, 200, nbytes=70))

    assert await index.delete(record.id, "w" * 64, A, LEASE) is None
    assert await index.get(record.id) == record
    assert await index.delete(record.id, "t" * 64, A, LEASE) == Deleted(1000, 100)
    assert await index.get(record.id) is None
    assert await index.image_and_thumbnail(record.id, 100, 100) == (None, None)
    assert await index.totals() == Totals(0, 0, 0)
    assert await index.delete(record.id, None, A, LEASE) is None
    # Journaled for A until its blobs are gone.
    assert not await index.claim(record.id, B, LEASE)
    await index.unjournal([record.id], B)
    assert not await index.claim(record.id, B, LEASE)
    await index.unjournal([record.id], A)
    assert await index.claim(record.id, B, LEASE)


async def test_delete_without_a_token_takes_any_image(index: Index) -> None:
    tokened, untokened = image(1, token="t" * 64), image(2)
    await store(index, tokened, untokened)
    assert await index.delete(untokened.id, "t" * 64, A, LEASE) is None
    assert await index.delete(tokened.id, None, A, LEASE) == Deleted(tokened.nbytes, 0)
    assert await index.delete(untokened.id, None, A, LEASE) == Deleted(untokened.nbytes, 0)
    assert await index.totals() == Totals(0, 0, 0)


async def test_a_claim_is_held_until_its_lease_expires(index: Index) -> None:
    assert await index.claim("k", A, LEASE)
    assert not await index.claim("k", B, LEASE)
    assert await index.claim("k", A, LEASE)  # still A's
    assert await index.claim("expiring", A, EXPIRED)
    assert await index.claim("expiring", B, LEASE)  # taken over
    assert not await index.claim("expiring", A, LEASE)


async def test_only_the_owner_clears_or_renews_its_entries(index: Index) -> None:
    await index.journal(["a1", "a2"], A, EXPIRED)
    await index.journal(["b1", "b2"], B, EXPIRED)
    await index.unjournal(["a1", "b1"], A)
    await index.renew(B, LEASE, ["b1", "b2", "a2"])
    assert await index.take_expired(C, LEASE, 10, []) == ["a2"]
    await index.renew(C, EXPIRED, ["a2"])
    assert await index.take_expired(A, LEASE, 10, []) == ["a2"]


async def test_only_the_entries_named_are_renewed(index: Index) -> None:
    # One a write whose answer was lost left, say: the node never learnt of it.
    await index.journal(["known", "unknown"], A, EXPIRED)
    await index.renew(A, LEASE, ["known"])
    assert await index.take_expired(B, LEASE, 10, []) == ["unknown"]


async def test_a_renewal_says_which_entries_the_owner_still_held(index: Index) -> None:
    await index.journal(["kept"], A, LEASE)
    await index.journal(["swept"], A, EXPIRED)
    assert await index.take_expired(B, LEASE, 10, []) == ["swept"]
    assert await index.renew(A, LEASE, ["kept", "swept", "never"]) == ["kept"]


async def test_a_node_takes_over_its_own_expired_entries_but_those_it_keeps(
    index: Index,
) -> None:
    # Its work on those it keeps may still be under way: the add of an upload whose
    # lease ran out while the index was unreachable, say. The others are lost writes'.
    await index.journal(["in-hand", "lost"], A, EXPIRED)
    assert await index.take_expired(A, LEASE, 10, ["in-hand", "lost-elsewhere"]) == ["lost"]
    assert await index.take_expired(A, LEASE, 10, ["in-hand"]) == []
    # Another node keeps nothing of A's.
    assert await index.take_expired(B, LEASE, 10, ["in-hand"]) == ["in-hand"]


async def test_journaling_again_renews_only_the_owner_s_own_entry(index: Index) -> None:
    await index.journal(["mine", "theirs"], A, EXPIRED)
    await index.journal(["mine"], A, LEASE)
    await index.journal(["theirs"], B, LEASE)
    assert await index.take_expired(C, LEASE, 10, []) == ["theirs"]


async def test_expired_entries_are_taken_over_a_batch_at_a_time(index: Index) -> None:
    expired = [f"expired-{n}" for n in range(5)]
    await index.journal(expired, A, EXPIRED)
    await index.journal(["current"], A, LEASE)
    first = await index.take_expired(B, LEASE, 3, [])
    rest = await index.take_expired(B, LEASE, 10, [])
    assert len(first) == 3
    assert sorted(first + rest) == expired
    assert await index.take_expired(C, LEASE, 10, []) == []
    # B holds them now: A's clearing leaves them.
    await index.unjournal(expired, A)
    await index.renew(B, EXPIRED, expired)
    assert sorted(await index.take_expired(C, LEASE, 10, [])) == expired


async def test_nodes_taking_over_at_once_never_take_the_same_entry(
    index: Index, open_index: OpenIndex
) -> None:
    expired = [f"expired-{n:03d}" for n in range(300)]
    await index.journal(expired, A, EXPIRED)
    # Each taker a node of its own: with SQLite, a process with its own connection.
    takers = [await open_index() for _ in range(4)]

    async def take_all(taker: Index, owner: str) -> list[str]:
        taken: list[str] = []
        while batch := await taker.take_expired(owner, LEASE, 7, []):
            taken += batch
        return taken

    batches = await asyncio.gather(
        *(take_all(taker, f"taker-{n}") for n, taker in enumerate(takers))
    )
    everything = [key for batch in batches for key in batch]
    assert sorted(everything) == expired  # each once


async def test_thumbnails_are_recorded_by_the_holder_of_their_claim(index: Index) -> None:
    record = image(1)
    await store(index, record)
    small = thumbnail(record, 100, last_used=5, nbytes=30)
    with pytest.raises(LeaseLost):
        await index.add_thumbnail(small, A)
    assert await index.image_and_thumbnail(record.id, 100, 100) == (record, None)

    assert await index.claim(key(small), A, LEASE)
    assert await index.add_thumbnail(small, A) == 0
    assert await index.image_and_thumbnail(record.id, 100, 100) == (record, small)
    assert await index.image_and_thumbnail(record.id, 200, 200) == (record, None)
    assert await index.image_and_thumbnail(image(2).id, 100, 100) == (None, None)
    assert await index.claim(key(small), B, LEASE)  # the claim went with the record
    await index.unjournal([key(small)], B)

    remade = thumbnail(record, 100, last_used=9, nbytes=45)
    assert await index.claim(key(remade), A, LEASE)
    assert await index.add_thumbnail(remade, A) == 30
    assert await index.image_and_thumbnail(record.id, 100, 100) == (record, remade)
    assert await index.totals() == Totals(1, record.nbytes, 45)

    await index.touch_thumbnail(remade, 1234)
    _, touched = await index.image_and_thumbnail(record.id, 100, 100)
    assert touched is not None
    assert touched.last_used == 1234


async def test_a_thumbnail_of_a_deleted_image_is_not_recorded(index: Index) -> None:
    record = image(1)
    await store(index, record)
    orphan = thumbnail(record, 100)
    assert await index.claim(key(orphan), A, LEASE)
    await index.delete(record.id, None, A, LEASE)
    assert await index.add_thumbnail(orphan, A) is None
    # Its claim stays with its holder, who has a blob to remove.
    assert not await index.claim(key(orphan), B, LEASE)
    assert await index.totals() == Totals(0, 0, 0)


async def test_a_thumbnail_whose_claim_was_taken_over_is_not_recorded(index: Index) -> None:
    record = image(1)
    await store(index, record)
    late = thumbnail(record, 100)
    assert await index.claim(key(late), A, EXPIRED)
    assert await index.take_expired(B, LEASE, 10, []) == [key(late)]
    with pytest.raises(LeaseLost):
        await index.add_thumbnail(late, A)
    assert await index.image_and_thumbnail(record.id, 100, 100) == (record, None)
    assert await index.totals() == Totals(1, record.nbytes, 0)


async def test_eviction_takes_the_least_recently_used_and_journals_them(index: Index) -> None:
    record = image(1)
    await store(index, record)
    by_age = [thumbnail(record, 100 + n, last_used=n, nbytes=10) for n in range(6)]
    await keep(index, *reversed(by_age))
    spared, remade, *evictable = by_age
    assert await index.claim(key(remade), B, LEASE)  # being made again

    assert await index.evict_thumbnails(0, [], A, LEASE) == []
    assert await index.evict_thumbnails(25, [key(spared)], A, LEASE) == evictable[:3]
    for gone in evictable[:3]:
        assert await index.image_and_thumbnail(record.id, gone.width, gone.height) == (record, None)
        assert not await index.claim(key(gone), C, LEASE)  # journaled for A
    assert await index.totals() == Totals(1, record.nbytes, 30)

    rest = await index.evict_thumbnails(1000, [], A, LEASE)
    assert rest == [spared, evictable[3]]
    assert await index.totals() == Totals(1, record.nbytes, 10)
    _, kept = await index.image_and_thumbnail(record.id, remade.width, remade.height)
    assert kept == remade


async def test_a_healthy_index_has_no_problem(index: Index) -> None:
    await index.catch_up()
    assert await index.problem() is None
    assert index.full() is None
    assert index.name in {"SQLite", "PostgreSQL"}


async def test_thumbnails_are_read_in_batches_in_key_order(index: Index) -> None:
    first, second = image(2), image(1)
    await store(index, first, second)
    kept = [thumbnail(first, 300), thumbnail(second, 20), thumbnail(second, 100)]
    await keep(index, *kept)
    in_order = sorted(kept, key=lambda record: (record.image_id, record.width, record.height))
    batch = await index.thumbnail_page(2, None)
    assert batch == in_order[:2]
    last = batch[-1]
    assert await index.thumbnail_page(2, (last.image_id, last.width, last.height)) == in_order[2:]
    assert await index.thumbnail_page(2, (kept[0].image_id, 300, 300)) == []


async def test_journal_entries_are_listed_with_their_leases(index: Index) -> None:
    await index.journal(["current"], A, LEASE)
    await index.journal(["expired"], B, EXPIRED)
    entries = {entry.key: entry for entry in await index.journaled()}
    assert entries.keys() == {"current", "expired"}
    assert entries["current"].owner == A
    assert 0 < entries["current"].expires_in <= LEASE
    assert entries["expired"].owner == B
    assert entries["expired"].expires_in < 0


async def test_a_thumbnail_is_forgotten_only_as_it_was_read(index: Index) -> None:
    record = image(1)
    await store(index, record)
    forgotten, replaced, claimed = (
        thumbnail(record, 10),
        thumbnail(record, 20),
        thumbnail(record, 30),
    )
    await keep(index, forgotten, replaced, claimed)
    assert await index.forget_thumbnail(forgotten, A, LEASE) == [forgotten]
    assert await index.image_and_thumbnail(record.id, 10, 10) == (record, None)
    assert await index.totals() == Totals(1, record.nbytes, 20)
    assert [(e.key, e.owner) for e in await index.journaled()] == [(key(forgotten), A)]
    await index.unjournal([key(forgotten)], A)
    assert await index.forget_thumbnail(forgotten, A, LEASE) == []  # gone already

    stale = ThumbnailRecord(record.id, 20, 20, 10, "0" * 64, 0)  # read before it was made again
    assert await index.forget_thumbnail(stale, A, LEASE) == []
    assert await index.claim(key(claimed), B, LEASE)  # being removed, or made again
    assert await index.forget_thumbnail(claimed, A, LEASE) == []
    assert await index.thumbnail_page(10, None) == [replaced, claimed]
    assert await index.totals() == Totals(1, record.nbytes, 20)
    assert [(e.key, e.owner) for e in await index.journaled()] == [(key(claimed), B)]


async def test_a_sound_index_verifies(index: Index) -> None:
    assert await index.verify() == []
    record = image(1)
    await store(index, record)
    await keep(index, thumbnail(record, 100))
    await index.delete(image(1).id, None, A, LEASE)
    await store(index, image(2))
    assert await index.verify() == []


async def test_totals_that_do_not_add_up_are_found_by_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    index = SqliteIndex(path, tmp_path / "reserve")
    await index.open()
    try:
        await store(index, image(1, nbytes=700))
        with sqlite3.connect(path) as db:
            db.execute("UPDATE totals SET images = 5")
        assert await index.verify() == [
            "the totals say 5 images of 700 bytes and 0 bytes of thumbnails; the records "
            "add up to 1 images of 700 bytes and 0 bytes of thumbnails"
        ]
    finally:
        await index.close()


async def test_a_reopened_index_has_everything(index: Index, open_index: OpenIndex) -> None:
    record = image(1, token="t" * 64)
    await store(index, record)
    kept = thumbnail(record, 100, nbytes=30)
    await keep(index, kept)
    await index.journal(["left"], A, EXPIRED)
    await index.close()

    again = await open_index()
    assert await again.page(10, None) == ([record], False)
    assert await again.image_and_thumbnail(record.id, 100, 100) == (record, kept)
    assert await again.totals() == Totals(1, record.nbytes, 30)
    assert await again.take_expired(B, LEASE, 10, []) == ["left"]


# PostgreSQL only: several nodes at once.


async def nodes(url: str, count: int) -> list[PostgresIndex]:
    opened = [postgres_index(url) for _ in range(count)]
    await asyncio.gather(*(node.open() for node in opened))
    return opened


async def close(opened: list[PostgresIndex]) -> None:
    await asyncio.gather(*(node.close() for node in opened))


async def test_nodes_starting_at_once_create_the_schema_once(postgres_url: str) -> None:
    started = await nodes(postgres_url, 4)
    try:
        await store(started[0], image(1))
        assert await started[3].totals() == Totals(1, 1000, 0)
    finally:
        await close(started)


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    (node,) = await nodes(postgres_url, 1)
    await node.close()
    db = await connect(postgres_url)
    try:
        await db.execute("UPDATE schema_version SET version = 99")
    finally:
        await db.close()
    with pytest.raises(RuntimeError, match=r"schema version 99.*upgrade asgilook-aiohttp"):
        await postgres_index(postgres_url).open()


# Each insert waits a moment before its commit, as on a busy server: the window in which a
# number is taken and not yet committed, which paging must never pass.
JITTER = """
CREATE FUNCTION jitter() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(random() * 0.004);
    RETURN NULL;
END $$;
CREATE TRIGGER jitter AFTER INSERT ON images FOR EACH ROW EXECUTE FUNCTION jitter();
"""
Add = Callable[[ImageRecord], Awaitable[object]]


async def follow_while_adding(url: str, adders: list[Add]) -> tuple[list[str], list[str], int]:
    """Page through the listing as a client following it does, on from where it stopped,
    again and again while each adder adds a dozen images, then once more to the end.

    Returns what the client saw, what was committed, and how often it reached the end
    while images were being added."""
    db = await connect(url)
    try:
        await db.execute(JITTER)
    finally:
        await db.close()
    reader = postgres_index(url)
    await reader.open()
    committed: list[str] = []
    seen: list[str] = []

    async def upload(add: Add, first: int) -> None:
        for record in map(image, range(first, first + 12)):
            await add(record)
            committed.append(record.id)

    async def to_the_end() -> None:
        more = True
        while more:
            page, more = await reader.page(5, seen[-1] if seen else None)
            seen.extend(record.id for record in page)

    try:
        uploading = asyncio.gather(*(upload(add, 100 * n) for n, add in enumerate(adders)))
        ends = 0
        while not uploading.done():
            await to_the_end()
            ends += 1
        await uploading
        await to_the_end()
    finally:
        await reader.close()
    return seen, committed, ends


async def test_paging_is_exact_while_nodes_add_images_at_once(postgres_url: str) -> None:
    writers = await nodes(postgres_url, 3)

    def adder(node: PostgresIndex, owner: str) -> Add:
        async def add(record: ImageRecord) -> None:
            await node.journal([record.id], owner, LEASE)
            await node.add(record, owner)

        return add

    try:
        adders = [adder(node, f"{n}-{task}") for n, node in enumerate(writers) for task in range(4)]
        seen, committed, ends = await follow_while_adding(postgres_url, adders)
    finally:
        await close(writers)
    assert ends > 10  # the client kept up with the uploads
    assert sorted(seen) == sorted(committed)  # each once, none passed


async def test_paging_would_pass_images_numbered_by_a_sequence(postgres_url: str) -> None:
    """The test above fails where numbers are not taken in commit order: with the same
    load, where they come from a sequence (as they do not in the index)."""
    import asyncpg  # noqa: PLC0415

    await close(await nodes(postgres_url, 1))
    writers = await asyncpg.create_pool(postgres_url, min_size=0, max_size=12)
    try:
        await writers.execute("CREATE SEQUENCE numbers")

        async def add(record: ImageRecord) -> None:
            await writers.execute(
                "INSERT INTO images (seq, id, uploaded, width, height, bytes, sha256) "
                "VALUES (nextval('numbers'), $1, 0, 1, 1, 1, '')",
                record.id,
            )

        seen, committed, _ = await follow_while_adding(postgres_url, [add] * 12)
    finally:
        await writers.close()
    assert len(seen) == len(set(seen))
    assert set(committed) - set(seen)  # passed, and never met


async def test_an_add_waits_for_the_number_an_earlier_one_holds(postgres_url: str) -> None:
    """Why the index never numbers out of commit order: each add takes its number from
    one row, whose lock it holds until it commits."""
    (index,) = await nodes(postgres_url, 1)
    db = await connect(postgres_url)
    record = image(1)
    try:
        await index.journal([record.id], A, LEASE)
        earlier = db.transaction()
        await earlier.start()
        await db.execute("UPDATE totals SET last_seq = last_seq + 1")  # as an add does
        adding = asyncio.ensure_future(index.add(record, A))
        await asyncio.sleep(0.2)
        assert not adding.done()
        await earlier.rollback()
        await adding
        assert await index.page(10, None) == ([record], False)
    finally:
        await asyncio.gather(db.close(), index.close())


async def test_nodes_evicting_at_once_never_evict_the_same_thumbnail(postgres_url: str) -> None:
    evictors = await nodes(postgres_url, 2)
    try:
        records = [image(n) for n in range(20)]
        await store(evictors[0], *records)
        thumbnails = [
            thumbnail(record, side, last_used=n * 10 + side % 7, nbytes=10)
            for n, record in enumerate(records)
            for side in (100, 200, 300)
        ]
        await asyncio.gather(*(keep(evictors[0], record) for record in thumbnails))

        async def evict_all(node: PostgresIndex, owner: str) -> list[ThumbnailRecord]:
            evicted: list[ThumbnailRecord] = []
            while batch := await node.evict_thumbnails(25, [], owner, LEASE):
                evicted += batch
            return evicted

        owners = [
            (node, f"evictor-{n}-{task}") for n, node in enumerate(evictors) for task in range(3)
        ]
        evictions = await asyncio.gather(*(evict_all(node, owner) for node, owner in owners))
        everything = [record for evicted in evictions for record in evicted]
        assert sorted(map(key, everything)) == sorted(map(key, thumbnails))  # each once
        assert await evictors[1].totals() == Totals(20, 20_000, 0)
        for (_, owner), evicted in zip(owners, evictions, strict=True):
            assert not any([await evictors[0].claim(key(record), C, LEASE) for record in evicted])
            await evictors[1].unjournal(list(map(key, evicted)), owner)
        assert await evictors[1].take_expired(C, EXPIRED, 1000, []) == []
    finally:
        await close(evictors)


# PostgreSQL only: faults.


async def unavailable_in_time(call: Callable[[], Awaitable[object]], seconds: float) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        await call()
    assert time.monotonic() - started < seconds + 0.5
    assert raised.value.dependency == "PostgreSQL"


async def recovered(call: Callable[[], Awaitable[object]]) -> None:
    """Service resumes by itself: at most one call meets a connection broken meanwhile."""
    try:
        await call()
    except Unavailable:
        await call()


async def test_a_stopped_postgresql_is_unavailable_until_it_is_back(
    postgres: Postgres, postgres_url: str
) -> None:
    node = postgres_index(postgres_url, timeout=1)
    await node.open()
    record = image(1)
    try:
        await store(node, record)
        postgres.stop()
        try:
            for call in (
                lambda: node.get(record.id),
                lambda: node.page(10, None),
                lambda: node.add(image(2), A),
                lambda: node.delete(record.id, None, A, LEASE),
                node.totals,
                postgres_index(postgres_url, timeout=1).open,
            ):
                await unavailable_in_time(call, 1)
            problem = await node.problem()
            assert problem is not None
            assert problem.startswith("PostgreSQL is unavailable: ")
        finally:
            postgres.start()
        await recovered(lambda: node.get(record.id))
        assert await node.get(record.id) == record
        assert await node.problem() is None
    finally:
        await node.close()


async def test_a_frozen_postgresql_is_unavailable_within_the_timeout(
    postgres: Postgres, postgres_url: str
) -> None:
    node = postgres_index(postgres_url, timeout=1)
    await node.open()
    record = image(1)
    try:
        await store(node, record)
        postgres.freeze()
        try:
            for call in (
                lambda: node.get(record.id),  # on a connection open before
                lambda: node.delete(record.id, None, A, LEASE),  # on a new one
            ):
                await unavailable_in_time(call, 1)
            started = time.monotonic()
            assert "no connection within 1 s" in (await node.problem() or "")
            assert time.monotonic() - started < 1.5
        finally:
            postgres.thaw()
        await recovered(lambda: node.get(record.id))
        assert await node.get(record.id) == record
        assert await node.problem() is None
    finally:
        await node.close()


async def test_totals_and_numbers_that_do_not_add_up_are_found_by_postgresql(
    postgres_url: str,
) -> None:
    index = postgres_index(postgres_url)
    await index.open()
    try:
        await store(index, image(1, nbytes=700))
        db = await connect(postgres_url)
        try:
            await db.execute("UPDATE totals SET thumbnail_bytes = 9, last_seq = 0")
        finally:
            await db.close()
        assert await index.verify() == [
            "the totals say 1 images of 700 bytes and 9 bytes of thumbnails; the records "
            "add up to 1 images of 700 bytes and 0 bytes of thumbnails",
            "the totals' last seq is 0, below the highest image's, 1: the next upload would "
            "be refused",
        ]
    finally:
        await index.close()
