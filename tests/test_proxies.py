"""Behind a reverse proxy: the access log names the client a trusted proxy forwarded for."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from asgilook_aiohttp.proxies import Malformed, forwarded_for

from serving import Server, start_server


class LoggedServer:
    """A server process whose JSON access log is read as requests are made."""

    def __init__(self, server: Server, base: str, connector: aiohttp.BaseConnector) -> None:
        self.server = server
        self._base = base
        self._connector = connector
        self._count = 0

    async def remote(self, headers: dict[str, str] | list[tuple[str, str]]) -> str:
        """The remote the access log shows for a request with ``headers``; it must get 200."""
        self._count += 1
        path = f"/healthz?n={self._count}"
        async with (
            aiohttp.ClientSession(connector=self._connector, connector_owner=False) as session,
            session.get(f"{self._base}{path}", headers=headers) as response,
        ):
            assert response.status == 200
        stderr = self.server.process.stderr
        assert stderr is not None
        async with asyncio.timeout(30):
            while True:
                entry = json.loads(await stderr.readline())
                if entry.get("path") == path:
                    return str(entry["remote"])


Start = Callable[..., Awaitable[LoggedServer]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Starts a server with the flags given, logging JSON; ``unix`` first serves it on a
    Unix socket instead, and makes the requests there."""
    started: list[tuple[Server, aiohttp.BaseConnector]] = []

    async def start(*flags: str) -> LoggedServer:
        unix = tmp_path / "asgilook.sock"
        on_unix = flags[:1] == ("unix",)
        server = await start_server(
            tmp_path / "storage",
            "--log-format",
            "json",
            *(("--unix", str(unix), *flags[1:]) if on_unix else flags),
            stderr=asyncio.subprocess.PIPE,
        )
        connector = aiohttp.UnixConnector(path=str(unix)) if on_unix else aiohttp.TCPConnector()
        started.append((server, connector))
        return LoggedServer(server, "http://localhost" if on_unix else server.url, connector)

    yield start
    for server, connector in started:
        await connector.close()
        server.signal(signal.SIGTERM)
        assert await server.exit_code() == 0


async def test_a_trusted_proxy_names_the_client(start: Start) -> None:
    logged = await start("--trusted-proxy", "127.0.0.1", "10.0.0.0/8")
    assert await logged.remote({"X-Forwarded-For": "203.0.113.9"}) == "203.0.113.9"
    # The proxies it came through, trusted, are passed over.
    assert await logged.remote({"X-Forwarded-For": "203.0.113.9, 10.1.2.3"}) == "203.0.113.9"
    forwarded = 'for="[2001:db8:cafe::17]:4711";proto=https'
    assert await logged.remote({"Forwarded": forwarded}) == "2001:db8:cafe::17"
    # Forwarded comes first, when a proxy sets both.
    both = {"Forwarded": "for=198.51.100.7", "X-Forwarded-For": "203.0.113.9"}
    assert await logged.remote(both) == "198.51.100.7"
    # Several header lines are one list, in order.
    lines = [("X-Forwarded-For", "192.0.2.1"), ("X-Forwarded-For", "203.0.113.9, 10.0.0.5")]
    assert await logged.remote(lines) == "203.0.113.9"
    assert await logged.remote({}) == "127.0.0.1"


async def test_what_a_client_wrote_on_the_left_is_not_believed(start: Start) -> None:
    logged = await start("--trusted-proxy", "127.0.0.1", "10.0.0.0/8")
    # The client sent "X-Forwarded-For: 1.1.1.1"; the proxy added the client's address.
    assert await logged.remote({"X-Forwarded-For": "1.1.1.1, 203.0.113.9"}) == "203.0.113.9"
    spoofed = "for=1.1.1.1, for=203.0.113.9;proto=https, for=10.9.9.9"
    assert await logged.remote({"Forwarded": spoofed}) == "203.0.113.9"
    # Only proxies: the farthest is as near the client as is known.
    assert await logged.remote({"X-Forwarded-For": "10.0.0.1, 10.0.0.2"}) == "10.0.0.1"
    # The proxy did not know, or hid, the client: whatever lies further left is the
    # client's own word, so the peer it is.
    assert await logged.remote({"Forwarded": "for=1.1.1.1, for=unknown"}) == "127.0.0.1"
    assert await logged.remote({"Forwarded": "for=1.1.1.1, for=_hidden"}) == "127.0.0.1"


async def test_headers_that_cannot_be_read_leave_the_peer(start: Start) -> None:
    logged = await start("--trusted-proxy", "127.0.0.1")
    for headers in (
        {"X-Forwarded-For": "not-an-address"},
        {"X-Forwarded-For": "203.0.113.9,,"},
        {"X-Forwarded-For": ""},
        {"Forwarded": "for=203.0.113.9;;"},
        {"Forwarded": 'for="[2001:db8::1'},
        {"Forwarded": "for=[2001:db8::1]"},  # brackets need quotes
        {"Forwarded": "for"},
        {"Forwarded": "by=10.0.0.1"},
        {"Forwarded": "for=999.1.1.1", "X-Forwarded-For": "203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.9\u00e9"},
    ):
        assert await logged.remote(headers) == "127.0.0.1", headers


async def test_a_proxy_named_as_an_ipv4_mapped_address(start: Start) -> None:
    # As the log shows an IPv4 peer on a socket for both, which systemd may pass.
    logged = await start("--trusted-proxy", "::ffff:127.0.0.0/104")
    assert await logged.remote({"X-Forwarded-For": "::ffff:203.0.113.9"}) == "203.0.113.9"


async def test_headers_from_a_peer_not_trusted_are_ignored(start: Start) -> None:
    logged = await start("--trusted-proxy", "10.0.0.0/8")
    assert await logged.remote({"X-Forwarded-For": "203.0.113.9"}) == "127.0.0.1"
    assert await logged.remote({"Forwarded": "for=203.0.113.9"}) == "127.0.0.1"


async def test_a_proxy_on_the_unix_socket(start: Start) -> None:
    logged = await start("unix", "--trusted-proxy", "unix")
    assert await logged.remote({"X-Forwarded-For": "203.0.113.9"}) == "203.0.113.9"
    assert await logged.remote({}) == "-"


async def test_the_unix_socket_is_trusted_only_if_named(start: Start) -> None:
    logged = await start("unix", "--trusted-proxy", "127.0.0.1")
    assert await logged.remote({"X-Forwarded-For": "203.0.113.9"}) == "-"


def test_forwarded_elements() -> None:
    header = (
        'for=192.0.2.43, For="[2001:db8:cafe::17]:4711";proto=http, '
        'by=203.0.113.43;for="192.0.2.60:80", for=unknown, for="_gazonk", proto=https'
    )
    assert list(forwarded_for(header)) == [
        ipaddress.ip_address("192.0.2.43"),
        ipaddress.ip_address("2001:db8:cafe::17"),
        ipaddress.ip_address("192.0.2.60"),
        None,
        None,
        None,
    ]
    with pytest.raises(Malformed):
        list(forwarded_for("for=192.0.2.43 for=192.0.2.44"))
