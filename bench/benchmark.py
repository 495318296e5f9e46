"""The whole benchmark: uploads against the machine's limit, responsiveness, listing,
downloads, thumbnails and memory, each against the real server on loopback.

    python bench/benchmark.py [--json] [--seconds 4] [--listing-sizes 1000,100000,1000000]
                              [--only uploads,saturation,downloads,listing] [--workers N]

Prints a table (or, with --json, one JSON document) and the verdict on each target.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import listing
from common import (
    ROOT,
    Server,
    encode,
    percentile,
    photo,
    start_server,
    tree_cpu,
    tree_memory,
)
from loadgen import Pool

sys.path.insert(0, str(ROOT))
from asgilook_aiohttp import imaging
from asgilook_aiohttp.config import Config, MiB, default_workers
from asgilook_aiohttp.storage.files import Placement

CPUS = len(os.sched_getaffinity(0))
CONCURRENCY = (1, 4, 16)


def sample_images() -> dict[str, bytes]:
    return {
        "12 MP JPEG": encode(photo((4000, 3000)), "JPEG", quality=90),
        "2 MP PNG": encode(photo((1633, 1225), 1), "PNG"),
        "0.3 MP PNG": encode(photo((632, 474), 2), "PNG"),
    }


# The upload each process of the limit converts, given once rather than with every job.
_upload: dict[str, bytes] = {}


def _start_worker(data: bytes) -> None:
    """Set the process up as the server sets up its workers, and give it the upload."""
    imaging.init_worker(Config.worker_memory_mb * MiB, os.getppid())
    _upload["data"] = data


def _convert_once(output: str) -> str:
    """A server worker's job for an upload, minus reading the uploaded file; the JPEG's
    path."""
    name = uuid.uuid4().hex
    destination = os.path.join(output, f"{name}.jpeg")
    placement = Placement(os.path.join(output, f"{name}.staging"), destination, cached=False)
    imaging.convert(_upload["data"], placement, 50_000_000, 90)
    return destination


def in_process_limit(data: bytes, seconds: float, workers: int, output: Path) -> float:
    """Images per second when ``workers`` processes do nothing but this conversion,
    storing their JPEGs in ``output``.

    The JPEGs are emptied afterwards but not removed (until then, 12 MP ones take about
    0.7 GB at ``--seconds 4``), so ``output`` should live as long as the upload runs: on
    ext4 without a journal, creating a file steps over each inode of its group freed in
    the last minutes (the kernel's ``recently_deleted``). On the development VM, after a
    few thousand removals, creating a file cost 0.5-0.8 ms of CPU instead of 0.03-0.07,
    for the limit and for the server alike.
    """
    output.mkdir(exist_ok=True)
    with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(data,)) as pool:
        stored = list(pool.map(_convert_once, [str(output)] * workers))  # start, warm up
        start = time.perf_counter()
        stored += pool.map(_convert_once, [str(output)] * workers)  # one job each, at once
        jobs = max(4 * workers, int(seconds * workers / (time.perf_counter() - start)))
        start = time.perf_counter()
        stored += pool.map(_convert_once, [str(output)] * jobs)
        rate = jobs / (time.perf_counter() - start)
    for path in stored:
        os.truncate(path, 0)
    return rate


async def load(
    concurrency: int, count: int, request: Callable[[], Awaitable[None]]
) -> tuple[float, list[float]]:
    """Run ``count`` requests ``concurrency`` at a time: (per second, latencies)."""
    latencies: list[float] = []
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            await request()
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return count / (time.perf_counter() - start), latencies


def uploader(pool: Pool, data: bytes) -> Callable[[], Awaitable[None]]:
    async def upload() -> None:
        async with pool.connection() as connection:
            status, body = await connection.post("/images", data)
        assert status == 201, body

    return upload


def getter(session: aiohttp.ClientSession, path: str) -> Callable[[], Awaitable[None]]:
    async def get() -> None:
        async with session.get(path) as response:
            assert response.status == 200, response.status
            await response.read()

    return get


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def uploads(
    pool: Pool,
    server: Server,
    images: dict[str, bytes],
    seconds: float,
    workers: int,
    *,
    limit_output: Path,
) -> list[dict[str, Any]]:
    """Throughput and latency, and where the CPU went: the server's own process, its
    workers, and this load generator, in milliseconds per upload.

    The limit is measured before and after the server's runs and averaged, so that the
    drift of a shared machine weighs on both sides alike.
    """
    rows = []
    pid = server.process.pid
    for name, data in images.items():
        limit_before = await asyncio.to_thread(
            in_process_limit, data, seconds, workers, limit_output
        )
        measured: list[dict[str, Any]] = []
        for concurrency in CONCURRENCY:
            count = max(2 * concurrency, int(limit_before * seconds))
            (server_before, workers_before), client_before = tree_cpu(pid), own_cpu()
            rate, latencies = await load(concurrency, count, uploader(pool, data))
            (server_after, workers_after), client_after = tree_cpu(pid), own_cpu()
            measured.append(
                {
                    "image": name,
                    "concurrency": concurrency,
                    "images_per_s": rate,
                    "p50_ms": statistics.median(latencies) * 1e3,
                    "p99_ms": percentile(latencies, 0.99) * 1e3,
                    "server_cpu_ms": (server_after - server_before) / count * 1e3,
                    "workers_cpu_ms": (workers_after - workers_before) / count * 1e3,
                    "client_cpu_ms": (client_after - client_before) / count * 1e3,
                }
            )
        limit_after = await asyncio.to_thread(
            in_process_limit, data, seconds, workers, limit_output
        )
        limit = (limit_before + limit_after) / 2
        for row in measured:
            row["limit_per_s"] = limit
            row["limit_before_after_per_s"] = [limit_before, limit_after]
            row["ratio"] = row["images_per_s"] / limit
        rows.extend(measured)
    return rows


async def under_saturation(
    session: aiohttp.ClientSession,
    pool: Pool,
    server: Server,
    photo_jpeg: bytes,
    seconds: float,
) -> dict[str, float]:
    """/healthz latency and peak memory while 16 uploads of 12 MP keep every worker busy."""
    stop = asyncio.Event()
    peak = peak_proportional = 0
    health: list[float] = []

    async def saturate() -> None:
        upload = uploader(pool, photo_jpeg)
        while not stop.is_set():
            await upload()

    async def probe() -> None:
        nonlocal peak, peak_proportional
        while not stop.is_set():
            start = time.perf_counter()
            async with session.get("/healthz") as response:
                await response.read()
            health.append(time.perf_counter() - start)
            resident, proportional = tree_memory(server.process.pid)
            peak = max(peak, resident)
            peak_proportional = max(peak_proportional, proportional)
            await asyncio.sleep(0.02)

    uploads = [asyncio.create_task(saturate()) for _ in range(16)]
    await asyncio.sleep(1)  # let the queue fill
    prober = asyncio.create_task(probe())
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(prober, *uploads)
    return {
        "healthz_p50_ms": statistics.median(health) * 1e3,
        "healthz_p99_ms": percentile(health, 0.99) * 1e3,
        "peak_rss_mib": peak / 2**20,
        "peak_pss_mib": peak_proportional / 2**20,
    }


async def downloads(
    session: aiohttp.ClientSession, images: dict[str, bytes], seconds: float
) -> dict[str, float]:
    stored = {}
    for name in ("0.3 MP PNG", "12 MP JPEG"):
        async with session.post("/images", data=io.BytesIO(images[name])) as response:
            stored[name] = await response.json()
    small, large = stored["0.3 MP PNG"], stored["12 MP JPEG"]
    results = {}
    rate, _ = await load(16, int(2000 * seconds), getter(session, small["image"]))
    results["small_requests_per_s"] = rate
    large_bytes = len(await (await session.get(large["image"])).read())
    rate, _ = await load(16, int(100 * seconds), getter(session, large["image"]))
    results["large_mb_per_s"] = rate * large_bytes / 1e6

    thumbnail = large["thumbnails"][2]
    start = time.perf_counter()
    await getter(session, thumbnail)()
    results["thumbnail_cold_ms"] = (time.perf_counter() - start) * 1e3
    rate, latencies = await load(1, 200, getter(session, thumbnail))
    results["thumbnail_warm_ms"] = statistics.median(latencies) * 1e3
    results["thumbnail_warm_per_s"], _ = await load(
        16, int(2000 * seconds), getter(session, thumbnail)
    )
    _, latencies = await load(1, 200, getter(session, small["image"]))
    results["original_warm_ms"] = statistics.median(latencies) * 1e3
    return results


async def listings(sizes: list[int]) -> list[dict[str, float]]:
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            storage = Path(scratch) / "storage"
            deep_id = await listing.fill(storage, size)
            server = await start_server(storage, "--workers", "1")
            try:
                async with aiohttp.ClientSession(server.url) as session:
                    await listing.timings(session, "/images?limit=100", 20)
                    first = await listing.timings(session, "/images?limit=100", 300)
                    deep = await listing.timings(session, f"/images?limit=100&after={deep_id}", 300)
            finally:
                await server.stop()
        rows.append(
            {
                "images": size,
                "first_p50_ms": statistics.median(first) * 1e3,
                "first_p99_ms": percentile(first, 0.99) * 1e3,
                "deep_p50_ms": statistics.median(deep) * 1e3,
                "deep_p99_ms": percentile(deep, 0.99) * 1e3,
            }
        )
    return rows


def verdicts(report: dict[str, Any]) -> dict[str, bool]:
    saturated = [row for row in report["uploads"] if row["concurrency"] == 16]
    first, last = report["listing"][0], report["listing"][-1]
    downloads = report["downloads"]
    return {
        "upload throughput >= 90% of the limit": all(row["ratio"] >= 0.9 for row in saturated),
        "healthz p99 <= 50 ms under load": report["saturation"]["healthz_p99_ms"] <= 50,
        "listing p99 at the largest size <= 1.5x the smallest": (
            last["first_p99_ms"] <= 1.5 * first["first_p99_ms"]
            and last["deep_p99_ms"] <= 1.5 * first["deep_p99_ms"]
        ),
        "warm thumbnail as fast as a warm original": (
            downloads["thumbnail_warm_ms"] <= 1.25 * downloads["original_warm_ms"]
        ),
        "peak RSS <= 600 MiB": report["saturation"]["peak_rss_mib"] <= 600,
    }


PARTS = ("uploads", "saturation", "downloads", "listing")


async def main(
    seconds: float, listing_sizes: list[int], parts: list[str], workers: int
) -> dict[str, Any]:
    images = sample_images()
    report: dict[str, Any] = {"workers": workers, "cpus": CPUS}
    with tempfile.TemporaryDirectory() as scratch:
        server = await start_server(Path(scratch) / "storage", "--workers", str(workers))
        try:
            timeout = aiohttp.ClientTimeout(total=300)
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(
                server.url, timeout=timeout, connector=connector
            ) as session:
                pool = Pool(server.url)
                try:
                    if "uploads" in parts:
                        report["uploads"] = await uploads(
                            pool,
                            server,
                            images,
                            seconds,
                            workers,
                            limit_output=Path(scratch) / "limit",
                        )
                    if "saturation" in parts:
                        report["saturation"] = await under_saturation(
                            session, pool, server, images["12 MP JPEG"], seconds
                        )
                    if "downloads" in parts:
                        report["downloads"] = await downloads(session, images, seconds)
                finally:
                    pool.close()
        finally:
            await server.stop()
    if "listing" in parts:
        report["listing"] = await listings(listing_sizes)
    if set(parts) == set(PARTS):
        report["targets"] = verdicts(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"{report['workers']} workers on {report['cpus']} CPUs")
    if "uploads" in report:
        print(
            f"\n{'upload':<11} {'conc':>4} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'limit/s':>8} {'ratio':>6} | CPU ms per upload: {'server':>6} {'workers':>7} "
            f"{'client':>6}"
        )
        for row in report["uploads"]:
            print(
                f"{row['image']:<11} {row['concurrency']:>4} {row['images_per_s']:7.1f} "
                f"{row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['limit_per_s']:8.1f} "
                f"{row['ratio']:6.2f} | {'':18} {row['server_cpu_ms']:6.1f} "
                f"{row['workers_cpu_ms']:7.1f} {row['client_cpu_ms']:6.1f}"
            )
    for part, title in (
        ("saturation", "under 16 concurrent 12 MP uploads"),
        ("downloads", "downloads (concurrency 16) and thumbnails"),
    ):
        if part in report:
            print(f"\n{title}:")
            for key, value in report[part].items():
                print(f"  {key:<22} {value:8.1f}")
    if "listing" in report:
        print(
            f"\n{'listing':>10} {'first p50':>10} {'first p99':>10} {'deep p50':>9} {'deep p99':>9}"
        )
        for row in report["listing"]:
            print(
                f"{row['images']:>10,} {row['first_p50_ms']:10.2f} {row['first_p99_ms']:10.2f} "
                f"{row['deep_p50_ms']:9.2f} {row['deep_p99_ms']:9.2f}"
            )
    if "targets" in report:
        print("\ntargets:")
        for target, met in report["targets"].items():
            print(f"  {'met ' if met else 'MISSED'} {target}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each load run")
    parser.add_argument("--listing-sizes", default="1000,100000,1000000")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="the server's conversion workers, and the limit's processes (default: as the server)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"run only these parts, comma-separated (of {','.join(PARTS)}); no verdicts then",
    )
    arguments = parser.parse_args()
    sizes = [int(n) for n in arguments.listing_sizes.split(",")]
    parts = arguments.only.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    result = asyncio.run(main(arguments.seconds, sizes, parts, arguments.workers))
    if arguments.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
