"""Which implementation of each port a configuration asks for.

The embedded pair needs nothing beyond the base install. The shared pair's libraries
come with the ``scale`` extra, imported only when it is chosen.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from ..config import Config
from .files import LocalBlobs
from .ports import Blobs, Index
from .scratch import Scratch
from .sqlite import SqliteIndex

INDEX_FILE = "index.sqlite3"
# Beside the index, whose writes it keeps room for; one for each HTTP process.
RESERVE_FILE = f"{INDEX_FILE}-reserve"


def reserve_file(http_process: int) -> str:
    return RESERVE_FILE if http_process == 0 else f"{RESERVE_FILE}-{http_process}"


def backends(
    config: Config, scratch: Scratch, *, reserve: Path | None = None
) -> tuple[Index, Blobs]:
    """The index and the blob store ``config`` names; SystemExit if the shared pair is
    asked for and its libraries are not installed. ``reserve``: where the SQLite index
    keeps its room, for a command run beside the server rather than its HTTP process
    ``config.http_process``."""
    if not config.shared_storage:
        if reserve is None:
            reserve = config.storage_path / reserve_file(config.http_process)
            if config.http_process == 0:  # the first to start: the others wait for it
                _remove_unused_reserves(config.storage_path, config.http_processes)
        return (
            SqliteIndex(
                config.storage_path / INDEX_FILE, reserve, timeout=config.dependency_timeout
            ),
            LocalBlobs(config.storage_path, scratch),
        )
    try:
        from .postgres import PostgresIndex  # noqa: PLC0415 - the extra, only if chosen
        from .s3 import S3Blobs  # noqa: PLC0415
    except ImportError as error:
        raise SystemExit(
            f"asgilook-aiohttp: --index {config.index.partition(':')[0]} needs the 'scale' "
            f"extra ({error.name} is missing): pip install 'asgilook-aiohttp[scale]'"
        ) from None
    bucket = urllib.parse.urlsplit(config.blobs)
    return (
        PostgresIndex(
            config.index, password=config.index_password, timeout=config.dependency_timeout
        ),
        S3Blobs(
            bucket.netloc,
            _prefix(bucket.path),
            endpoint=config.s3_endpoint,
            region=config.s3_region,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            timeout=config.dependency_timeout,
        ),
    )


def _remove_unused_reserves(storage: Path, http_processes: int) -> None:
    """Those of HTTP processes that a server with more of them had."""
    for path in storage.glob(f"{RESERVE_FILE}-*"):
        number = path.name.removeprefix(f"{RESERVE_FILE}-")
        if number.isdigit() and int(number) >= http_processes:
            path.unlink(missing_ok=True)


def _prefix(path: str) -> str:
    """The key prefix an s3:// URL's path names: "" or "some/where/"."""
    prefix = path.strip("/")
    return f"{prefix}/" if prefix else ""
