"""The server under a stand-in for systemd: notifications, the watchdog, passed sockets."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from functools import partial
from operator import le
from pathlib import Path

import aiohttp
import pytest

from asgilook_aiohttp import systemd

import samples
from checks import Client, image_object, until_metric
from serving import processes_in_group, running, start_server

PNG = samples.encode(samples.two_tone((640, 360)), "PNG")


class NotifySocket:
    """The datagram socket systemd listens on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(path))
        self._socket.setblocking(False)

    async def next(self) -> list[str]:
        async with asyncio.timeout(30):
            data = await asyncio.get_running_loop().sock_recv(self._socket, 4096)
        return data.decode().split("\n")

    async def until(self, assignment: str) -> list[list[str]]:
        """Every message up to and including the one with ``assignment``."""
        seen = []
        while True:
            message = await self.next()
            seen.append(message)
            if assignment in message:
                return seen

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def accepts(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, int(port))) == 0


async def test_ready_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "200000"}
    server = await start_server(tmp_path / "storage", "--http-processes", "2", env=env)
    before_ready = await notify_socket.until("READY=1")
    # READY=1 comes only once the socket accepts connections.
    assert accepts(server.url)
    assert any(line.startswith("STATUS=starting") for message in before_ready for line in message)
    assert f"STATUS=serving on {server.url} with 2 HTTP processes" in before_ready[-1]
    # The watchdog is pinged every half WATCHDOG_USEC (0.1 s here).
    pings = 0
    while pings < 3:
        pings += (await notify_socket.next()).count("WATCHDOG=1")

    server.signal(signal.SIGTERM)
    stopping = await notify_socket.until("STOPPING=1")
    assert any(line.startswith("STATUS=stopping") for line in stopping[-1])
    assert await server.exit_code() == 0


async def test_serves_a_socket_passed_by_the_service_manager(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
    ):
        port = listener.getsockname()[1]
        fd, other_fd = listener.fileno(), other.fileno()
        # As systemd does: the sockets become fds 3 and up, LISTEN_PID names the server's
        # own pid. The second is a datagram socket for something else: not to be served.
        prefix = (
            f"exec 3<&{fd} 4<&{other_fd} {fd}<&- {other_fd}<&-; "
            "export LISTEN_FDS=2 LISTEN_FDNAMES=http:statsd LISTEN_PID=$$;"
        )
        server = await start_server(
            tmp_path / "storage", pass_fds=(fd, other_fd), shell_prefix=prefix
        )
    assert server.url == f"http://127.0.0.1:{port}"
    async with session.post(f"{server.url}/images", data=PNG) as response:
        assert response.status == 201
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def test_serves_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "asgilook.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # left behind by a server that is gone
    server = await start_server(tmp_path / "storage", "--unix", str(path))
    assert server.url == f"unix:{path}"
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post("http://localhost/images", data=PNG) as response:
            assert response.status == 201
            image = await response.json()
        async with session.get(f"http://localhost{image['image']}") as response:
            assert response.status == 200
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def test_each_request_without_a_sane_id_gets_a_new_one(client: Client) -> None:
    made = set()
    for supplied in ({}, {}, {"X-Request-ID": "bad id"}):
        response = await client.get("/healthz", headers=supplied)
        made.add(response.headers["X-Request-ID"])
    assert len(made) == 3
    assert all(len(made_id) == 32 and int(made_id, 16) >= 0 for made_id in made)
    kept = await client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert kept.headers["X-Request-ID"] == "trace-42"


async def test_json_logs_carry_the_request_id(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    server = await start_server(
        tmp_path / "storage", "--log-format", "json", stderr=asyncio.subprocess.PIPE
    )
    async with session.get(f"{server.url}/images", headers={"X-Request-ID": "trace-42"}) as r:
        assert r.headers["X-Request-ID"] == "trace-42"
    async with session.post(f"{server.url}/images", data=b"not an image") as r:
        generated = r.headers["X-Request-ID"]
        assert len(generated) == 32
    bad = "no spaces or \u00e9 allowed"
    async with session.get(f"{server.url}/nowhere", headers={"X-Request-ID": bad}) as r:
        assert r.headers["X-Request-ID"] != bad
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0

    assert server.process.stderr is not None
    lines = [json.loads(line) for line in (await server.process.stderr.read()).splitlines()]
    access = {line["request_id"]: line for line in lines if line["logger"] == "aiohttp.access"}
    assert access["trace-42"]["path"] == "/images"
    assert access["trace-42"]["status"] == 200
    assert access[generated]["method"] == "POST"
    assert access[generated]["status"] == 415
    assert all({"time", "level", "message"} <= line.keys() for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_stop_signal_lets_every_upload_in_flight_finish(
    tmp_path: Path, session: aiohttp.ClientSession, signum: signal.Signals
) -> None:
    storage = tmp_path / "storage"
    server = await start_server(storage, "--workers", "2")
    bodies = [samples.encode(samples.photo((1600, 1200), seed), "PNG") for seed in range(3)]
    signalled = asyncio.Event()

    async def slow_body(data: bytes) -> AsyncIterator[bytes]:
        yield data[:65536]
        await signalled.wait()
        yield data[65536:]

    async def upload(data: bytes) -> dict[str, object]:
        async with session.post(f"{server.url}/images", data=slow_body(data)) as response:
            assert response.status == 201
            return image_object(await response.json())

    uploads = [asyncio.create_task(upload(data)) for data in bodies]
    # Every upload has begun: the server holds the first piece of each.
    everyone_begun = partial(le, len(bodies) * 65536)
    await until_metric((session, server.url), "asgilook_upload_bytes_in_memory", everyone_begun)
    server.signal(signum)
    await server.until_not_listening()  # the rest comes only once the server is stopping
    signalled.set()
    images = await asyncio.gather(*uploads)
    assert await server.exit_code() == 0
    await asyncio.sleep(0.2)
    assert processes_in_group(server.process.pid) == []
    assert list((storage / "staging").iterdir()) == []  # nothing half-written

    async with running(storage) as restarted:
        listed = await (await session.get(f"{restarted.url}/images")).json()
    assert sorted(image["id"] for image in listed) == sorted(str(i["id"]) for i in images)


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_process() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert systemd.watchdog_interval(other) is None
