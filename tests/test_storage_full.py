"""Storage trouble: a full disk refuses uploads with 507 and leaves nothing; readiness
says why, and recovers with the storage."""

from __future__ import annotations

import io
import os
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

import samples
from checks import Client, ClientFactory, assert_nothing_stored, assert_problem


def mount(*arguments: str) -> None:
    done = subprocess.run(["mount", *arguments], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root is needed): {done.stderr.decode().strip()}")


def umount(mount_point: Path) -> None:
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A file system of its own, of the given size."""
    mount_point.mkdir()
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point))
    try:
        yield mount_point
    finally:
        umount(mount_point)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from tmpfs(tmp_path / "small", "4m")


def _noise_jpeg() -> bytes:
    """About 5 MiB, kept as it is: the body does not fit the disk, nor does its copy."""
    noise = Image.frombytes("RGB", (3000, 2000), random.Random(1).randbytes(3000 * 2000 * 3))
    return samples.encode(noise, "JPEG", quality=90)


def _stripes_png() -> bytes:
    """About 80 kB that fits, whose JPEG (about 6 MiB of vertical noise) does not."""
    row = Image.frombytes("RGB", (5000, 1), random.Random(1).randbytes(5000 * 3))
    return samples.encode(row.resize((5000, 4000), Image.Resampling.NEAREST), "PNG")


@pytest.mark.parametrize(
    ("upload_memory_mb", "make_body"),
    [
        pytest.param(0, lambda: os.urandom(6 * 1024 * 1024), id="body-spooled-to-disk"),
        pytest.param(128, _noise_jpeg, id="jpeg-kept-as-is-too-big"),
        pytest.param(128, _stripes_png, id="converted-image-too-big"),
    ],
)
async def test_upload_to_a_full_disk_is_507_and_leaves_nothing(
    make_client: ClientFactory,
    small_disk: Path,
    upload_memory_mb: int,
    make_body: Callable[[], bytes],
) -> None:
    storage = small_disk / "storage"
    client = await make_client(storage_path=storage, upload_memory_mb=upload_memory_mb)
    response = await client.post("/images", data=io.BytesIO(make_body()))
    await assert_problem(response, 507, "storage-full")
    assert "Retry-After" in response.headers
    assert_nothing_stored(storage)
    small = samples.small_png()
    assert (await client.post("/images", data=small)).status == 201


async def test_not_ready_without_room_for_an_upload(
    make_client: ClientFactory, small_disk: Path
) -> None:
    client = await make_client(storage_path=small_disk / "storage")
    body = await assert_problem(await client.get("/readyz"), 503, "not-ready")
    assert "MiB free" in body["detail"]
    await client.close()
    roomy = await make_client(storage_path=small_disk / "storage", max_upload_bytes=1024 * 1024)
    assert (await roomy.get("/readyz")).status == 200


async def test_readiness_follows_a_read_only_storage(client: Client, storage: Path) -> None:
    assert (await client.get("/readyz")).status == 200
    # A read-only bind mount over the storage directory: new writes there fail with EROFS.
    mount("--bind", str(storage), str(storage))
    try:
        mount("-o", "remount,bind,ro", str(storage))
        body = await assert_problem(await client.get("/readyz"), 503, "not-ready")
        assert "not writable" in body["detail"]
        assert (await client.get("/healthz")).status == 200
    finally:
        umount(storage)
    assert (await client.get("/readyz")).status == 200
