"""The storage a server serves, opened by a command that runs beside it.

A command is one more node to the others: it journals what it works on, under its own
owner, so the server's processes and nodes leave it alone, and it takes nothing from
their scratch space or their reserves. It never creates a library, nor upgrades one: a storage
directory without an index of this release's schema is an error.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import Config
from ..journal import Journal
from ..storage.backends import INDEX_FILE, backends
from ..storage.ports import Blobs, Index, Unavailable
from ..storage.scratch import Scratch
from ..storage.sqlite import SCHEMA_VERSION


class CannotRun(Exception):
    """Why a command could not run at all (exit status 2); the message says it to people."""


@dataclass(frozen=True)
class Attached:
    index: Index
    blobs: Blobs
    journal: Journal


def describe(config: Config) -> str:
    """The library, for people: its directory, or its database and bucket."""
    if config.shared_storage:
        return f"the index at {config.index} with the blobs in {config.blobs}"
    return f"the library in {config.storage_path}"


def _check_index_file(config: Config) -> None:
    """Raise ``CannotRun`` unless the storage holds an index of this release's schema:
    opening any other would create one, or upgrade it under the server that serves it."""
    path = config.storage_path / INDEX_FILE
    if not path.is_file():
        raise CannotRun(
            f"there is no library in {path.parent} (no {INDEX_FILE}); give the server's --storage"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as error:
        raise CannotRun(f"cannot open {describe(config)}: {error}") from None
    if version == 0:
        raise CannotRun(f"{path} is an empty index, not a library; give the server's --storage")
    if version < SCHEMA_VERSION:
        raise CannotRun(
            f"{path} has the index schema of an earlier release (version {version}); start "
            f"this release's server on it once, which upgrades it (to version {SCHEMA_VERSION})"
        )
    if version > SCHEMA_VERSION:
        raise CannotRun(
            f"{path} has index schema version {version}, from a later release than this one "
            f"(which reads version {SCHEMA_VERSION}): upgrade asgilook-aiohttp"
        )


@contextlib.asynccontextmanager
async def attached(config: Config) -> AsyncIterator[Attached]:
    """The index and blobs ``config`` names, open; raises ``CannotRun``."""
    if not config.shared_storage:
        _check_index_file(config)
    scratch = Scratch(config.storage_path)
    # In staging/, named for this process: whatever it leaves, the server's next start
    # removes.
    reserve = scratch.path(".reserve")
    async with contextlib.AsyncExitStack() as resources:
        try:
            index, blobs = backends(config, scratch, reserve=reserve)
            if not config.shared_storage:
                scratch.directory.mkdir(exist_ok=True)
                resources.callback(reserve.unlink, missing_ok=True)
            resources.push_async_callback(index.close)
            resources.push_async_callback(blobs.close)
            await index.open()
            await blobs.open()
        except Unavailable as error:
            raise CannotRun(str(error)) from None
        except (Exception, SystemExit) as error:
            # An index that is no database, a bucket refused, the extra not installed:
            # what the server would refuse to start on, the command cannot run on.
            why = str(error.code if isinstance(error, SystemExit) else error)
            raise CannotRun(
                f"cannot open {describe(config)}: {why.removeprefix('asgilook-aiohttp: ')}"
            ) from None
        journal = Journal(index, blobs, lease=config.lease_seconds)
        resources.push_async_callback(journal.close)
        yield Attached(index, blobs, journal)
