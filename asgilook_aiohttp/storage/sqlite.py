"""The index in one SQLite file beside the blobs: the embedded implementation of the port.

SQLite runs in WAL mode with ``synchronous=FULL``, so a committed row survives a crash
of the process or of the machine. Writes and pages go through one thread, which owns the
connection, so the event loop never waits on the disk for them. A lookup of one image by
its id is answered on the event loop by a read-only connection of its own, which a writer
never blocks (WAL), and which reads a few pages that serving keeps in the page cache: less
work than the thread hop it would otherwise take. Pages are read by keyset
(``seq > ?``), so a deep page costs the same as the first at any size of the index; one
writer at a time means ``seq`` follows commit order. The totals are kept in a row of
their own, written in the same transactions as the rows they count.

On a full disk SQLite cannot make the shared-memory file that WAL mode reads through,
which a clean stop removes. The index is then opened in exclusive locking mode, which
keeps that memory in this process instead, and holds the file to itself (a backup must
wait) until ``catch_up`` can open it as usual. The index also owns the reserve: room set
aside beside it, given up when a write that must not wait for room (opening, deleting)
finds none, and taken again by ``catch_up``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..space import Reserve, is_full, unless_full
from .ports import (
    Deleted,
    ImageRecord,
    JournalEntry,
    LeaseLost,
    ThumbnailRecord,
    Totals,
    Unavailable,
    UnknownCursor,
    thumbnail_key,
    totals_problem,
)

T = TypeVar("T")

# Each entry moves the schema one version up; a new index runs them all.
_MIGRATIONS = (
    """
CREATE TABLE images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    uploaded INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
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
""",
    "ALTER TABLE images ADD COLUMN delete_token_sha256 TEXT;",
    # Where deleted images stood, so that a paging cursor naming one still works.
    "CREATE TABLE tombstones (id TEXT PRIMARY KEY, seq INTEGER NOT NULL);",
    # Journal entries are owned and leased. Those of earlier releases have neither, so
    # they count as expired: the first sweep takes them over.
    """
ALTER TABLE pending ADD COLUMN owner TEXT;
ALTER TABLE pending ADD COLUMN expires REAL NOT NULL DEFAULT 0;
CREATE INDEX pending_by_expiry ON pending (expires);
CREATE INDEX pending_by_owner ON pending (owner);
CREATE TABLE totals (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    images INTEGER NOT NULL,
    image_bytes INTEGER NOT NULL,
    thumbnail_bytes INTEGER NOT NULL
);
INSERT INTO totals
SELECT 1, count(*), coalesce(sum(bytes), 0), (SELECT coalesce(sum(bytes), 0) FROM thumbnails)
FROM images;
""",
)
SCHEMA_VERSION = len(_MIGRATIONS)
"""The version of the schema this release writes (SQLite's ``user_version``)."""
_COLUMNS = "id, uploaded, width, height, bytes, sha256, delete_token_sha256"
_THUMBNAIL_COLUMNS = "image_id, width, height, bytes, sha256, last_used"
_IMAGE_FIELDS = _COLUMNS.split(", ")
_JOINED_COLUMNS = ", ".join(
    [f"images.{name}" for name in _IMAGE_FIELDS]
    + [f"thumbnails.{name}" for name in _THUMBNAIL_COLUMNS.split(", ")]
)
CURSOR_QUERY = (
    "SELECT seq FROM images WHERE id = ? UNION ALL SELECT seq FROM tombstones WHERE id = ?"
)
PAGE_QUERY = f"SELECT {_COLUMNS} FROM images WHERE seq > ? ORDER BY seq LIMIT ?"
NEWEST_PAGE_QUERY = f"SELECT {_COLUMNS} FROM images WHERE seq < ? ORDER BY seq DESC LIMIT ?"
# Past every seq: where a newest-first reading starts.
_AFTER_THE_LAST = 2**63 - 1
# Insert-if-absent: the entry is taken unless another owner holds a current lease.
_CLAIM = (
    "INSERT INTO pending (id, owner, expires) VALUES (?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires = excluded.expires "
    "WHERE owner = excluded.owner OR expires < ? RETURNING id"
)

_RESERVE_IN_USE = (
    "the room kept for deletions on a full disk is in use; uploads wait until it is set aside again"
)
_NOT_SHARED = (
    "the index is held by this process alone for lack of room for its shared memory; backups wait"
)


def is_locked(error: sqlite3.Error) -> bool:
    """Whether ``error`` is another connection's lock, not a fault."""
    primary = error.sqlite_errorcode & 0xFF  # without the extended code's detail
    return primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _lease_lost(key: str) -> LeaseLost:
    return LeaseLost(
        "this node's lease", f"the journal entry {key} is no longer this node's to finish"
    )


class SqliteIndex:
    name = "SQLite"

    def __init__(self, path: Path, reserve_path: Path, *, timeout: float = 5.0) -> None:
        """``timeout``: how long a write waits for another process's to end."""
        self._path = path
        self._timeout = timeout
        self._reserve = Reserve(reserve_path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        """Used on the event loop while the index is shared; None while it is not."""
        self._shared = True
        # Entries taken over when the disk was too full to write it, and by whom: this
        # holds them for this process as a lease on disk would (there they stay expired)
        # until a claim or a clearing is written. Another process may take them too
        # meanwhile; undoing what they name twice removes nothing more.
        self._unwritten: dict[str, str] = {}

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def _with_db(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Call ``fn`` with the connection, from the index's own thread."""
        assert self._db is not None
        try:
            return fn(self._db)
        except sqlite3.OperationalError as error:
            if not is_locked(error):
                raise
            raise Unavailable(
                self.name, f"another process kept the index locked for over {self._timeout:g} s"
            ) from None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(lambda: self._with_db(fn))

    async def _look_up(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read of a few rows by key on the event loop, or through the index's
        thread while there is no read connection or SQLite would make it wait."""
        if self._reader is not None:
            try:
                return fn(self._reader)
            except sqlite3.OperationalError as error:
                if not is_locked(error):  # by a process recovering the WAL, say
                    raise
        return await self._call(fn)

    def _connect_reader(self) -> sqlite3.Connection | None:
        """A read connection, if the index is shared: one held exclusively has no room
        for another."""
        if not self._shared:
            return None
        # It never waits for a lock: a lookup that would goes through the thread.
        reader = sqlite3.connect(
            self._path, isolation_level=None, timeout=0, check_same_thread=False
        )
        reader.execute("PRAGMA query_only=ON")
        return reader

    def _with_reserve(self, write: Callable[[], T]) -> T:
        """Run a write that must not wait for room: on a full disk, give up the reserve
        for it and run it once more."""
        try:
            return write()
        except Exception as error:
            if not is_full(error) or not self._reserve.release():
                raise
        return write()

    async def open(self) -> None:
        """Set the reserve aside and open the index; on a full disk, with the reserve's
        room if need be (an index that is new or must be upgraded needs some)."""

        def open_() -> sqlite3.Connection | None:
            self._reserve.take()
            self._with_reserve(self._open)
            return self._connect_reader()

        self._reader = await self._run(open_)

    def _open(self) -> None:
        try:
            self._db, self._shared = self._connect(shared=True), True
        except sqlite3.Error as error:
            if is_locked(error):
                # Another process of this server opened it on a full disk, which keeps
                # it to itself until there is room again.
                raise Unavailable(
                    self.name, "the index is held by another process until the disk has room"
                ) from None
            if not is_full(error):
                raise
            self._db, self._shared = self._connect(shared=False), False

    def _share(self) -> None:
        """Open the index for other readers too, if there is room now."""
        assert self._db is not None
        self._db.close()
        self._db = None
        try:
            self._open()
        except sqlite3.Error:  # locked by a reader that was waiting, say: next time
            self._db, self._shared = self._connect(shared=False), False

    def _connect(self, *, shared: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            if not shared:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path} has index schema version {version}; this release reads up "
                    f"to version {SCHEMA_VERSION}: upgrade asgilook-aiohttp"
                )
            for number, migration in enumerate(_MIGRATIONS[version:], start=version + 1):
                db.executescript(f"BEGIN; {migration} PRAGMA user_version={number}; COMMIT;")
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()

        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._db is not None:
            await self._call(close)
            self._db = None
        self._thread.shutdown()

    async def problem(self) -> str | None:
        put_off = [_RESERVE_IN_USE] if not self._reserve.held else []
        if not self._shared:
            put_off.append(_NOT_SHARED)
        return "; ".join(put_off) or None

    def full(self) -> str | None:
        return None if self._reserve.held else _RESERVE_IN_USE

    async def catch_up(self) -> None:
        wants_reader = self._reader is None

        def catch_up() -> sqlite3.Connection | None:
            reader = None
            with unless_full():
                if not self._shared:
                    self._share()
                if wants_reader:
                    reader = self._connect_reader()
            self._reserve.take()
            return reader

        if (reader := await self._run(catch_up)) is not None:
            self._reader = reader

    async def journal(self, keys: Collection[str], owner: str, lease: float) -> None:
        def journal(db: sqlite3.Connection) -> None:
            expires = time.time() + lease
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO pending (id, owner, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET expires = excluded.expires "
                    "WHERE owner = excluded.owner",
                    [(key, owner, expires) for key in keys],
                )

        await self._call(journal)

    async def claim(self, key: str, owner: str, lease: float) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            if self._unwritten.get(key, owner) != owner:
                return False
            now = time.time()
            held = bool(db.execute(_CLAIM, (key, owner, now + lease, now)).fetchall())
            self._unwritten.pop(key, None)  # expired on disk, so written as taken now
            return held

        return await self._call(claim)

    async def unjournal(self, keys: Collection[str], owner: str) -> None:
        def unjournal(db: sqlite3.Connection) -> None:
            unwritten = [key for key in keys if self._unwritten.get(key) == owner]
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "DELETE FROM pending WHERE id = ? AND owner = ?", [(key, owner) for key in keys]
                )
                db.executemany("DELETE FROM pending WHERE id = ?", [(key,) for key in unwritten])
            for key in unwritten:
                del self._unwritten[key]

        await self._call(unjournal)

    async def renew(self, owner: str, lease: float, keys: Collection[str]) -> list[str]:
        def renew(db: sqlite3.Connection) -> list[str]:
            expires = time.time() + lease
            with db:
                db.execute("BEGIN IMMEDIATE")
                return [
                    key
                    for key in keys
                    if db.execute(
                        "UPDATE pending SET expires = ? WHERE id = ? AND owner = ?",
                        (expires, key, owner),
                    ).rowcount
                ]

        return await self._call(renew)

    async def take_expired(
        self, owner: str, lease: float, limit: int, keep: Collection[str]
    ) -> list[str]:
        kept = set(keep)

        def takeable(key: str, holder: str | None) -> bool:
            return key not in self._unwritten and not (holder == owner and key in kept)

        def take(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            keys: list[str] = []
            try:
                with db:
                    # Found and taken in one transaction, so that no other process of
                    # the server takes the same entries.
                    db.execute("BEGIN IMMEDIATE")
                    expired = db.execute(
                        "SELECT id, owner FROM pending WHERE expires < ? ORDER BY expires LIMIT ?",
                        (now, limit + len(self._unwritten) + len(kept)),
                    )
                    keys = [key for key, holder in expired if takeable(key, holder)][:limit]
                    db.executemany(
                        "UPDATE pending SET owner = ?, expires = ? WHERE id = ?",
                        [(owner, now + lease, key) for key in keys],
                    )
            except sqlite3.Error as error:
                # Taking them over frees room, as their blobs go: it must not wait for it.
                if not is_full(error):
                    raise
                self._unwritten.update(dict.fromkeys(keys, owner))
            return keys

        return await self._call(take)

    async def add(self, record: ImageRecord, owner: str) -> None:
        def add(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                held = db.execute(
                    "DELETE FROM pending WHERE id = ? AND owner = ?", (record.id, owner)
                )
                if held.rowcount == 0:
                    raise _lease_lost(record.id)
                db.execute(
                    f"INSERT INTO images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.uploaded,
                        record.width,
                        record.height,
                        record.nbytes,
                        record.sha256,
                        record.delete_token_sha256,
                    ),
                )
                db.execute(
                    "UPDATE totals SET images = images + 1, image_bytes = image_bytes + ?",
                    (record.nbytes,),
                )

        await self._call(add)

    async def get(self, image_id: str) -> ImageRecord | None:
        def get(db: sqlite3.Connection) -> ImageRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM images WHERE id = ?", (image_id,)).fetchone()
            return ImageRecord(*row) if row else None

        return await self._look_up(get)

    async def page(
        self, limit: int, after: str | None, *, newest_first: bool = False
    ) -> tuple[list[ImageRecord], bool]:
        def page(db: sqlite3.Connection) -> tuple[list[ImageRecord], bool]:
            start = _AFTER_THE_LAST if newest_first else 0
            if after is not None:
                row = db.execute(CURSOR_QUERY, (after, after)).fetchone()
                if row is None:
                    raise UnknownCursor(after)
                start = row[0]
            query = NEWEST_PAGE_QUERY if newest_first else PAGE_QUERY
            rows = db.execute(query, (start, limit + 1)).fetchall()
            return [ImageRecord(*row) for row in rows[:limit]], len(rows) > limit

        return await self._call(page)

    async def delete(
        self, image_id: str, token_sha256: str | None, owner: str, lease: float
    ) -> Deleted | None:
        def delete(db: sqlite3.Connection) -> Deleted | None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                row = db.execute(
                    "SELECT bytes, seq FROM images WHERE id = ? "
                    "AND (? IS NULL OR delete_token_sha256 = ?)",
                    (image_id, token_sha256, token_sha256),
                ).fetchone()
                if row is None:
                    return None
                image_bytes, seq = row
                (thumbnail_bytes,) = db.execute(
                    "SELECT coalesce(sum(bytes), 0) FROM thumbnails WHERE image_id = ?",
                    (image_id,),
                ).fetchone()
                db.execute("DELETE FROM images WHERE id = ?", (image_id,))
                db.execute("INSERT INTO tombstones (id, seq) VALUES (?, ?)", (image_id, seq))
                db.execute(
                    "INSERT INTO pending (id, owner, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
                    "expires = excluded.expires",
                    (image_id, owner, time.time() + lease),
                )
                db.execute(
                    "UPDATE totals SET images = images - 1, image_bytes = image_bytes - ?, "
                    "thumbnail_bytes = thumbnail_bytes - ?",
                    (image_bytes, thumbnail_bytes),
                )
            return Deleted(image_bytes=image_bytes, thumbnail_bytes=thumbnail_bytes)

        # It frees space, but needs a little first: on a full disk, the reserve's.
        return await self._run(lambda: self._with_reserve(lambda: self._with_db(delete)))

    async def image_and_thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        def lookup(db: sqlite3.Connection) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
            row = db.execute(
                f"SELECT {_JOINED_COLUMNS} FROM images LEFT JOIN thumbnails "
                "ON image_id = id AND thumbnails.width = ? AND thumbnails.height = ? "
                "WHERE id = ?",
                (width, height, image_id),
            ).fetchone()
            if row is None:
                return None, None
            image, thumbnail = row[: len(_IMAGE_FIELDS)], row[len(_IMAGE_FIELDS) :]
            kept = ThumbnailRecord(*thumbnail) if thumbnail[0] is not None else None
            return ImageRecord(*image), kept

        return await self._look_up(lookup)

    async def add_thumbnail(self, record: ThumbnailRecord, owner: str) -> int | None:
        key = thumbnail_key(record.image_id, record.width, record.height)

        def add(db: sqlite3.Connection) -> int | None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                # An image gone keeps the entry: its holder still has a blob to remove.
                image = db.execute("SELECT 1 FROM images WHERE id = ?", (record.image_id,))
                if image.fetchone() is None:
                    return None
                held = db.execute("DELETE FROM pending WHERE id = ? AND owner = ?", (key, owner))
                if held.rowcount == 0:
                    raise _lease_lost(key)
                old = db.execute(
                    "SELECT bytes FROM thumbnails WHERE image_id = ? AND width = ? AND height = ?",
                    (record.image_id, record.width, record.height),
                ).fetchone()
                replaced = int(old[0]) if old else 0
                db.execute(
                    f"INSERT INTO thumbnails ({_THUMBNAIL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (image_id, width, height) DO UPDATE SET bytes = excluded.bytes, "
                    "sha256 = excluded.sha256, last_used = excluded.last_used",
                    (
                        record.image_id,
                        record.width,
                        record.height,
                        record.nbytes,
                        record.sha256,
                        record.last_used,
                    ),
                )
                db.execute(
                    "UPDATE totals SET thumbnail_bytes = thumbnail_bytes + ?",
                    (record.nbytes - replaced,),
                )
            return replaced

        return await self._call(add)

    async def touch_thumbnail(self, record: ThumbnailRecord, now: int) -> None:
        await self._call(
            lambda db: db.execute(
                "UPDATE thumbnails SET last_used = ? "
                "WHERE image_id = ? AND width = ? AND height = ?",
                (now, record.image_id, record.width, record.height),
            )
        )

    async def evict_thumbnails(
        self, at_least: int, spared: Collection[str], owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        spare = set(spared)

        def evict(db: sqlite3.Connection) -> list[ThumbnailRecord]:
            evicted: list[ThumbnailRecord] = []
            freed = 0
            expires = time.time() + lease
            with db:
                db.execute("BEGIN IMMEDIATE")
                rows = db.execute(f"SELECT {_THUMBNAIL_COLUMNS} FROM thumbnails ORDER BY last_used")
                while freed < at_least and (row := rows.fetchone()) is not None:
                    candidate = ThumbnailRecord(*row)
                    key = thumbnail_key(candidate.image_id, candidate.width, candidate.height)
                    if key in spare:
                        continue
                    journaled = db.execute(
                        "INSERT INTO pending (id, owner, expires) VALUES (?, ?, ?) "
                        "ON CONFLICT (id) DO NOTHING",
                        (key, owner, expires),
                    )
                    if journaled.rowcount == 0:  # being made, or its blob removed, just now
                        continue
                    evicted.append(candidate)
                    freed += candidate.nbytes
                if evicted:
                    db.executemany(
                        "DELETE FROM thumbnails WHERE image_id = ? AND width = ? AND height = ?",
                        [(r.image_id, r.width, r.height) for r in evicted],
                    )
                    db.execute("UPDATE totals SET thumbnail_bytes = thumbnail_bytes - ?", (freed,))
            return evicted

        return await self._call(evict)

    async def totals(self) -> Totals:
        def totals(db: sqlite3.Connection) -> Totals:
            row = db.execute("SELECT images, image_bytes, thumbnail_bytes FROM totals").fetchone()
            return Totals(*row)

        return await self._call(totals)

    async def thumbnail_page(
        self, limit: int, after: tuple[str, int, int] | None
    ) -> list[ThumbnailRecord]:
        def page(db: sqlite3.Connection) -> list[ThumbnailRecord]:
            rows = db.execute(
                f"SELECT {_THUMBNAIL_COLUMNS} FROM thumbnails "
                "WHERE (image_id, width, height) > (?, ?, ?) "
                "ORDER BY image_id, width, height LIMIT ?",
                (*(after or ("", 0, 0)), limit),
            )
            return [ThumbnailRecord(*row) for row in rows]

        return await self._call(page)

    async def journaled(self) -> list[JournalEntry]:
        def journaled(db: sqlite3.Connection) -> list[JournalEntry]:
            rows = db.execute("SELECT id, owner, expires - ? FROM pending", (time.time(),))
            return [JournalEntry(*row) for row in rows]

        return await self._call(journaled)

    async def forget_thumbnail(
        self, record: ThumbnailRecord, owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        key = thumbnail_key(record.image_id, record.width, record.height)
        which = (record.image_id, record.width, record.height, record.nbytes, record.sha256)
        the_thumbnail = "image_id = ? AND width = ? AND height = ? AND bytes = ? AND sha256 = ?"

        def forget(db: sqlite3.Connection) -> list[ThumbnailRecord]:
            with db:
                db.execute("BEGIN IMMEDIATE")
                if not db.execute(
                    f"SELECT 1 FROM thumbnails WHERE {the_thumbnail}", which
                ).fetchone():
                    return []
                journaled = db.execute(
                    "INSERT INTO pending (id, owner, expires) VALUES (?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (key, owner, time.time() + lease),
                )
                if journaled.rowcount == 0:
                    return []
                db.execute(f"DELETE FROM thumbnails WHERE {the_thumbnail}", which)
                db.execute(
                    "UPDATE totals SET thumbnail_bytes = thumbnail_bytes - ?", (record.nbytes,)
                )
            return [record]

        return await self._call(forget)

    async def verify(self) -> list[str]:
        def verify(db: sqlite3.Connection) -> list[str]:
            try:
                problems = [
                    f"SQLite's integrity check: {line}"
                    for (line,) in db.execute("PRAGMA integrity_check(100)")
                    if line != "ok"
                ]
                with db:
                    db.execute("BEGIN")  # one snapshot: the totals and the rows they count
                    kept = db.execute("SELECT images, image_bytes, thumbnail_bytes FROM totals")
                    counted = db.execute(
                        "SELECT count(*), coalesce(sum(bytes), 0), "
                        "(SELECT coalesce(sum(bytes), 0) FROM thumbnails) FROM images"
                    )
                    wrong = totals_problem(Totals(*kept.fetchone()), Totals(*counted.fetchone()))
            except sqlite3.DatabaseError as error:
                if is_locked(error):
                    raise
                return [f"SQLite cannot read the index through: {error}"]
            return problems + ([wrong] if wrong else [])

        return await self._call(verify)
