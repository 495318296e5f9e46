"""The operator's commands on a large library: ``check``, ``backup`` and ``restore``.

    python bench/library.py [--images 100000] [--more 1000]

Builds a library of ``--images`` images directly, files and rows, not through uploads:
eight distinct JPEGs made with Pillow (photo-like gradients with grain, 120x90 to
330x244, quality 85, 4 to 24 KB), each written under many ids, with the rows the server would have
added for them (size, dimensions, SHA-256) and the totals to match. Then it times, each
through the console script in a subprocess, with the library's files in the page cache as
the build left them: ``check``; a full ``backup`` into a new directory; a second one, with
nothing new; one after ``--more`` images are added; and a ``restore`` of the backup into an
empty storage. Everything is in a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncio  # noqa: E402

from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE  # noqa: E402
from asgilook_aiohttp.storage.sqlite import SqliteIndex  # noqa: E402

SIZES = [(120 + 30 * n, 90 + 22 * n) for n in range(8)]


@dataclass(frozen=True)
class Sample:
    data: bytes
    width: int
    height: int
    sha256: str


def samples() -> list[Sample]:
    made = []
    for seed, (width, height) in enumerate(SIZES):
        ramp = Image.linear_gradient("L").resize((width, height))
        noise = random.Random(seed).randbytes(width * height)
        grain = Image.blend(ramp, Image.frombytes("L", (width, height), noise), 0.2)
        image = Image.merge("RGB", (ramp, grain, ramp.transpose(Image.Transpose.ROTATE_180)))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        made.append(Sample(data, width, height, hashlib.sha256(data).hexdigest()))
    return made


def add_images(storage: Path, count: int, first: int, made: list[Sample]) -> None:
    """Write ``count`` images numbered from ``first``: their files, then their rows."""
    rows = []
    for number in range(first, first + count):
        image_id = str(uuid.UUID(int=random.Random(number).getrandbits(128), version=4))
        sample = made[number % len(made)]
        directory = storage / "images" / image_id[:2] / image_id[2:4]
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{image_id}.jpeg").write_bytes(sample.data)
        uploaded = 1_700_000_000 + number
        rows.append(
            (image_id, uploaded, sample.width, sample.height, len(sample.data), sample.sha256)
        )
    with contextlib.closing(sqlite3.connect(storage / INDEX_FILE)) as db, db:
        db.executemany(
            "INSERT INTO images (id, uploaded, width, height, bytes, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute(
            "UPDATE totals SET images = images + ?, image_bytes = image_bytes + ?",
            (len(rows), sum(row[4] for row in rows)),
        )


def build(storage: Path, count: int, made: list[Sample]) -> None:
    storage.mkdir()
    index = SqliteIndex(storage / INDEX_FILE, storage / RESERVE_FILE)

    async def create_schema() -> None:
        await index.open()
        await index.close()

    asyncio.run(create_schema())
    add_images(storage, count, 0, made)


@dataclass
class Run:
    name: str
    seconds: float
    status: int
    out: str


def run(name: str, *arguments: str | Path) -> Run:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASGILOOK_")}
    command = [sys.executable, "-m", "asgilook_aiohttp", *map(str, arguments)]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=ROOT, env=clean, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    return Run(name, seconds, done.returncode, (done.stdout + done.stderr).strip())


def library_size(storage: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(storage / INDEX_FILE)) as db:
        images, image_bytes = db.execute("SELECT images, image_bytes FROM totals").fetchone()
    return int(images), int(image_bytes)


def main(count: int, more: int) -> None:
    made = samples()
    sizes = ", ".join(f"{len(sample.data) / 1000:.0f}" for sample in made)
    print(f"{count:,} images of 8 distinct JPEGs ({sizes} KB); then {more:,} more")
    with tempfile.TemporaryDirectory(prefix="asgilook-library-") as scratch:
        storage, backup, restored = (Path(scratch) / name for name in ("lib", "bak", "new"))
        started = time.perf_counter()
        build(storage, count, made)
        print(f"built in {time.perf_counter() - started:.1f} s")
        runs: list[tuple[Run, int, int, int]] = []  # and the images, bytes, bytes copied

        def timed(name: str, *arguments: str | Path, copied: bool) -> None:
            images, image_bytes = library_size(storage)
            result = run(name, *arguments)
            moved = _copied_bytes(result.out) if copied else image_bytes
            runs.append((result, images, image_bytes, moved))

        timed("check", "check", "--storage", storage, copied=False)
        timed("backup, full", "backup", "--storage", storage, backup, copied=True)
        timed("backup, nothing new", "backup", "--storage", storage, backup, copied=True)
        add_images(storage, more, count, made)
        timed(f"backup, {more:,} new", "backup", "--storage", storage, backup, copied=True)
        timed("restore", "restore", "--storage", restored, backup, copied=True)

    print(
        f"\n{'command':<22} {'exit':>4} {'seconds':>8} {'images/s':>9} {'MB/s':>7} {'library':>16}"
    )
    for result, images, image_bytes, moved in runs:
        print(
            f"{result.name:<22} {result.status:>4} {result.seconds:8.2f} "
            f"{images / result.seconds:9,.0f} {moved / 1e6 / result.seconds:7.1f} "
            f"{images:>8,} {image_bytes / 1e9:5.2f} GB"
        )
    print("\nimages/s: images in the library over the time; MB/s: bytes read (check) or copied")
    for result, *_ in runs:
        print(f"\n$ asgilook-aiohttp {result.name} (exit {result.status}):\n{result.out}")


def _copied_bytes(out: str) -> int:
    """The bytes a backup's or a restore's summary line says it copied."""
    for line in out.splitlines():
        if " copied (" in line:
            return int(float(line.split(" copied (")[1].split(" MB")[0].replace(",", "")) * 1e6)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--more", type=int, default=1_000)
    arguments = parser.parse_args()
    main(arguments.images, arguments.more)
