"""Clients that lie, stall, trickle or flood: each gets a problem+json answer or a closed
connection, costs the server little, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import random
import re
import socket
import sqlite3
import uuid
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar, cast

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from asgilook_aiohttp import logs
from asgilook_aiohttp.storage import files
from asgilook_aiohttp.storage.backends import INDEX_FILE

import samples
from checks import (
    Client,
    ClientFactory,
    assert_nothing_stored,
    assert_problem,
    bearer,
    scrape,
    staged_bytes,
    stored_files,
    until,
    value,
)
from serving import Server, proc_stat, start_server

CONDITIONAL_HEADERS = (
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
    "If-Range",
    "Range",
)
AWKWARD_VALUES = (
    "",
    " ",
    ",",
    " , ,",
    '"unterminated',
    "W/",
    "*, *",
    ",".join(f'"{n}"' for n in range(1_000)),
    "bytes=" + ",".join(f"{n}-{n}" for n in range(800)),
    "x" * 8000,
)
# What no server need read: aiohttp refuses a header field longer than this with 400.
TOO_LONG = ",".join(f'"{n:x}"' for n in range(10_000))


class Connection:
    """A raw HTTP/1.1 connection, to send exactly what a hostile client would."""

    opened: ClassVar[list[Connection]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Connection.opened.append(self)

    @classmethod
    async def to(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, to_head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names) and body (none, as it
        must be, for the answer ``to_head`` a HEAD request)."""
        status_line = await self.reader.readline()
        assert status_line, "the server closed the connection without an answer"
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, text = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = text.strip()
        length = 0 if to_head else int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length)
        return int(status_line.split()[1]), headers, body

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (reading ends, or is reset)."""
        try:
            return await self.reader.read(65536) == b"" or await self.reader.read() == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


@pytest.fixture(autouse=True)
async def close_connections() -> AsyncIterator[None]:
    yield
    while Connection.opened:
        connection = Connection.opened.pop()
        connection.close()
        with contextlib.suppress(ConnectionError):
            await connection.writer.wait_closed()


def address(client: Client) -> tuple[str, int]:
    assert client.server.port is not None
    return "127.0.0.1", client.server.port


def head(method: str, path: str, **headers: str | int) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name.replace('_', '-')}: {text}" for name, text in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def gzip_bomb(compressed_bytes: int) -> bytes:
    """A gzip stream of zeros about ``compressed_bytes`` long that inflates about a
    thousand times over: one flushed block of a MiB of zeros, repeated (it never ends, so
    its checksum is never read)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    start = packer.compress(b"\0" * 1024 * 1024) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(b"\0" * 1024 * 1024) + packer.flush(zlib.Z_FULL_FLUSH)
    return start + block * (compressed_bytes // len(block))


@pytest.fixture
async def image(client: Client) -> dict[str, Any]:
    response = await client.post("/images", data=samples.encode(samples.photo((256, 192)), "PNG"))
    assert response.status == 201
    created: dict[str, Any] = await response.json()
    return created


def image_routes(image: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("GET", image["image"]),
        ("HEAD", image["image"]),
        ("GET", image["thumbnails"][0]),
        ("GET", f"/images/{image['id']}"),
        ("GET", "/images"),
    ]


@pytest.mark.parametrize("header", CONDITIONAL_HEADERS)
async def test_awkward_conditional_and_range_headers_are_never_a_500(
    client: Client, image: dict[str, Any], header: str
) -> None:
    for text in AWKWARD_VALUES:
        for method, path in image_routes(image):
            response = await client.request(method, path, headers={header: text})
            assert response.status in (200, 206, 304, 412, 416), (header, text[:20], path)
            if response.status >= 400 and method == "GET":
                await assert_problem(response, response.status)
        deleting = await client.delete(
            f"/images/{image['id']}", headers={header: text, **bearer("not the token")}
        )
        await assert_problem(deleting, 403, "forbidden")
    too_long = await client.get(image["image"], headers={header: TOO_LONG})
    assert too_long.status == 400


async def test_an_empty_if_match_matches_nothing_and_an_empty_if_none_match_holds(
    client: Client, image: dict[str, Any]
) -> None:
    for method, path in image_routes(image):
        failed = await client.request(method, path, headers={"If-Match": ""})
        assert failed.status == 412
        if method == "GET":
            await assert_problem(failed, 412, "precondition-failed")
        kept = await client.request(method, path, headers={"If-None-Match": ""})
        assert kept.status == 200
    deleting = await client.delete(
        f"/images/{image['id']}", headers={"If-Match": "", **bearer(image["delete_token"])}
    )
    await assert_problem(deleting, 412, "precondition-failed")
    assert (await client.get(image["image"])).status == 200


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    header=st.sampled_from(CONDITIONAL_HEADERS),
    text=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=200,
    ),
)
async def test_any_conditional_or_range_header_is_answered_without_a_server_error(
    client: Client, image: dict[str, Any], header: str, text: str
) -> None:
    for method, path in image_routes(image):
        response = await client.request(method, path, headers={header: text.strip()})
        assert response.status < 500, (header, text)


async def test_a_stalled_body_gets_408_and_leaves_nothing(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(body_rate_window=0.5, min_body_rate=1000, upload_memory_mb=0)
    connection = await Connection.to(*address(client))
    await connection.send(head("POST", "/images", Content_Length=1_000_000) + b"\0" * 5000)
    async with asyncio.timeout(20):
        status, headers, body = await connection.response()
        assert await connection.closed_by_server()
    assert status == 408
    assert headers["connection"] == "close"
    assert b"body-too-slow" in body
    assert b"bytes/s" in body
    assert staged_bytes(storage) == 0
    assert_nothing_stored(storage)


async def test_a_trickling_body_gets_408_but_a_slow_steady_one_is_stored(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(body_rate_window=1, min_body_rate=10_000)
    trickle = await Connection.to(*address(client))
    await trickle.send(head("POST", "/images", Content_Length=1_000_000))
    async with asyncio.timeout(20):
        answered = asyncio.create_task(trickle.response())
        while not answered.done():
            await trickle.send(b"\0" * 100)  # 1,000 bytes a second
            await asyncio.wait({answered}, timeout=0.1)
    status, _, _ = answered.result()
    assert status == 408
    assert_nothing_stored(storage)

    photo = samples.encode(samples.photo((160, 120)), "PNG")  # about 50 kB
    steady = await Connection.to(*address(client))
    await steady.send(head("POST", "/images", Content_Length=len(photo)))
    for start in range(0, len(photo), 5000):
        await steady.send(photo[start : start + 5000])  # 50,000 bytes a second
        await asyncio.sleep(0.1)
    status, _, _ = await steady.response()
    assert status == 201


async def test_a_body_past_the_body_timeout_gets_408(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(body_timeout=1, min_body_rate=1, body_rate_window=0.2)
    connection = await Connection.to(*address(client))
    await connection.send(head("POST", "/images", Content_Length=1_000_000))
    async with asyncio.timeout(20):
        answered = asyncio.create_task(connection.response())
        while not answered.done():
            await connection.send(b"\0" * 1000)
            await asyncio.wait({answered}, timeout=0.05)
    status, _, body = answered.result()
    assert status == 408
    assert b"longer than" in body
    assert_nothing_stored(storage)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZIP", "x-foo", "gzip, gzip", "compress"])
async def test_a_coded_body_is_415_unread(client: Client, storage: Path, coding: str) -> None:
    packed = zlib.compress(samples.small_png())
    response = await client.post("/images", data=packed, headers={"Content-Encoding": coding})
    body = await assert_problem(response, 415, "unsupported-encoding")
    assert coding in body["detail"]
    assert_nothing_stored(storage)
    identity = await client.post(
        "/images", data=samples.small_png(), headers={"Content-Encoding": "identity"}
    )
    assert identity.status == 201


@pytest.mark.parametrize(
    "ending", [b"", b"\r\n", b"\r\n--XX\r\n", b"\r\n--XX"], ids=["none", "crlf", "open", "cut"]
)
async def test_a_form_cut_before_its_closing_boundary_is_400(
    client: Client, storage: Path, ending: bytes
) -> None:
    form = (
        b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + samples.small_png()
        + ending
    )
    response = await client.post(
        "/images", data=form, headers={"Content-Type": "multipart/form-data; boundary=XX"}
    )
    await assert_problem(response, 400, "malformed-body")
    assert_nothing_stored(storage)


async def test_a_form_with_fields_after_the_image_is_read_to_its_end(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("image", samples.small_png(), filename="a.png")
    form.add_field("title", "holiday")
    form.add_field("image", b"a second image field is not the upload", filename="b.png")
    response = await client.post("/images", data=form)
    assert response.status == 201
    assert (await response.json())["size"] == [64, 48]


async def test_a_refused_body_ends_its_connection(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(write_token="secret")
    connection = await Connection.to(*address(client))
    await connection.send(head("POST", "/images", Content_Length=10_000_000) + b"\0" * 1000)
    async with asyncio.timeout(20):
        status, headers, _ = await connection.response()
        assert status == 401
        assert headers["connection"] == "close"
        assert await connection.closed_by_server()
    assert_nothing_stored(storage)


async def test_a_lying_content_length_leaves_nothing(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(upload_memory_mb=0)
    connection = await Connection.to(*address(client))
    await connection.send(head("POST", "/images", Content_Length=100_000) + samples.small_png())
    connection.writer.write_eof()  # claims 100 kB, sends a few hundred bytes and stops
    async with asyncio.timeout(20):
        assert await connection.closed_by_server()
    await until(lambda: not stored_files(storage))  # its handler cleans up once it is gone
    assert_nothing_stored(storage)
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0


async def test_an_image_deleted_as_its_download_starts_is_a_404_problem(
    client: Client, image: dict[str, Any], storage: Path
) -> None:
    # What a download finds when a deletion lands between reading the index and opening
    # the file: the row, but no file.
    remove_stored_file(storage, image["id"])
    connection = await Connection.to(*address(client))
    await connection.send(
        head("GET", image["image"]) + head("HEAD", image["image"]) + head("GET", "/healthz")
    )
    status, headers, body = await connection.response()
    assert status == 404
    assert headers["content-type"].startswith("application/problem+json")
    assert image["id"] in body.decode()
    assert "etag" not in headers
    assert len(headers["x-request-id"]) == 32
    status, headers, _ = await connection.response(to_head=True)
    assert status == 404
    assert headers["content-type"].startswith("application/problem+json")
    assert "x-request-id" in headers
    status, _, body = await connection.response()  # the HEAD's answer had no body
    assert (status, body) == (200, b'{"status": "alive"}')


def remove_stored_file(storage: Path, image_id: str) -> None:
    next(storage.glob(f"images/*/*/{image_id}.jpeg")).unlink()


async def test_a_client_that_sends_its_whole_body_before_reading_gets_the_refusal(
    make_client: ClientFactory,
) -> None:
    client = await make_client(write_token="secret")
    connection = await Connection.to(*address(client))
    body = b"\0" * 3_000_000
    async with asyncio.timeout(20):
        await connection.send(head("POST", "/images", Content_Length=len(body)) + body)
        status, headers, _ = await connection.response()
    assert status == 401
    assert headers["connection"] == "close"


@pytest.mark.parametrize("sent_from", ["file", "memory"])
async def test_a_client_that_stops_reading_a_download_is_cut_off(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch, sent_from: str
) -> None:
    if sent_from == "memory":  # as a small image is, but too big for the socket's buffers
        monkeypatch.setattr(files, "IN_MEMORY_BYTES", 1 << 30)
    client = await make_client(min_body_rate=10_000_000, body_rate_window=0.5)
    noise = random.Random(2).randbytes(4000 * 3000 * 3)
    big = samples.encode(Image.frombytes("RGB", (4000, 3000), noise), "JPEG", quality=100)
    created = await (await client.post("/images", data=io.BytesIO(big))).json()
    connection = await Connection.to(*address(client))
    transport = cast(asyncio.Transport, connection.writer.transport)
    transport.pause_reading()
    await connection.send(head("GET", created["image"]))
    # Far more than the socket buffers hold, so the server waits on the client.
    assert len(big) > 16_000_000
    # A client that stalls, well past the 1.6 s its download may take.
    received = await read_after_stalling(connection, transport)
    assert len(received) < len(big)


async def read_after_stalling(connection: Connection, transport: asyncio.Transport) -> bytes:
    """Read nothing for 3 s, then all that comes until the connection ends."""
    await asyncio.sleep(3)
    transport.resume_reading()
    received = b""
    async with asyncio.timeout(20):
        with contextlib.suppress(ConnectionError):
            while chunk := await connection.reader.read(1 << 20):
                received += chunk
    return received


# Through the server process: what aiohttp does with connections is set up there.


@pytest.fixture
async def server(tmp_path: Path) -> Server:
    return await start_server(tmp_path / "storage", "--idle-timeout", "1")


def url_address(server: Server) -> tuple[str, int]:
    host, _, port = server.url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def test_slow_headers_and_silent_and_idle_connections_are_closed(server: Server) -> None:
    silent = await Connection.to(*url_address(server))
    slow = await Connection.to(*url_address(server))
    idle = await Connection.to(*url_address(server))
    await idle.send(head("GET", "/healthz"))
    assert (await idle.response())[0] == 200
    async with asyncio.timeout(20):
        closing = asyncio.create_task(slow.closed_by_server())
        for byte in b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"x" * 1000:
            if closing.done():
                break
            await slow.send(bytes([byte]))
            await asyncio.sleep(0.05)
        assert await closing
        assert await silent.closed_by_server()
        assert await idle.closed_by_server()


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_connections_past_the_cap_get_503_and_the_server_stays_up(tmp_path: Path) -> None:
    # A hard limit of 400 descriptors: the cap comes down to fit within it.
    server = await start_server(
        tmp_path / "storage", shell_prefix="ulimit -n 400;", stderr=asyncio.subprocess.PIPE
    )
    assert server.process.stderr is not None
    host, port = url_address(server)
    crowd = [await Connection.to(host, port) for _ in range(450)]
    async with asyncio.timeout(20):
        late = await Connection.to(host, port)
        await late.send(head("GET", "/healthz"))
        status, headers, body = await late.response()
    assert status == 503
    assert headers["content-type"] == "application/problem+json"
    assert headers["retry-after"]
    assert b"too-many-connections" in body
    assert open_descriptors(server.process.pid) < 400
    for connection in crowd:
        connection.close()
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(20):
            while True:
                async with session.get(f"{server.url}/healthz") as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.05)
        async with session.post(f"{server.url}/images", data=samples.small_png()) as response:
            assert response.status == 201
    server.signal(15)
    assert await server.exit_code() == 0
    log = (await server.process.stderr.read()).decode()
    assert "Traceback" not in log
    assert "serving at most 72 connections" in log  # (400 - 256) / 2


def open_file_limits(pid: int) -> tuple[str, str]:
    limits = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if "open files" in line).split()[3:5]
    return soft, hard


async def test_the_server_raises_its_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "storage", shell_prefix="ulimit -Sn 300;")
    soft, hard = open_file_limits(server.process.pid)
    assert soft == hard != "300"
    server.signal(15)
    assert await server.exit_code() == 0


async def test_a_gzip_bomb_is_refused_for_little_cpu(server: Server) -> None:
    bomb = gzip_bomb(4 * 1024 * 1024)  # about 4 GiB once inflated
    before = cpu_seconds(server.process.pid)
    connection = await Connection.to(*url_address(server))
    await connection.send(
        head("POST", "/images", Content_Length=len(bomb), Content_Encoding="gzip")
    )
    sending = asyncio.create_task(connection.send(bomb))
    async with asyncio.timeout(30):
        status, headers, body = await connection.response()
        assert status == 415
        assert b"unsupported-encoding" in body
        assert headers["connection"] == "close"
        assert await connection.closed_by_server()
    sending.cancel()
    # Inflating all of it would take the server seconds, and its first 32 MiB a few tens
    # of milliseconds each time it is sent.
    assert cpu_seconds(server.process.pid) - before < 1.5


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_malformed_requests_are_one_line_each_not_tracebacks(tmp_path: Path) -> None:
    server = await start_server(tmp_path / "storage", stderr=asyncio.subprocess.PIPE)
    assert server.process.stderr is not None
    for _ in range(3):
        connection = await Connection.to(*url_address(server))
        await connection.send(b"GET / HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n")
        assert (await connection.response())[0] == 400
        connection.close()
    server.signal(15)
    assert await server.exit_code() == 0
    log = (await server.process.stderr.read()).decode()
    assert "Traceback" not in log
    assert log.count("INFO aiohttp.server [-] refused a malformed request") == 3


def test_a_flood_of_one_error_is_logged_a_few_times(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(logs, "_clock", lambda: clock[0])
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("text")
    try:
        flood = logging.getLogger("asyncio")
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                flood.exception("socket.accept() out of system resource")
        flood.error("something else")
        clock[0] += 61  # a minute on, the next of the kind says what was left out
        flood.error("socket.accept() out of system resource")
    finally:
        root.handlers, root.level = saved[0], saved[1]
    logged = capsys.readouterr().err
    assert logged.count("socket.accept() out of system resource") == 11
    assert logged.count("Traceback") == 10
    assert "something else" in logged
    assert "(and 990 like it not logged)" in logged


async def test_a_client_that_stops_reading_a_listing_is_cut_off(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(min_body_rate=10_000_000, body_rate_window=0.5, idle_timeout=0.5)
    with sqlite3.connect(storage / INDEX_FILE) as db:  # a full page, without converting
        db.executemany(
            "INSERT INTO images (id, uploaded, width, height, bytes, sha256) "
            "VALUES (?, 1700000000, 4000, 3000, 3000000, ?)",
            [(str(uuid.UUID(int=n, version=4)), "0" * 64) for n in range(1000)],
        )
    connection = await Connection.to(*address(client))
    transport = cast(asyncio.Transport, connection.writer.transport)
    transport.pause_reading()
    # Socket buffers as small as a slow network's, which loopback's are not: the page
    # outgrows them, and the rest waits in the server's memory for the client.
    assert client.server.runner is not None
    assert client.server.runner.server is not None
    server = client.server.runner.server
    await until(lambda: len(server.connections) == 1)
    (handler,) = server.connections
    assert handler.transport is not None
    handler.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await connection.send(head("GET", "/images?limit=1000"))
    received = await read_after_stalling(connection, transport)  # past the page's time
    head_part, _, body = received.partition(b"\r\n\r\n")
    declared = re.search(rb"content-length: (\d+)", head_part.lower())
    assert declared is not None
    length = int(declared[1])
    assert length > 500_000
    assert len(body) < length
