"""``asgilook-aiohttp backup DEST`` and ``restore SRC``: copy a library, while it serves.

A copy is a storage directory a server can start on. It stands for the moment its index
was snapshotted, with SQLite's online backup API, which the server's writers do not wait
for (WAL): a committed row names a complete file, so every image acknowledged before that
moment is in the copy. Work in progress (the journal) is left out, and so are thumbnails,
which a server makes again on demand.

Each original the snapshot names is then copied, unless the destination has it already
(originals never change, so a second copy into the same place copies only what is new):
read and hashed, written to the destination's ``staging/``, fsynced, read back from the
disk and hashed again, and renamed into place. Only then is the snapshot written into the
destination's index, in one SQLite transaction; and only after that are the files it no
longer names removed. The destination's index names only files that are there, at every
moment, even across a crash.

An original that is gone by the time it is copied, and whose row is gone from the library
too, was deleted after the snapshot: the copy records the deletion, as the server did. One
that is gone while its row is still there was lost, and one whose bytes are not what its
row says would be sent with the wrong length and digest: either is left out of the copy,
named on standard error, and makes the exit status 1 (``check`` tells the rest).

The files ``check --repair`` set aside are copied too, by name and size: they never change.

A copy says what it is a copy of, in a marker beside its index: ``-copying`` while it is
made, renamed ``-backup-of`` once it is complete (a restored library keeps none). Files
are only ever removed from a destination whose marker names this very copy (this library,
or this restore's source) and that no server has been started on since: anything else may
be a library's only copy of an image.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import hashlib
import os
import shutil
import signal
import sqlite3
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config
from ..storage.backends import INDEX_FILE, RESERVE_FILE
from ..storage.durable import fsync_directory, move_into_place, place_durably, write_durably
from ..storage.files import LocalBlobs, Placement
from ..storage.ports import SET_ASIDE, image_key
from ..storage.scratch import Scratch
from ..storage.sqlite import SCHEMA_VERSION, is_locked
from . import Command
from .attached import CannotRun

_DOCS = "the operating guide's section on backups (docs/operating.md)"
_COPIERS = 8
"""Files copied at once: each mostly waits for its fsync and its read back."""
_BATCH = 512
_CHUNK = 1024 * 1024
_PROGRESS_EVERY = 5.0
_LIBRARY_ID = f"{INDEX_FILE}-library-id"
"""Beside a library's index: the identity its backups are marked with, made by its first
backup (the index's schema is the server's)."""
_COPYING = f"{INDEX_FILE}-copying"
"""Beside a copy's index while it is made: what it is a copy of."""
_BACKUP_OF = f"{INDEX_FILE}-backup-of"
"""``_COPYING``, renamed once the backup is complete."""
_WAL_HEADER = 2
"""The file format version bytes of an index in WAL mode (offsets 18 and 19): a copy is
written in rollback journal mode, and a server switches it to WAL when it starts on it."""
_DMS_BYTE = 128
"""The byte of the ``-shm`` file each SQLite connection to a WAL index holds a read lock
on while it is open (its "dead man switch"): held by another process, a server."""


def _destination(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "destination",
        metavar="DEST",
        type=Path,
        help="a new or empty directory, or an earlier backup of this library (then only new "
        "images are copied)",
    )


def _source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="SRC", type=Path, help="a backup (or any storage directory)"
    )


async def _back_up(config: Config, args: argparse.Namespace) -> int:
    return _run(config.storage_path, args.destination, config, restoring=False)


async def _restore(config: Config, args: argparse.Namespace) -> int:
    return _run(args.source, config.storage_path, config, restoring=True)


def _run(source: Path, target: Path, config: Config, *, restoring: bool) -> int:
    _embedded_only(config)
    _interruptible()
    try:
        return _copy_library(source, target, config, restoring=restoring)
    except (OSError, sqlite3.Error) as error:
        # The target holds a consistent copy, or none, whenever this stops.
        raise CannotRun(
            f"could not copy into {target}: {error}; once that is fixed, run this again: it "
            "carries on from what is there"
        ) from None


def _interruptible() -> None:
    """Let Ctrl-C stop the copy at once. The copy runs on the command's event loop, which
    has nothing else to do, and asyncio.run's own handler would only cancel the task, which
    a copy that never awaits sees once it is done."""
    if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _embedded_only(config: Config) -> None:
    if config.shared_storage or config.blobs != "file":
        raise CannotRun(
            "this copies the embedded storage (--storage); with PostgreSQL and S3, dump the "
            f"database with pg_dump, then copy the bucket: see {_DOCS}"
        )


class _Outcome(enum.Enum):
    THERE = "already there"
    COPIED = "copied"
    GONE = "deleted after the snapshot"
    # Problems, said of the original; each leaves the image out of the copy.
    WRONG = "{original} is not what its row says ({nbytes:,} bytes, SHA-256 {sha256})"
    LOST = "{original} is missing, while the library still has its row"
    MISCOPIED = "its copy, read back from the disk, differs from {original}: a failing disk?"
    UNREADABLE = "{original} cannot be read: look at its permissions, and at the disk"


@dataclass
class _Tally:
    checked: int = 0
    there: int = 0
    copied: int = 0
    copied_bytes: int = 0
    set_aside: int = 0
    """Files of ``set-aside/`` copied."""
    gone: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    directories: set[Path] = field(default_factory=set)
    """Whose entries changed: fsynced before the index names the files in them."""


def _copy_library(source: Path, target: Path, config: Config, *, restoring: bool) -> int:
    started = time.monotonic()
    source, target = source.resolve(), target.resolve()
    _check_places(source, target)
    index, timeout = source / INDEX_FILE, config.dependency_timeout
    with contextlib.ExitStack() as resources:
        live = resources.enter_context(
            # A library in WAL mode (not a backup) may have rows in its -wal still.
            contextlib.closing(
                _open_live(index, timeout, access=_access(index) if restoring else "mode=ro")
            )
        )
        copy_of = f"restore from {source}" if restoring else f"backup of {_library_id(source)}"

        def still_indexed(image_id: str) -> bool:
            with _reading(index, timeout):
                row = live.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
            return row is not None

        target.mkdir(parents=True, exist_ok=True)
        resources.enter_context(_held(target))
        _check_target(target, copy_of, restoring=restoring)
        scratch = Scratch(target)
        scratch.open()
        place_durably(
            f"{copy_of}\n".encode(),
            str(scratch.path(".marker")),
            str(target / _COPYING),
            cached=True,
        )
        snapshot_path = scratch.path(".sqlite3")
        resources.callback(snapshot_path.unlink, missing_ok=True)
        resources.callback(
            snapshot_path.with_name(f"{snapshot_path.name}-journal").unlink, missing_ok=True
        )
        snapshot = resources.enter_context(
            contextlib.closing(sqlite3.connect(snapshot_path, isolation_level=None))
        )
        with _reading(index, timeout):
            live.backup(snapshot)
        snapshot.execute("PRAGMA journal_mode=DELETE")
        snapshot.execute("PRAGMA synchronous=OFF")  # scratch: a crash leaves it unused
        snapshot.executescript("BEGIN; DELETE FROM pending; DELETE FROM thumbnails; COMMIT;")
        unnamed = _images_in(target)
        tally = _copy_images(
            snapshot, source, target, scratch, unnamed, still_indexed=still_indexed
        )
        _leave_out(snapshot, tally.gone + tally.wrong)
        stale_aside = _copy_set_aside(source, target, scratch, tally)
        images, image_bytes = snapshot.execute(
            "SELECT count(*), coalesce(sum(bytes), 0) FROM images"
        ).fetchone()
        snapshot.execute(
            "UPDATE totals SET images = ?, image_bytes = ?, thumbnail_bytes = 0",
            (images, image_bytes),
        )
        with ThreadPoolExecutor(_COPIERS) as pool:
            list(pool.map(fsync_directory, tally.directories))
        _install(snapshot, target / INDEX_FILE, timeout)
        for path in [*unnamed.values(), *stale_aside]:
            Path(path).unlink(missing_ok=True)
        shutil.rmtree(target / "thumbnails", ignore_errors=True)
        if restoring:
            (target / _COPYING).unlink()
        else:
            (target / _COPYING).rename(target / _BACKUP_OF)
        fsync_directory(target)
    what = (
        f"restored {images:,} images ({_size(image_bytes)}) from {source} into {target}"
        if restoring
        else f"backed up {images:,} images ({_size(image_bytes)}) to {target}"
    )
    print(
        f"{what}: {tally.copied:,} copied ({_size(tally.copied_bytes)}), {tally.there:,} "
        f"already there, {len(unnamed):,} removed"
        + (f", {len(tally.gone):,} deleted meanwhile" if tally.gone else "")
        + (f", {len(tally.wrong):,} left out (run check)" if tally.wrong else "")
        + (
            f", set-aside/: {tally.set_aside:,} copied, {len(stale_aside):,} removed"
            if tally.set_aside or stale_aside
            else ""
        )
        + f", in {time.monotonic() - started:.1f} s"
    )
    return 1 if tally.wrong else 0


def _check_places(source: Path, target: Path) -> None:
    if target == source or source in target.parents:
        raise CannotRun(
            f"{target} is inside the library it would copy, {source}: give a directory "
            "elsewhere, on another disk at best"
        )
    if target.exists() and not target.is_dir():
        raise CannotRun(f"{target} is not a directory")


def _check_target(target: Path, copy_of: str, *, restoring: bool) -> None:
    """Refuse a ``target`` that holds anything but an earlier ``copy_of`` (complete or
    not) that no server has been started on: files in it the copy does not name are
    removed."""
    # mkfs makes lost+found at the root of a new file system: still an empty one.
    if not any(entry.name != "lost+found" for entry in target.iterdir()):
        return
    if _served(target / INDEX_FILE):
        raise CannotRun(f"a server is running on {target}: stop it first")
    interrupted = _marker(target / _COPYING)
    if interrupted is not None and interrupted != copy_of:
        raise CannotRun(
            f"{target} holds an interrupted copy that is not this one ({interrupted}): "
            "finish that one, or give a new or empty directory"
        )
    if interrupted is None and restoring:
        raise CannotRun(
            f"{target} is not empty: restore only into an empty or new storage directory "
            "(or start the server with --storage on the backup)"
        )
    if interrupted is None and _marker(target / _BACKUP_OF) != copy_of:
        raise CannotRun(
            f"{target} is not a backup of this library made by backup (its {_BACKUP_OF} "
            "would say so): give a new or empty directory"
        )
    if _started_on(target):
        raise CannotRun(
            f"a server has been started on {target}: it is a library of its own now, whose "
            "images a backup would remove; give a new or empty directory"
        )


def _marker(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except ValueError:  # not text: not a marker this command wrote
        return ""


def _started_on(storage: Path) -> bool:
    """Whether a server has ever been started on ``storage``: it sets its reserve up.
    (Not whether the index is in WAL mode: a command run on a backup, ``check`` say,
    switches it too, and takes no reserve there.)"""
    return any(storage.glob(f"{RESERVE_FILE}*"))


def _access(index: Path) -> str:
    """How a restore opens the index of the copy it restores: as immutable, needing no
    write access, when it holds all it has itself. A -wal may still hold rows (a stopped
    library in WAL mode), and a -journal what an interrupted write must have undone (a
    backup stopped while it wrote its index): the latter only a reader that may write can
    undo, and read the index through."""
    if index.with_name(f"{index.name}-journal").exists():
        return "mode=rw"
    return "mode=ro" if _in_wal_mode(index) else "mode=ro&immutable=1"


def _in_wal_mode(index: Path) -> bool:
    try:
        with open(index, "rb") as file:
            header = file.read(20)
    except FileNotFoundError:
        return False
    return _WAL_HEADER in header[18:20]


def _library_id(storage: Path) -> str:
    """The library's identity, made and stored beside its index the first time."""
    path = storage / _LIBRARY_ID
    if (known := _marker(path)) is None:
        made = storage / f"{_LIBRARY_ID}.{os.getpid()}"
        write_durably(made, f"library {uuid.uuid4()}\n".encode())
        try:
            # A link never replaces the one another backup made meanwhile.
            with contextlib.suppress(FileExistsError):
                os.link(made, path)
        finally:
            made.unlink()
        fsync_directory(storage)
        known = path.read_text().strip()
    return known


@contextlib.contextmanager
def _held(target: Path) -> Iterator[None]:
    """Keep other backups and restores out of ``target`` meanwhile."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CannotRun(f"another backup or restore is writing into {target}") from None
        yield
    finally:
        os.close(fd)


def _served(index: Path) -> bool:
    """Whether another process has the index open in WAL mode, as a server does."""
    try:
        fd = os.open(f"{index}-shm", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        # struct flock: l_type, l_whence, l_start, l_len, l_pid (and padding).
        asked = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, _DMS_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, asked)
    finally:
        os.close(fd)
    return bool(struct.unpack("hhqqi4x", answer)[0] != fcntl.F_UNLCK)


def _open_live(index: Path, timeout: float, *, access: str) -> sqlite3.Connection:
    """The library's index, open to be read (``access``, SQLite's URI parameters:
    ``mode=ro``, and ``immutable=1`` for one nothing writes to, which then needs no write
    access, and gets no -wal nor -shm file), if this release reads it; raises
    ``CannotRun``."""
    if not index.is_file():
        raise CannotRun(f"there is no library in {index.parent} (no {INDEX_FILE})")
    with _reading(index, timeout):
        live = sqlite3.connect(
            f"{index.as_uri()}?{access}",
            uri=True,
            timeout=timeout,
            isolation_level=None,
        )
        try:
            (version,) = live.execute("PRAGMA user_version").fetchone()
        except BaseException:
            live.close()
            raise
    if version != SCHEMA_VERSION:
        live.close()
        raise CannotRun(_version_problem(index, version))
    return live


@contextlib.contextmanager
def _reading(index: Path, timeout: float) -> Iterator[None]:
    """Say why the library's index could not be read, as ``CannotRun``."""
    try:
        yield
    except sqlite3.OperationalError as error:
        if not is_locked(error):
            raise CannotRun(f"cannot read {index}: {error}") from None
        raise CannotRun(
            f"{index} stayed locked for over {timeout:g} s: the server holds it to itself "
            "while the disk is too full for the index's shared memory; free some room "
            "(the server's /healthz says when it has it again), then run this again"
        ) from None
    except sqlite3.DatabaseError as error:
        raise CannotRun(f"{index} is not a readable index: {error}") from None


def _version_problem(index: Path, version: int) -> str:
    if version == 0:
        return f"{index} is not an index of asgilook-aiohttp (no schema)"
    if version < SCHEMA_VERSION:
        return (
            f"{index} has index schema version {version}, older than this release's "
            f"{SCHEMA_VERSION}: start this release's server on it once (that upgrades it), "
            "or copy it with the release that wrote it"
        )
    return (
        f"{index} has index schema version {version}, newer than this release's "
        f"{SCHEMA_VERSION}: copy it with the asgilook-aiohttp release that serves it"
    )


def _files(root: Path) -> Callable[[str], Placement]:
    """Where the original of an image is under ``root``, and a staging file beside it."""
    blobs = LocalBlobs(root, Scratch(root))

    def placement(image_id: str) -> Placement:
        return blobs.destination(image_key(image_id))

    return placement


def _images_in(root: Path) -> dict[str, str]:
    """The originals under ``root``: their paths by their ids."""
    found: dict[str, str] = {}
    for top in _directories(root / "images"):
        for below in _directories(top):
            with os.scandir(below) as entries:
                found.update(
                    (entry.name.removesuffix(".jpeg"), entry.path)
                    for entry in entries
                    if entry.name.endswith(".jpeg")
                )
    return found


def _directories(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(entry.path) for entry in entries if entry.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _copy_images(
    snapshot: sqlite3.Connection,
    source: Path,
    target: Path,
    scratch: Scratch,
    present: dict[str, str],
    *,
    still_indexed: Callable[[str], bool],
) -> _Tally:
    """Copy what ``target`` lacks of the originals the snapshot names. ``present``: the ids
    ``target`` has files for; what is left in it are those the snapshot does not name.
    ``still_indexed``: whether the library has a row for an image now."""
    (total,) = snapshot.execute("SELECT count(*) FROM images").fetchone()
    originals, copies = _files(source), _files(target)
    tally = _Tally()
    shown = time.monotonic()

    def copy(row: tuple[str, int, str, bool]) -> tuple[_Outcome, list[Path]]:
        image_id, nbytes, sha256, known = row
        place = copies(image_id)
        if known and _size_of(place.final) == nbytes:
            return _Outcome.THERE, []
        return _copy_into(originals(image_id).final, place.final, scratch, (nbytes, sha256))

    rows = snapshot.execute("SELECT id, bytes, sha256 FROM images ORDER BY seq")
    with ThreadPoolExecutor(_COPIERS) as pool:
        while batch := rows.fetchmany(_BATCH):
            known = [present.pop(image_id, None) is not None for image_id, _, _ in batch]
            work = [(*row, here) for row, here in zip(batch, known, strict=True)]
            for (image_id, nbytes, sha256), here, (done, changed) in zip(
                batch, known, pool.map(copy, work), strict=True
            ):
                # A deletion removes the row before the file: a file gone while its row
                # is still there was lost.
                lost = done is _Outcome.GONE and still_indexed(image_id)
                outcome = _Outcome.LOST if lost else done
                tally.checked += 1
                tally.directories.update(changed)
                if outcome is _Outcome.THERE:
                    tally.there += 1
                elif outcome is _Outcome.COPIED:
                    tally.copied += 1
                    tally.copied_bytes += nbytes
                else:
                    (tally.gone if outcome is _Outcome.GONE else tally.wrong).append(image_id)
                    if here:  # a file of the earlier copy, no longer named
                        present[image_id] = copies(image_id).final
                    if outcome is not _Outcome.GONE:
                        original = originals(image_id).final
                        problem = outcome.value.format(
                            original=original, nbytes=nbytes, sha256=sha256
                        )
                        print(f"{image_id}: {problem}; left out of the copy", file=sys.stderr)
            if time.monotonic() - shown >= _PROGRESS_EVERY:
                shown = time.monotonic()
                print(
                    f"{tally.checked:,} of {total:,} images: {tally.copied:,} copied "
                    f"({_size(tally.copied_bytes)}), {tally.there:,} already there",
                    file=sys.stderr,
                )
    return tally


def _size_of(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _copy_set_aside(source: Path, target: Path, scratch: Scratch, tally: _Tally) -> list[str]:
    """Copy the files of ``source``'s ``set-aside/`` that ``target``'s lacks, counted in
    ``tally``; those of ``target``'s that ``source`` no longer has."""
    wanted, present = _listing(source / SET_ASIDE), _listing(target / SET_ASIDE)
    missing = [name for name, nbytes in wanted.items() if present.get(name) != nbytes]

    def copy(name: str) -> tuple[_Outcome, list[Path]]:
        return _copy_into(
            str(source / SET_ASIDE / name), str(target / SET_ASIDE / name), scratch, None
        )

    with ThreadPoolExecutor(_COPIERS) as pool:
        for name, (outcome, changed) in zip(missing, pool.map(copy, missing), strict=True):
            tally.directories.update(changed)
            if outcome is _Outcome.COPIED:
                tally.set_aside += 1
            elif outcome in (_Outcome.MISCOPIED, _Outcome.UNREADABLE):
                original = source / SET_ASIDE / name
                problem = outcome.value.format(original=original)
                print(f"{SET_ASIDE}{name}: {problem}; left out of the copy", file=sys.stderr)
                tally.wrong.append(f"{SET_ASIDE}{name}")
    return [str(target / SET_ASIDE / name) for name in present.keys() - wanted.keys()]


def _listing(directory: Path) -> dict[str, int]:
    """The sizes of the files in ``directory`` by their names."""
    try:
        with os.scandir(directory) as entries:
            return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
    except FileNotFoundError:
        return {}


def _copy_into(
    original: str, final: str, scratch: Scratch, expected: tuple[int, str] | None
) -> tuple[_Outcome, list[Path]]:
    """Copy ``original`` to ``final`` by way of ``scratch``; the directories whose entries
    changed."""
    staging = str(scratch.path(".jpeg"))
    try:
        outcome = _copy_file(original, staging, expected)
        if outcome is not _Outcome.COPIED:
            return outcome, []
        return outcome, move_into_place(staging, final)
    finally:
        Path(staging).unlink(missing_ok=True)


def _copy_file(original: str, staging: str, expected: tuple[int, str] | None) -> _Outcome:
    """Copy ``original`` to ``staging``, durably, if its size and SHA-256 are ``expected``
    (when given) and the copy's, read back from the disk, are the same."""
    read = hashlib.sha256()
    try:
        with open(original, "rb") as source, open(staging, "xb") as copy:
            while chunk := source.read(_CHUNK):
                read.update(chunk)
                copy.write(chunk)
            copy.flush()
            os.fsync(copy.fileno())
            # Its pages leave the cache, so reading it back reads what the disk holds.
            os.posix_fadvise(copy.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            written = copy.tell()
    except OSError as error:
        if error.filename != original:
            raise
        return _Outcome.GONE if isinstance(error, FileNotFoundError) else _Outcome.UNREADABLE
    if expected is not None and (written, read.hexdigest()) != expected:
        return _Outcome.WRONG
    with open(staging, "rb") as copy:
        if hashlib.file_digest(copy, "sha256").hexdigest() != read.hexdigest():
            return _Outcome.MISCOPIED
    return _Outcome.COPIED


def _leave_out(snapshot: sqlite3.Connection, image_ids: list[str]) -> None:
    """Remove images from the snapshot as a deletion would, tombstone and all."""
    snapshot.execute("BEGIN")
    for image_id in image_ids:
        snapshot.execute(
            "INSERT OR REPLACE INTO tombstones (id, seq) SELECT id, seq FROM images WHERE id = ?",
            (image_id,),
        )
        snapshot.execute("DELETE FROM images WHERE id = ?", (image_id,))
    snapshot.execute("COMMIT")


def _install(snapshot: sqlite3.Connection, index: Path, timeout: float) -> None:
    """Write the snapshot over ``index``, in one transaction: SQLite's own, so that an
    index left by a crash (its WAL, say) is recovered first, not mixed with the new one."""
    created = not index.exists()
    try:
        with contextlib.closing(
            sqlite3.connect(index, timeout=timeout, isolation_level=None)
        ) as target:
            # A plain set of files, for rsync or a read-only medium; a server started on
            # the copy switches it to WAL.
            target.execute("PRAGMA journal_mode=DELETE")
            target.execute("PRAGMA synchronous=FULL")
            snapshot.backup(target)
    except sqlite3.OperationalError as error:
        if not is_locked(error):
            raise
        raise CannotRun(
            f"{index} stayed locked for over {timeout:g} s: is a server on it?"
        ) from None
    if created:
        fsync_directory(index.parent)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


COMMANDS = (
    Command("backup", "copy the library while it serves", "DEST", _destination, _back_up),
    Command("restore", "copy a backup into an empty storage", "SRC", _source, _restore),
)
