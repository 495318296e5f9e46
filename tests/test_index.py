"""The SQLite index on its own: pages by key lookups, lookups by id on the event loop, an
index of an earlier release upgraded in place, and a full disk, on which deleting and
opening still work."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from asgilook_aiohttp.space import Reserve, is_full
from asgilook_aiohttp.storage.ports import ImageRecord, ThumbnailRecord, Totals, thumbnail_key
from asgilook_aiohttp.storage.sqlite import CURSOR_QUERY, PAGE_QUERY, SqliteIndex

import disks

OWNER = "node"
LEASE = 60.0


def image(n: int) -> ImageRecord:
    return ImageRecord(f"00000000-0000-4000-8000-{n:012d}", n, 1, 1, 1000, "0" * 64)


def open_index(directory: Path) -> SqliteIndex:
    return SqliteIndex(directory / "index.sqlite3", directory / "index.sqlite3-reserve")


async def store(index: SqliteIndex, record: ImageRecord) -> None:
    await index.journal([record.id], OWNER, LEASE)
    await index.add(record, OWNER)


async def test_page_queries_search_by_key_at_any_depth(tmp_path: Path) -> None:
    index = open_index(tmp_path)
    await index.open()
    await store(index, image(0))
    await index.close()

    with closing(sqlite3.connect(tmp_path / "index.sqlite3")) as db:
        cursor_plan, page_plan = (
            [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", args)]
            for query, args in ((CURSOR_QUERY, ("x", "x")), (PAGE_QUERY, (0, 100)))
        )
    searches = [step for step in cursor_plan if step.startswith(("SEARCH", "SCAN"))]
    assert len(searches) == 2  # images and tombstones, each by its key
    assert all(step.startswith("SEARCH") and "(id=?)" in step for step in searches)
    assert page_plan == ["SEARCH images USING INTEGER PRIMARY KEY (rowid>?)"]


async def no_thread(fn: Callable[[], object]) -> object:
    raise AssertionError("the index's thread was asked")


async def test_lookups_by_id_are_answered_on_the_loop_and_see_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = open_index(tmp_path)
    await index.open()
    try:
        record = image(1)
        await store(index, record)
        kept = ThumbnailRecord(record.id, 10, 10, 100, "1" * 64, 5)
        await index.journal([thumbnail_key(record.id, 10, 10)], OWNER, LEASE)
        await index.add_thumbnail(kept, OWNER)
        with monkeypatch.context() as patched:
            patched.setattr(index, "_run", no_thread)
            assert await index.get(record.id) == record
            assert await index.image_and_thumbnail(record.id, 10, 10) == (record, kept)
            assert await index.image_and_thumbnail(record.id, 20, 20) == (record, None)
        await index.delete(record.id, None, OWNER, LEASE)
        with monkeypatch.context() as patched:
            patched.setattr(index, "_run", no_thread)
            assert await index.get(record.id) is None
            assert await index.image_and_thumbnail(record.id, 10, 10) == (None, None)
    finally:
        await index.close()


# The index as the release before leases left it (schema version 3).
_EARLIER_RELEASE = """
CREATE TABLE images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    uploaded INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    delete_token_sha256 TEXT
);
CREATE TABLE pending (id TEXT PRIMARY KEY);
CREATE TABLE thumbnails (
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (image_id, width, height)
);
CREATE INDEX thumbnails_by_last_use ON thumbnails (last_used);
CREATE TABLE tombstones (id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
INSERT INTO images VALUES (1, 'first', 1, 10, 10, 1000, 'a', NULL);
INSERT INTO images VALUES (2, 'second', 2, 10, 10, 2500, 'b', NULL);
INSERT INTO thumbnails VALUES ('second', 5, 5, 40, 'c', 7);
INSERT INTO pending VALUES ('crashed-upload'), ('crashed-delete');
PRAGMA user_version = 3;
"""


async def test_an_index_of_an_earlier_release_is_upgraded(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "index.sqlite3")) as db:
        db.executescript(_EARLIER_RELEASE)
    index = open_index(tmp_path)
    await index.open()
    try:
        assert await index.totals() == Totals(images=2, image_bytes=3500, thumbnail_bytes=40)
        # What it left journaled has no owner nor lease: the first sweep takes it over.
        taken = await index.take_expired(OWNER, LEASE, 10, [])
        assert sorted(taken) == ["crashed-delete", "crashed-upload"]
        records, _ = await index.page(10, None)
        assert [record.id for record in records] == ["first", "second"]
        await store(index, image(3))
        assert await index.totals() == Totals(images=3, image_bytes=4500, thumbnail_bytes=40)
    finally:
        await index.close()


async def test_an_index_of_a_later_release_is_refused(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / "index.sqlite3")) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="upgrade asgilook-aiohttp"):
        await open_index(tmp_path).open()


# A full disk: a file system of the test's own, filled to the last byte.


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    yield from disks.tmpfs(tmp_path / "disk", "8m")


def fill(disk: Path) -> Path:
    return disks.fill(disk, disk / "index.sqlite3")


async def test_a_delete_on_a_full_disk_takes_the_reserve_until_there_is_room(disk: Path) -> None:
    index = open_index(disk)
    await index.open()
    try:
        kept, deleted = image(1), image(2)
        for record in (kept, deleted):
            await store(index, record)
        filler = fill(disk)

        assert await index.delete(deleted.id, None, OWNER, LEASE) is not None
        assert (reason := index.full()) is not None
        assert reason.startswith("the room kept for deletions on a full disk is in use")
        assert await index.problem() == reason
        await index.catch_up()  # no room yet: nothing changes
        assert index.full() == reason

        filler.unlink()
        await index.catch_up()
        assert index.full() is None
        assert await index.problem() is None
        assert await index.totals() == Totals(1, kept.nbytes, 0)
    finally:
        await index.close()


async def test_an_index_opened_on_a_full_disk_is_shared_once_there_is_room(disk: Path) -> None:
    first = open_index(disk)
    await first.open()
    record = image(1)
    await store(first, record)
    await first.close()  # which removes the shared-memory file it needs to open
    filler = fill(disk)

    index = open_index(disk)
    await index.open()
    try:
        assert await index.get(record.id) == record
        assert await index.problem() == (
            "the index is held by this process alone for lack of room for its shared "
            "memory; backups wait"
        )
        filler.unlink()
        await index.catch_up()
        assert await index.problem() is None
        with pytest.MonkeyPatch.context() as patched:  # and it has room for a reader
            patched.setattr(index, "_run", no_thread)
            assert await index.get(record.id) == record
        with closing(sqlite3.connect(disk / "index.sqlite3")) as db:  # others may read it
            assert db.execute("SELECT count(*) FROM images").fetchone() == (1,)
        await store(index, image(2))
    finally:
        await index.close()


async def test_an_index_upgraded_on_a_full_disk_takes_the_reserve_s_room(disk: Path) -> None:
    with closing(sqlite3.connect(disk / "index.sqlite3")) as db:
        db.executescript(_EARLIER_RELEASE)
    assert Reserve(disk / "index.sqlite3-reserve").take()  # set aside by the earlier run
    filler = fill(disk)

    index = open_index(disk)
    await index.open()
    try:
        assert await index.totals() == Totals(images=2, image_bytes=3500, thumbnail_bytes=40)
        assert index.full() is not None
        filler.unlink()
        await index.catch_up()
        assert await index.problem() is None
    finally:
        await index.close()


async def test_no_room_to_create_an_index_is_an_error_that_says_so(disk: Path) -> None:
    fill(disk)
    index = open_index(disk)
    with pytest.raises(sqlite3.Error) as raised:
        await index.open()
    await index.close()
    assert is_full(raised.value)


async def test_expired_entries_are_taken_over_on_a_full_disk_without_a_reserve(
    disk: Path,
) -> None:
    index = open_index(disk)
    await index.open()
    try:
        await index.journal(["left-1", "left-2"], "a-node-that-crashed", -1)
        (disk / "index.sqlite3-reserve").unlink()  # and no reserve to give up
        filler = fill(disk)

        # Their blobs are to be removed, which frees room: the takeover does not wait for it.
        assert sorted(await index.take_expired(OWNER, LEASE, 10, [])) == ["left-1", "left-2"]
        assert await index.take_expired("another", LEASE, 10, []) == []
        assert not await index.claim("left-1", "another", LEASE)
        with pytest.raises(sqlite3.Error) as raised:
            await index.claim("left-1", OWNER, LEASE)
        assert is_full(raised.value)

        filler.unlink()
        assert await index.claim("left-1", OWNER, LEASE)
        await index.unjournal(["left-1", "left-2"], OWNER)
        await index.renew(OWNER, -1, ["left-1", "left-2"])
        assert await index.take_expired("another", LEASE, 10, []) == []
    finally:
        await index.close()
