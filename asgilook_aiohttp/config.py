"""Every setting, its default and its limits, read from flags and the environment.

Flags beat environment variables, which beat defaults. Each setting has one flag and
one ``ASGILOOK_*`` variable; the storage path also honours the tutorial's
``ASGI_LOOK_STORAGE_PATH``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def default_storage_path(environ: Mapping[str, str]) -> Path:
    """Where images live unless told otherwise: somewhere that survives a reboot."""
    # systemd's StateDirectory= may list several directories, separated by colons.
    if state := environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    home = environ.get("HOME") or str(Path.home())
    data_home = environ.get("XDG_DATA_HOME") or str(Path(home) / ".local" / "share")
    return Path(data_home) / "asgilook-aiohttp"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Config:
    storage_path: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = field(default_factory=default_workers)
    queue_size: int = 32
    conversion_timeout: float = 30.0
    worker_memory_mb: int = 1024
    max_upload_bytes: int = 32 * MiB
    upload_memory_mb: int = 128
    upload_disk_mb: int = 256
    max_pixels: int = 50_000_000
    min_thumbnail_side: int = 64
    thumbnail_budget_mb: int = 1024
    jpeg_quality: int = 90
    shutdown_timeout: float = 30.0
    idle_timeout: float = 15.0
    body_timeout: float = 600.0
    min_body_rate: int = 1024
    body_rate_window: float = 30.0
    max_connections: int = 4096
    unix_path: Path | None = None
    log_format: str = "text"
    write_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> Config:
        """Build the configuration from command-line flags and environment variables."""
        environ = os.environ if environ is None else environ
        parser = _parser()
        flags = vars(parser.parse_args(argv))
        values: dict[str, Any] = {}
        for setting in _SETTINGS:
            if (value := flags.get(setting.name)) is not None:
                values.setdefault(setting.target, value)
        for setting in _SETTINGS:
            if (value := setting.from_environ(environ, parser)) is not None:
                values.setdefault(setting.target, value)
        values.setdefault("storage_path", default_storage_path(environ))
        return cls(**values)


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if high is None and value < low:
            raise ValueError(f"must be at least {low}, not {value}")
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be a number of seconds above 0, not {text}")
    return value


def _path(text: str) -> Path:
    if not text:
        raise ValueError("must not be empty")
    return Path(text).expanduser()


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(f"must be 'text' or 'json', not {text!r}")
    return text


def _token(text: str) -> str:
    token = text.strip()
    if not token or any(character.isspace() for character in token):
        raise ValueError("must be a non-empty token without spaces")
    return token


def _token_from_file(text: str) -> str:
    try:
        return _token(_path(text).read_text())
    except OSError as error:
        raise ValueError(f"cannot be read: {error.strerror}") from None


@dataclass(frozen=True)
class _Setting:
    name: str
    flag: str | None
    """None for a secret, which must not show in the process list."""
    parse: Callable[[str], Any]
    help: str
    env: tuple[str, ...] = ()
    field: str | None = None
    """The Config field it sets, when not ``name``."""

    @property
    def target(self) -> str:
        return self.field or self.name

    @property
    def env_names(self) -> tuple[str, ...]:
        return (f"ASGILOOK_{self.name.upper()}", *self.env)

    def from_environ(self, environ: Mapping[str, str], parser: argparse.ArgumentParser) -> Any:
        for name in self.env_names:
            if (text := environ.get(name)) is not None:
                try:
                    return self.parse(text)
                except ValueError as error:
                    parser.error(f"environment variable {name}={text!r}: {error}")
        return None


_SETTINGS = (
    _Setting("host", "--host", str, "address to listen on (default 127.0.0.1)"),
    _Setting(
        "port",
        "--port",
        _whole_number(0, 65535),
        "TCP port to listen on; 0 picks a free one (default 8000)",
    ),
    _Setting(
        "storage_path",
        "--storage",
        _path,
        "directory for images and their index (default: $STATE_DIRECTORY under systemd, "
        "else $XDG_DATA_HOME/asgilook-aiohttp, else ~/.local/share/asgilook-aiohttp)",
        env=("ASGI_LOOK_STORAGE_PATH",),
    ),
    _Setting("workers", "--workers", _whole_number(1), "conversion processes (default: CPU count)"),
    _Setting(
        "queue_size",
        "--queue-size",
        _whole_number(0),
        "uploads that may wait for a free worker before new ones get 503 (default 32)",
    ),
    _Setting(
        "conversion_timeout",
        "--conversion-timeout",
        _positive_float,
        "seconds one conversion may run before its worker is killed (default 30)",
    ),
    _Setting(
        "worker_memory_mb",
        "--worker-memory-mb",
        _whole_number(1),
        "address-space cap of each worker process in MiB (default 1024)",
    ),
    _Setting(
        "max_upload_bytes",
        "--max-upload-bytes",
        _whole_number(1),
        "largest request body accepted, in bytes (default 33554432, 32 MiB)",
    ),
    _Setting(
        "upload_memory_mb",
        "--upload-memory-mb",
        _whole_number(0),
        "memory, shared with the workers, that upload bodies wait in until converted, in "
        "MiB; a body that does not fit goes to disk instead (default 128)",
    ),
    _Setting(
        "upload_disk_mb",
        "--upload-disk-mb",
        _whole_number(0),
        "disk space in staging/ that upload bodies which did not fit in memory may take "
        "while they arrive and wait to be converted, in MiB; a body that would pass it, or "
        "leave less than --max-upload-bytes free, gets 507 (default 256)",
    ),
    _Setting(
        "max_pixels",
        "--max-pixels",
        _whole_number(1),
        "most pixels (width x height) an upload may have (default 50000000)",
    ),
    _Setting(
        "min_thumbnail_side",
        "--min-thumbnail-side",
        _whole_number(1),
        "smallest width or height a listed thumbnail may have (default 64)",
    ),
    _Setting(
        "thumbnail_budget_mb",
        "--thumbnail-budget-mb",
        _whole_number(1),
        "disk space kept thumbnails may take, in MiB; least recently served go first "
        "(default 1024)",
    ),
    _Setting(
        "jpeg_quality",
        "--jpeg-quality",
        _whole_number(1, 95),
        "quality of re-encoded JPEGs (default 90)",
    ),
    _Setting(
        "shutdown_timeout",
        "--shutdown-timeout",
        _positive_float,
        "seconds to let in-flight requests finish after SIGTERM (default 30)",
    ),
    _Setting(
        "idle_timeout",
        "--idle-timeout",
        _positive_float,
        "seconds a connection may take to send a whole request head, from when it opens or "
        "from its last response; then it is closed (default 15)",
    ),
    _Setting(
        "body_timeout",
        "--body-timeout",
        _positive_float,
        "seconds a request body may take to arrive in full; then 408 (default 600)",
    ),
    _Setting(
        "min_body_rate",
        "--min-body-rate",
        _whole_number(1),
        "bytes per second a request body must keep arriving at, on average over each "
        "--body-rate-window (slower gets 408), and a download must be read at (default 1024)",
    ),
    _Setting(
        "body_rate_window",
        "--body-rate-window",
        _positive_float,
        "seconds over which a body's arrival rate is averaged (default 30)",
    ),
    _Setting(
        "max_connections",
        "--max-connections",
        _whole_number(1),
        "open connections served at once; more are answered 503 and closed at once "
        "(default 4096, lowered to fit the open-file limit)",
    ),
    _Setting(
        "unix_path",
        "--unix",
        _path,
        "serve on this Unix socket instead of TCP, for a reverse proxy",
    ),
    _Setting(
        "log_format",
        "--log-format",
        _log_format,
        "'text' for people, 'json' for one JSON object per line (default text)",
    ),
    _Setting(
        "write_token",
        None,
        _token,
        "the bearer token that uploads and deletions need (no flag: it would show in ps)",
    ),
    _Setting(
        "write_token_file",
        "--write-token-file",
        _token_from_file,
        "a file holding the write token",
        field="write_token",
    ),
)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asgilook-aiohttp",
        description="Serve the asgilook image API. Every flag also reads an environment "
        "variable: ASGILOOK_ and the setting's name in capitals (--storage reads "
        "ASGILOOK_STORAGE_PATH). The write token is read from ASGILOOK_WRITE_TOKEN or from "
        "the file that --write-token-file or ASGILOOK_WRITE_TOKEN_FILE names.",
    )
    for setting in _SETTINGS:
        if setting.flag is None:
            continue
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            type=_argparse_type(setting.parse),
            default=None,
            help=f"{setting.help} [env: {', '.join(setting.env_names)}]",
        )
    return parser
