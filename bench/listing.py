"""Listing latency at 1,000, 100,000 and 1,000,000 images: first page and a deep page.

    python bench/listing.py [--sizes 1000,100000,1000000] [--requests 200]

For each size, fills a fresh index directly (no uploads), starts the real server on it
on loopback, and times sequential ``GET /images?limit=100`` requests for the first page
and for a page after an id 90% of the way in.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import percentile, start_server  # noqa: E402

from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE  # noqa: E402
from asgilook_aiohttp.storage.sqlite import SqliteIndex  # noqa: E402


async def fill(storage: Path, count: int) -> str:
    """An index of ``count`` images; returns the id 90% of the way in."""
    await asyncio.to_thread(storage.mkdir, parents=True)
    index = SqliteIndex(storage / INDEX_FILE, storage / RESERVE_FILE)
    await index.open()  # creates the schema
    await index.close()
    ids = [str(uuid.UUID(int=n, version=4)) for n in range(count)]
    with sqlite3.connect(storage / INDEX_FILE) as db:
        db.executemany(
            "INSERT INTO images (id, uploaded, width, height, bytes, sha256) "
            "VALUES (?, ?, 4000, 3000, 3000000, ?)",
            ((image_id, 1_700_000_000 + n, "0" * 64) for n, image_id in enumerate(ids)),
        )
    return ids[count * 9 // 10 - 100]


async def timings(session: aiohttp.ClientSession, url: str, requests: int) -> list[float]:
    results = []
    for _ in range(requests):
        start = time.perf_counter()
        async with session.get(url) as response:
            page = await response.json()
            assert response.status == 200, response.status
            assert len(page) == 100
        results.append(time.perf_counter() - start)
    return results


async def main(sizes: list[int], requests: int) -> None:
    print(f"GET /images?limit=100, {requests} sequential requests each; milliseconds")
    print(f"{'images':>10} {'first p50':>10} {'first p99':>10} {'deep p50':>9} {'deep p99':>9}")
    for size in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            storage = Path(scratch) / "storage"
            deep_id = await fill(storage, size)
            server = await start_server(storage, "--workers", "1")
            try:
                async with aiohttp.ClientSession(server.url) as session:
                    await timings(session, "/images?limit=100", 20)  # warm up
                    first = await timings(session, "/images?limit=100", requests)
                    deep = await timings(session, f"/images?limit=100&after={deep_id}", requests)
            finally:
                await server.stop()
        print(
            f"{size:>10,} {statistics.median(first) * 1e3:10.2f} "
            f"{percentile(first, 0.99) * 1e3:10.2f} {statistics.median(deep) * 1e3:9.2f} "
            f"{percentile(deep, 0.99) * 1e3:9.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--requests", type=int, default=200)
    arguments = parser.parse_args()
    asyncio.run(main([int(n) for n in arguments.sizes.split(",")], arguments.requests))
