"""The index in PostgreSQL, shared by any number of nodes: the shared implementation of
the port.

Every call has one deadline, ``timeout``: connecting, waiting for a pooled connection
and every statement fall within it, and whatever keeps PostgreSQL from answering in time
(down, restarting, frozen, unreachable, out of connections) is ``Unavailable``. The pool
drops a broken connection and opens another on a later call, so service resumes by
itself once PostgreSQL does.

An image's ``seq`` is taken from the one-row ``totals`` table by the statement that
inserts the image. The row's lock holds the next insert back until this one commits, so
numbers are taken in commit order: a reader who sees seq N sees every smaller one, and
keyset paging never passes an image that commits later (numbers from a sequence would
let it). A transaction that writes ``totals`` writes it last, so that one holding the
row waits for nothing but its commit.

Leases are timed by the database's clock, so the nodes' clocks need not agree. Eviction
and the taking over of expired entries lock their rows with ``SKIP LOCKED``, so two nodes
never take the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import asyncpg

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

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")

# Held while the schema is created or upgraded, so that nodes starting at once take
# turns: "asgilook" in ASCII.
_MIGRATION_LOCK = 0x617367696C6F6F6B
# Each entry moves the schema one version up; a new database runs them all.
_MIGRATIONS = (
    """
CREATE TABLE images (
    seq bigint PRIMARY KEY,
    id text NOT NULL UNIQUE,
    uploaded bigint NOT NULL,
    width integer NOT NULL,
    height integer NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    delete_token_sha256 text
);
CREATE TABLE tombstones (id text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE pending (
    id text PRIMARY KEY,
    owner text NOT NULL,
    expires timestamptz NOT NULL
);
CREATE INDEX pending_by_expiry ON pending (expires);
CREATE INDEX pending_by_owner ON pending (owner);
CREATE TABLE thumbnails (
    image_id text NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    width integer NOT NULL,
    height integer NOT NULL,
    bytes bigint NOT NULL,
    sha256 text NOT NULL,
    last_used bigint NOT NULL,
    PRIMARY KEY (image_id, width, height)
);
CREATE INDEX thumbnails_by_last_use ON thumbnails (last_used);
CREATE TABLE totals (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_seq bigint NOT NULL,
    images bigint NOT NULL,
    image_bytes bigint NOT NULL,
    thumbnail_bytes bigint NOT NULL
);
INSERT INTO totals VALUES (true, 0, 0, 0, 0);
""",
)

_COLUMNS = "id, uploaded, width, height, bytes, sha256, delete_token_sha256"
_THUMBNAIL_COLUMNS = "image_id, width, height, bytes, sha256, last_used"
_IMAGE_FIELDS = _COLUMNS.split(", ")
_JOINED_COLUMNS = ", ".join(
    [f"images.{name}" for name in _IMAGE_FIELDS]
    + [f"thumbnails.{name}" for name in _THUMBNAIL_COLUMNS.split(", ")]
)
# ports.thumbnail_key, in SQL.
_THUMBNAIL_KEY = "'thumbnails/' || image_id || '/' || width || 'x' || height || '.jpeg'"

_ADD = f"""
WITH held AS (DELETE FROM pending WHERE id = $1 AND owner = $8 RETURNING id),
numbered AS (
    UPDATE totals SET last_seq = last_seq + 1, images = images + 1, image_bytes = image_bytes + $5
    WHERE EXISTS (SELECT FROM held)
    RETURNING last_seq
)
INSERT INTO images (seq, {_COLUMNS})
SELECT last_seq, $1, $2, $3, $4, $5, $6, $7 FROM numbered
RETURNING seq
"""
_JOURNAL = """
INSERT INTO pending (id, owner, expires)
SELECT key, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) AS key
ON CONFLICT (id) DO UPDATE SET expires = excluded.expires WHERE pending.owner = excluded.owner
"""
_JOURNAL_IF_ABSENT = """
INSERT INTO pending (id, owner, expires)
SELECT key, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) AS key
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
# Insert-if-absent: the entry is taken unless another owner holds a current lease.
_CLAIM = """
INSERT INTO pending (id, owner, expires) VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
WHERE pending.owner = excluded.owner OR pending.expires < now()
RETURNING true
"""
_TAKE_EXPIRED = """
WITH expired AS MATERIALIZED (
    SELECT id FROM pending
    WHERE expires < now() AND NOT (owner IS NOT DISTINCT FROM $1 AND id = ANY ($4::text[]))
    ORDER BY expires LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE pending SET owner = $1, expires = now() + make_interval(secs => $2)
FROM expired WHERE pending.id = expired.id
RETURNING pending.id
"""
_FORGET_IMAGE = """
WITH gone AS (DELETE FROM images WHERE id = $1 RETURNING id, seq),
buried AS (INSERT INTO tombstones (id, seq) SELECT id, seq FROM gone)
INSERT INTO pending (id, owner, expires) VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires = excluded.expires
"""
_CURSOR = "SELECT seq FROM images WHERE id = $1 UNION ALL SELECT seq FROM tombstones WHERE id = $1"
_PAGE = f"SELECT {_COLUMNS} FROM images WHERE seq > $1 ORDER BY seq LIMIT $2"
_NEWEST_PAGE = f"SELECT {_COLUMNS} FROM images WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
# Past every seq: where a newest-first reading starts.
_AFTER_THE_LAST = 2**63 - 1
_EVICTION_CANDIDATES = f"""
SELECT {_THUMBNAIL_COLUMNS}, {_THUMBNAIL_KEY} AS key FROM thumbnails
WHERE {_THUMBNAIL_KEY} <> ALL ($1::text[])
AND NOT EXISTS (SELECT FROM pending WHERE pending.id = {_THUMBNAIL_KEY})
ORDER BY last_used
FOR UPDATE SKIP LOCKED
"""
_COUNTED = """
SELECT count(*), coalesce(sum(bytes), 0)::bigint,
    (SELECT coalesce(sum(bytes), 0) FROM thumbnails)::bigint,
    coalesce(max(seq), 0)
FROM images
"""
# The indexes of this schema that a failed CREATE INDEX CONCURRENTLY (or REINDEX) left
# unusable.
_INVALID_INDEXES = """
SELECT indexrelid::regclass::text FROM pg_index
WHERE NOT indisvalid AND indrelid IN (SELECT oid FROM pg_class WHERE relname = ANY($1::text[])
    AND relnamespace = current_schema()::regnamespace)
"""
_THE_THUMBNAIL_IS = "image_id = $1 AND width = $2 AND height = $3 AND bytes = $4 AND sha256 = $5"
_THE_THUMBNAIL = f"SELECT true FROM thumbnails WHERE {_THE_THUMBNAIL_IS}"
_TABLES = ["images", "tombstones", "pending", "thumbnails", "totals"]
# Candidates locked at a time; those locked and not needed stay locked until the commit.
_EVICTION_BATCH = 32

# What asyncpg raises when PostgreSQL cannot be reached or does not answer in time; and
# the classes of server errors that mean the same: connection exception, invalid
# authorization, transaction rolled back (to be tried again), insufficient resources,
# operator intervention (shutting down, starting up, statement cancelled).
_UNREACHED = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError)
_UNAVAILABLE_CLASSES = ("08", "28", "40", "53", "57")
# Read-only: connected to a standby, after a failover.
_READ_ONLY = "25006"


def _unavailable(error: Exception) -> bool:
    if isinstance(error, asyncpg.PostgresError):
        return error.sqlstate[:2] in _UNAVAILABLE_CLASSES or error.sqlstate == _READ_ONLY
    # Arguments or settings this side got wrong are not the server's absence.
    return not isinstance(
        error, asyncpg.exceptions.DataError | asyncpg.exceptions.ClientConfigurationError
    )


def _lease_lost(key: str) -> LeaseLost:
    return LeaseLost(
        "this node's lease", f"the journal entry {key} is no longer this node's to finish"
    )


async def _keep_session(_: asyncpg.Connection[asyncpg.Record]) -> None:
    """Leave a connection returned to the pool as it is: no call sets session state (its
    locks are the transaction's), so the pool's reset would be a round trip for nothing."""


class PostgresIndex:
    name = "PostgreSQL"

    def __init__(
        self, url: str, *, password: str | None, timeout: float, pool_size: int = 10
    ) -> None:
        self._url = url
        self._password = password
        self._timeout = timeout
        self._pool_size = pool_size
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    async def open(self) -> None:
        deadline_ms = str(int(self._timeout * 1000))
        self._pool = asyncpg.create_pool(
            self._url,
            password=self._password,  # None: asyncpg looks in PGPASSWORD, then PGPASSFILE
            min_size=0,
            max_size=self._pool_size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            reset=_keep_session,
            server_settings={
                "application_name": "asgilook-aiohttp",
                # The server gives up too: on statements this side stopped waiting for,
                # and on the locks of a node that stopped half-way through a transaction.
                "statement_timeout": deadline_ms,
                "idle_in_transaction_session_timeout": deadline_ms,
            },
        )
        try:
            await self._pool  # connects to nothing yet: the first call does
            await self._run(self._migrate)
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, db: _Connection) -> None:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer)")
            version = await db.fetchval("SELECT version FROM schema_version")
            if version is None:
                version = 0
                await db.execute("INSERT INTO schema_version VALUES (0)")
            if version > len(_MIGRATIONS):
                raise RuntimeError(
                    f"the PostgreSQL index has schema version {version}; this release reads "
                    f"up to version {len(_MIGRATIONS)}: upgrade asgilook-aiohttp"
                )
            for migration in _MIGRATIONS[version:]:
                await db.execute(migration)
            await db.execute("UPDATE schema_version SET version = $1", len(_MIGRATIONS))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Past the deadline, close() terminates the connections it could not close.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await pool.close()

    async def _run(self, work: Callable[[_Connection], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection, all within the deadline."""
        assert self._pool is not None, "the index is not open"
        connected = False
        try:
            async with asyncio.timeout(self._timeout):
                db = await self._pool.acquire(timeout=self._timeout)
                connected = True
                try:
                    return await work(db)
                except (asyncio.CancelledError, *_UNREACHED):
                    # It may be cut off mid-statement: dropped, where the pool would wait
                    # for the server to acknowledge a cancellation (beyond the deadline).
                    # One that failed is released already, which terminate() refuses.
                    with contextlib.suppress(asyncpg.InterfaceError):
                        db.terminate()
                    raise
                finally:
                    await self._pool.release(db)
        except _UNREACHED as error:
            if not _unavailable(error):
                raise
            raise Unavailable(self.name, self._detail(error, connected)) from error

    def _detail(self, error: Exception, connected: bool) -> str:
        if isinstance(error, TimeoutError):
            if connected:
                return f"no answer within {self._timeout:g} s"
            return f"no connection within {self._timeout:g} s (or all {self._pool_size} in use)"
        if isinstance(error, OSError):
            return f"cannot connect: {error}"
        return str(error) or type(error).__name__

    async def problem(self) -> str | None:
        try:
            await self._run(lambda db: db.fetchval("SELECT 1"))
        except Unavailable as error:
            return str(error)
        return None

    def full(self) -> str | None:
        return None

    async def catch_up(self) -> None:
        pass

    async def journal(self, keys: Collection[str], owner: str, lease: float) -> None:
        # Sorted, so that writers lock entries in one order.
        entries = sorted(set(keys))
        await self._run(
            lambda db: db.execute(
                _JOURNAL,
                entries,
                owner,
                lease,
            )
        )

    async def claim(self, key: str, owner: str, lease: float) -> bool:
        held = await self._run(
            lambda db: db.fetchval(
                _CLAIM,
                key,
                owner,
                lease,
            )
        )
        return held is not None

    async def unjournal(self, keys: Collection[str], owner: str) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM pending WHERE id = ANY ($1::text[]) AND owner = $2", list(keys), owner
            )
        )

    async def renew(self, owner: str, lease: float, keys: Collection[str]) -> list[str]:
        rows = await self._run(
            lambda db: db.fetch(
                "UPDATE pending SET expires = now() + make_interval(secs => $2) "
                "WHERE owner = $1 AND id = ANY ($3::text[]) RETURNING id",
                owner,
                lease,
                list(keys),
            )
        )
        return [row["id"] for row in rows]

    async def take_expired(
        self, owner: str, lease: float, limit: int, keep: Collection[str]
    ) -> list[str]:
        rows = await self._run(
            lambda db: db.fetch(
                _TAKE_EXPIRED,
                owner,
                lease,
                limit,
                list(keep),
            )
        )
        return [row["id"] for row in rows]

    async def add(self, record: ImageRecord, owner: str) -> None:
        seq = await self._run(
            lambda db: db.fetchval(
                _ADD,
                record.id,
                record.uploaded,
                record.width,
                record.height,
                record.nbytes,
                record.sha256,
                record.delete_token_sha256,
                owner,
            )
        )
        if seq is None:
            raise _lease_lost(record.id)

    async def get(self, image_id: str) -> ImageRecord | None:
        row = await self._run(
            lambda db: db.fetchrow(f"SELECT {_COLUMNS} FROM images WHERE id = $1", image_id)
        )
        return ImageRecord(*row) if row else None

    async def page(
        self, limit: int, after: str | None, *, newest_first: bool = False
    ) -> tuple[list[ImageRecord], bool]:
        async def page(db: _Connection) -> list[asyncpg.Record]:
            start = _AFTER_THE_LAST if newest_first else 0
            if after is not None:
                found = await db.fetchval(_CURSOR, after)
                if found is None:
                    raise UnknownCursor(after)
                start = found
            return await db.fetch(_NEWEST_PAGE if newest_first else _PAGE, start, limit + 1)

        rows = await self._run(page)
        return [ImageRecord(*row) for row in rows[:limit]], len(rows) > limit

    async def delete(
        self, image_id: str, token_sha256: str | None, owner: str, lease: float
    ) -> Deleted | None:
        async def delete(db: _Connection) -> Deleted | None:
            async with db.transaction():
                # With the image's row locked, no thumbnail of it is added until this
                # commits, and every one added before is seen from here on.
                image_bytes = await db.fetchval(
                    "SELECT bytes FROM images WHERE id = $1 "
                    "AND ($2::text IS NULL OR delete_token_sha256 = $2) FOR UPDATE",
                    image_id,
                    token_sha256,
                )
                if image_bytes is None:
                    return None
                thumbnail_bytes = await db.fetchval(
                    "WITH gone AS (DELETE FROM thumbnails WHERE image_id = $1 RETURNING bytes) "
                    "SELECT coalesce(sum(bytes), 0)::bigint FROM gone",
                    image_id,
                )
                await db.execute(
                    _FORGET_IMAGE,
                    image_id,
                    owner,
                    lease,
                )
                await db.execute(
                    "UPDATE totals SET images = images - 1, image_bytes = image_bytes - $1, "
                    "thumbnail_bytes = thumbnail_bytes - $2",
                    image_bytes,
                    thumbnail_bytes,
                )
            return Deleted(image_bytes=image_bytes, thumbnail_bytes=thumbnail_bytes)

        return await self._run(delete)

    async def image_and_thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        row = await self._run(
            lambda db: db.fetchrow(
                f"SELECT {_JOINED_COLUMNS} FROM images LEFT JOIN thumbnails "
                "ON image_id = id AND thumbnails.width = $2 AND thumbnails.height = $3 "
                "WHERE id = $1",
                image_id,
                width,
                height,
            )
        )
        if row is None:
            return None, None
        image, thumbnail = row[: len(_IMAGE_FIELDS)], row[len(_IMAGE_FIELDS) :]
        kept = ThumbnailRecord(*thumbnail) if thumbnail[0] is not None else None
        return ImageRecord(*image), kept

    async def add_thumbnail(self, record: ThumbnailRecord, owner: str) -> int | None:
        key = thumbnail_key(record.image_id, record.width, record.height)

        async def add(db: _Connection) -> int | None:
            async with db.transaction():
                # Locked first, as a deletion does, so that the two wait in one order.
                image = await db.fetchval(
                    "SELECT 1 FROM images WHERE id = $1 FOR KEY SHARE", record.image_id
                )
                if image is None:  # the entry stays: its holder has a blob to remove
                    return None
                held = await db.fetchval(
                    "DELETE FROM pending WHERE id = $1 AND owner = $2 RETURNING id", key, owner
                )
                if held is None:
                    raise _lease_lost(key)
                replaced: int = await db.fetchval(
                    "WITH old AS (SELECT bytes FROM thumbnails "
                    "WHERE image_id = $1 AND width = $2 AND height = $3), "
                    f"new AS (INSERT INTO thumbnails ({_THUMBNAIL_COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6) "
                    "ON CONFLICT (image_id, width, height) DO UPDATE SET bytes = excluded.bytes, "
                    "sha256 = excluded.sha256, last_used = excluded.last_used) "
                    "SELECT coalesce((SELECT bytes FROM old), 0)",
                    record.image_id,
                    record.width,
                    record.height,
                    record.nbytes,
                    record.sha256,
                    record.last_used,
                )
                await db.execute(
                    "UPDATE totals SET thumbnail_bytes = thumbnail_bytes + $1",
                    record.nbytes - replaced,
                )
            return replaced

        return await self._run(add)

    async def touch_thumbnail(self, record: ThumbnailRecord, now: int) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE thumbnails SET last_used = $4 "
                "WHERE image_id = $1 AND width = $2 AND height = $3",
                record.image_id,
                record.width,
                record.height,
                now,
            )
        )

    async def evict_thumbnails(
        self, at_least: int, spared: Collection[str], owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        async def evict(db: _Connection) -> list[ThumbnailRecord]:
            evicted: list[ThumbnailRecord] = []
            freed = 0
            async with db.transaction():
                candidates = await db.cursor(_EVICTION_CANDIDATES, list(spared))
                locked: deque[asyncpg.Record] = deque()
                while freed < at_least:
                    if not locked:
                        locked.extend(await candidates.fetch(_EVICTION_BATCH))
                        if not locked:
                            break
                    chosen: dict[str, ThumbnailRecord] = {}
                    wanted = at_least - freed
                    while locked and wanted > 0:
                        *columns, key = locked.popleft()
                        chosen[key] = ThumbnailRecord(*columns)
                        wanted -= chosen[key].nbytes
                    # A key journaled meanwhile is being made again, or was evicted just now.
                    journaled = await db.fetch(
                        _JOURNAL_IF_ABSENT,
                        sorted(chosen),
                        owner,
                        lease,
                    )
                    for row in journaled:
                        evicted.append(chosen[row["id"]])
                        freed += chosen[row["id"]].nbytes
                if not evicted:
                    return evicted
                await db.execute(
                    "DELETE FROM thumbnails WHERE (image_id, width, height) IN "
                    "(SELECT * FROM unnest($1::text[], $2::integer[], $3::integer[]))",
                    [r.image_id for r in evicted],
                    [r.width for r in evicted],
                    [r.height for r in evicted],
                )
                await db.execute("UPDATE totals SET thumbnail_bytes = thumbnail_bytes - $1", freed)
            return evicted

        return await self._run(evict)

    async def totals(self) -> Totals:
        row = await self._run(
            lambda db: db.fetchrow("SELECT images, image_bytes, thumbnail_bytes FROM totals")
        )
        assert row is not None
        return Totals(*row)

    async def thumbnail_page(
        self, limit: int, after: tuple[str, int, int] | None
    ) -> list[ThumbnailRecord]:
        rows = await self._run(
            lambda db: db.fetch(
                f"SELECT {_THUMBNAIL_COLUMNS} FROM thumbnails "
                "WHERE (image_id, width, height) > ($1, $2, $3) "
                "ORDER BY image_id, width, height LIMIT $4",
                *(after or ("", 0, 0)),
                limit,
            )
        )
        return [ThumbnailRecord(*row) for row in rows]

    async def journaled(self) -> list[JournalEntry]:
        rows = await self._run(
            lambda db: db.fetch(
                "SELECT id, owner, extract(epoch FROM expires - now())::float8 FROM pending"
            )
        )
        return [JournalEntry(*row) for row in rows]

    async def forget_thumbnail(
        self, record: ThumbnailRecord, owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        key = thumbnail_key(record.image_id, record.width, record.height)
        which = (record.image_id, record.width, record.height, record.nbytes, record.sha256)

        async def forget(db: _Connection) -> list[ThumbnailRecord]:
            async with db.transaction():
                if not await db.fetchval(f"{_THE_THUMBNAIL} FOR UPDATE", *which):
                    return []
                if not await db.fetch(_JOURNAL_IF_ABSENT, [key], owner, lease):
                    return []
                await db.execute(f"DELETE FROM thumbnails WHERE ({_THE_THUMBNAIL_IS})", *which)
                await db.execute(
                    "UPDATE totals SET thumbnail_bytes = thumbnail_bytes - $1", record.nbytes
                )
            return [record]

        return await self._run(forget)

    async def verify(self) -> list[str]:
        async def verify(db: _Connection) -> list[str]:
            # One snapshot: the totals and the rows they count.
            async with db.transaction(isolation="repeatable_read", readonly=True):
                kept = await db.fetchrow(
                    "SELECT images, image_bytes, thumbnail_bytes, last_seq FROM totals"
                )
                counted = await db.fetchrow(_COUNTED)
                invalid = await db.fetch(_INVALID_INDEXES, _TABLES)
            assert kept is not None
            assert counted is not None
            problems = [f"PostgreSQL's index {name} is invalid: REINDEX it" for (name,) in invalid]
            if wrong := totals_problem(Totals(*kept[:3]), Totals(*counted[:3])):
                problems.append(wrong)
            if kept[3] < counted[3]:
                problems.append(
                    f"the totals' last seq is {kept[3]}, below the highest image's, {counted[3]}: "
                    "the next upload would be refused"
                )
            return problems

        return await self._run(verify)
