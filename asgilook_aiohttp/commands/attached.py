"""The storage a server serves, opened by a command that runs beside it.

A command is one more node to the others: it journals what it works on, under its own
owner, so the server's processes and nodes leave it alone, and it takes nothing from
their scratch space or their reserves. It never creates a library: a storage directory
without an index is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import Config
from ..journal import Journal
from ..storage.backends import INDEX_FILE, backends
from ..storage.ports import Blobs, Index, Unavailable
from ..storage.scratch import Scratch


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


@contextlib.asynccontextmanager
async def attached(config: Config) -> AsyncIterator[Attached]:
    """The index and blobs ``config`` names, open; raises ``CannotRun``."""
    if not config.shared_storage and not (config.storage_path / INDEX_FILE).is_file():
        raise CannotRun(
            f"there is no library in {config.storage_path} (no {INDEX_FILE}); "
            "give the server's --storage"
        )
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
