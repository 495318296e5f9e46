"""Scale-out: the embedded library (sqlite + file) on one node against the shared one
(PostgreSQL + S3) on one node and on two: uploads, downloads, thumbnails, and where the
CPU went.

    python bench/scaleout.py [--json] [--seconds 4] [--only local,one,two]
                             [--workers N] [--two-node-workers N] [--wait-for-quiet MINUTES]

Everything runs on this machine, on loopback: the nodes (``run.py``) and their workers,
PostgreSQL 15 (its defaults, fsync on) and SeaweedFS (``weed mini``) in a temporary
directory, started for the shared configurations and stopped afterwards, and this load
generator. With two nodes, requests go to each in turn. Prints a table (or, with
--json, one JSON document) and the verdict on each target of issue 13.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import engines
from benchmark import sample_images
from common import (
    ROOT,
    Server,
    machine_cpu,
    percentile,
    start_server,
    tree_cpu,
    tree_cpu_total,
)
from loadgen import Pool

sys.path.insert(0, str(ROOT))
from asgilook_aiohttp.config import default_workers

CPUS = len(os.sched_getaffinity(0))
CONCURRENCY = 16
CONFIGURATIONS = ("local", "one", "two")
TITLES = {
    "local": "local: sqlite + file, 1 node",
    "one": "postgresql + s3, 1 node",
    "two": "postgresql + s3, 2 nodes",
}
SMALL, LARGE = "0.3 MP PNG", "12 MP JPEG"
# Cold thumbnails timed, one image each.
COLD_THUMBNAILS = 7
WARM_THUMBNAILS = 200
# The thumbnail asked for: of a 12 MP image, 1000x750.
THUMBNAIL = 2
# What each part of the CPU is called in the report, in order.
PARTS = ("server", "workers", "postgres", "seaweedfs", "loadgen", "kernel", "foreign")
# A run in which processes not ours took more than this share of the machine is marked
# disturbed: its figures are not this service's.
DISTURBED = 0.05

# A request against a node's connections: the bytes it moved.
Request = Callable[["Node"], Awaitable[int]]


class _Reading(asyncio.BufferedProtocol):
    """One keep-alive connection that sends GETs and counts the bytes of each response
    into one reused buffer, keeping nothing of a 200's body: a client that kept each
    body (read with a StreamReader) spent more CPU on a 12 MP download than the local
    server sending it."""

    def __init__(self) -> None:
        self._buffer = memoryview(bytearray(1 << 20))
        self._head = bytearray()
        self._status = 0
        self._length = 0
        self._left: int | None = None
        self._answer: asyncio.Future[tuple[int, int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc or ConnectionResetError("closed by the server"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._left is None:
            self._head += self._buffer[:nbytes]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line, *fields = self._head[:end].decode("latin-1").split("\r\n")
            self._status = int(status_line.split(" ", 2)[1])
            length = next(
                int(value)
                for name, _, value in (field.partition(":") for field in fields)
                if name.lower() == "content-length"
            )
            del self._head[: end + 4]
            self._left = length - len(self._head)
            self._length = length
            if self._status == 200:
                self._head.clear()
        else:
            self._left -= nbytes
            if self._status != 200:
                self._head += self._buffer[:nbytes]
        if self._left == 0 and self._answer is not None and not self._answer.done():
            self._answer.set_result((self._status, self._length, bytes(self._head)))

    async def get(self, path: str) -> tuple[int, int, bytes]:
        """GET ``path``: the status, the body's length, and the body unless it is a 200's."""
        assert self.transport is not None
        self._head.clear()
        self._left = None
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        return await self._answer


class Node:
    """A node's connections: the lean upload client's, and downloading ones."""

    def __init__(self, url: str) -> None:
        self.uploads = Pool(url)
        address = urlsplit(url)
        self._host = address.hostname or "127.0.0.1"
        self._port = address.port or 80
        self._idle: list[_Reading] = []

    async def get(self, path: str) -> tuple[int, int, bytes]:
        while self._idle and self._idle[-1].transport is None:  # closed by the server
            self._idle.pop()
        if self._idle:
            reading = self._idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, reading = await loop.create_connection(_Reading, self._host, self._port)
        try:
            answer = await reading.get(path)
        except BaseException:
            if reading.transport is not None:  # its state is unknown: not reused
                reading.transport.close()
            raise
        self._idle.append(reading)
        return answer

    def keep(self, reading: _Reading) -> None:
        """Reuse ``reading``, already open to this node, for GETs before opening any."""
        self._idle.append(reading)

    def close(self) -> None:
        self.uploads.close()
        for reading in self._idle:
            if reading.transport is not None:
                reading.transport.close()
        self._idle.clear()


@dataclass
class Cluster:
    """The nodes of one configuration, and the engines they share, if any."""

    servers: list[Server]
    engine_pids: dict[str, int] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    _turn: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.nodes = [Node(server.url) for server in self.servers]

    def next_node(self) -> Node:
        """Each node in turn."""
        return self.nodes[next(self._turn) % len(self.nodes)]

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_snapshot(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far of each part, and of the machine as a whole."""
    snapshot = {"server": 0.0, "workers": 0.0, "postgres": 0.0, "seaweedfs": 0.0}
    for node in cluster.servers:
        server, workers = tree_cpu(node.process.pid, reaped=True)
        snapshot["server"] += server
        snapshot["workers"] += workers
    for name, pid in cluster.engine_pids.items():
        snapshot[name] = tree_cpu_total(pid)
    snapshot["loadgen"] = own_cpu()
    snapshot.update(machine_cpu())
    return snapshot


def cpu_per_request(
    before: dict[str, float], after: dict[str, float], count: int
) -> dict[str, float]:
    """Milliseconds of CPU per request by part: ``kernel`` is interrupts (loopback
    networking among them) and kernel threads (writeback among them), ``foreign`` whatever
    else kept the machine busy (processes not ours); ``busy`` is the share of the
    machine's CPUs in use, ``foreign_share`` the share that foreign processes took."""
    spent = {name: after[name] - before[name] for name in after}
    spent["kernel"] = spent["interrupts"] + spent["kernel_threads"]
    ours = sum(spent[name] for name in PARTS[:-1])
    spent["foreign"] = max(0.0, spent["busy"] - ours)
    result = {f"{name}_ms": spent[name] / count * 1e3 for name in PARTS}
    result["busy"] = spent["busy"] / spent["capacity"]
    result["foreign_share"] = spent["foreign"] / spent["capacity"]
    return result


async def run_load(
    cluster: Cluster, request: Request, seconds: float, concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    """``concurrency`` clients sending requests for ``seconds``: the rate, latency, bytes
    moved and CPU per request."""
    latencies: list[float] = []
    moved = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal moved
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            done = await request(cluster.next_node())
            moved += done
            latencies.append(time.perf_counter() - start)

    before = cpu_snapshot(cluster)
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    after = cpu_snapshot(cluster)
    count = len(latencies)
    return {
        "requests": count,
        "per_s": count / elapsed,
        "mb_per_s": moved / elapsed / 1e6,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "cpu": cpu_per_request(before, after, count),
    }


async def measured(
    cluster: Cluster, request: Request, seconds: float, concurrency: int = CONCURRENCY
) -> dict[str, Any]:
    """``run_load`` after a second of the same load unmeasured: connections opened,
    workers and pools warm, the object store's first volumes grown."""
    await run_load(cluster, request, min(1.0, seconds), concurrency)
    result = await run_load(cluster, request, seconds, concurrency)
    result["test_processes_after"] = len(test_processes())
    return result


def uploader(data: bytes, path: str = "/images") -> Request:
    async def upload(node: Node) -> int:
        async with node.uploads.connection() as connection:
            status, body = await connection.post(path, data)
        if status != 201:
            raise RuntimeError(f"an upload was answered {status}: {body[:500]!r}")
        return len(data)

    return upload


def getter(path: str) -> Request:
    async def get(node: Node) -> int:
        status, length, body = await node.get(path)
        if status != 200:
            raise RuntimeError(f"GET {path} was answered {status}: {body[:500]!r}")
        return length

    return get


async def upload_one(node: Node, data: bytes) -> dict[str, Any]:
    async with node.uploads.connection() as connection:
        status, body = await connection.post("/images", data)
    if status != 201:
        raise RuntimeError(f"an upload was answered {status}: {body[:500]!r}")
    image: dict[str, Any] = json.loads(body)
    return image


async def thumbnails(cluster: Cluster, data: bytes) -> dict[str, float]:
    """First-hit latency of thumbnails, each of a new image and made in a worker (with
    two nodes, by the node that did not take the upload, each node in turn), and warm
    latency, one request at a time."""
    cold: list[float] = []
    path = ""
    nodes = cluster.nodes
    for n in range(COLD_THUMBNAILS):
        image = await upload_one(nodes[n % len(nodes)], data)
        path = image["thumbnails"][THUMBNAIL]
        get = getter(path)
        start = time.perf_counter()
        await get(nodes[(n + 1) % len(nodes)])
        cold.append(time.perf_counter() - start)
    warm: list[float] = []
    for _ in range(WARM_THUMBNAILS):
        start = time.perf_counter()
        await get(cluster.next_node())
        warm.append(time.perf_counter() - start)
    return {
        "cold_p50_ms": statistics.median(cold) * 1e3,
        "cold_max_ms": max(cold) * 1e3,
        "warm_p50_ms": statistics.median(warm) * 1e3,
        "warm_p99_ms": percentile(warm, 0.99) * 1e3,
    }


async def measure(cluster: Cluster, images: dict[str, bytes], seconds: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in (SMALL, LARGE):
        result[f"upload {name}"] = await measured(cluster, uploader(images[name]), seconds)
    for name in (SMALL, LARGE):
        image = await upload_one(cluster.next_node(), images[name])
        result[f"download {name}"] = await measured(cluster, getter(image["image"]), seconds)
    result["thumbnails"] = await thumbnails(cluster, images[LARGE])
    return result


@contextlib.asynccontextmanager
async def nodes(
    count: int, workers: int, scratch: Path, flags: tuple[str, ...], env: dict[str, str]
) -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    try:
        for n in range(count):
            storage = scratch / f"node-{n}"
            flags_ = ("--workers", str(workers), *flags)
            started.append(await start_server(storage, *flags_, env=env))
        yield started
    finally:
        for server in started:
            if server.process.returncode is None:
                await server.stop()


class Library:
    """The shared library's engines, started when first needed."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._engines: tuple[engines.Postgres, engines.SeaweedFS] | None = None
        self._bucket = "bench"

    async def flags(self, name: str) -> tuple[tuple[str, ...], dict[str, str], dict[str, int]]:
        """Flags and environment for nodes on a new database and key prefix named
        ``name``; and the engines' pids."""
        if self._engines is None:
            self._engines = self._stack.enter_context(engines.engines())
            await self._engines[1].create_bucket(self._bucket)
        postgres, seaweedfs = self._engines
        flags = (
            "--index",
            postgres.new_database(name),
            "--blobs",
            f"s3://{self._bucket}/{name}",
            "--s3-endpoint",
            seaweedfs.endpoint,
            "--s3-region",
            engines.REGION,
        )
        return flags, seaweedfs.env(), {"postgres": postgres.pid, "seaweedfs": seaweedfs.pid}


async def main(
    configurations: list[str], seconds: float, workers: int, two_node_workers: int
) -> dict[str, Any]:
    images = {name: data for name, data in sample_images().items() if name in (SMALL, LARGE)}
    report: dict[str, Any] = {
        "cpus": CPUS,
        "seconds": seconds,
        "concurrency": CONCURRENCY,
        "workers": {"local": workers, "one": workers, "two": two_node_workers},
        "image_bytes": {name: len(data) for name, data in images.items()},
        "configurations": {},
    }
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        library = Library(stack)
        for name in configurations:
            flags: tuple[str, ...] = ()
            env: dict[str, str] = {}
            engine_pids: dict[str, int] = {}
            if name != "local":
                flags, env, engine_pids = await library.flags(name)
            count = 2 if name == "two" else 1
            node_workers = two_node_workers if name == "two" else workers
            async with nodes(count, node_workers, Path(scratch) / name, flags, env) as servers:
                cluster = Cluster(servers, engine_pids)
                try:
                    report["configurations"][name] = await measure(cluster, images, seconds)
                finally:
                    cluster.close()
    report["targets"] = verdicts(report["configurations"])
    return report


def app_cpu(phase: dict[str, Any]) -> float:
    return float(phase["cpu"]["server_ms"] + phase["cpu"]["workers_ms"])


def disturbed(*runs: dict[str, Any]) -> bool:
    return any(run["cpu"]["foreign_share"] > DISTURBED for run in runs)


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of issue 13 that the configurations measured allow to judge: the
    figure it is judged on, and whether it is met."""
    targets: dict[str, dict[str, Any]] = {}
    large, small = f"upload {LARGE}", f"upload {SMALL}"
    if "local" in results and "one" in results:
        local, one = results["local"], results["one"]
        ratio = one[large]["per_s"] / local[large]["per_s"]
        targets["1 node on postgresql+s3 keeps >= 50% of the local upload rate at 12 MP"] = {
            "value": ratio,
            "met": ratio >= 0.5,
            "disturbed": disturbed(local[large], one[large]),
        }
        for phase, size in ((large, "12 MP"), (small, "0.3 MP")):
            rise = app_cpu(one[phase]) / app_cpu(local[phase]) - 1
            targets[f"app CPU per upload (server + workers) rises <= 1/3 over local, {size}"] = {
                "value": rise,
                "met": rise <= 1 / 3,
                "disturbed": disturbed(local[phase], one[phase]),
            }
    if "one" in results and "two" in results:
        for phase, size in ((large, "12 MP"), (small, "0.3 MP")):
            one, two = results["one"][phase], results["two"][phase]
            ratio = two["per_s"] / one["per_s"]
            targets[f"2 nodes not slower than 1 (uploads/s), {size}"] = {
                "value": ratio,
                "met": ratio >= 1,
                "disturbed": disturbed(one, two),
            }
    return targets


def print_table(report: dict[str, Any]) -> None:
    results = report["configurations"]
    workers = report["workers"]
    print(
        f"{report['cpus']} CPUs; concurrency {report['concurrency']}, {report['seconds']:g} s "
        f"per run; workers per node: local {workers['local']}, 1 node {workers['one']}, "
        f"2 nodes {workers['two']}"
    )
    columns = [name for name in CONFIGURATIONS if name in results]
    header = f"\n{'':<30}" + "".join(f"{TITLES[name]:>28}" for name in columns)
    print(header)

    rows = (
        (f"upload {SMALL}/s (p50 ms)", f"upload {SMALL}", "per_s", ".1f", "p50_ms", ".0f"),
        (f"upload {LARGE}/s (p50 ms)", f"upload {LARGE}", "per_s", ".1f", "p50_ms", ".0f"),
        ("download 0.3 MP req/s (p50 ms)", f"download {SMALL}", "per_s", ".0f", "p50_ms", ".1f"),
        ("download 12 MP MB/s (p50 ms)", f"download {LARGE}", "mb_per_s", ".0f", "p50_ms", ".0f"),
        ("thumbnail cold p50 (max) ms", "thumbnails", "cold_p50_ms", ".0f", "cold_max_ms", ".0f"),
        ("thumbnail warm p50 (p99) ms", "thumbnails", "warm_p50_ms", ".1f", "warm_p99_ms", ".1f"),
    )
    for label, phase, main_key, main_format, aside_key, aside_format in rows:
        cells = [
            f"{results[name][phase][main_key]:{main_format}} "
            f"({results[name][phase][aside_key]:{aside_format}})"
            for name in columns
        ]
        print(f"{label:<30}" + "".join(f"{cell:>28}" for cell in cells))

    print(
        "\nCPU ms per request: server / workers | PostgreSQL / SeaweedFS | load generator | "
        "kernel | foreign;\n  machine busy; all but foreign, and the engines' share of it"
    )
    phases = [f"upload {SMALL}", f"upload {LARGE}", f"download {SMALL}", f"download {LARGE}"]
    for name in columns:
        print(f"  {TITLES[name]}")
        for phase in phases:
            cpu = results[name][phase]["cpu"]
            engines_ms = cpu["postgres_ms"] + cpu["seaweedfs_ms"]
            total = sum(cpu[f"{part}_ms"] for part in PARTS[:-1])
            print(
                f"    {phase:<22} {cpu['server_ms']:6.2f} / {cpu['workers_ms']:6.2f} | "
                f"{cpu['postgres_ms']:5.2f} / {cpu['seaweedfs_ms']:5.2f} | "
                f"{cpu['loadgen_ms']:5.2f} | {cpu['kernel_ms']:5.2f} | {cpu['foreign_ms']:5.2f}; "
                f"busy {cpu['busy']:4.0%}; ours {total:6.2f}, engines {engines_ms / total:4.0%}"
            )
    if report["targets"]:
        print("\ntargets:")
        for target, verdict in report["targets"].items():
            print(
                f"  {'met ' if verdict['met'] else 'MISSED'} {target}: {verdict['value']:.2f}"
                + (" (DISTURBED)" if verdict["disturbed"] else "")
            )
    if disturbed := disturbed_runs(results):
        print(
            f"\nDISTURBED: processes not ours took over {DISTURBED:.0%} of the machine in "
            + ", ".join(f"{run} ({share:.0%})" for run, share in disturbed.items())
        )


def disturbed_runs(results: dict[str, Any]) -> dict[str, float]:
    """The runs in which processes not ours took over ``DISTURBED`` of the machine, and
    the share they took."""
    return {
        f"{name} {phase}": figures["cpu"]["foreign_share"]
        for name, phases in results.items()
        for phase, figures in phases.items()
        if "cpu" in figures and figures["cpu"]["foreign_share"] > DISTURBED
    }


def test_processes() -> list[bytes]:
    """The pids of test suites running on this machine, whose load would count in ours."""
    return subprocess.run(
        ["pgrep", "-f", "pytest"], capture_output=True, check=False
    ).stdout.split()


def quiet(load_limit: float) -> tuple[bool, str]:
    """Whether no test suite runs and the 1-minute load average is below ``load_limit``;
    and what was seen."""
    running = test_processes()
    load = float(Path("/proc/loadavg").read_text().split()[0])
    seen = f"load average {load:.2f}, {len(running)} pytest processes"
    return not running and load < load_limit, seen


def wait_for_quiet(minutes: float) -> dict[str, Any]:
    """Poll every 30 s, up to ``minutes``, for a quiet machine; what was found."""
    deadline = time.monotonic() + minutes * 60
    while True:
        calm, seen = quiet(0.5)
        if calm or time.monotonic() >= deadline:
            return {
                "quiet": calm,
                "seen": seen,
                "waited_s": minutes * 60 - (deadline - time.monotonic()),
            }
        print(f"waiting for a quiet machine: {seen}", file=sys.stderr)
        time.sleep(30)


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into the KeyboardInterrupt of a Ctrl-C, so that everything started is
    stopped on the way out."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured run")
    parser.add_argument(
        "--only",
        default=",".join(CONFIGURATIONS),
        help=f"run only these configurations, comma-separated (of {','.join(CONFIGURATIONS)})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="conversion workers of the one-node configurations (default: as the server)",
    )
    parser.add_argument(
        "--two-node-workers",
        type=int,
        default=None,
        help="conversion workers of each of the two nodes (default: half of --workers, at "
        "least 1, so that the two share this machine's CPUs as one node does)",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0,
        metavar="MINUTES",
        help="first wait, up to this long, until no pytest runs and the load average is below 0.5",
    )
    arguments = parser.parse_args()
    chosen = arguments.only.split(",")
    if unknown := set(chosen) - set(CONFIGURATIONS):
        parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    if set(chosen) != {"local"} and (lacking := engines.missing()):
        parser.error(f"the shared configurations need {lacking}")
    two_node_workers = arguments.two_node_workers or max(1, arguments.workers // 2)
    _stop_on_sigterm()
    machine = wait_for_quiet(arguments.wait_for_quiet)
    try:
        result = asyncio.run(
            main(
                [name for name in CONFIGURATIONS if name in chosen],
                arguments.seconds,
                arguments.workers,
                two_node_workers,
            )
        )
    except KeyboardInterrupt:
        sys.exit("interrupted; everything it started is stopped")
    result["machine_before"] = machine
    result["machine_after"] = quiet(0.5)[1]
    if arguments.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
        print(f"\nbefore: {machine['seen']}; after: {result['machine_after']}")
