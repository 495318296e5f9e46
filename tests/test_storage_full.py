"""A full disk: uploads are refused with 507 and leave nothing, readiness says why."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import samples
from checks import ClientFactory, assert_nothing_stored, assert_problem


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system of its own (needs root to mount a tmpfs)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


async def test_upload_to_a_full_disk_is_507(make_client: ClientFactory, small_disk: Path) -> None:
    storage = small_disk / "storage"
    client = await make_client(storage_path=storage)
    data = os.urandom(6 * 1024 * 1024)  # more than the disk holds
    response = await client.post("/images", data=io.BytesIO(data))
    await assert_problem(response, 507, "storage-full")
    assert "Retry-After" in response.headers
    assert_nothing_stored(storage)
    small = samples.encode(samples.two_tone(), "PNG")
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
