"""Soak (issue 12): legitimate traffic with and without hostile clients, against the real
server on loopback.

    python bench/soak.py [--seconds 20] [--uploaders 4] [--readers 2] [--workers N]
                         [--attackers slowloris,gzip-bomb,scan-bomb] [--ceiling] [--json PATH]

Phase 1 sends legitimate traffic alone for --seconds: uploaders sending 0.3 MP and 2 MP
photos (JPEG and PNG) one after another, readers listing images and fetching images and
thumbnails at a gentle pace, and a /healthz probe every 20 ms. Phase 2 sends the same
traffic while attackers run: 50 slowloris connections, 4 gzip bombs and 4 scan bombs,
each reconnecting whenever the server answers or drops it.

Prints, for each kind of legitimate request and each phase, the rate of successes, p50
and p99 latency and the errors; what the attackers saw; where the CPU went; and the
verdicts on the issue's targets: uploads keep at least 80% of their unattacked rate, and
/healthz p99 stays within 50 ms under attack. Exits 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from common import (
    ROOT,
    Server,
    encode,
    percentile,
    photo,
    start_python,
    start_server,
    tree_cpu,
)
from loadgen import Pool

from asgilook_aiohttp.config import default_workers

# How many of each attacker run at once in the attacked phase.
ATTACKERS = {"slowloris": 50, "gzip-bomb": 4, "scan-bomb": 4}
# A legitimate client gives up on a request after this long; it counts as an error.
REQUEST_TIMEOUT = 10.0
READ_PAUSE = 0.05
PROBE_PAUSE = 0.02
# Slowloris sends this many bytes of its request head at a time, this often.
DRIP_BYTES = 3
DRIP_EVERY = 1.0
# Attackers start this long before the legitimate traffic, so that it meets them settled.
ATTACK_HEAD_START = 2.0
# Each bomb waits this long at most for the server's answer before trying again.
BOMB_PATIENCE = 60.0
# Percent of a CPU that other processes may take before the figures are called skewed.
BUSY_ELSEWHERE = 20
# No loop runs past its time, nor past this many rounds.
MAX_ROUNDS = 100_000
# SIGTERM drains in-flight requests for up to 30 s by default; then the server is killed.
STOP_PATIENCE = 45.0
# What a request may fail with besides a status: the server closing or resetting the
# connection, or refusing it, or answering with something that is not HTTP.
FAILURES = (OSError, EOFError, asyncio.IncompleteReadError, aiohttp.ClientError, ValueError)
# An attacker's connection that the server never ended.
OPEN = "open at the end"


def sample_uploads() -> list[tuple[str, bytes]]:
    """(kind, body) of the photos the uploaders send, in turn."""
    small, large = photo((632, 474), 2), photo((1633, 1225), 1)
    return [
        ("upload 0.3 MP", encode(small, "JPEG", quality=90)),
        ("upload 2 MP", encode(large, "JPEG", quality=90)),
        ("upload 0.3 MP", encode(small, "PNG")),
        ("upload 2 MP", encode(large, "PNG")),
    ]


def gzip_bomb(inflated: int = 2**30, piece: int = 64 * 2**20) -> bytes:
    """``inflated`` bytes of zeros as gzip, about 1 MB per GiB: one deflated piece of zeros,
    full-flushed (so byte-aligned and referring to nothing before it), repeated, then an
    empty final block and the trailer. Deflating a GiB itself would take seconds."""
    zeros = bytes(piece)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    segment = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    crc = 0
    for _ in range(inflated // piece):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no time
    trailer = struct.pack("<II", crc, inflated % 2**32)
    return header + segment * (inflated // piece) + last + trailer


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def scan_bomb(side: int = 7000, scans: int = 10_000) -> bytes:
    """A progressive greyscale JPEG of ``side``x``side`` pixels (under the 50 MP limit)
    whose scans carry no entropy-coded data: about 10 bytes a scan to send, but a decoder
    visits every 8x8 block of the image in each scan, some 3 ms a scan at 7000x7000."""
    one_code = bytes([1] + [0] * 15) + b"\x00"  # one 1-bit code, for symbol 0
    dc_first = _segment(0xDA, b"\x01\x01\x00\x00\x00\x00")  # component 1, Ss=Se=0
    ac_first = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00")  # component 1, Ss=1, Se=63
    return b"".join(
        [
            b"\xff\xd8",  # SOI
            _segment(0xDB, b"\x00" + b"\x01" * 64),  # DQT: table 0, all ones
            _segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00"),  # SOF2
            _segment(0xC4, b"\x00" + one_code + b"\x10" + one_code),  # DHT: DC 0, AC 0
            dc_first,
            ac_first * (scans - 1),
            b"\xff\xd9",  # EOI
        ]
    )


@dataclass
class Tally:
    """What one kind of legitimate request met in one phase. Latencies are those of every
    request that ended, failures and timeouts included, so that p99 does not hide them."""

    latencies: list[float] = field(default_factory=list)
    successes: int = 0  # within the phase's time; the rate
    errors: Counter[str] = field(default_factory=Counter)

    def record(self, seconds: float, error: str | None, in_time: bool) -> None:
        self.latencies.append(seconds)
        if error is not None:
            self.errors[error] += 1
        elif in_time:
            self.successes += 1

    def merged(self, other: Tally) -> Tally:
        return Tally(
            self.latencies + other.latencies,
            self.successes + other.successes,
            self.errors + other.errors,
        )

    def summary(self, seconds: float) -> dict[str, Any]:
        ended = self.latencies
        return {
            "per_s": self.successes / seconds,
            "requests": len(ended),
            "p50_ms": statistics.median(ended) * 1e3 if ended else None,
            "p99_ms": percentile(ended, 0.99) * 1e3 if ended else None,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
        }


async def timed(tally: Tally, deadline: float, request: Awaitable[int]) -> None:
    start = time.perf_counter()
    error: str | None = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            status = await request
    except TimeoutError:
        error = "timeout"
    except FAILURES as failure:
        error = type(failure).__name__
    else:
        if status >= 400:
            error = f"HTTP {status}"
    end = time.perf_counter()
    tally.record(end - start, error, end <= deadline)


async def upload(pool: Pool, body: bytes) -> int:
    async with pool.connection() as connection:
        status, _ = await connection.post("/images", body)
    return status


async def get(session: aiohttp.ClientSession, path: str) -> int:
    async with session.get(path) as response:
        await response.read()
        return response.status


@dataclass
class Legitimate:
    pool: Pool
    session: aiohttp.ClientSession
    uploads: list[tuple[str, bytes]]
    images: list[str]
    thumbnails: list[str]

    async def run(self, seconds: float, uploaders: int, readers: int) -> dict[str, Tally]:
        tallies = {kind: Tally() for kind, _ in self.uploads}
        tallies |= {kind: Tally() for kind in ("list", "image", "thumbnail", "healthz")}
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(self._uploader(tallies, deadline, n) for n in range(uploaders)),
            *(self._reader(tallies, deadline, random.Random(n)) for n in range(readers)),
            self._prober(tallies["healthz"], deadline),
        )
        return tallies

    async def _uploader(self, tallies: dict[str, Tally], deadline: float, first: int) -> None:
        for n in range(first, first + MAX_ROUNDS):
            if time.perf_counter() >= deadline:
                return
            kind, body = self.uploads[n % len(self.uploads)]
            await timed(tallies[kind], deadline, upload(self.pool, body))

    async def _reader(self, tallies: dict[str, Tally], deadline: float, rng: random.Random) -> None:
        for _ in range(MAX_ROUNDS):
            for kind, path in (
                ("list", "/images"),
                ("image", rng.choice(self.images)),
                ("thumbnail", rng.choice(self.thumbnails)),
            ):
                if time.perf_counter() >= deadline:
                    return
                await timed(tallies[kind], deadline, get(self.session, path))
                await asyncio.sleep(READ_PAUSE)

    async def _prober(self, tally: Tally, deadline: float) -> None:
        for _ in range(MAX_ROUNDS):
            if time.perf_counter() >= deadline:
                return
            await timed(tally, deadline, get(self.session, "/healthz"))
            await asyncio.sleep(PROBE_PAUSE)


@dataclass
class Attack:
    """What one kind of attacker met: how each connection ended, and how long after it
    was opened the server answered or dropped it."""

    outcomes: Counter[str] = field(default_factory=Counter)
    lasted: list[float] = field(default_factory=list)

    def ended(self, outcome: str, opened: float) -> None:
        self.outcomes[outcome] += 1
        if outcome != OPEN:
            self.lasted.append(time.perf_counter() - opened)

    def summary(self) -> dict[str, Any]:
        lasted = self.lasted
        return {
            "connections": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "ended_after_p50_s": statistics.median(lasted) if lasted else None,
            "ended_after_max_s": max(lasted) if lasted else None,
        }


async def answer_status(reader: asyncio.StreamReader) -> str:
    """The status of the server's answer, or how the connection ended without one."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return "closed"
    except ConnectionResetError:
        return "reset"
    return f"HTTP {head.split(b' ', 2)[1].decode('latin-1')}"


async def slowloris(address: tuple[str, int], attack: Attack, rng: random.Random) -> None:
    """Keep a request head unfinished for as long as the server allows, a few bytes at a
    time; when dropped, connect again."""
    head = b"GET /images HTTP/1.1\r\nHost: soak\r\n" + b"".join(
        b"X-Soak-%d: %d\r\n" % (n, n) for n in range(1000)
    )
    await asyncio.sleep(rng.uniform(0, DRIP_EVERY))  # drip out of step with each other
    for _ in range(MAX_ROUNDS):
        await one_connection(address, attack, head, drip=True)
        await asyncio.sleep(0.05)


async def bomb(address: tuple[str, int], attack: Attack, request: bytes) -> None:
    """Send the whole request, read the answer, connect again."""
    for _ in range(MAX_ROUNDS):
        await one_connection(address, attack, request, drip=False)
        await asyncio.sleep(0.01)


async def one_connection(
    address: tuple[str, int], attack: Attack, request: bytes, *, drip: bool
) -> None:
    opened = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(*address)
    except OSError:
        attack.ended("refused", opened)
        await asyncio.sleep(0.1)
        return
    outcome = OPEN
    try:
        if drip:
            outcome = await dripped(reader, writer, request)
        else:
            writer.write(request)
            async with asyncio.timeout(BOMB_PATIENCE):
                outcome = await answer_status(reader)
    except TimeoutError:
        outcome = "no answer"
    except OSError as error:
        outcome = type(error).__name__
    finally:
        attack.ended(outcome, opened)
        writer.transport.abort()  # nothing unsent is worth delivering


async def dripped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> str:
    for offset in range(0, MAX_ROUNDS * DRIP_BYTES, DRIP_BYTES):
        writer.write(head[offset : offset + DRIP_BYTES])
        try:
            async with asyncio.timeout(DRIP_EVERY):
                return await answer_status(reader)
        except TimeoutError:
            pass
    return OPEN


def cpu_seconds(server: Server) -> dict[str, float]:
    """CPU seconds used so far: the whole machine (all CPUs, busy and in all), the server's
    process, its workers (the replaced ones too) and this load generator."""
    with open("/proc/stat") as stat:
        ticks = [int(n) for n in stat.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle, iowait
    own, workers = tree_cpu(server.process.pid, reaped=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "machine_busy": (sum(ticks) - idle) / tick,
        "machine_total": sum(ticks) / tick,
        "server_process": own,
        "workers": workers,
        "load_generator": usage.ru_utime + usage.ru_stime,
    }


async def phase(
    server: Server,
    legitimate: Legitimate,
    arguments: argparse.Namespace,
    attackers: dict[str, Callable[[Attack], list[Coroutine[Any, Any, None]]]],
) -> dict[str, Any]:
    attacks = {name: Attack() for name in attackers}
    tasks = [
        asyncio.create_task(attacker)
        for name, crowd in attackers.items()
        for attacker in crowd(attacks[name])
    ]
    try:
        if tasks:
            await asyncio.sleep(ATTACK_HEAD_START)
        cpu = cpu_seconds(server)
        start = time.perf_counter()
        tallies = await legitimate.run(arguments.seconds, arguments.uploaders, arguments.readers)
        elapsed = time.perf_counter() - start
        cpu_after = cpu_seconds(server)
    finally:
        for task in tasks:
            task.cancel()
        for ended in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(ended, Exception):
                raise ended
    all_uploads = Tally()
    for kind, tally in list(tallies.items()):
        if kind.startswith("upload"):
            all_uploads = all_uploads.merged(tally)
    tallies["uploads, all"] = all_uploads
    # Percent of one CPU over the phase, the legitimate requests' stragglers included.
    percent = {name: (cpu_after[name] - cpu[name]) / elapsed * 100 for name in cpu}
    percent["rest_of_machine"] = percent["machine_busy"] - sum(
        percent[name] for name in ("server_process", "workers", "load_generator")
    )
    return {
        "seconds": elapsed,
        "requests": {kind: tally.summary(arguments.seconds) for kind, tally in tallies.items()},
        "attackers": {name: attack.summary() for name, attack in attacks.items()},
        "cpu_percent": percent,
    }


async def seed(
    server: Server, session: aiohttp.ClientSession, uploads: list[tuple[str, bytes]]
) -> Legitimate:
    """Images for the readers, their thumbnails made already so that readers read."""
    images, thumbnails = [], []
    for _, body in uploads:
        async with session.post("/images", data=body) as response:
            assert response.status == 201, await response.text()
            stored = await response.json()
        images.append(stored["image"])
        thumbnails.extend(stored["thumbnails"])
    for path in thumbnails:
        assert await get(session, path) == 200, path
    return Legitimate(Pool(server.url), session, uploads, images, thumbnails)


async def stop(server: Server) -> dict[str, Any]:
    """How long the server took to exit after SIGTERM; killed if it drains too long."""
    start = time.perf_counter()
    killed = False
    try:
        await asyncio.wait_for(server.stop(), STOP_PATIENCE)
    except TimeoutError:
        server.process.kill()
        await server.process.wait()
        killed = True
    return {"seconds": time.perf_counter() - start, "killed": killed}


def post(body: bytes, *fields: bytes) -> bytes:
    head = [b"POST /images HTTP/1.1", b"Host: soak", *fields, b"Content-Length: %d" % len(body)]
    return b"\r\n".join([*head, b"", b""]) + body


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    uploads = sample_uploads()
    requests = {
        "gzip-bomb": post(gzip_bomb(), b"Content-Encoding: gzip"),
        "scan-bomb": post(scan_bomb(), b"Content-Type: image/jpeg"),
    }
    flags = ["--workers", str(arguments.workers)] if arguments.workers else []
    report: dict[str, Any] = {
        "workers": arguments.workers or default_workers(),
        "seconds": arguments.seconds,
        "uploaders": arguments.uploaders,
        "readers": arguments.readers,
        "attackers": {name: ATTACKERS[name] for name in arguments.attackers},
        "attackers_sent_to": "a bare refusing app" if arguments.ceiling else "the server",
        "request_bytes": {name: len(request) for name, request in requests.items()},
    }
    with tempfile.TemporaryDirectory() as scratch:
        server = await start_server(Path(scratch) / "storage", *flags)
        # With --ceiling the attackers hit a bare app that refuses them at once, and the
        # server none of it: what their traffic alone costs the legitimate clients.
        refuser = str(ROOT / "bench" / "refuser.py")
        target = await start_python(refuser) if arguments.ceiling else server
        split = urlsplit(target.url)
        address = (split.hostname or "127.0.0.1", split.port or 80)

        def crowd(name: str) -> Callable[[Attack], list[Coroutine[Any, Any, None]]]:
            if name == "slowloris":
                return lambda attack: [
                    slowloris(address, attack, random.Random(n)) for n in range(ATTACKERS[name])
                ]
            return lambda attack: [
                bomb(address, attack, requests[name]) for _ in range(ATTACKERS[name])
            ]

        attackers = {name: crowd(name) for name in arguments.attackers}
        try:
            timeout = aiohttp.ClientTimeout(total=None)  # each request has its own
            async with aiohttp.ClientSession(server.url, timeout=timeout) as session:
                legitimate = await seed(server, session, uploads)
                try:
                    report["unattacked"] = await phase(server, legitimate, arguments, {})
                    report["attacked"] = await phase(server, legitimate, arguments, attackers)
                finally:
                    legitimate.pool.close()
        finally:
            report["server_stop"] = await stop(server)
            if target is not server:
                await target.stop()
    before = report["unattacked"]["requests"]
    after = report["attacked"]["requests"]
    ratio = after["uploads, all"]["per_s"] / before["uploads, all"]["per_s"]
    report["upload_rate_ratio"] = ratio
    report["targets"] = {
        "uploads attacked / unattacked >= 0.80": ratio >= 0.8,
        "healthz p99 under attack <= 50 ms": (after["healthz"]["p99_ms"] or float("inf")) <= 50,
    }
    return report


def figure(value: float | None, width: int, decimals: int) -> str:
    """``value`` in a column, or a dash where there was nothing to measure."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{decimals}f}"


def print_report(report: dict[str, Any]) -> None:
    attackers = ", ".join(f"{n} {name}" for name, n in report["attackers"].items())
    print(
        f"{report['workers']} workers; {report['uploaders']} uploaders, {report['readers']} "
        f"readers, /healthz every {PROBE_PAUSE * 1e3:.0f} ms; {report['seconds']:g} s a phase; "
        f"attackers: {attackers}, sent to {report['attackers_sent_to']}"
    )
    phases = ("unattacked", "attacked")
    columns = f"{'rate/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    print(f"\n{'':<14} {'without attackers':<31}   {'with attackers':<31}")
    print(f"{'kind':<14} {columns}   {columns}")
    for kind in report["unattacked"]["requests"]:
        cells = []
        for name in phases:
            row = report[name]["requests"][kind]
            cells.append(
                f"{row['per_s']:7.1f} {figure(row['p50_ms'], 8, 1)} "
                f"{figure(row['p99_ms'], 8, 1)} {row['errors']:6}"
            )
        print(f"{kind:<14} {'   '.join(cells)}")
    for name in phases:
        for kind, row in report[name]["requests"].items():
            if row["error_kinds"] and kind != "uploads, all":
                kinds = ", ".join(f"{n} {error}" for error, n in row["error_kinds"].items())
                print(f"  {name} {kind}: {kinds}")
    print(f"\n{'attacker':<10} {'conns':>6} {'ended after: p50 s':>19} {'max s':>7}   outcomes")
    for name, attack in report["attacked"]["attackers"].items():
        outcomes = ", ".join(f"{n} {outcome}" for outcome, n in attack["outcomes"].items())
        print(
            f"{name:<10} {attack['connections']:>6} {figure(attack['ended_after_p50_s'], 19, 2)} "
            f"{figure(attack['ended_after_max_s'], 7, 2)}   {outcomes}"
        )
    print(
        "\nCPU, % of one CPU: machine busy (of) | server process, workers, load generator, "
        "rest of the machine"
    )
    for name in phases:
        cpu = report[name]["cpu_percent"]
        print(
            f"  {name:<12} {cpu['machine_busy']:4.0f} ({cpu['machine_total']:.0f}) | "
            f"{cpu['server_process']:4.0f} {cpu['workers']:4.0f} {cpu['load_generator']:4.0f} "
            f"{cpu['rest_of_machine']:4.0f}"
        )
    busiest = max(report[name]["cpu_percent"]["rest_of_machine"] for name in phases)
    if busiest > BUSY_ELSEWHERE:
        print(f"  other processes took up to {busiest:.0f}% of a CPU: figures are skewed")
    stopped = report["server_stop"]
    print(
        f"the server {'was killed' if stopped['killed'] else 'exited'} "
        f"{stopped['seconds']:.1f} s after SIGTERM"
    )
    print(f"\nupload rate attacked / unattacked: {report['upload_rate_ratio']:.2f}")
    for target, met in report["targets"].items():
        print(f"  {'met ' if met else 'MISSED'} {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--uploaders", type=int, default=4, help="concurrent uploads")
    parser.add_argument("--readers", type=int, default=2, help="concurrent readers")
    parser.add_argument("--workers", type=int, help="the server's workers (default: its own)")
    parser.add_argument(
        "--attackers",
        default=",".join(ATTACKERS),
        help=f"the attackers of the second phase, comma-separated (of {','.join(ATTACKERS)})",
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="send the attackers to a bare app that refuses them at once, not to the server",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    arguments = parser.parse_args()
    arguments.attackers = arguments.attackers.split(",")
    if unknown := set(arguments.attackers) - set(ATTACKERS):
        parser.error(f"unknown attackers: {', '.join(sorted(unknown))}")
    result = asyncio.run(main(arguments))
    print_report(result)
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=2))
