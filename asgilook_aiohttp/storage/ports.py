"""The two ports the rest of the service speaks to, and what crosses them.

The **index** keeps a record per image and per kept thumbnail, pages through images in
upload order, and journals work in progress. The **blob store** keeps bytes under keys.
Each has an embedded implementation (SQLite, a local directory) and a shared one
(PostgreSQL, an S3 bucket) that any number of nodes use at once.

Nothing that must agree across nodes lives in one process's memory. Work in progress is
journaled under a key, owned by one node and leased for a while: an image id while an
upload or a deletion is under way (the image and everything of it), or a thumbnail's
blob key while it is made or evicted. Each node renews its own leases; any node may take
over an entry whose lease has expired, and finish or undo what its owner left. Taking a
thumbnail's key is also how one node, and only one, comes to make it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


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
    """When it was last served, in whole seconds since the epoch (coarse: it is recorded
    at most once an hour)."""


@dataclass(frozen=True)
class Deleted:
    image_bytes: int
    thumbnail_bytes: int


@dataclass(frozen=True)
class Totals:
    images: int
    image_bytes: int
    thumbnail_bytes: int


def totals_problem(kept: Totals, counted: Totals) -> str | None:
    """What is wrong with the totals an index keeps, if the records add up to others."""
    if kept == counted:
        return None
    return (
        f"the totals say {kept.images} images of {kept.image_bytes} bytes and "
        f"{kept.thumbnail_bytes} bytes of thumbnails; the records add up to {counted.images} "
        f"images of {counted.image_bytes} bytes and {counted.thumbnail_bytes} bytes of thumbnails"
    )


def image_key(image_id: str) -> str:
    return f"images/{image_id}.jpeg"


SET_ASIDE = "set-aside/"
"""Where images' blobs that no record names are set aside, beside ``images/``."""


def set_aside_name(key: str, attempt: int) -> str:
    """The name in ``set-aside/`` of the image's blob ``key``; another one for each later
    attempt, for when one is taken already."""
    prefix, _, name = key.partition("/")
    image_id = name.removesuffix(".jpeg")
    if prefix != "images" or not name.endswith(".jpeg") or not _plain(image_id):
        raise ValueError(f"not an image's blob key: {key!r}")
    suffix = f".{attempt}" if attempt else ""
    return f"{SET_ASIDE}{image_id}{suffix}.jpeg"


def thumbnail_key(image_id: str, width: int, height: int) -> str:
    return f"thumbnails/{image_id}/{width}x{height}.jpeg"


def thumbnail_of(key: str) -> tuple[str, int, int] | None:
    """The image id and size a thumbnail key names; None for any other key."""
    prefix, _, rest = key.partition("/")
    image_id, _, name = rest.partition("/")
    if prefix != "thumbnails" or not name.endswith(".jpeg"):
        return None
    width, _, height = name.removesuffix(".jpeg").partition("x")
    return image_id, int(width), int(height)


def blob_key(name: str) -> bool:
    """Whether ``name`` is the key of some image's or thumbnail's blob."""
    if (thumbnail := _parsed_thumbnail(name)) is not None:
        return thumbnail_key(*thumbnail) == name
    prefix, _, rest = name.partition("/")
    image_id = rest.removesuffix(".jpeg")
    return prefix == "images" and rest.endswith(".jpeg") and _plain(image_id)


def _parsed_thumbnail(name: str) -> tuple[str, int, int] | None:
    try:
        thumbnail = thumbnail_of(name)
    except ValueError:  # a size that is no number
        return None
    return thumbnail if thumbnail is not None and _plain(thumbnail[0]) else None


def _plain(image_id: str) -> bool:
    return bool(image_id) and "/" not in image_id and not image_id.startswith(".")


@dataclass(frozen=True)
class JournalEntry:
    key: str
    owner: str | None
    """None for an entry of a release that journaled no owners."""
    expires_in: float
    """Seconds until its lease expires, by the index's clock; negative once it has."""


@dataclass(frozen=True)
class Stored:
    """Something the blob store holds, as a listing finds it."""

    name: str
    """Where it is, for people: its path under the storage directory, or its object key
    under the prefix."""
    key: str | None
    """The blob key it holds; None for a stray that no key names, or what could not be
    listed."""
    nbytes: int
    unlisted: str | None = None
    """Why it could not be listed, or looked at (a directory, say): what is in it is not
    listed."""


class UnknownCursor(LookupError):
    """``after`` names an image that is not in the index."""


class Unavailable(Exception):
    """A dependency failed to answer, or not within its time: the request may be tried
    again. ``dependency`` names it for people ("PostgreSQL", "the object store")."""

    retry_after = 5

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency


class LeaseLost(Unavailable):
    """The journal entry this work held expired and was taken over by a node that
    undoes it: this node was stopped or cut off for longer than the lease."""


class BlobMissing(LookupError):
    """No blob is stored under the key (deleted, or evicted, meanwhile)."""


class Index(Protocol):
    """Every call may raise ``Unavailable``; none waits longer than its backend's timeout."""

    name: str
    """What it is, for people: "SQLite", "PostgreSQL"."""

    async def open(self) -> None:
        """Connect, and create or upgrade the schema."""

    async def close(self) -> None: ...

    async def problem(self) -> str | None:
        """Why the index cannot take writes now (down, full), for readiness; None if it can."""

    def full(self) -> str | None:
        """Why writes that take room are refused just now (the room left on a full disk is
        kept for deletions); None if they are not. Answered without a round trip."""

    async def catch_up(self) -> None:
        """Do what a full disk put off, as far as there is room for it now; the store
        calls this every second."""

    # Work in progress, leased: ``owner`` is a node's id, leases run for ``lease`` seconds.

    async def journal(self, keys: Collection[str], owner: str, lease: float) -> None:
        """Journal new keys (fresh image ids), held by ``owner``."""

    async def claim(self, key: str, owner: str, lease: float) -> bool:
        """Journal ``key`` for ``owner`` unless another holds it and its lease is current
        (an expired one is taken over); whether ``owner`` holds it now."""

    async def unjournal(self, keys: Collection[str], owner: str) -> None:
        """Clear entries ``owner`` holds; others' are left alone."""

    async def renew(self, owner: str, lease: float, keys: Collection[str]) -> list[str]:
        """Extend the leases of these entries of ``owner`` to ``lease`` seconds from now;
        the keys of those it still held. Its entries not named lapse: those of writes
        whose answer was lost (a statement that timed out here and committed there),
        which only a sweep can find."""

    async def take_expired(
        self, owner: str, lease: float, limit: int, keep: Collection[str]
    ) -> list[str]:
        """Take over up to ``limit`` entries whose lease has expired, for ``owner``; their
        keys. Two nodes asking at once never take the same entry. The owner's own in
        ``keep`` are left to it: still in hand, their work could finish between its
        undoing's steps."""

    # Images.

    async def add(self, record: ImageRecord, owner: str) -> None:
        """Record an image whose blob is stored, and clear its journal entry, at once.
        Raises ``LeaseLost`` if ``owner`` no longer holds the entry."""

    async def get(self, image_id: str) -> ImageRecord | None: ...

    async def page(
        self, limit: int, after: str | None, *, newest_first: bool = False
    ) -> tuple[list[ImageRecord], bool]:
        """Up to ``limit`` images in upload order (or the reverse, ``newest_first``) after
        the image ``after`` (deleted or not), and whether more follow. Raises
        ``UnknownCursor``. A reader paging to the end meets exactly once every image
        committed before it got there (newest first: before its first page), however
        many nodes add images meanwhile."""

    async def delete(
        self, image_id: str, token_sha256: str | None, owner: str, lease: float
    ) -> Deleted | None:
        """Remove an image and its thumbnails' records and journal its id for ``owner``,
        at once; with ``token_sha256``, only if it is the image's delete token. None if
        no image matched."""

    # Thumbnails.

    async def image_and_thumbnail(
        self, image_id: str, width: int, height: int
    ) -> tuple[ImageRecord | None, ThumbnailRecord | None]:
        """An image and its kept thumbnail of this size, in one lookup; None where missing."""

    async def add_thumbnail(self, record: ThumbnailRecord, owner: str) -> int | None:
        """Record a thumbnail whose blob is stored and clear its key's journal entry, at
        once: the bytes of the record it replaced (0 if none), or None if its image is
        gone. Raises ``LeaseLost`` if ``owner`` no longer holds the entry."""

    async def touch_thumbnail(self, record: ThumbnailRecord, now: int) -> None: ...

    async def evict_thumbnails(
        self, at_least: int, spared: Collection[str], owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        """Remove the records of the least recently used thumbnails that free ``at_least``
        bytes, journaling their keys for ``owner`` until their blobs are gone; never one
        whose key is in ``spared`` or journaled. Two nodes never evict the same one."""

    async def totals(self) -> Totals: ...

    # Checking the whole library, beside the nodes that serve it.

    async def thumbnail_page(
        self, limit: int, after: tuple[str, int, int] | None
    ) -> list[ThumbnailRecord]:
        """Up to ``limit`` thumbnail records ordered by (image id, width, height), after
        that triple; an empty list at the end."""

    async def journaled(self) -> list[JournalEntry]:
        """Every journal entry, as it stands."""

    async def forget_thumbnail(
        self, record: ThumbnailRecord, owner: str, lease: float
    ) -> list[ThumbnailRecord]:
        """Remove a thumbnail's record, if it still is ``record`` and its key is not
        journaled, journaling the key for ``owner`` until its blob is gone, as an eviction
        does: the list of it, or an empty one."""

    async def verify(self) -> list[str]:
        """What is wrong with the index itself, one sentence each, for people: its storage's
        own integrity check, and totals that do not add up to the records'; empty if
        nothing is. May read the whole index."""


class Destination(Protocol):
    """Where a worker process puts the bytes it made. It is pickled into the worker."""

    def put(self, data: bytes) -> bytes | None:
        """Store ``data`` durably; or, where the server stores it, hand it back."""


class HandBack:
    """The destination of a blob the server stores itself: the worker hands it back."""

    def put(self, data: bytes) -> bytes | None:
        return data


@dataclass(frozen=True)
class FileBody:
    """Bytes to send from an open local file, with sendfile."""

    file: BinaryIO
    offset: int
    count: int

    async def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class StreamBody:
    """Bytes to send as they arrive from elsewhere."""

    chunks: AsyncIterator[bytes]
    count: int
    release: Callable[[], Awaitable[None]]

    async def close(self) -> None:
        await self.release()


@dataclass(frozen=True)
class BytesBody:
    """Bytes read already, to send as they are; ``let_go`` is told once they are sent."""

    data: bytes | bytearray
    let_go: Callable[[int], None] | None = None

    @property
    def count(self) -> int:
        return len(self.data)

    async def close(self) -> None:
        if self.let_go is not None:
            self.let_go(len(self.data))


Body = FileBody | StreamBody | BytesBody


class Blobs(Protocol):
    """Every call may raise ``Unavailable``; none waits longer than its backend's timeout."""

    name: str
    """What it is, for people: "the storage directory", "the object store"."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def problem(self) -> str | None:
        """Why blobs cannot be stored now, for readiness; None if they can."""

    def destination(self, key: str) -> Destination:
        """Where a worker puts the blob ``key``."""

    async def keep(self, key: str, handed_back: bytes | None) -> None:
        """Store what a worker's destination handed back, if anything."""

    async def abandon(self, destination: Destination) -> None:
        """Remove what a worker that failed may have left on its way to ``destination``
        (not the blob itself)."""

    async def source(self, key: str) -> str | bytes:
        """What a worker reads the blob from: a local path, or its bytes. Raises
        ``BlobMissing``."""

    async def body(self, key: str, offset: int, count: int) -> Body:
        """``count`` bytes of the blob from ``offset``, ready to send (count 0: only
        that it exists), opened or read before this returns. Raises ``BlobMissing``."""

    async def delete(self, keys: Collection[str]) -> None:
        """Remove blobs; those already gone are no error."""

    async def delete_image(self, image_id: str) -> None:
        """Remove an image's blob and every thumbnail blob of it."""

    def stored(self) -> AsyncIterator[list[Stored]]:
        """Everything stored, in batches, strays included, and what could not be listed
        (``Stored.unlisted``): a listing made as the nodes go on, so a blob stored or
        removed meanwhile may be in it or not."""

    async def digest(self, key: str) -> tuple[int, str]:
        """The blob's size and SHA-256 (hex), read through without holding it whole nor
        hashing on the event loop. Raises ``BlobMissing``; ``OSError`` if it is there
        but cannot be read."""

    async def set_aside(self, key: str) -> str:
        """Move an image's blob to ``set-aside/``, flat under its id (with a number added
        if that name is taken: nothing there is replaced); where it went, named as
        ``Stored.name`` names. ``stored`` never lists what is there. Raises
        ``BlobMissing``."""

    async def set_aside_count(self) -> int:
        """How many files, or objects, are in ``set-aside/``."""


async def holds(blobs: Blobs, key: str) -> bool:
    """Whether ``blobs`` has the blob ``key``; raises ``Unavailable`` if the store does
    not answer."""
    try:
        body = await blobs.body(key, 0, 0)
    except BlobMissing:
        return False
    await body.close()
    return True
