"""Running the server as a real process for tests, and cleaning up after it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def until_not_listening(self) -> None:
        """Wait until the server refuses new connections, the first thing it does on a stop
        signal."""
        address = urlsplit(self.url)
        async with asyncio.timeout(30):
            while True:
                try:
                    _, writer = await asyncio.open_connection(address.hostname, address.port)
                except (ConnectionRefusedError, ConnectionResetError):  # reset: closed meanwhile
                    return
                writer.close()
                await writer.wait_closed()
                await asyncio.sleep(0.005)

    async def exit_code(self) -> int:
        async with asyncio.timeout(30):
            return await self.process.wait()


_started: list[asyncio.subprocess.Process] = []


async def stop_all() -> None:
    """Kill whatever a test left running, with its whole process group."""
    while _started:
        process = _started.pop()
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def start_server(
    storage: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    shell_prefix: str = "",
    stderr: int | None = None,
    program: tuple[str, ...] = (sys.executable, "run.py"),
) -> Server:
    """Start ``run.py`` (or ``program``) on a free loopback port and wait for its
    "listening on" line.

    ``shell_prefix`` runs first in bash before it execs the server (same pid), as a
    service manager would prepare the process.
    """
    command = [
        *program,
        "--port",
        "0",
        "--storage",
        str(storage),
        "--workers",
        "1",
        *flags,
    ]
    if shell_prefix:
        command = ["bash", "-c", f'{shell_prefix} exec "$@"', "bash", *command]
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        pass_fds=pass_fds,
        start_new_session=True,  # its own process group, to find stray workers afterwards
    )
    _started.append(process)
    assert process.stdout is not None
    async with asyncio.timeout(30):
        line = (await process.stdout.readline()).decode()
    match = re.fullmatch(r"asgilook-aiohttp listening on (\S+)\n", line)
    assert match, line
    return Server(process, match.group(1))


CONSOLE_SCRIPT = Path(sys.executable).parent / "asgilook-aiohttp"


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This one without the server's settings (which would change what a test started),
    and with ``extra``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ASGILOOK_", "ASGI_LOOK"))}
    return {**clean, **(extra or {})}


async def start_command(
    *argv: str | Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start the console script with ``argv``, its output piped, as from a terminal."""
    return await asyncio.create_subprocess_exec(
        CONSOLE_SCRIPT,
        *map(str, argv),
        env=environment(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # A shell starts a background job with Ctrl-C ignored; a terminal's does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


async def run_command(*argv: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the console script to its end; its exit status, standard output and standard
    error."""
    process = await start_command(*argv, env=env)
    async with asyncio.timeout(120):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@asynccontextmanager
async def running(storage: Path, *flags: str) -> AsyncIterator[Server]:
    """A server on ``storage`` for the length of the block; then SIGTERM and exit status 0."""
    server = await start_server(storage, *flags)
    try:
        yield server
    finally:
        server.signal(signal.SIGTERM)
        assert await server.exit_code() == 0


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the parenthesised command name: state, ppid,
    pgrp, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes_in_group(pgid: int) -> list[int]:
    return _live_processes(_GROUP, pgid)


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started that still run, by pid."""
    return sorted(_live_processes(_PARENT, pid))


_PARENT, _GROUP = 1, 2  # their places among proc_stat's fields


def _live_processes(field: int, value: int) -> list[int]:
    """The processes not yet exited whose ``field`` in proc_stat is ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = proc_stat(int(entry.name))
            except OSError:
                continue
            if int(fields[field]) == value and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def descendants_of(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *descendants_of(child)]
    return found
