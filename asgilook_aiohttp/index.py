"""The metadata index: a row per stored image and per kept thumbnail, and a journal of
ids whose files are being added or removed.

SQLite runs in WAL mode with ``synchronous=FULL``, so a committed row survives a crash
of the process or of the machine. All calls go through one thread, which owns the
connection, so the event loop never waits on the disk. Pages are read by keyset
(``seq > ?``), so a deep page costs the same as the first at any size of the index.

On a full disk SQLite cannot make the shared-memory file that WAL mode reads through,
which a clean stop removes. The index is then opened in exclusive locking mode, which
keeps that memory in this process instead, and holds the file to itself (a backup must
wait) until ``share`` can open it as usual.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .space import is_full

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
)
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


@dataclass(frozen=True)
class ImageRecord:
    id: str
    uploaded: int
    """Upload time, in whole seconds since the epoch."""
    width: int
    height: int
    nbytes: int
    sha256: str
    delete_token_sha256: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ThumbnailRecord:
    image_id: str
    width: int
    height: int
    nbytes: int
    sha256: str
    last_used: int
    """When it was last served, in whole seconds since the epoch (coarse: see ``touch``)."""


@dataclass(frozen=True)
class Deleted:
    image_bytes: int
    thumbnail_bytes: int


class UnknownCursor(LookupError):
    """``after`` names an image that is not in the index."""


class Index:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self._db: sqlite3.Connection | None = None
        self._shared = True

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    @property
    def shared(self) -> bool:
        """Whether other processes may read the index (False while the disk was too full)."""
        return self._shared

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._open)

    def _open(self) -> None:
        try:
            self._db, self._shared = self._connect(shared=True), True
        except sqlite3.Error as error:
            if not is_full(error):
                raise
            self._db, self._shared = self._connect(shared=False), False

    async def share(self) -> bool:
        """Open the index for other readers too, if it is not yet and there is room now;
        whether it is."""

        def share(db: sqlite3.Connection) -> bool:
            if self._shared:
                return True
            db.close()
            self._db = None
            try:
                self._open()
            except sqlite3.Error:  # locked by a reader that was waiting, say: next time
                self._db, self._shared = self._connect(shared=False), False
            return self._shared

        return await self._call(share)

    def _connect(self, *, shared: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            if not shared:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > len(_MIGRATIONS):
                raise RuntimeError(
                    f"{self._path} has index schema version {version}; this release reads up "
                    f"to version {len(_MIGRATIONS)}: upgrade asgilook-aiohttp"
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

        if self._db is not None:
            await self._call(close)
            self._db = None
        self._thread.shutdown()

    async def add_pending(self, image_ids: Iterable[str]) -> None:
        """Journal ids of uploads, durably, before files of theirs are moved into place."""
        await self._for_each_id("INSERT INTO pending (id) VALUES (?)", image_ids)

    async def drop_pending(self, image_ids: Iterable[str]) -> None:
        await self._for_each_id("DELETE FROM pending WHERE id = ?", image_ids)

    async def _for_each_id(self, statement: str, image_ids: Iterable[str]) -> None:
        """Run ``statement`` once per id, all in one transaction."""
        rows = [(image_id,) for image_id in image_ids]

        def run(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.executemany(statement, rows)

        await self._call(run)

    async def pending(self) -> list[str]:
        def pending(db: sqlite3.Connection) -> list[str]:
            return [row[0] for row in db.execute("SELECT id FROM pending")]

        return await self._call(pending)

    async def add(self, record: ImageRecord) -> None:
        """Record a stored image and clear its journal entry, in one transaction."""

        def add(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
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
                db.execute("DELETE FROM pending WHERE id = ?", (record.id,))

        await self._call(add)

    async def get(self, image_id: str) -> ImageRecord | None:
        def get(db: sqlite3.Connection) -> ImageRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM images WHERE id = ?", (image_id,)).fetchone()
            return ImageRecord(*row) if row else None

        return await self._call(get)

    async def page(self, limit: int, after: str | None) -> tuple[list[ImageRecord], bool]:
        """Up to ``limit`` images in upload order, after the image ``after``; and whether
        more follow."""

        def page(db: sqlite3.Connection) -> tuple[list[ImageRecord], bool]:
            start = 0
            if after is not None:
                row = db.execute(CURSOR_QUERY, (after, after)).fetchone()
                if row is None:
                    raise UnknownCursor(after)
                start = row[0]
            rows = db.execute(PAGE_QUERY, (start, limit + 1)).fetchall()
            return [ImageRecord(*row) for row in rows[:limit]], len(rows) > limit

        return await self._call(page)

    async def delete(self, image_id: str, token_sha256: str | None = None) -> Deleted | None:
        """Remove an image and its thumbnails, journaling its id until its files are gone.

        With ``token_sha256``, only if it is the image's delete token. Returns None if no
        image matched.
        """

        def delete(db: sqlite3.Connection) -> Deleted | None:
            with db:
                db.execute("BEGIN")
                row = db.execute(
                    "SELECT bytes, seq FROM images WHERE id = ? "
                    "AND (? IS NULL OR delete_token_sha256 = ?)",
                    (image_id, token_sha256, token_sha256),
                ).fetchone()
                if row is None:
                    return None
                (thumbnail_bytes,) = db.execute(
                    "SELECT coalesce(sum(bytes), 0) FROM thumbnails WHERE image_id = ?",
                    (image_id,),
                ).fetchone()
                db.execute("DELETE FROM images WHERE id = ?", (image_id,))
                db.execute("INSERT INTO tombstones (id, seq) VALUES (?, ?)", (image_id, row[1]))
                db.execute("INSERT OR IGNORE INTO pending (id) VALUES (?)", (image_id,))
            return Deleted(image_bytes=row[0], thumbnail_bytes=thumbnail_bytes)

        return await self._call(delete)

    async def image_and_thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        """An image and its kept thumbnail of this size, in one lookup; None where missing."""

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

        return await self._call(lookup)

    async def add_thumbnail(self, record: ThumbnailRecord) -> int | None:
        """Record a thumbnail whose file is in place: the bytes of the row it replaced (0 if
        none), or None if its image is gone."""

        def add(db: sqlite3.Connection) -> int | None:
            with db:
                db.execute("BEGIN")
                old = db.execute(
                    "SELECT bytes FROM thumbnails WHERE image_id = ? AND width = ? AND height = ?",
                    (record.image_id, record.width, record.height),
                ).fetchone()
                try:
                    db.execute(
                        f"INSERT OR REPLACE INTO thumbnails ({_THUMBNAIL_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            record.image_id,
                            record.width,
                            record.height,
                            record.nbytes,
                            record.sha256,
                            record.last_used,
                        ),
                    )
                except sqlite3.IntegrityError:  # the image was deleted meanwhile
                    return None
            return int(old[0]) if old else 0

        return await self._call(add)

    async def touch_thumbnail(self, record: ThumbnailRecord, now: int) -> None:
        await self._call(
            lambda db: db.execute(
                "UPDATE thumbnails SET last_used = ? "
                "WHERE image_id = ? AND width = ? AND height = ?",
                (now, record.image_id, record.width, record.height),
            )
        )

    async def totals(self) -> tuple[int, int]:
        """How many images are stored, and their bytes."""

        def totals(db: sqlite3.Connection) -> tuple[int, int]:
            count, nbytes = db.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM images"
            ).fetchone()
            return int(count), int(nbytes)

        return await self._call(totals)

    async def thumbnail_bytes(self) -> int:
        def total(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT coalesce(sum(bytes), 0) FROM thumbnails").fetchone()[0])

        return await self._call(total)

    async def evict_thumbnails(
        self, at_least: int, spared: Collection[tuple[str, int, int]]
    ) -> list[ThumbnailRecord]:
        """Forget the least recently used thumbnails that free ``at_least`` bytes, but none
        of ``spared`` (image id, width, height)."""

        def evict(db: sqlite3.Connection) -> list[ThumbnailRecord]:
            evicted: list[ThumbnailRecord] = []
            freed = 0
            with db:
                db.execute("BEGIN")
                rows = db.execute(f"SELECT {_THUMBNAIL_COLUMNS} FROM thumbnails ORDER BY last_used")
                while freed < at_least and (row := rows.fetchone()) is not None:
                    candidate = ThumbnailRecord(*row)
                    if (candidate.image_id, candidate.width, candidate.height) in spared:
                        continue
                    evicted.append(candidate)
                    freed += candidate.nbytes
                db.executemany(
                    "DELETE FROM thumbnails WHERE image_id = ? AND width = ? AND height = ?",
                    [(r.image_id, r.width, r.height) for r in evicted],
                )
            return evicted

        return await self._call(evict)
