"""Every setting, its default and its limits, read from flags and the environment.

Flags beat environment variables, which beat the configuration file (``--config``, TOML,
keyed by the flags' names), which beats the defaults. Each setting has one flag, one
``ASGILOOK_*`` variable and one key; the storage path also honours the tutorial's
``ASGI_LOOK_STORAGE_PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

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
    http_processes: int = field(default_factory=default_workers)
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
    log_level: str = "info"
    write_token: str | None = field(default=None, repr=False)
    index: str = "sqlite"
    blobs: str = "file"
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    index_password: str | None = field(default=None, repr=False)
    dependency_timeout: float = 5.0
    lease_seconds: float = 30.0
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (or ``unix``, for the Unix socket's peers) whose
    X-Forwarded-For and Forwarded headers name the client."""
    cors_origins: tuple[str, ...] = ()
    """Origins (``scheme://host[:port]``, or ``*``) whose pages may call the API."""
    http_process: int = 0
    """Which of the server's HTTP processes this configuration is for (0: the first, or
    the only one); not a setting."""

    @property
    def shared_storage(self) -> bool:
        """Whether the index and blobs are PostgreSQL and S3, shared by several nodes."""
        return self.index != "sqlite"

    def for_http_process(self, number: int) -> Config:
        """The share of this configuration that HTTP process ``number`` of
        ``http_processes`` serves with: the limits that hold for the whole server are
        divided among them. Each keeps what one upload needs, however many there are: a
        conversion worker, room for one upload on disk to wait in, and a place in the
        queue if the server has a queue."""
        count = self.http_processes

        def share(total: int, least: int = 0) -> int:
            return max(least, total // count + (1 if number < total % count else 0))

        return dataclasses.replace(
            self,
            http_process=number,
            workers=share(self.workers, least=1),
            queue_size=share(self.queue_size, least=min(1, self.queue_size)),
            upload_memory_mb=share(self.upload_memory_mb),
            upload_disk_mb=share(self.upload_disk_mb, least=-(-self.max_upload_bytes // MiB)),
            max_connections=share(self.max_connections, least=1),
        )

    @classmethod
    def from_sources(
        cls,
        argv: Sequence[str] | None = None,
        environ: Mapping[str, str] | None = None,
        parser: argparse.ArgumentParser | None = None,
    ) -> Config:
        """Build the configuration from command-line flags, environment variables and
        the configuration file; ``parser`` is one of ``settings_parser``'s with a
        command's own arguments added, which are left for the command to read."""
        return cls.from_flags(*parse_command_line(argv, parser), environ)

    @classmethod
    def from_flags(
        cls,
        flags: Mapping[str, Any],
        parser: argparse.ArgumentParser,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in _SETTINGS:
            if (value := flags.get(setting.name)) is not None:
                values.setdefault(setting.target, tuple(value) if setting.many else value)
        # What a source further up has set is not read again: a value it overrides may be
        # one that cannot be read here (a file that is only on another machine, say).
        for setting in _SETTINGS:
            if setting.target in values:
                continue
            if (value := setting.from_environ(environ, parser)) is not None:
                values[setting.target] = value
        config_file = flags.get("config") or environ.get(CONFIG_VARIABLE)
        if config_file:
            _read_file(Path(config_file), parser, values)
        values.setdefault("storage_path", default_storage_path(environ))
        config = cls(**values)
        if (config.index == "sqlite") != (config.blobs == "file"):
            parser.exit(
                2,
                f"asgilook-aiohttp: --index {_kind(config.index)} and --blobs "
                f"{_kind(config.blobs)} do not go together: use sqlite with file (one "
                "machine) or postgresql with s3 (several nodes)\n",
            )
        return config


CONFIG_VARIABLE = "ASGILOOK_CONFIG"


def parse_command_line(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None
) -> tuple[dict[str, Any], argparse.ArgumentParser]:
    """The flags given, by setting name (None where not given), and the parser that read
    them, to report what is wrong with the rest."""
    parser = settings_parser() if parser is None else parser
    return vars(parser.parse_args(argv)), parser


def _read_file(path: Path, parser: argparse.ArgumentParser, values: dict[str, Any]) -> None:
    """Add to ``values`` (by Config field) the settings a configuration file sets that
    they do not have yet."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        parser.exit(2, f"asgilook-aiohttp: the configuration file {path}: {error.strerror}\n")
    except tomllib.TOMLDecodeError as error:
        parser.exit(2, f"asgilook-aiohttp: the configuration file {path} is not TOML: {error}\n")
    by_key = {setting.key: setting for setting in _SETTINGS if setting.flag is not None}
    for key, value in document.items():
        if (setting := by_key.get(key)) is None:
            parser.exit(
                2,
                f"asgilook-aiohttp: the configuration file {path} has an unknown setting "
                f"{key!r}; the settings are the flags' names without their dashes: "
                f"{', '.join(sorted(by_key))}\n",
            )
        if setting.target in values:
            continue
        try:
            values[setting.target] = setting.from_value(value)
        except ValueError as error:
            parser.exit(
                2, f"asgilook-aiohttp: the configuration file {path}: {key} = {value!r}: {error}\n"
            )


def _kind(setting: str) -> str:
    return setting.partition(":")[0]


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


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


UNIX_PEERS = "unix"
"""The trusted proxy that stands for whatever connects to the Unix socket."""


def _proxy(text: str) -> str:
    if text == UNIX_PEERS:
        return text
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(
            f"must be an IP address, a network such as 10.0.0.0/8, or {UNIX_PEERS!r}, not {text!r}"
        ) from None


def _origin(text: str) -> str:
    if text == "*":
        return text
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = -1
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or port == -1
        or url.path
        or url.query
        or url.fragment
        or url.username is not None
    ):
        raise ValueError(
            f"must be '*' or an origin: scheme, host and port if not the scheme's own, as in "
            f"https://example.org or http://localhost:3000, not {text!r}"
        )
    # As a browser writes it: without the scheme's own port.
    own_port = {"http": 80, "https": 443}[url.scheme]
    return f"{url.scheme}://{url.netloc.lower().removesuffix(f':{own_port}')}"


def _token(text: str) -> str:
    token = text.strip()
    if not token or any(character.isspace() for character in token):
        raise ValueError("must be a non-empty token without spaces")
    return token


def _index(text: str) -> str:
    if text == "sqlite":
        return text
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("postgresql", "postgres") or not url.hostname:
        raise ValueError(
            f"must be 'sqlite' or a URL like postgresql://user@host:5432/database, not {text!r}"
        )
    if url.password is not None:
        raise ValueError(
            "must not hold the password, which would show in the process list: set "
            "PGPASSWORD, PGPASSFILE or PGPASSWORD_FILE instead"
        )
    return text


def _blobs(text: str) -> str:
    if text == "file":
        return text
    url = urllib.parse.urlsplit(text)
    if url.scheme != "s3" or len(url.netloc) < 3 or url.query or url.fragment:
        raise ValueError(f"must be 'file' or s3://bucket or s3://bucket/prefix, not {text!r}")
    return text


def _url(text: str) -> str:
    url = urllib.parse.urlsplit(text)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"must be an http:// or https:// URL, not {text!r}")
    return text


def _non_empty(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _secret_from_file(text: str) -> str:
    try:
        return _non_empty(_path(text).read_text())
    except OSError as error:
        raise ValueError(f"cannot be read: {error.strerror}") from None


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
    many: bool = False
    """Whether it takes several values: the flag takes one or more, the variable and the
    file's key a list (the variable's separated by commas or spaces)."""

    @property
    def target(self) -> str:
        return self.field or self.name

    @property
    def key(self) -> str:
        """Its key in the configuration file: the flag's name without its dashes."""
        return (self.flag or self.name).removeprefix("--")

    def from_text(self, text: str) -> Any:
        if self.many:
            return tuple(self.parse(item) for item in text.replace(",", " ").split())
        return self.parse(text)

    def from_value(self, value: object) -> Any:
        """The setting from a value of a configuration file."""
        if self.many and isinstance(value, list):
            return tuple(self.parse(_scalar(item)) for item in value)
        return self.from_text(_scalar(value))

    @property
    def env_names(self) -> tuple[str, ...]:
        return (f"ASGILOOK_{self.name.upper()}", *self.env)

    def from_environ(self, environ: Mapping[str, str], parser: argparse.ArgumentParser) -> Any:
        for name in self.env_names:
            if (text := environ.get(name)) is not None:
                try:
                    return self.from_text(text)
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
    _Setting(
        "workers",
        "--workers",
        _whole_number(1),
        "conversion processes in all, at least one per HTTP process (default: CPU count)",
    ),
    _Setting(
        "http_processes",
        "--http-processes",
        _whole_number(1),
        "processes serving HTTP on the same sockets, under one main process (default: CPU "
        "count); the conversion workers, the upload queue, memory and disk, and the "
        "connection limit are shared out among them",
    ),
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
        "log_level",
        "--log-level",
        _log_level,
        "the least severe lines logged: debug, info, warning, error or critical (default info)",
    ),
    _Setting(
        "trusted_proxies",
        "--trusted-proxy",
        _proxy,
        "addresses or networks of reverse proxies whose X-Forwarded-For and Forwarded "
        f"headers name the client, for the access log; {UNIX_PEERS!r} trusts whatever "
        "connects to --unix (default: none, the headers are ignored)",
        many=True,
    ),
    _Setting(
        "cors_origins",
        "--cors-origin",
        _origin,
        "origins, such as https://example.org, whose web pages may call the API from a "
        "browser (CORS), or '*' for any (default: none but the server's own)",
        many=True,
    ),
    _Setting("write_token", None, _token, "the bearer token that uploads and deletions need"),
    _Setting(
        "write_token_file",
        "--write-token-file",
        _token_from_file,
        "a file holding the write token",
        field="write_token",
    ),
    _Setting(
        "index",
        "--index",
        _index,
        "where the index of images is kept: 'sqlite' (a file in --storage, the default) or "
        "postgresql://user@host:port/database, shared by several nodes; the password comes "
        "from PGPASSWORD, PGPASSFILE or the file PGPASSWORD_FILE names, never a flag",
    ),
    _Setting(
        "blobs",
        "--blobs",
        _blobs,
        "where image bytes are kept: 'file' (under --storage, the default) or "
        "s3://bucket/prefix, shared by several nodes; goes with --index postgresql",
    ),
    _Setting(
        "s3_endpoint",
        "--s3-endpoint",
        _url,
        "the S3-compatible server, e.g. http://127.0.0.1:8333 (default: AWS's own)",
    ),
    _Setting("s3_region", "--s3-region", _non_empty, "the bucket's region (default us-east-1)"),
    _Setting(
        "s3_access_key",
        None,
        _non_empty,
        "the S3 access key id",
        env=("AWS_ACCESS_KEY_ID",),
    ),
    _Setting(
        "s3_access_key_file",
        None,
        _secret_from_file,
        "a file holding the S3 access key id",
        env=("AWS_ACCESS_KEY_ID_FILE",),
        field="s3_access_key",
    ),
    _Setting(
        "s3_secret_key",
        None,
        _non_empty,
        "the S3 secret access key",
        env=("AWS_SECRET_ACCESS_KEY",),
    ),
    _Setting(
        "s3_secret_key_file",
        None,
        _secret_from_file,
        "a file holding the S3 secret access key",
        env=("AWS_SECRET_ACCESS_KEY_FILE",),
        field="s3_secret_key",
    ),
    _Setting("index_password", None, _non_empty, "the PostgreSQL password", env=("PGPASSWORD",)),
    _Setting(
        "index_password_file",
        None,
        _secret_from_file,
        "a file holding the PostgreSQL password",
        env=("PGPASSWORD_FILE",),
        field="index_password",
    ),
    _Setting(
        "dependency_timeout",
        "--dependency-timeout",
        _positive_float,
        "seconds any one call to PostgreSQL or the object store may take, and a write to "
        "the SQLite index may wait for another process's; then the request gets 503 "
        "(default 5)",
    ),
    _Setting(
        "lease_seconds",
        "--lease-seconds",
        _positive_float,
        "seconds a node's work in progress stays its own without renewal; after a crash, "
        "any node undoes it once this has passed (default 30)",
    ),
)


def _scalar(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("must be a string or a number")
    return str(value)


SECRET_VARIABLES = tuple(
    name
    for setting in _SETTINGS
    if setting.flag is None and not setting.name.endswith("_file")
    for name in setting.env_names
)
"""Variables that hold secrets themselves (not the names of files that do)."""


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def settings_parser(
    prog: str = "asgilook-aiohttp",
    description: str = "Serve the asgilook image API.",
    epilog: str | None = None,
    usage: str = "%(prog)s [serve] [SETTING ...]",
) -> argparse.ArgumentParser:
    """A parser of every setting's flag, for a command to add its own arguments to."""
    parser = argparse.ArgumentParser(
        prog=prog,
        epilog=epilog,
        usage=usage,
        description=f"{description} Every flag also reads an environment "
        "variable: ASGILOOK_ and the setting's name in capitals (--storage reads "
        "ASGILOOK_STORAGE_PATH). Secrets have no flag, which would show them in the process "
        "list; each is read from a variable, or from a file another variable names: "
        + "; ".join(
            f"{setting.help}: {' or '.join(setting.env_names)}"
            for setting in _SETTINGS
            if setting.flag is None
        )
        + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings, keyed by the flags' names without their dashes, "
        'such as port = 8080 or trusted-proxy = ["10.0.0.1"]; flags and environment '
        f"variables beat it [env: {CONFIG_VARIABLE}]",
    )
    for setting in _SETTINGS:
        if setting.flag is None:
            continue
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.key.upper().replace("-", "_"),
            type=_argparse_type(setting.parse),
            default=None,
            help=f"{setting.help} [env: {', '.join(setting.env_names)}]",
            nargs="+" if setting.many else None,
            action="extend" if setting.many else "store",
        )
    return parser
