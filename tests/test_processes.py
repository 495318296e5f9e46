"""Every CPU serves HTTP: several HTTP processes under one main process, on the same
sockets, behaving as one server."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import re
import signal
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from asgilook_aiohttp.config import Config, MiB
from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.scratch import Scratch

import samples
from checks import (
    ClientFactory,
    assert_problem,
    bearer,
    process_exists,
    scrape,
    until,
    until_metric,
    value,
)
from serving import (
    Server,
    children_of,
    descendants_of,
    proc_stat,
    processes_in_group,
    running,
    start_server,
)

_REQUESTS = "asgilook_http_requests_total"
PNG = samples.encode(samples.two_tone((640, 480)), "PNG")


async def own_series(server: Server, number: int) -> dict[tuple[str, str], float]:
    """What HTTP process ``number`` reports of itself alone, by series name and route."""
    address = f"\0asgilook-aiohttp/{server.process.pid}/{number}/metrics"
    reader, writer = await asyncio.open_unix_connection(address)
    text = (await reader.read()).decode()
    writer.close()
    return {
        (sample.name, sample.labels.get("route", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("status", "200") == "200"
    }


def http_processes(server: Server) -> list[int]:
    """The main process's children but the fork server and resource tracker it shares
    with them."""
    found = []
    for pid in children_of(server.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # it exited since it was listed: a replaced HTTP process, say
            continue
        if b"multiprocessing" not in command:
            found.append(pid)
    return found


def workers_watching(server: Server, http_process: int) -> list[int]:
    """The conversion workers of one HTTP process: those holding a pidfd of it, to exit
    with it."""
    watching = []
    for worker in workers_of(server):
        for fd in Path(f"/proc/{worker}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == "anon_inode:[pidfd]":
                    info = Path(f"/proc/{worker}/fdinfo/{fd.name}").read_text()
                    if f"Pid:\t{http_process}\n" in info:
                        watching.append(worker)
    return watching


def mapped_files(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def fork_servers_of(server: Server) -> list[int]:
    return [
        pid
        for pid in descendants_of(server.process.pid)
        if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and not _is_forked_from_a_fork_server(pid)
    ]


def _is_forked_from_a_fork_server(pid: int) -> bool:
    parent = int(proc_stat(pid)[1])
    return b"forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()


def workers_of(server: Server) -> list[int]:
    """The conversion workers: the processes the fork server started."""
    return [pid for fork_server in fork_servers_of(server) for pid in children_of(fork_server)]


Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@asynccontextmanager
async def listening_on(kind: str, storage: Path) -> AsyncIterator[tuple[Server, Opener]]:
    """A server of two HTTP processes on a TCP socket it opens itself, on a Unix socket,
    or on a socket passed as systemd passes them; and a way to connect to it."""
    if kind == "unix":
        path = storage.parent / "asgilook.sock"
        server = await start_server(storage, "--http-processes", "2", "--unix", str(path))
        yield server, partial(asyncio.open_unix_connection, str(path))
    elif kind == "passed":
        with socket.create_server(("127.0.0.1", 0)) as listener:
            fd = listener.fileno()
            prefix = f"exec 3<&{fd} {fd}<&-; export LISTEN_FDS=1 LISTEN_PID=$$;"
            server = await start_server(
                storage, "--http-processes", "2", pass_fds=(fd,), shell_prefix=prefix
            )
        yield server, partial(asyncio.open_connection, *_address(server))
    else:
        server = await start_server(storage, "--http-processes", "2")
        yield server, partial(asyncio.open_connection, *_address(server))
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("kind", ["tcp", "unix", "passed"])
async def test_connections_are_shared_out_and_every_process_serves(
    tmp_path: Path, kind: str
) -> None:
    async with listening_on(kind, tmp_path / "storage") as (server, connect):
        assert len(http_processes(server)) == 2

        async def keep_alive() -> asyncio.StreamWriter:
            reader, writer = await connect()
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            return writer

        # Opened at once, as a load balancer or a benchmark opens its pool, and held.
        writers = await asyncio.gather(*(keep_alive() for _ in range(16)))
        answered = [await own_series(server, number) for number in range(2)]
        for writer in writers:
            writer.close()
        healthz = [
            series.get(("asgilook_http_requests_total", "/healthz"), 0) for series in answered
        ]
        assert sum(healthz) == 16
        assert min(healthz) >= 4, healthz

        # /metrics, from whichever process answers, counts them all.
        unix = "unix:" in server.url
        connector = (  # a new connection for each scrape, to reach either process
            aiohttp.UnixConnector(server.url[5:], force_close=True)
            if unix
            else aiohttp.TCPConnector(force_close=True)
        )
        base = "http://localhost" if unix else server.url
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(4):
                metrics = await scrape((session, base))
                assert value(metrics, "asgilook_http_processes") == 2
                assert (
                    sum(
                        count
                        for (name, labels), count in metrics.items()
                        if name == "asgilook_http_requests_total"
                        and ("route", "/healthz") in labels
                    )
                    == 16
                )


async def test_what_every_process_sees_alike_is_reported_once(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with running(tmp_path / "storage", "--http-processes", "2") as server:
        for _ in range(3):
            async with session.post(f"{server.url}/images", data=PNG) as response:
                assert response.status == 201
        stored = (session, server.url), "asgilook_images_stored", lambda n: n == 3
        metrics = await until_metric(*stored)
    uploads = value(metrics, "asgilook_conversions_total", job="convert_upload", outcome="ok")
    assert uploads == 3


async def test_a_thumbnail_first_asked_of_every_process_at_once_is_made_once(
    tmp_path: Path,
) -> None:
    # A new connection for each request, so that both processes get some.
    async with (
        running(tmp_path / "storage", "--http-processes", "2") as server,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
    ):
        async with fresh.post(f"{server.url}/images", data=PNG) as response:
            image = await response.json()
        path = image["thumbnails"][0]

        async def get() -> bytes:
            async with fresh.get(f"{server.url}{path}") as response:
                assert response.status == 200
                return await response.read()

        bodies = await asyncio.gather(*(get() for _ in range(16)))
        metrics = await scrape((fresh, server.url))
    assert len(set(bodies)) == 1
    assert samples.decode(bodies[0]).size == (320, 240)
    made = value(metrics, "asgilook_conversions_total", job="make_thumbnail", outcome="ok")
    assert made == 1


async def test_a_killed_http_process_is_replaced_and_the_others_serve_meanwhile(
    tmp_path: Path,
) -> None:
    server = await start_server(
        tmp_path / "storage", "--http-processes", "2", stderr=asyncio.subprocess.PIPE
    )
    victim, survivor = http_processes(server)
    victims_workers = workers_watching(server, victim)
    assert len(victims_workers) == 1
    os.kill(victim, signal.SIGKILL)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(10):  # while it is gone and being replaced
            async with fresh.get(f"{server.url}/healthz") as response:
                assert response.status == 200
        await until(lambda: len(http_processes(server)) == 2)
        replacement = (set(http_processes(server)) - {survivor}).pop()
        assert replacement != victim
        await until_metric((fresh, server.url), "asgilook_http_processes", lambda n: n == 2)
        async with fresh.post(f"{server.url}/images", data=PNG) as response:
            assert response.status == 201
    await until(lambda: not any(process_exists(pid) for pid in victims_workers))

    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    assert processes_in_group(server.process.pid) == []
    assert server.process.stderr is not None
    log = (await server.process.stderr.read()).decode()
    assert re.search(
        rf"ERROR .* HTTP process [01] \(pid {victim}\) was killed by signal 9; "
        r"starting another in 0\.5 s",
        log,
    ), log


async def test_an_http_process_that_stops_answering_is_killed_and_replaced(
    tmp_path: Path,
) -> None:
    # A watchdog of 2 s: pings every second, each HTTP process heard from every 0.5 s.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    pings: list[float] = []

    async def listen() -> None:
        loop = asyncio.get_running_loop()
        while True:
            if b"WATCHDOG=1" in await loop.sock_recv(notify, 4096):
                pings.append(loop.time())

    listening = asyncio.create_task(listen())
    env = {"WATCHDOG_USEC": "2000000", "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    server = await start_server(
        tmp_path / "storage", "--http-processes", "2", env=env, stderr=asyncio.subprocess.PIPE
    )
    stuck, _ = http_processes(server)
    os.kill(stuck, signal.SIGSTOP)  # as an event loop that never comes round again
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(10):  # the other takes every new connection meanwhile
            async with asyncio.timeout(1), fresh.get(f"{server.url}/healthz") as response:
                assert response.status == 200
    await until(lambda: not process_exists(stuck), seconds=10)
    await until(lambda: len(http_processes(server)) == 2)
    await asyncio.sleep(2)
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    listening.cancel()
    notify.close()
    # The stuck process was dealt with in time: systemd never went a whole timeout
    # without a ping, so it would not have restarted the service.
    assert len(pings) >= 4
    assert max(later - earlier for earlier, later in itertools.pairwise(pings)) < 2.0
    assert server.process.stderr is not None
    log = (await server.process.stderr.read()).decode()
    assert re.search(rf"HTTP process [01] \(pid {stuck}\) has not answered for [\d.]+ s", log)


@pytest.mark.parametrize(("workers", "expected"), [("2", 2), ("3", 3), ("1", 2)])
async def test_conversion_workers_are_shared_out_not_multiplied(
    tmp_path: Path, workers: str, expected: int
) -> None:
    async with running(
        tmp_path / "storage", "--http-processes", "2", "--workers", workers
    ) as server:
        await until(lambda: len(workers_of(server)) == expected)


def test_each_process_gets_its_share_of_what_the_whole_server_may_use() -> None:
    config = Config(
        Path("storage"),
        http_processes=3,
        workers=4,
        queue_size=32,
        upload_memory_mb=128,
        upload_disk_mb=256,
        max_connections=4096,
    )
    shares = [config.for_http_process(number) for number in range(3)]
    assert [share.http_process for share in shares] == [0, 1, 2]
    assert [share.workers for share in shares] == [2, 1, 1]
    assert sum(share.queue_size for share in shares) == 32
    assert sum(share.upload_memory_mb for share in shares) == 128
    assert sum(share.upload_disk_mb for share in shares) == 256
    assert sum(share.max_connections for share in shares) == 4096
    # Fewer workers than processes: each still converts.
    fewer = Config(Path("storage"), http_processes=2, workers=1)
    assert [fewer.for_http_process(number).workers for number in (0, 1)] == [1, 1]
    # On a machine of many CPUs, each still takes the largest upload allowed, and queues.
    many = Config(Path("storage"), http_processes=64)
    for share in (many.for_http_process(number) for number in (0, 63)):
        assert share.upload_disk_mb * MiB >= many.max_upload_bytes
        assert share.queue_size >= 1
    unqueued = Config(Path("storage"), http_processes=2, queue_size=0)
    assert unqueued.for_http_process(1).queue_size == 0


async def test_each_process_has_its_own_reserve_and_a_smaller_server_removes_the_rest(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    async with running(storage, "--http-processes", "3"):
        reserves = sorted(path.name for path in storage.glob(f"{RESERVE_FILE}*"))
        assert reserves == [RESERVE_FILE, f"{RESERVE_FILE}-1", f"{RESERVE_FILE}-2"]
        assert all((storage / name).stat().st_size == MiB for name in reserves)
    async with running(storage, "--http-processes", "2"):
        reserves = sorted(path.name for path in storage.glob(f"{RESERVE_FILE}*"))
        assert reserves == [RESERVE_FILE, f"{RESERVE_FILE}-1"]


def test_a_process_starting_removes_what_processes_that_are_gone_left_in_staging(
    tmp_path: Path,
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    gone = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, check=True)
    dead_pid = int(gone.stdout)
    left = [f"{dead_pid}-0123456789ab-0.upload", "0123456789ab-7.jpeg"]  # the latter: before pids
    alive = f"{os.getppid()}-0123456789ab-0.upload"  # a process still running: not ours to judge
    for name in (*left, alive):
        (staging / name).write_bytes(b"half")
    Scratch(tmp_path).open()
    assert [path.name for path in staging.iterdir()] == [alive]


async def test_a_stop_signal_drains_every_http_process(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    server = await start_server(storage, "--http-processes", "2", "--workers", "2")
    bodies = [samples.encode(samples.photo((800, 600), seed), "PNG") for seed in range(4)]
    signalled = asyncio.Event()

    async def slow_body(data: bytes) -> AsyncIterator[bytes]:
        yield data[:65536]
        await signalled.wait()
        yield data[65536:]

    async def upload(data: bytes) -> str:
        async with (
            aiohttp.ClientSession() as own_connection,
            own_connection.post(f"{server.url}/images", data=slow_body(data)) as response,
        ):
            assert response.status == 201
            return str((await response.json())["id"])

    uploads = [asyncio.create_task(upload(data)) for data in bodies]

    async def each_holds_an_upload() -> bool:
        held = [await own_series(server, number) for number in range(2)]
        return all(series[("asgilook_upload_bytes_in_memory", "")] >= 65536 for series in held)

    async with asyncio.timeout(30):
        while not await each_holds_an_upload():  # noqa: ASYNC110 - state in other processes
            await asyncio.sleep(0.01)
    server.signal(signal.SIGTERM)
    await server.until_not_listening()
    signalled.set()
    ids = await asyncio.gather(*uploads)
    assert await server.exit_code() == 0
    assert processes_in_group(server.process.pid) == []
    assert list((storage / "staging").iterdir()) == []

    async with running(storage) as restarted:
        listed = await (await session.get(f"{restarted.url}/images")).json()
    assert sorted(image["id"] for image in listed) == sorted(ids)


async def test_the_thumbnail_budget_holds_for_all_processes_together(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    server = await start_server(
        storage, "--http-processes", "2", "--thumbnail-budget-mb", "1", "--jpeg-quality", "95"
    )
    photo = samples.encode(samples.photo((2048, 1536)), "PNG")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        images = []
        for _ in range(3):
            async with fresh.post(f"{server.url}/images", data=io.BytesIO(photo)) as response:
                images.append(await response.json())

        async def get(path: str) -> None:
            async with fresh.get(f"{server.url}{path}") as response:
                assert response.status == 200

        paths = [path for image in images for path in image["thumbnails"]]
        await asyncio.gather(*(get(path) for path in paths))
        kept = sum(path.stat().st_size for path in (storage / "thumbnails").rglob("*.jpeg"))
        largest = max(path.stat().st_size for path in (storage / "thumbnails").rglob("*.jpeg"))
        made = value(
            await scrape((fresh, server.url)),
            "asgilook_conversions_total",
            job="make_thumbnail",
            outcome="ok",
        )
    assert made == len(paths)
    # Each process may have one thumbnail of its own past the budget, about to be served.
    assert kept <= MiB + 2 * largest
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def test_a_write_that_another_process_keeps_waiting_gets_503_not_500(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(dependency_timeout=0.2)
    response = await client.post("/images", data=PNG)
    assert response.status == 201
    image = await response.json()
    with sqlite3.connect(storage / INDEX_FILE, isolation_level=None) as other:
        other.execute("BEGIN IMMEDIATE")  # as another process's long write
        response = await client.post("/images", data=PNG)
        await assert_problem(response, 503, "dependency-unavailable")
        assert response.headers["Retry-After"] == "5"
        deleting = await client.delete(image["image"][:-5], headers=bearer(image["delete_token"]))
        await assert_problem(deleting, 503, "dependency-unavailable")
        other.execute("COMMIT")
    listed = await (await client.get("/images")).json()
    assert [listed_image["id"] for listed_image in listed] == [image["id"]]
    deleting = await client.delete(image["image"][:-5], headers=bearer(image["delete_token"]))
    assert deleting.status == 204


async def test_conversion_workers_load_pillow_and_not_the_server(tmp_path: Path) -> None:
    async with running(tmp_path / "storage", "--http-processes", "2", "--workers", "2") as server:
        await until(lambda: len(workers_of(server)) == 2)
        for worker in workers_of(server):
            mapped = mapped_files(worker)
            assert "/PIL/" in mapped
            # The server's own modules, aiohttp's parser among them, stay in the server.
            assert "/aiohttp/" not in mapped


async def test_a_fork_server_that_dies_is_replaced_and_uploads_go_on(tmp_path: Path) -> None:
    server = await start_server(
        tmp_path / "storage", "--http-processes", "2", stderr=asyncio.subprocess.PIPE
    )
    (fork_server,) = fork_servers_of(server)
    before = http_processes(server)
    os.kill(fork_server, signal.SIGKILL)
    await until(lambda: not set(http_processes(server)) & set(before))
    await until(lambda: len(http_processes(server)) == 2)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(4):  # on both processes, most likely: each starts its workers anew
            async with fresh.post(f"{server.url}/images", data=PNG) as response:
                assert response.status == 201
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0
    assert processes_in_group(server.process.pid) == []
    assert server.process.stderr is not None
    log = (await server.process.stderr.read()).decode()
    assert f"the fork server of the conversion workers (pid {fork_server}) exited" in log
