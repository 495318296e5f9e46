"""Cold and warm thumbnail latency for a 12-megapixel JPEG, and what draft() saves.

    python bench/thumbnails.py [--rounds N]

Starts the real server on loopback with fresh storage, uploads a 4000x3000 photo-like
JPEG, then times the first request for each thumbnail (made in a worker) and repeated
requests (served from storage). Beside it, the same thumbnail made in this process with
and without JPEG draft mode, which is what a cold request spends most of its time on.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import encode, photo, start_server  # noqa: E402

from asgilook_aiohttp import imaging  # noqa: E402
from asgilook_aiohttp.storage.files import Placement  # noqa: E402


def make_without_draft(source: str, placement: Placement, width: int, height: int) -> None:
    """The worker's job for a thumbnail, but decoding the image at full size."""
    with Image.open(source) as image:
        thumbnail = image.resize((width, height), Image.Resampling.LANCZOS)
    output = io.BytesIO()
    thumbnail.save(output, "JPEG", quality=90)
    placement.put(output.getvalue())  # as the worker stores it


def in_process(source: str, size: tuple[int, int], rounds: int) -> tuple[float, float]:
    """Median seconds to make one thumbnail with draft() and without."""
    timings: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        for n in range(rounds):
            for draft in (True, False):
                destination = os.path.join(scratch, f"{n}-{draft}.jpeg")
                placement = Placement(f"{destination}.staging", destination, cached=True)
                start = time.perf_counter()
                if draft:
                    imaging.make_thumbnail(source, placement, *size, 90)
                else:
                    make_without_draft(source, placement, *size)
                timings[draft].append(time.perf_counter() - start)
    return statistics.median(timings[True]), statistics.median(timings[False])


async def timed_get(session: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        assert response.status == 200, response.status
    return time.perf_counter() - start


async def main(rounds: int) -> None:
    data = encode(photo((4000, 3000)), "JPEG", quality=90)
    with tempfile.TemporaryDirectory() as scratch:
        server = await start_server(Path(scratch) / "storage")
        try:
            async with aiohttp.ClientSession(server.url) as session:
                async with session.post("/images", data=data) as response:
                    image = await response.json()
                source = Path(scratch) / "source.jpeg"
                source.write_bytes(data)
                print(f"12 MP JPEG, {len(data) / 1e6:.1f} MB; medians of {rounds} rounds")
                header = (
                    f"{'thumbnail':>10} {'cold ms':>8} {'warm ms':>8} "
                    f"{'draft ms':>9} {'no-draft ms':>12} {'speed-up':>9}"
                )
                print(header)
                for url in image["thumbnails"]:
                    width, height = (int(n) for n in url.rsplit("/", 1)[1][:-5].split("x"))
                    size = (width, height)
                    cold = await timed_get(session, url)
                    warm = statistics.median([await timed_get(session, url) for _ in range(rounds)])
                    draft, no_draft = in_process(str(source), size, rounds)
                    print(
                        f"{f'{width}x{height}':>10} {cold * 1e3:8.1f} {warm * 1e3:8.1f} "
                        f"{draft * 1e3:9.1f} {no_draft * 1e3:12.1f} {no_draft / draft:8.1f}x"
                    )
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args().rounds))
