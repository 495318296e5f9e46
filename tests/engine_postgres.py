"""A real PostgreSQL 15 for the tests: one server a session, on 127.0.0.1, with a database
of its own for each test that asks for one.

Where the server or asyncpg is missing the tests that need them are skipped, saying what
is missing; with ``ASGILOOK_REQUIRE_ENGINES=1`` (as in CI) they fail instead. As root,
the server runs as the ``postgres`` user (it refuses root), and PostgreSQL 15 is
installed with apt if it is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

BIN = Path("/usr/lib/postgresql/15/bin")
_PROGRAMS = ("initdb", "pg_ctl", "createdb")
_USER = "postgres"


class Postgres:
    """A server of the tests' own, which a test may stop, start, freeze and thaw, as long
    as it leaves it running."""

    def __init__(self, directory: Path, port: int) -> None:
        self._directory = directory
        self._data = directory / "data"
        self.port = port

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database; its URL."""
        name = f"t_{uuid.uuid4().hex}"
        _run(BIN / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", _USER, name)
        return self.url(name)

    def initialise(self) -> None:
        _run(*_as_owner(BIN / "initdb", "-D", self._data, "-U", _USER, "-A", "trust", "--no-sync"))

    def start(self) -> None:
        options = f"-p {self.port} -k {self._directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self._directory / "log"
        _run(*_as_owner(BIN / "pg_ctl", "-D", self._data, "-l", log, "-o", options, "-w", "start"))

    def stop(self) -> None:
        """Stop at once, as a crash would: the next start recovers."""
        _run(*_as_owner(BIN / "pg_ctl", "-D", self._data, "-m", "immediate", "-w", "stop"))

    @property
    def running(self) -> bool:
        return (self._data / "postmaster.pid").exists()

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self._data / "postmaster.pid").read_text().split("\n", 1)[0])

    def freeze(self) -> None:
        """Stop every server process (SIGSTOP): connections stay open, nothing answers."""
        for pid in self._processes():  # the postmaster first: it forks no more
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._processes():
            os.kill(pid, signal.SIGCONT)

    def _processes(self) -> list[int]:
        """The postmaster and its children, each of which leads a process group of its own."""
        postmaster = self.pid
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                _, _, after_name = stat.read_text().rpartition(")")
            except OSError:  # gone meanwhile
                continue
            if int(after_name.split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]


def _as_owner(*argv: str | Path) -> list[str]:
    command = [str(arg) for arg in argv]
    return ["runuser", "-u", _USER, "--", *command] if os.geteuid() == 0 else command


def _run(*argv: str | Path) -> None:
    done = subprocess.run([str(arg) for arg in argv], capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode(errors='replace')}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _missing() -> str | None:
    """What the tests need that this machine lacks, if anything."""
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg (pip install '.[test]')"
    if not all((BIN / program).exists() for program in _PROGRAMS):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql-15"], check=False)
        if not all((BIN / program).exists() for program in _PROGRAMS):
            return f"PostgreSQL 15 in {BIN} (apt-get install postgresql-15)"
    return None


def unavailable(missing: str) -> NoReturn:
    if os.environ.get("ASGILOOK_REQUIRE_ENGINES") == "1":
        pytest.fail(f"ASGILOOK_REQUIRE_ENGINES=1, and this machine lacks {missing}")
    pytest.skip(f"needs {missing}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    if missing := _missing():
        unavailable(missing)
    # Not under pytest's own temporary directory, which the postgres user cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="asgilook-postgres-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, _USER)
        server = Postgres(directory, _free_port())
        server.initialise()
        server.start()
        try:
            yield server
        finally:
            if server.running:
                server.thaw()
                server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres: Postgres) -> str:
    """A database of the test's own, empty."""
    return postgres.new_database()
