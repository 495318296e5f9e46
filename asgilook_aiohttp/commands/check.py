"""``asgilook-aiohttp check [--repair] [--json]``: verify the whole library, with the server
running or not.

Every image's and kept thumbnail's blob is read through and its size and SHA-256 compared
with its record; every blob stored is matched with a record; the journal is searched for
work whose lease expired; ``staging/`` for what processes that are gone left; and the index
runs its own integrity check. One line per problem on standard output (or one JSON
document), progress on standard error.

Nodes keep working meanwhile, and their work is journaled before it stores a blob and
until a record names it or it is removed again (see ``journal``). So the blobs are listed
first, then the journal, then the records: a blob that no record read afterwards names,
and that was not journaled when the journal was read, is left over unless it is journaled
now, gone, or named by a record now (a thumbnail evicted and made again while the records
were read). ``--repair`` takes each one in hand through the journal, as the server's own
undoing does, and if still no record names it then, removes a thumbnail's; an image's it
sets aside in ``set-aside/`` instead, as the only copy of someone's photo it may be (an
index restored from an older backup does not know the images uploaded since).

``--repair`` never removes an image's record, nor a blob an image's record names: one that
does not match its record is still the only copy there is. Thumbnails are a cache: one
whose blob is missing or wrong (served as a 404, or wrong, until evicted) has its record
and blob removed as an eviction would, and is made again when next asked for. Nothing is
repaired on an index that fails its own check: it may miss records that are there.

A blob, or a directory of them, that cannot be read (a failing disk, say) is a problem of
its own; the check goes on with the rest, and ``--repair`` leaves it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field

from ..config import Config
from ..storage.ports import (
    SET_ASIDE,
    BlobMissing,
    ImageRecord,
    ThumbnailRecord,
    Unavailable,
    holds,
    image_key,
    thumbnail_key,
    thumbnail_of,
)
from ..storage.scratch import Scratch
from . import Command
from .attached import Attached, CannotRun, attached, describe

# Records read at a time.
_BATCH = 500
# Blobs hashed at once: local reads in threads, or requests to the object store.
_LOCAL_READERS = 8
_REMOTE_READERS = 16
# Seconds between progress lines.
_PROGRESS_EVERY = 5.0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repair",
        action="store_true",
        help="remove what is safe to remove: thumbnails' blobs no record names, what "
        "processes that are gone left in staging/, journaled work whose lease expired, and "
        "thumbnails whose blob is missing or wrong (made again when asked for); move "
        "to set-aside/ images' blobs no record names; never remove an image's record, nor "
        "its blob",
    )
    parser.add_argument(
        "--json", action="store_true", help="report as one JSON document on standard output"
    )


@dataclass(frozen=True)
class Problem:
    kind: str
    """One of: ``unnamed-blob``, ``stray``, ``missing``, ``wrong-size``, ``wrong-sha256``,
    ``unreadable``, ``staging-leftover``, ``expired-work``, ``index``."""
    key: str
    """The blob key, the name in the store, the journal's key, or the index."""
    detail: str
    id: str | None = None
    """The image it is of, if any."""

    @property
    def line(self) -> str:
        return f"{self.key}: {self.detail}"


@dataclass
class _Report:
    to_json: bool
    images: int = 0
    thumbnails: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[Problem] = field(default_factory=list)
    refused: str | None = None
    """Why nothing was repaired, if ``--repair`` was refused."""
    bad_thumbnails: list[tuple[Problem, ThumbnailRecord]] = field(default_factory=list)
    set_aside: int = 0
    """Images' blobs the repair moved to ``set-aside/``."""
    set_aside_earlier: int = 0
    """What was in ``set-aside/`` before."""

    def found(self, problem: Problem) -> None:
        self.problems.append(problem)
        if not self.to_json:
            print(problem.line, flush=True)

    def did(self, problem: Problem, what: str) -> None:
        done = Problem(problem.kind, problem.key, what, problem.id)
        self.repaired.append(done)
        if not self.to_json:
            print(f"repaired: {done.line}", flush=True)


async def _run(config: Config, args: argparse.Namespace) -> int:
    started = time.monotonic()
    report = _Report(to_json=args.json)
    try:
        async with attached(config) as library, _progress(report, started):
            await _check(library, config, report, repair=args.repair)
    except Unavailable as error:
        raise CannotRun(str(error)) from None
    seconds = time.monotonic() - started
    if args.json:
        document = {
            "library": describe(config),
            "checked": {
                "images": report.images,
                "thumbnails": report.thumbnails,
                "blobs": report.blobs,
                "bytes": report.bytes,
            },
            "problems": [asdict(problem) for problem in report.problems],
            "repaired": [asdict(done) for done in report.repaired],
            "repair_refused": report.refused,
            "set_aside": report.set_aside,
            "set_aside_earlier": report.set_aside_earlier,
            "seconds": round(seconds, 3),
        }
        print(json.dumps(document, indent=2))
    else:
        print(_summary(config, report, seconds))
    return 1 if report.problems else 0


def _summary(config: Config, report: _Report, seconds: float) -> str:
    checked = (
        f"checked {describe(config)}: {report.images} images, {report.thumbnails} thumbnails, "
        f"{report.blobs} blobs stored, {report.bytes} bytes read in {seconds:.1f} s"
    )
    # Not a problem, but what an operator is to look at some day.
    earlier = report.set_aside_earlier
    files = "file" if earlier == 1 else "files"
    before = f"; {earlier} {files} in {SET_ASIDE} from earlier repairs" if earlier else ""
    if not report.problems:
        return f"{checked}; no problems{before}"
    repaired = f", {len(report.repaired)} repaired" if report.repaired else ""
    if report.set_aside:
        repaired += f" ({report.set_aside} moved to {SET_ASIDE})"
    refused = f"; {report.refused}" if report.refused else ""
    return f"{checked}; {len(report.problems)} problems{repaired}{refused}{before}"


async def _check(library: Attached, config: Config, report: _Report, *, repair: bool) -> None:
    index_problems = await library.index.verify()
    for problem in index_problems:
        report.found(Problem("index", f"the index ({library.index.name})", problem))
    if repair and index_problems:
        # A damaged index may miss a record that is there: what it calls left over may
        # be named.
        repair = False
        report.refused = "the index failed its own check, so nothing was repaired"
    try:
        await _check_contents(library, config, report, repair=repair)
    except Exception as error:
        if not index_problems or isinstance(error, Unavailable):
            raise
        report.found(
            Problem(
                "index", f"the index ({library.index.name})", f"the check could not go on: {error}"
            )
        )


async def _check_contents(
    library: Attached, config: Config, report: _Report, *, repair: bool
) -> None:
    report.set_aside_earlier = await library.blobs.set_aside_count()
    # Listed first, then the journal, then the records: see the module's docstring.
    listed = await _list(library, report)
    journaled = {entry.key for entry in await library.index.journaled()}
    readers = _REMOTE_READERS if config.shared_storage else _LOCAL_READERS
    async with _Readers(readers) as reading:
        await _read_records(library, reading, listed, report)
    unnamed = await _unnamed(library, listed, journaled, report)
    if repair:
        await _remove_unnamed(library, unnamed, report)
        await _forget_thumbnails(library, report)
    await _check_journal(library, report, repair=repair)
    _check_staging(config, report, repair=repair)


async def _list(library: Attached, report: _Report) -> dict[str, str]:
    """The blobs stored, by key, to their names in the store; strays are reported."""
    listed: dict[str, str] = {}
    async for batch in library.blobs.stored():
        for stored in batch:
            if stored.unlisted is not None:
                detail = f"cannot be listed: {stored.unlisted}"
                report.found(Problem("unreadable", stored.name, detail))
                continue
            report.blobs += 1
            if stored.key is None:
                report.found(
                    Problem("stray", stored.name, "not a blob of this library: no key names it")
                )
            else:
                listed[stored.key] = stored.name
    return listed


async def _read_records(
    library: Attached, reading: _Readers, listed: dict[str, str], report: _Report
) -> None:
    """Start comparing every record's blob with it, and take what they name from ``listed``."""
    after: str | None = None
    more = True
    while more:
        images, more = await library.index.page(_BATCH, after)
        for image in images:
            listed.pop(image_key(image.id), None)
            report.images += 1
            await reading.start(_image(library, image, report))
        after = images[-1].id if images else after
    last: tuple[str, int, int] | None = None
    while thumbnails := await library.index.thumbnail_page(_BATCH, last):
        for thumbnail in thumbnails:
            listed.pop(_key_of(thumbnail), None)
            report.thumbnails += 1
            await reading.start(_thumbnail(library, thumbnail, report))
        last = _size(thumbnails[-1])


def _size(thumbnail: ThumbnailRecord) -> tuple[str, int, int]:
    return thumbnail.image_id, thumbnail.width, thumbnail.height


_Said = tuple[int, str]
"""What a record says of its blob: its size and SHA-256."""


def _image_of(key: str) -> str:
    thumbnail = thumbnail_of(key)
    return thumbnail[0] if thumbnail else key.removeprefix("images/").removesuffix(".jpeg")


async def _image(library: Attached, image: ImageRecord, report: _Report) -> None:
    async def now() -> _Said | None:
        current = await library.index.get(image.id)
        return None if current is None else (current.nbytes, current.sha256)

    expected = (image.nbytes, image.sha256)
    subject = f"image {image.id}"
    await _compare(library, image_key(image.id), subject, image.id, (expected, now), report=report)


async def _thumbnail(library: Attached, thumbnail: ThumbnailRecord, report: _Report) -> None:
    async def now() -> _Said | None:
        _, current = await library.index.image_and_thumbnail(*_size(thumbnail))
        return None if current is None else (current.nbytes, current.sha256)

    expected = (thumbnail.nbytes, thumbnail.sha256)
    key = _key_of(thumbnail)
    subject = f"thumbnail {thumbnail.width}x{thumbnail.height} of image {thumbnail.image_id}"
    found = await _compare(
        library, key, subject, thumbnail.image_id, (expected, now), report=report
    )
    if found is not None and found.kind != "unreadable":
        report.bad_thumbnails.append((found, thumbnail))


async def _compare(
    library: Attached,
    key: str,
    subject: str,
    image_id: str,
    record: tuple[_Said, Callable[[], Awaitable[_Said | None]]],
    *,
    report: _Report,
) -> Problem | None:
    """Compare the blob ``key`` with what its record said, and says now (None if it is
    gone): a problem is one only if the record still says the same."""
    expected, now = record
    try:
        nbytes, sha256 = await library.blobs.digest(key)
    except BlobMissing:
        if await now() != expected:
            return None
        problem = Problem("missing", subject, f"its blob {key} is missing", image_id)
    except OSError as error:  # a failing disk, say: the blobs that can be read are checked
        if await now() != expected:
            return None
        problem = _unreadable(subject, f"its blob {key}", error, image_id)
    else:
        report.bytes += nbytes
        if (nbytes, sha256) == expected or await now() != expected:
            return None
        if nbytes != expected[0]:
            detail = f"its blob holds {nbytes} bytes, the record says {expected[0]}"
            problem = Problem("wrong-size", subject, detail, image_id)
        else:
            detail = f"its blob's SHA-256 is {sha256}, the record says {expected[1]}"
            problem = Problem("wrong-sha256", subject, detail, image_id)
    report.found(problem)
    return problem


def _unreadable(subject: str, what: str, error: OSError, image_id: str) -> Problem:
    detail = f"{what} cannot be read: {error.strerror or error}"
    return Problem("unreadable", subject, detail, image_id)


async def _unnamed(
    library: Attached, listed: dict[str, str], journaled: set[str], report: _Report
) -> dict[str, str]:
    """Report those of the blobs no record named that are left over, and return them: no
    work was journaled for them before the records were read, none is now, they are still
    there, and no record names them now."""
    candidates = {key: name for key, name in listed.items() if not _covered(key, journaled)}
    if not candidates:
        return {}
    journaled_now = {entry.key for entry in await library.index.journaled()}
    unnamed = {}
    for key, name in candidates.items():
        if _covered(key, journaled_now):
            continue
        image_id = _image_of(key)
        problem = None
        try:
            if await holds(library.blobs, key):
                problem = Problem("unnamed-blob", name, "no record names this blob", image_id)
        except OSError as error:
            problem = _unreadable(name, "no record names this blob, and it", error, image_id)
        # The record may have been passed while the blob was being made again (a thumbnail
        # evicted, then asked for), and added, its work cleared, before the journal was
        # read again.
        if problem is None or await _named(library, key):
            continue
        report.found(problem)
        if problem.kind == "unnamed-blob":
            unnamed[key] = name
    return unnamed


async def _named(library: Attached, key: str) -> bool:
    """Whether a record names the blob ``key`` now."""
    if (thumbnail := thumbnail_of(key)) is not None:
        _, record = await library.index.image_and_thumbnail(*thumbnail)
        return record is not None
    return await library.index.get(_image_of(key)) is not None


def _covered(key: str, journaled: set[str]) -> bool:
    """Whether journaled work may store or remove the blob ``key``: its own entry, or its
    image's (an upload, or a deletion, which takes the thumbnails too)."""
    return key in journaled or _image_of(key) in journaled


async def _remove_unnamed(library: Attached, unnamed: dict[str, str], report: _Report) -> None:
    journal = library.journal
    for key, name in unnamed.items():
        # The journal's key that covers it: the thumbnail's own, or the image's id.
        image_id = _image_of(key)
        thumbnail = thumbnail_of(key) is not None
        work = key if thumbnail else image_id
        problem = Problem("unnamed-blob", name, "", image_id)
        if not await journal.claim(work):
            report.did(problem, "left: a node is working on it now")
        elif thumbnail:
            await journal.undo([work])  # removes it only if still no record names it
            if await holds(library.blobs, key):
                report.did(problem, "left: a record names it now, or it could not be removed")
            else:
                report.did(problem, "removed")
        else:
            await _set_aside(library, key, problem, report)


async def _set_aside(library: Attached, key: str, problem: Problem, report: _Report) -> None:
    """Move an image's blob that no record names to ``set-aside/``, its id in hand."""
    journal = library.journal
    image_id = _image_of(key)
    try:
        if await library.index.get(image_id) is not None:
            report.did(problem, "left: a record names it now")
            return
        try:
            where = await library.blobs.set_aside(key)
        except BlobMissing:
            report.did(problem, "left: removed meanwhile")
            return
        except OSError as error:  # set-aside/ not a directory this process may write in
            report.did(problem, f"left: it could not be set aside: {error.strerror}")
            return
        report.set_aside += 1
        report.did(problem, f"no record names this blob: moved to {where}")
    finally:
        # Cleared, not undone: undoing an image's entry removes its blob, and that is just
        # what is not to be done with it.
        await library.index.unjournal([image_id], journal.owner)
        journal.done(image_id)


async def _forget_thumbnails(library: Attached, report: _Report) -> None:
    """Remove the records of thumbnails whose blobs are missing or wrong, and their blobs,
    as an eviction does: the next request for one makes it again."""
    for problem, thumbnail in report.bad_thumbnails:
        if await library.journal.take(_forgetting(library, thumbnail), _key_of):
            await library.journal.undo([_key_of(thumbnail)])
            report.did(problem, "its record and blob removed: made again when next asked for")
        else:
            report.did(problem, "left: made again, or removed, meanwhile")


def _forgetting(
    library: Attached, thumbnail: ThumbnailRecord
) -> Callable[[frozenset[str]], Awaitable[list[ThumbnailRecord]]]:
    journal = library.journal

    def forget(in_hand: frozenset[str]) -> Awaitable[list[ThumbnailRecord]]:
        return library.index.forget_thumbnail(thumbnail, journal.owner, journal.lease)

    return forget


def _key_of(thumbnail: ThumbnailRecord) -> str:
    return thumbnail_key(*_size(thumbnail))


async def _check_journal(library: Attached, report: _Report, *, repair: bool) -> None:
    expired = [entry for entry in await library.index.journaled() if entry.expires_in < 0]
    for entry in expired:
        owner = f"node {entry.owner}" if entry.owner else "a node of an earlier release"
        detail = (
            f"work journaled by {owner} whose lease expired {-entry.expires_in:.0f} s ago: "
            "nothing finishes it until a node takes it over"
        )
        report.found(Problem("expired-work", f"journal entry {entry.key}", detail))
    if repair and expired:
        await library.journal.sweep()
        left = {entry.key for entry in await library.index.journaled()}
        for entry in expired:
            problem = Problem("expired-work", f"journal entry {entry.key}", "")
            if entry.key in left:
                report.did(problem, "taken over by a node meanwhile, or left to the server")
            else:
                report.did(problem, "taken over and undone")


def _check_staging(config: Config, report: _Report, *, repair: bool) -> None:
    scratch = Scratch(config.storage_path)
    if not scratch.directory.is_dir():
        return
    for path in scratch.leftovers():
        name = f"{scratch.directory.name}/{path.name}"
        problem = Problem("staging-leftover", name, "left by a process that is gone")
        report.found(problem)
        if repair:
            path.unlink(missing_ok=True)
            report.did(problem, "removed")


class _Readers:
    """Blobs being read and hashed, up to a number at once; the first failure ends them."""

    def __init__(self, limit: int) -> None:
        self._room = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    async def __aenter__(self) -> _Readers:
        return self

    async def start(self, reading: Coroutine[object, object, None]) -> None:
        await self._room.acquire()
        if self._failure is not None:
            reading.close()
            raise self._failure
        task = asyncio.create_task(reading)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._room.release()
        if not task.cancelled() and self._failure is None:
            self._failure = task.exception()

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None or self._failure is not None:
            for task in self._tasks:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if exc_info[0] is None and self._failure is not None:
            raise self._failure


@contextlib.asynccontextmanager
async def _progress(report: _Report, started: float) -> AsyncIterator[None]:
    """A line on standard error every few seconds while the check runs."""

    async def tell() -> None:
        while True:
            await asyncio.sleep(_PROGRESS_EVERY)
            seconds = time.monotonic() - started
            print(
                f"checking: {report.blobs} blobs listed, {report.images} images and "
                f"{report.thumbnails} thumbnails read, {report.bytes / 1e6:.0f} MB "
                f"({report.bytes / 1e6 / seconds:.0f} MB/s), {len(report.problems)} problems, "
                f"{seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    telling = asyncio.create_task(tell())
    try:
        yield
    finally:
        telling.cancel()


COMMAND = Command(
    name="check",
    summary="verify the whole library: every blob against its record, and the index itself",
    usage="[--repair] [--json]",
    arguments=_arguments,
    run=_run,
)
