"""What the server writes to standard error: under systemd, with the journal's priority on
every line and a traceback kept to one entry; and as much as --log-level asks."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from checks import until
from serving import Server, children_of, start_server

# A line to journald's stream: the priority, then no time (journald adds its own).
_JOURNAL_LINE = re.compile(r"<[0-7]>(?!\d{4}-)\S")
_STAMPED_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


class Log:
    """A file that is the server's standard error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    @property
    def journal_stream(self) -> str:
        """``JOURNAL_STREAM`` naming this file, as systemd names the journal's stream."""
        status = os.fstat(self.fd)
        return f"{status.st_dev}:{status.st_ino}"

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    async def until_line(self, wanted: Callable[[str], bool]) -> str:
        await until(lambda: any(wanted(line) for line in self.lines()))
        return next(line for line in self.lines() if wanted(line))


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Log]:
    log = Log(tmp_path / "stderr.log")
    yield log
    os.close(log.fd)


async def start(tmp_path: Path, log: Log, *flags: str, journal_stream: str | None) -> Server:
    """A server writing to ``log``, under systemd if ``journal_stream`` is given; with a
    hard limit of 400 descriptors, so that it warns as it starts that it serves fewer
    connections than it was asked to."""
    env = {"TMPDIR": str(tmp_path)}  # where its fork server listens
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    return await start_server(
        tmp_path / "storage",
        "--http-processes",
        "1",
        *flags,
        env=env,
        stderr=log.fd,
        shell_prefix="ulimit -n 400;",
    )


async def stop(server: Server) -> None:
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def get(server: Server, path: str) -> int:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}{path}") as response:
        return response.status


def unfold(line: str) -> str:
    """A line as logs.fold wrote it, with its line breaks back."""
    return re.sub(r"\\(.)", lambda escape: "\n" if escape[1] == "n" else escape[1], line)


def fork_server_of(server: Server) -> int:
    (pid,) = [
        pid
        for pid in children_of(server.process.pid)
        if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    return pid


def fork_server_socket(tmp_path: Path) -> Path:
    (listener,) = tmp_path.glob("pymp-*/listener-*")
    return listener


async def lose_the_fork_servers_socket(server: Server, tmp_path: Path) -> None:
    """Remove the socket the fork server of the conversion workers listens on, as a
    cleaner of temporary files might, and kill the worker: the next request to
    /readyz cannot start another, and an error is logged with its traceback."""
    listener = fork_server_socket(tmp_path)
    listener.unlink()
    fork_server = fork_server_of(server)
    await until(lambda: len(children_of(fork_server)) == 1)
    os.kill(children_of(fork_server)[0], signal.SIGKILL)
    await until(lambda: not children_of(fork_server))
    assert await get(server, "/readyz") == 503
    # Without a file there, the main process fails as it stops the fork server and exits
    # 1 (converter.stop_helper_processes); not what these tests are about.
    listener.touch()


async def test_under_the_journal_lines_carry_their_priority_and_a_traceback_is_one_line(
    tmp_path: Path, log: Log
) -> None:
    server = await start(tmp_path, log, journal_stream=log.journal_stream)
    assert await get(server, "/healthz") == 200
    await lose_the_fork_servers_socket(server, tmp_path)
    await stop(server)
    lines = log.lines()
    assert lines, "nothing logged"
    assert all(_JOURNAL_LINE.match(line) for line in lines), lines
    access = next(line for line in lines if '"GET /healthz"' in line)
    assert access.startswith("<6>INFO aiohttp.access [")
    assert any(
        line.startswith(
            "<4>WARNING asgilook_aiohttp.connections [-] serving at most 72 connections"
        )
        for line in lines
    )
    error = next(line for line in lines if "could not restart a conversion worker" in line)
    assert error.startswith("<3>ERROR asgilook_aiohttp.converter [")
    assert "\\nTraceback (most recent call last):\\n  File " in error
    assert error.endswith("\\nFileNotFoundError: [Errno 2] No such file or directory")
    traceback = unfold(error[len("<3>") :]).split("\n")
    assert traceback[0].endswith("could not restart a conversion worker")
    assert traceback[1] == "Traceback (most recent call last):"
    assert traceback[-1] == "FileNotFoundError: [Errno 2] No such file or directory"
    # The readiness check answered 503 for the lost worker: an INFO line all the same.
    assert next(line for line in lines if '"GET /readyz" 503' in line).startswith("<6>")


async def test_json_lines_under_the_journal_carry_their_priority(tmp_path: Path, log: Log) -> None:
    server = await start(tmp_path, log, "--log-format", "json", journal_stream=log.journal_stream)
    assert await get(server, "/healthz") == 200
    await lose_the_fork_servers_socket(server, tmp_path)
    await stop(server)
    entries = {}
    for line in log.lines():
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, line
        entry = json.loads(match[2])
        entries[entry["message"]] = match[1], entry
    priority, access = next(entry for key, entry in entries.items() if "GET /healthz" in key)
    assert (priority, access["level"]) == ("6", "INFO")
    assert "time" in access
    priority, error = entries["could not restart a conversion worker"]
    assert (priority, error["level"]) == ("3", "ERROR")
    assert error["exception"].startswith("Traceback (most recent call last):\n")


@pytest.mark.parametrize("journal", ["none", "another file"])
async def test_elsewhere_lines_are_as_they_were(tmp_path: Path, log: Log, journal: str) -> None:
    """Without JOURNAL_STREAM, or with one that names another file than standard error
    (which a service's shell redirected elsewhere, say), nothing is prefixed, and lines
    carry their time."""
    other = tmp_path / "other"
    other.touch()
    stream = None if journal == "none" else f"{other.stat().st_dev}:{other.stat().st_ino}"
    server = await start(tmp_path, log, journal_stream=stream)
    assert await get(server, "/healthz") == 200
    await log.until_line(lambda line: '"GET /healthz"' in line)
    await stop(server)
    lines = log.lines()
    assert all(_STAMPED_LINE.match(line) for line in lines), lines
    assert any(
        " WARNING asgilook_aiohttp.connections [-] serving at most" in line for line in lines
    )


async def test_the_log_level_warning_leaves_out_the_access_log(tmp_path: Path, log: Log) -> None:
    server = await start(tmp_path, log, "--log-level", "warning", journal_stream=log.journal_stream)
    assert await get(server, "/healthz") == 200
    assert await get(server, "/nothing-here") == 404
    await stop(server)
    lines = log.lines()
    assert not [line for line in lines if "aiohttp.access" in line]
    assert [line for line in lines if line.startswith("<4>WARNING")]
    assert all(line.startswith(("<4>", "<3>", "<2>")) for line in lines), lines


async def test_the_log_level_debug_shows_debug_lines(tmp_path: Path, log: Log) -> None:
    server = await start(tmp_path, log, "--log-level", "debug", journal_stream=log.journal_stream)
    assert await get(server, "/healthz") == 200
    await log.until_line(lambda line: '"GET /healthz"' in line)
    await stop(server)
    # asyncio says which selector each event loop uses, at DEBUG.
    assert any(line.startswith("<7>DEBUG asyncio [-] Using selector:") for line in log.lines())
