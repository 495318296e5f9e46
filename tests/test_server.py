"""The server as a process: run.py starts, serves, drains and stops; kill -9 loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import asgilook_aiohttp

import samples
from checks import staged_bytes, stored_files, until, until_metric
from serving import (
    CONSOLE_SCRIPT,
    ROOT,
    Server,
    processes_in_group,
    run_command,
    running,
    start_server,
)


async def upload(session: aiohttp.ClientSession, server: Server, data: bytes) -> dict[str, str]:
    async with session.post(f"{server.url}/images", data=data) as response:
        assert response.status == 201
        image: dict[str, str] = await response.json()
        return image


async def download(session: aiohttp.ClientSession, server: Server, path: str) -> bytes:
    async with session.get(f"{server.url}{path}") as response:
        assert response.status == 200
        return await response.read()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_serves_then_exits_0_on_signal_leaving_no_processes(
    tmp_path: Path, session: aiohttp.ClientSession, signum: int
) -> None:
    server = await start_server(tmp_path / "storage")
    image = await upload(session, server, samples.small_png())
    assert await download(session, server, image["image"])
    server.signal(signum)
    assert await server.exit_code() == 0
    # Nothing is left for a service manager to kill, not even for a moment.
    assert processes_in_group(server.process.pid) == []


async def test_the_console_script_serves_like_run_py(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    script = Path(sys.executable).parent / "asgilook-aiohttp"
    server = await start_server(tmp_path / "storage", program=(str(script),))
    image = await upload(session, server, samples.small_png())
    assert await download(session, server, image["image"])
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def test_acknowledged_uploads_survive_kill_9(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    server = await start_server(storage)
    stored = {}
    for fmt in ("PNG", "JPEG"):
        image = await upload(session, server, samples.encode(samples.two_tone(), fmt))
        stored[image["image"]] = await download(session, server, image["image"])
    os.killpg(server.process.pid, signal.SIGKILL)
    assert await server.exit_code() == -signal.SIGKILL

    async with running(storage) as restarted:
        listed = await (await session.get(f"{restarted.url}/images")).json()
        assert [image["image"] for image in listed] == list(stored)
        for path, image_bytes in stored.items():
            assert await download(session, restarted, path) == image_bytes


async def test_workers_die_with_a_killed_server_and_store_nothing_after(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    server = await start_server(storage)
    slow = samples.slow_png()
    upload = asyncio.create_task(session.post(f"{server.url}/images", data=io.BytesIO(slow)))
    await until_metric((session, server.url), "asgilook_conversion_workers_busy", bool)
    server.signal(signal.SIGKILL)  # mid-conversion: about half a second of work left
    with pytest.raises(aiohttp.ClientError):
        await upload
    await until(lambda: processes_in_group(server.process.pid) == [])
    assert [path for path in stored_files(storage) if path.startswith("images/")] == []
    async with running(storage) as restarted:  # nothing of it after a restart either
        assert await (await session.get(f"{restarted.url}/images")).json() == []
    assert stored_files(storage) == []


async def test_version_is_printed_without_starting_anything(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        CONSOLE_SCRIPT,
        "--version",
        "--storage",
        str(tmp_path / "storage"),
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0
    assert stdout.decode() == f"asgilook-aiohttp {asgilook_aiohttp.__version__}\n"
    assert not (tmp_path / "storage").exists()


async def test_serve_is_the_default_command_and_takes_a_configuration_file(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    settings = tmp_path / "asgilook.toml"
    settings.write_text('max-upload-bytes = 100\nlog-format = "json"\nport = 1\n')
    server = await start_server(
        tmp_path / "storage",
        "--config",
        str(settings),
        env={"ASGILOOK_LOG_FORMAT": "text"},
        stderr=asyncio.subprocess.PIPE,
        program=(str(CONSOLE_SCRIPT), "serve"),
    )
    async with session.post(f"{server.url}/images", data=b"x" * 101) as response:
        assert response.status == 413
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    assert server.process.stderr is not None
    log = (await server.process.stderr.read()).decode()
    assert '"POST /images" 413' in log  # text, as the environment said, not the file's JSON


async def test_help_names_every_command_and_an_unknown_one_is_refused() -> None:
    status, out, _ = await run_command("--help")
    assert status == 0
    for command in ("serve", "check", "backup", "restore", "delete"):
        assert f"{command}: " in " ".join(out.split())
    status, out, err = await run_command("frobnicate", "--port", "0")
    assert status == 2
    assert out == ""
    assert "there is no command 'frobnicate'; commands" in err


async def test_bad_configuration_is_refused_with_a_message(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        "--workers",
        "0",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert b"--workers: must be at least 1" in stderr


@pytest.mark.parametrize(
    "first_bytes",
    [
        pytest.param(b"\x89PNG\r\n\x1a\n", id="in-memory"),
        pytest.param(os.urandom(2 * 1024 * 1024), id="outgrew-memory-onto-disk"),
    ],
)
async def test_a_stalled_upload_holds_the_stop_no_longer_than_the_shutdown_timeout(
    tmp_path: Path, session: aiohttp.ClientSession, first_bytes: bytes
) -> None:
    storage = tmp_path / "storage"
    # 1 MiB of upload memory for each of the two HTTP processes.
    flags = ("--shutdown-timeout", "3", "--http-processes", "2", "--upload-memory-mb", "2")
    server = await start_server(storage, *flags)

    async def never_ending_body() -> AsyncIterator[bytes]:
        yield first_bytes
        await asyncio.sleep(3600)

    stalled = asyncio.create_task(session.post(f"{server.url}/images", data=never_ending_body()))
    await until_metric(  # the server has all that was sent, in memory or on disk
        (session, server.url),
        "asgilook_upload_bytes_in_memory",
        lambda held: held + staged_bytes(storage) == len(first_bytes),
    )
    loop = asyncio.get_running_loop()
    signalled = loop.time()
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    # The drain and aiohttp's own close share the one timeout (3 s), not twice over.
    assert loop.time() - signalled < 5.5
    stalled.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await stalled
