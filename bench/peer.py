"""Side by side with thumbor 7.8 (issue 14): the same images served by this server and by
thumbor on this machine, measured in turn, with the verdict on each target.

    python bench/peer.py [--json] [--seconds 3] [--rounds 3] [--ours-root DIR]
                         [--ours-flag FLAG]... [--baseline-peak-pss-mib MIB]
                         [--wait-for-quiet MINUTES] [--thumbor-venv DIR]

thumbor is installed from the package index into a virtual environment of its own, outside
the repository (--thumbor-venv, by default ~/.cache/asgilook-bench/thumbor), the first time,
and reused afterwards. It runs with file storage and file result storage in a temporary
directory, uploads enabled and ``--processes`` as many as this process's CPUs; ours is
``run.py`` of --ours-root (this checkout by default) with its default flags and each
--ours-flag (split as a shell would: ``--ours-flag='--workers 1'``), on fresh storage. Both
listen on loopback only and are stopped at the end, on Ctrl-C and SIGTERM too.

Both get the same bytes: a ~140 KB 1000x750 JPEG, a 12 MP JPEG, and a 2000x1500 JPEG whose
thumbnails are the halving and the eighth our server lists for it (1000x750 and 250x187;
thumbor: ``/unsafe/WxH/<id>``), made once before they are measured warm. Each figure is
measured ``--rounds`` times per server, alternating, and the median reported: small
original and warm thumbnails in requests/s, the 12 MP original in MB/s, and /healthz
(thumbor: /healthcheck) p50 and p99 on a connection of its own while 16 clients upload the
12 MP JPEG over and over, with the peak PSS of each server's process tree meanwhile; and
the idle PSS of both trees, once started and after the runs. One lean load generator
sends 16 requests at a time on 16 keep-alive connections, spread evenly over the
processes that accept them; beside every figure, the CPU per request of the server's
whole tree and of the load generator.

Prints a table (or, with --json, one JSON document) and the targets' verdicts. On ext4
without a journal, point TMPDIR at a directory where nothing was deleted lately (see
bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import aiohttp
from common import ROOT, Server, _tree, encode, percentile, photo, start_python, tree_memory
from loadgen import Connection
from PIL import Image
from scaleout import (
    CONCURRENCY,
    CPUS,
    DISTURBED,
    Cluster,
    _Reading,
    _stop_on_sigterm,
    getter,
    measured,
    quiet,
    run_load,
    uploader,
    wait_for_quiet,
)

THUMBOR_VERSION = "7.8.0"
THUMBOR_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asgilook-bench" / "thumbor"
)
# thumbor's settings for a run; its other settings keep their defaults.
THUMBOR_CONF = """\
STORAGE = 'thumbor.storages.file_storage'
FILE_STORAGE_ROOT_PATH = {storage!r}
UPLOAD_ENABLED = True
UPLOAD_PHOTO_STORAGE = 'thumbor.storages.file_storage'
RESULT_STORAGE = 'thumbor.result_storages.file_storage'
RESULT_STORAGE_FILE_STORAGE_ROOT_PATH = {results!r}
# By default the results of /unsafe/ URLs are made anew for every request.
RESULT_STORAGE_STORES_UNSAFE = True
# Ours encodes thumbnails at its --jpeg-quality, 90 by default; thumbor's default is 80.
QUALITY = 90
"""
OURS, THUMBOR = "ours", "thumbor"
SMALL_BYTES = 140_000
SMALL_SIZE, LARGE_SIZE, SOURCE_SIZE = (1000, 750), (4000, 3000), (2000, 1500)
LARGE_QUALITY = 90
# Of the thumbnails our server lists for the source, largest first: its half and eighth.
THUMBNAILS = (0, 2)
MiB = 2**20
# Uploads run this long before /healthz is probed, so that every worker is busy.
FILL_SECONDS = 1.0
PROBE_INTERVAL = 0.02
# Reading a tree's PSS takes CPU from the servers measured: as often as it takes to catch
# the plateau that uploads without pause hold memory at.
MEMORY_INTERVAL = 0.25
# Servers just started are left alone this long before their idle memory is read.
SETTLE_SECONDS = 2.0
# Connections opened and dropped, at most, to spread CONCURRENCY over accepting processes.
SPREAD_ATTEMPTS = 50 * CONCURRENCY
# /proc/net/tcp's state of a listening socket.
LISTEN = "0A"

# Where each serves what: uploads, its health, an original (from "{id}") and a thumbnail
# (from "{id}" and "{size}", WxH).
ROUTES = {
    OURS: ("/images", "/healthz", "/images/{id}.jpeg", "/thumbnails/{id}/{size}.jpeg"),
    THUMBOR: ("/image", "/healthcheck", "/image/{id}", "/unsafe/{size}/{id}"),
}

T = TypeVar("T")


@dataclass
class Peer:
    """A server under comparison and where it serves each thing."""

    name: str
    server: Server
    upload_path: str
    health_path: str
    original: str
    thumbnail: str


def install_thumbor(venv: Path) -> Path:
    """The thumbor command of ``venv``, a virtual environment made and filled from the
    package index unless an earlier run did."""
    done = venv / f"thumbor-{THUMBOR_VERSION}-installed"
    command = venv / "bin" / "thumbor"
    if done.exists() and command.exists():
        return command
    print(f"installing thumbor {THUMBOR_VERSION} into {venv}", file=sys.stderr)
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet", f"thumbor=={THUMBOR_VERSION}"]
    for step in ([sys.executable, "-m", "venv", "--clear", str(venv)], pip):
        result = subprocess.run(step, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"{shlex.join(step)} failed:\n{result.stdout}{result.stderr}")
    done.touch()
    return command


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def answers(url: str, process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Whether ``url`` is answered 200 within ``seconds``, while ``process`` runs."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while process.returncode is None and time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.1)
    return False


async def stop_thumbor(process: asyncio.subprocess.Process) -> None:
    """Its serving processes are sent SIGTERM, and its first process, which forked them
    and only waits for them, exits once they all have. SIGTERM to the first would kill
    it at once and leave the others running on their own."""
    for member in _tree(process.pid):
        if member != process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def thumbor_files(scratch: Path) -> tuple[Path, BinaryIO]:
    """thumbor's configuration for a run, with its storage and result storage in
    ``scratch``; and its log, open for appending."""
    scratch.mkdir()
    conf = scratch / "thumbor.conf"
    conf.write_text(
        THUMBOR_CONF.format(storage=str(scratch / "storage"), results=str(scratch / "results"))
    )
    return conf, (scratch / "thumbor.log").open("ab")


def tail(path: str) -> str:
    with open(path, errors="replace") as text:
        return text.read()[-3000:]


@contextlib.asynccontextmanager
async def running_thumbor(command: Path, scratch: Path) -> AsyncIterator[Server]:
    """thumbor on a free loopback port, with its files in ``scratch``; stopped on the way
    out."""
    conf, log = thumbor_files(scratch)
    with log:
        for _ in range(3):  # the port may be taken between choosing and binding it
            url = f"http://127.0.0.1:{free_port()}"
            process = await asyncio.create_subprocess_exec(
                str(command),
                *("--ip", "127.0.0.1", "--port", str(urlsplit(url).port)),
                *("--conf", str(conf), "--processes", str(CPUS)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                if await answers(f"{url}/healthcheck", process, 60):
                    yield Server(process, url)
                    return
            finally:
                await stop_thumbor(process)
    sys.exit(f"thumbor did not start; its log:\n{tail(log.name)}")


@contextlib.asynccontextmanager
async def running_ours(root: Path, flags: list[str], storage: Path) -> AsyncIterator[Server]:
    """``run.py`` of ``root`` on fresh storage, importing its package from ``root`` in
    every process it starts; stopped on the way out."""
    paths = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    server = await start_python(
        str(root / "run.py"),
        *("--port", "0", "--storage", str(storage), *flags),
        env={"PYTHONPATH": paths},
    )
    try:
        yield server
    finally:
        await server.stop()


def _tcp(port: int) -> list[tuple[int, str, int]]:
    """The IPv4 sockets whose own port is ``port``: (the other end's port, state, inode)."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.append((int(fields[2].rsplit(":", 1)[1], 16), fields[3], int(fields[9])))
    return found


def _sockets(pid: int) -> set[int]:
    """The inodes of the sockets a process holds."""
    inodes = set()
    with contextlib.suppress(OSError):
        for descriptor in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(descriptor.path)
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def accepting(server: Server) -> set[int]:
    """The processes of the server's tree that hold a socket listening on its port, but
    for one that opened it for the others it started and never accepts on it itself
    (thumbor's first process, which forks the rest)."""
    port = urlsplit(server.url).port
    assert port is not None
    listening = {inode for _, state, inode in _tcp(port) if state == LISTEN}
    tree = _tree(server.process.pid)
    holders = {member for member in tree if _sockets(member) & listening}
    return holders - {int(tree[member][1]) for member in holders}


async def accepted_by(server: Server, client_port: int) -> int:
    """The process of the server's tree that accepted the connection from
    ``client_port``, once one has."""
    port = urlsplit(server.url).port
    assert port is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ends = {inode for remote, _, inode in _tcp(port) if remote == client_port and inode}
        for member in _tree(server.process.pid):
            if _sockets(member) & ends:
                return member
        await asyncio.sleep(0.001)
    raise RuntimeError(f"no process of {server.url} accepted the connection from {client_port}")


def has_room(shares: list[int], share: int, count: int) -> bool:
    """Whether a process holding ``share`` of the ``count`` connections may take one more,
    with ``shares`` those of every accepting process, its own among them."""
    even, left_over = divmod(count, len(shares))
    if share < even:
        return True
    return share == even and sum(other > even for other in shares) < left_over


async def spread(
    server: Server,
    connect: Callable[[str], Awaitable[tuple[T, int]]],
    close: Callable[[T], None],
    count: int = CONCURRENCY,
) -> tuple[list[T], list[int]]:
    """``count`` connections to ``server``, as many on each process that accepts them
    as on any other, and how many each got. Of processes that accept from one socket,
    whichever the kernel wakes first takes a new connection, and a keep-alive connection
    stays with it: opened at once, as a pool opens them under load, thumbor's connections
    mostly all went to one of its processes, and opened one at a time, still unevenly.
    After SPREAD_ATTEMPTS connections, the rest are kept wherever they land."""
    kept: dict[int, list[T]] = {member: [] for member in accepting(server)}
    attempts = 0
    while sum(len(share) for share in kept.values()) < count:
        connection, client_port = await connect(server.url)
        share = kept.setdefault(await accepted_by(server, client_port), [])
        attempts += 1
        shares = [len(other) for other in kept.values()]
        if attempts > SPREAD_ATTEMPTS or has_room(shares, len(share), count):
            share.append(connection)
        else:
            close(connection)
    connections = [connection for share in kept.values() for connection in share]
    return connections, sorted((len(share) for share in kept.values() if share), reverse=True)


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def open_reading(url: str) -> tuple[_Reading, int]:
    loop = asyncio.get_running_loop()
    transport, reading = await loop.create_connection(_Reading, *_address(url))
    return reading, transport.get_extra_info("sockname")[1]


def close_reading(reading: _Reading) -> None:
    if reading.transport is not None:
        reading.transport.close()


async def open_posting(url: str) -> tuple[Connection, int]:
    reader, writer = await asyncio.open_connection(*_address(url))
    return Connection(reader, writer), writer.get_extra_info("sockname")[1]


async def downloads(peer: Peer, path: str, seconds: float) -> dict[str, Any]:
    """GETs of ``path`` by CONCURRENCY clients on spread connections, after a second of
    the same unmeasured."""
    cluster = Cluster([peer.server])
    try:
        readings, counts = await spread(peer.server, open_reading, close_reading)
        for reading in readings:
            cluster.nodes[0].keep(reading)
        result = await measured(cluster, getter(path), seconds)
    finally:
        cluster.close()
    result["connections"] = counts
    return result


async def under_uploads(peer: Peer, data: bytes, seconds: float) -> dict[str, Any]:
    """Health probes, one at a time on a connection of their own, and the peak PSS of the
    server's tree, while CONCURRENCY clients upload ``data`` on spread connections, one
    upload after another; the written data is flushed to disk afterwards, so that the
    next run does not pay for it."""
    cluster = Cluster([peer.server])
    probe: _Reading | None = None
    latencies: list[float] = []
    peak = 0
    sampling = 0.0
    done = asyncio.Event()

    async def watch(probe: _Reading) -> None:
        nonlocal peak, sampling
        start = sampled = time.perf_counter()
        while not done.is_set():
            if time.perf_counter() >= sampled:
                spent = time.thread_time()
                peak = max(peak, tree_memory(peer.server.process.pid)[1])
                sampling += time.thread_time() - spent
                sampled = time.perf_counter() + MEMORY_INTERVAL
            if time.perf_counter() - start >= FILL_SECONDS:
                sent = time.perf_counter()
                status, _, body = await probe.get(peer.health_path)
                if status != 200:
                    raise RuntimeError(f"{peer.health_path} was answered {status}: {body!r}")
                latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(PROBE_INTERVAL)

    try:
        connections, counts = await spread(peer.server, open_posting, Connection.close)
        for connection in connections:
            cluster.nodes[0].uploads.keep(connection)
        probe, _ = await open_reading(peer.server.url)
        watcher = asyncio.create_task(watch(probe))
        try:
            upload = uploader(data, peer.upload_path)
            result = await run_load(cluster, upload, FILL_SECONDS + seconds)
        finally:
            done.set()
            await watcher
    finally:
        cluster.close()
        if probe is not None:
            close_reading(probe)
    await asyncio.to_thread(os.sync)
    # Reading the tree's memory is not the load generator's work, though done in its process.
    result["cpu"]["memory_sampling_ms"] = sampling / result["requests"] * 1e3
    result["cpu"]["loadgen_ms"] -= result["cpu"]["memory_sampling_ms"]
    result.update(
        connections=counts,
        health_p50_ms=statistics.median(latencies) * 1e3,
        health_p99_ms=percentile(latencies, 0.99) * 1e3,
        probes=len(latencies),
        peak_pss_mib=peak / MiB,
    )
    return result


async def alternately(
    peers: list[Peer], rounds: int, run: Callable[[Peer], Awaitable[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """``run`` ``rounds`` times on each peer, taking turns and starting with each in turn,
    so that a drift of the machine weighs on both alike."""
    results: dict[str, list[dict[str, Any]]] = {peer.name: [] for peer in peers}
    for n in range(rounds):
        for peer in peers if n % 2 == 0 else peers[::-1]:
            results[peer.name].append(await run(peer))
    return results


def sample_images() -> dict[str, bytes]:
    """The small original, the JPEG quality of 50-95 closest to SMALL_BYTES; the 12 MP
    original; the thumbnails' source."""
    small = photo(SMALL_SIZE)
    candidates = (encode(small, "JPEG", quality=quality) for quality in range(50, 96, 5))
    return {
        "small": min(candidates, key=lambda data: abs(len(data) - SMALL_BYTES)),
        "large": encode(photo(LARGE_SIZE), "JPEG", quality=LARGE_QUALITY),
        "source": encode(photo(SOURCE_SIZE, 1), "JPEG", quality=LARGE_QUALITY),
    }


async def fetch(session: aiohttp.ClientSession, path: str) -> bytes:
    async with session.get(path) as response:
        body = await response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} was answered {response.status}: {body[:500]!r}")
    return body


async def upload(session: aiohttp.ClientSession, peer: Peer, data: bytes) -> str:
    """The id of ``data`` uploaded once: ours says where the image is as
    /images/<id>.jpeg, thumbor as /image/<id>/<file name>."""
    headers = {"Content-Type": "image/jpeg"}
    async with session.post(peer.upload_path, data=data, headers=headers) as response:
        body = await response.read()
    if response.status != 201:
        raise RuntimeError(f"an upload to {peer.name} was answered {response.status}: {body!r}")
    location = response.headers["Location"]
    if peer.name == OURS:
        return location.rsplit("/", 1)[1].removesuffix(".jpeg")
    return location.split("/")[2]


async def prepare(peers: list[Peer], images: dict[str, bytes]) -> dict[str, Any]:
    """Upload every image to each peer; check that each serves the originals' bytes as
    they were sent; make the thumbnails (cold) and check their size. What each peer's
    runs GET, and what was found."""
    stored: dict[str, dict[str, str]] = {}
    for peer in peers:
        async with aiohttp.ClientSession(peer.server.url) as session:
            stored[peer.name] = {
                name: await upload(session, peer, data) for name, data in images.items()
            }
    async with aiohttp.ClientSession(peers[0].server.url) as session:
        image = json.loads(await fetch(session, f"/images/{stored[OURS]['source']}"))
    listed = [image["thumbnails"][n] for n in THUMBNAILS]
    sizes = [path.rsplit("/", 1)[1].removesuffix(".jpeg") for path in listed]
    paths: dict[str, dict[str, str]] = {}
    identical: dict[str, dict[str, bool]] = {"small": {}, "large": {}}
    thumbnail_bytes: dict[str, dict[str, int]] = {size: {} for size in sizes}
    for peer in peers:
        ids = stored[peer.name]
        paths[peer.name] = {name: peer.original.format(id=ids[name]) for name in ("small", "large")}
        async with aiohttp.ClientSession(peer.server.url) as session:
            for name in ("small", "large"):
                served = await fetch(session, paths[peer.name][name])
                identical[name][peer.name] = served == images[name]
            for n, size in enumerate(sizes):
                path = peer.thumbnail.format(id=ids["source"], size=size)
                thumbnail = await fetch(session, path)
                made = "x".join(map(str, Image.open(io.BytesIO(thumbnail)).size))
                if made != size:
                    raise RuntimeError(f"{peer.name} made {path} {made}")
                thumbnail_bytes[size][peer.name] = len(thumbnail)
                paths[peer.name][f"thumbnail {n}"] = path
    return {
        "paths": paths,
        "thumbnail_sizes": sizes,
        "identical_originals": identical,
        "thumbnail_bytes": thumbnail_bytes,
    }


def idle_pss_mib(peers: list[Peer]) -> dict[str, float]:
    return {peer.name: tree_memory(peer.server.process.pid)[1] / MiB for peer in peers}


def load_average() -> list[str]:
    """The load averages over 1, 5 and 15 minutes."""
    with open("/proc/loadavg") as averages:
        return averages.read().split()[:3]


def git_commit(root: Path) -> str:
    """``root``'s commit, and "+ changes" if its tracked files differ from it."""

    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *arguments], capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


async def main(arguments: argparse.Namespace) -> dict[str, Any]:
    command = await asyncio.to_thread(install_thumbor, arguments.thumbor_venv)
    images = sample_images()
    flags = [flag for value in arguments.ours_flag for flag in shlex.split(value)]
    root: Path = arguments.ours_root.resolve()
    report: dict[str, Any] = {
        "cpus": CPUS,
        "concurrency": CONCURRENCY,
        "seconds": arguments.seconds,
        "rounds": arguments.rounds,
        "ours": {"root": str(root), "commit": git_commit(root), "flags": flags},
        "thumbor": {
            "version": THUMBOR_VERSION,
            "processes": CPUS,
            "venv": str(command.parent.parent),
        },
        "image_bytes": {name: len(data) for name, data in images.items()},
        "load_average_before": load_average(),
    }
    with tempfile.TemporaryDirectory(prefix="asgilook-peer-") as scratch:
        async with (
            running_ours(root, flags, Path(scratch) / "ours") as our_server,
            running_thumbor(command, Path(scratch) / "thumbor") as thumbor_server,
        ):
            servers = {OURS: our_server, THUMBOR: thumbor_server}
            peers = [Peer(name, server, *ROUTES[name]) for name, server in servers.items()]
            await asyncio.sleep(SETTLE_SECONDS)
            report["idle_pss_mib_started"] = idle_pss_mib(peers)
            report.update(await prepare(peers, images))
            paths = report["paths"]
            runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for phase in ("small", "thumbnail 0", "thumbnail 1", "large"):

                async def download(peer: Peer, phase: str = phase) -> dict[str, Any]:
                    return await downloads(peer, paths[peer.name][phase], arguments.seconds)

                runs[phase] = await alternately(peers, arguments.rounds, download)

            async def uploads(peer: Peer) -> dict[str, Any]:
                return await under_uploads(peer, images["large"], arguments.seconds)

            runs["uploads"] = await alternately(peers, arguments.rounds, uploads)
            await asyncio.sleep(SETTLE_SECONDS)
            report["idle_pss_mib_after"] = idle_pss_mib(peers)
    report["runs"] = runs
    report["figures"] = figures(report)
    report["targets"] = verdicts(report, arguments.baseline_peak_pss_mib)
    report["load_average_after"] = load_average()
    return report


# The figures measured, from the runs of a phase: name, title, phase, the runs' key, and
# whether more is better.
MEASURED = (
    ("small", "small original ({small_kb:.0f} KB), requests/s", "small", "per_s", True),
    ("thumbnail 0", "warm thumbnail {size_0}, requests/s", "thumbnail 0", "per_s", True),
    ("thumbnail 1", "warm thumbnail {size_1}, requests/s", "thumbnail 1", "per_s", True),
    ("large", "12 MP original ({large_mb:.1f} MB), MB/s", "large", "mb_per_s", True),
    ("health_p50", "/healthz p50 under 16 x 12 MP uploads, ms", "uploads", "health_p50_ms", False),
    ("health_p99", "/healthz p99 under 16 x 12 MP uploads, ms", "uploads", "health_p99_ms", False),
    ("uploads", "12 MP uploads/s meanwhile", "uploads", "per_s", True),
    ("peak_pss", "peak PSS meanwhile, MiB", "uploads", "peak_pss_mib", False),
)


def figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure: the median of each peer's runs, the ratio (ours/thumbor, or for a
    figure where less is better thumbor/ours: above 1, ours is better either way), the
    median CPU per request of the server's tree and of the load generator, and whether
    processes not ours took over DISTURBED of the machine in any of its runs."""
    names = {
        "small_kb": report["image_bytes"]["small"] / 1e3,
        "large_mb": report["image_bytes"]["large"] / 1e6,
        **{f"size_{n}": size for n, size in enumerate(report["thumbnail_sizes"])},
    }
    rows: list[dict[str, Any]] = []
    for name, title, phase, key, higher_is_better in MEASURED:
        runs = report["runs"][phase]
        row: dict[str, Any] = {"name": name, "figure": title.format(**names)}
        row["cpu_per_request"] = {}
        for peer, peer_runs in runs.items():
            row[peer] = statistics.median(float(run[key]) for run in peer_runs)
            cpus = [run["cpu"] for run in peer_runs]
            row["cpu_per_request"][peer] = {
                "server_tree_ms": statistics.median(
                    cpu["server_ms"] + cpu["workers_ms"] for cpu in cpus
                ),
                "loadgen_ms": statistics.median(cpu["loadgen_ms"] for cpu in cpus),
            }
        row["higher_is_better"] = higher_is_better
        row["disturbed"] = any(
            run["cpu"]["foreign_share"] > DISTURBED
            for peer_runs in runs.values()
            for run in peer_runs
        )
        rows.append(row)
    for moment, title in (("started", "once started"), ("after", "after the runs")):
        row = {"name": f"idle_pss_{moment}", "figure": f"idle PSS {title}, MiB"}
        rows.append(row | report[f"idle_pss_mib_{moment}"] | {"higher_is_better": False})
    for row in rows:
        ratio = row[OURS] / row[THUMBOR]
        row["ratio"] = ratio if row["higher_is_better"] else 1 / ratio
    return rows


def verdicts(report: dict[str, Any], baseline_peak_pss_mib: float | None) -> list[dict[str, Any]]:
    """Each target of issue 14, the figure it is judged on, and whether it is met (None
    where it cannot be judged)."""
    rows = {row["name"]: row for row in report["figures"]}
    baseline = baseline_peak_pss_mib
    one, two = report["thumbnail_sizes"]
    checks: list[tuple[str, str, Callable[[dict[str, Any]], bool | None]]] = [
        ("small original >= 1.5x thumbor's requests/s", "small", lambda row: row["ratio"] >= 1.5),
        (
            f"warm thumbnail {one} >= 1.5x thumbor's requests/s",
            "thumbnail 0",
            lambda row: row["ratio"] >= 1.5,
        ),
        (
            f"warm thumbnail {two} >= 1.5x thumbor's requests/s",
            "thumbnail 1",
            lambda row: row["ratio"] >= 1.5,
        ),
        ("12 MP original >= 2x thumbor's MB/s", "large", lambda row: row["ratio"] >= 2),
        (
            "/healthz p99 under 16 x 12 MP uploads <= 50 ms and below thumbor's",
            "health_p99",
            lambda row: row[OURS] <= 50 and row[OURS] < row[THUMBOR],
        ),
        (
            "idle PSS of our tree <= thumbor's, once started",
            "idle_pss_started",
            lambda row: row[OURS] <= row[THUMBOR],
        ),
        (
            "idle PSS of our tree <= thumbor's, after the runs",
            "idle_pss_after",
            lambda row: row[OURS] <= row[THUMBOR],
        ),
        (
            "our peak PSS under 16 x 12 MP uploads <= the baseline's "
            + ("(none given)" if baseline is None else f"({baseline:.0f} MiB)"),
            "peak_pss",
            lambda row: None if baseline is None else row[OURS] <= baseline,
        ),
    ]
    return [
        {
            "target": text,
            "figure": rows[name]["figure"],
            OURS: rows[name][OURS],
            THUMBOR: rows[name][THUMBOR],
            "ratio": rows[name]["ratio"],
            "met": check(rows[name]),
            "disturbed": rows[name].get("disturbed", False),
        }
        for text, name, check in checks
    ]


def connections(runs: list[dict[str, Any]]) -> str:
    """How the connections of a peer's runs were spread, most often: "8+8"."""
    spreads = Counter("+".join(map(str, run["connections"])) for run in runs)
    return " or ".join(spread for spread, _ in spreads.most_common())


def print_table(report: dict[str, Any]) -> None:
    ours, thumbor = report[OURS], report[THUMBOR]
    flags = shlex.join(ours["flags"]) or "none"
    spreads = {
        peer: connections([run for phase in report["runs"].values() for run in phase[peer]])
        for peer in (OURS, THUMBOR)
    }
    print(
        f"ours: {ours['root']}/run.py at {ours['commit']}, default flags, extra: {flags}\n"
        f"thumbor {thumbor['version']}: --processes {thumbor['processes']}, file storage and "
        "file result storage\n"
        f"{report['cpus']} CPUs; {report['concurrency']} requests at a time on keep-alive "
        f"connections, per accepting process: ours {spreads[OURS]}, thumbor "
        f"{spreads[THUMBOR]}\n"
        f"{report['seconds']:g} s per run after 1 s unmeasured; {report['rounds']} rounds each, "
        "alternating; medians"
    )
    identical = report["identical_originals"]
    same = all(all(by_peer.values()) for by_peer in identical.values())
    print(
        "originals served byte for byte as uploaded: "
        + ("yes, by both" if same else json.dumps(identical))
        + "; thumbnails' bytes, ours / thumbor: "
        + ", ".join(
            f"{size} {sizes[OURS] / 1024:.0f} / {sizes[THUMBOR] / 1024:.0f} KiB"
            for size, sizes in report["thumbnail_bytes"].items()
        )
    )
    print(
        f"\n{'figure':<44} {'ours':>8} {'thumbor':>8} {'ratio':>8}  CPU ms per request, "
        "server tree / load generator"
    )
    print(f"{'':<72}{'ours':>15} {'thumbor':>15}")
    for row in report["figures"]:
        cells = f"{row['figure']:<44} {row[OURS]:8.1f} {row[THUMBOR]:8.1f} {row['ratio']:7.2f}x"
        if cpu := row.get("cpu_per_request"):
            cells += "".join(
                f" {cpu[peer]['server_tree_ms']:7.2f} / {cpu[peer]['loadgen_ms']:5.2f}"
                for peer in (OURS, THUMBOR)
            )
        if row.get("disturbed"):
            cells += "  DISTURBED"
        print(cells)
    print(
        "ratio: ours/thumbor; for latency and memory thumbor/ours: above 1, ours is better.\n"
        "uploads: thumbor stores the bytes as sent once their header reads as an image's; "
        "ours decodes\nan upright JPEG at 1/8 scale to check it, and converts anything else"
    )
    print("\ntargets:")
    for verdict in report["targets"]:
        met = {True: "met   ", False: "MISSED", None: "n/a   "}[verdict["met"]]
        print(
            f"  {met} {verdict['target']}: ours {verdict[OURS]:.1f}, thumbor "
            f"{verdict[THUMBOR]:.1f}, ratio {verdict['ratio']:.2f}"
            + (" (DISTURBED)" if verdict["disturbed"] else "")
        )
    machine = report["machine_before"]
    print(
        f"\nload average before: {' '.join(report['load_average_before'])}; after: "
        f"{' '.join(report['load_average_after'])}; when it began: {machine['seen']}, "
        + ("quiet" if machine["quiet"] else "NOT QUIET")
        + f" (waited {machine['waited_s']:.0f} s); took {report['took_s']:.0f} s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measured run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each figure per server (at least 2)"
    )
    parser.add_argument(
        "--ours-root",
        type=Path,
        default=ROOT,
        help="the checkout whose run.py is ours (default: this one)",
    )
    parser.add_argument(
        "--ours-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="more flags for our server, split as a shell would; repeatable "
        "(--ours-flag='--http-processes 1')",
    )
    parser.add_argument(
        "--baseline-peak-pss-mib",
        type=float,
        help="our tree's peak PSS under 16 x 12 MP uploads in the baseline run, the memory "
        "target's reference",
    )
    parser.add_argument(
        "--thumbor-venv",
        type=Path,
        default=THUMBOR_VENV,
        help=f"thumbor's virtual environment, made if missing (default {THUMBOR_VENV})",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=10,
        metavar="MINUTES",
        help="first wait, up to this long (default 10), until no pytest runs and the load "
        "average is below 0.5",
    )
    arguments = parser.parse_args()
    if arguments.rounds < 2:
        parser.error("--rounds must be at least 2")
    if not (arguments.ours_root / "run.py").is_file():
        parser.error(f"{arguments.ours_root} has no run.py")
    _stop_on_sigterm()
    machine = wait_for_quiet(arguments.wait_for_quiet)
    started = time.monotonic()
    try:
        result = asyncio.run(main(arguments))
    except KeyboardInterrupt:
        sys.exit("interrupted; everything it started is stopped")
    result["machine_before"] = machine
    result["machine_after"] = quiet(0.5)[1]
    result["took_s"] = time.monotonic() - started
    if arguments.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
