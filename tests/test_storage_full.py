"""Storage trouble, on small file systems of the tests' own: a full disk refuses uploads
and new thumbnails with 507 and leaves nothing, yet deletions, reads and start-up go on;
readiness says why, and everything recovers by itself when space returns. Bodies still
arriving hold no more disk than they are allowed."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from PIL import Image

from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.durable import write_durably

import disks
import samples
from checks import (
    Client,
    ClientFactory,
    assert_nothing_stored,
    assert_problem,
    bearer,
    image_file,
    scrape,
    staged_bytes,
    stored_files,
    until,
    until_metric,
    value,
)
from serving import ROOT, running, start_server

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    yield from disks.tmpfs(tmp_path / "small", "4m")


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
        pytest.param(1, lambda: os.urandom(6 * 1024 * 1024), id="body-spooled-to-disk"),
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
    disks.mount("--bind", str(storage), str(storage))
    try:
        disks.mount("-o", "remount,bind,ro", str(storage))
        body = await assert_problem(await client.get("/readyz"), 503, "not-ready")
        assert "not writable" in body["detail"]
        assert (await client.get("/healthz")).status == 200
    finally:
        disks.umount(storage)
    assert (await client.get("/readyz")).status == 200


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    yield from disks.tmpfs(tmp_path / "disk", "16m")


def fill(storage: Path) -> Path:
    """Fill the storage's file system to the last byte with a file beside it; return that
    file."""
    filler = disks.fill(storage.parent, storage / INDEX_FILE)
    assert free_bytes(storage) == 0
    return filler


def index_of(storage: Path) -> closing[sqlite3.Connection]:
    """The index, read and written from outside the server, each statement committed."""
    return closing(sqlite3.connect(storage / INDEX_FILE, isolation_level=None))


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


async def until_ready(source: Client | tuple[aiohttp.ClientSession, str]) -> None:
    """Wait for /readyz to say 200, by itself."""
    async with asyncio.timeout(30):
        while True:
            if isinstance(source, tuple):
                session, url = source
                async with session.get(f"{url}/readyz") as response:
                    status = response.status
            else:
                status = (await source.get("/readyz")).status
            if status == 200:
                return
            await asyncio.sleep(0.05)


def noise_jpeg(size: tuple[int, int] = (500, 400), seed: int = 0) -> bytes:
    """A JPEG of noise, kept as it is: about as many bytes stored as sent."""
    noise = Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
    return samples.encode(noise, "JPEG", quality=90)


async def upload(client: Client, data: bytes) -> dict[str, Any]:
    response = await client.post("/images", data=data)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def test_upload_to_a_filled_disk_is_507_and_leaves_nothing(
    make_client: ClientFactory, disk: Path
) -> None:
    storage = disk / "storage"
    client = await make_client(storage_path=storage, max_upload_bytes=MiB)
    kept = await upload(client, samples.small_png())
    before = stored_files(storage)
    filler = fill(storage)
    response = await client.post("/images", data=samples.small_png())
    await assert_problem(response, 507, "storage-full")
    assert response.headers["Retry-After"] == "60"
    assert stored_files(storage) == before
    assert [image["id"] for image in await (await client.get("/images")).json()] == [kept["id"]]

    filler.unlink()
    await until_ready(client)
    await upload(client, samples.small_png())


async def test_uploads_that_fill_the_disk_get_201_or_507_and_nothing_else(
    make_client: ClientFactory, disk: Path
) -> None:
    storage = disk / "storage"
    client = await make_client(storage_path=storage, max_upload_bytes=MiB)
    statuses: list[int] = []
    created: list[str] = []
    for round_ in range(100):
        responses = await asyncio.gather(
            *(client.post("/images", data=noise_jpeg(seed=round_ * 4 + n)) for n in range(4))
        )
        for response in responses:
            statuses.append(response.status)
            if response.status == 201:
                created.append((await response.json())["id"])
            else:
                await assert_problem(response, 507, "storage-full")
        if statuses[-8:].count(507) == 8:
            break
    assert 201 in statuses
    assert statuses.count(507) >= 8
    listed = await (await client.get("/images?limit=1000")).json()
    assert sorted(image["id"] for image in listed) == sorted(created)
    assert stored_files(storage) == sorted(
        str(image_file(storage, image_id).relative_to(storage)) for image_id in created
    )


async def test_delete_on_a_full_disk_frees_space_and_the_reserve_returns(
    make_client: ClientFactory, disk: Path
) -> None:
    storage = disk / "storage"
    client = await make_client(storage_path=storage, max_upload_bytes=MiB)
    images = [await upload(client, noise_jpeg(seed=n)) for n in range(3)]
    assert (storage / RESERVE_FILE).stat().st_size == MiB
    filler = fill(storage)
    await assert_problem(await client.get("/readyz"), 503, "not-ready")

    for image in images:
        response = await client.delete(
            f"/images/{image['id']}", headers=bearer(image["delete_token"])
        )
        assert response.status == 204, await response.text()
        assert (await client.get(image["image"])).status == 404
    assert await (await client.get("/images")).json() == []
    assert_nothing_stored(storage)

    filler.unlink()
    await until_ready(client)
    assert (storage / RESERVE_FILE).stat().st_size == MiB
    await upload(client, samples.small_png())


async def test_thumbnails_on_a_full_disk(make_client: ClientFactory, disk: Path) -> None:
    storage = disk / "storage"
    client = await make_client(storage_path=storage, max_upload_bytes=MiB)
    image = await upload(client, samples.encode(samples.two_tone((640, 480)), "PNG"))
    made, unmade = image["thumbnails"]
    assert (await client.get(made)).status == 200
    with index_of(storage) as db:  # served long ago: due a new date
        db.execute("UPDATE thumbnails SET last_used = 0")
    before = stored_files(storage)
    filler = fill(storage)

    kept = await client.get(made)
    assert kept.status == 200
    assert samples.decode(await kept.read()).size == (320, 240)
    await assert_problem(await client.get(unmade), 507, "storage-full")
    assert stored_files(storage) == before
    with index_of(storage) as db:
        assert db.execute("SELECT count(*) FROM thumbnails").fetchone() == (1,)

    filler.unlink()
    await until_ready(client)
    assert (await client.get(unmade)).status == 200


async def test_start_on_a_full_disk_serves_reads_and_recovers_when_space_returns(
    session: aiohttp.ClientSession, disk: Path
) -> None:
    storage = disk / "storage"
    flags = ("--max-upload-bytes", str(MiB))
    async with (
        running(storage, *flags) as server,
        session.post(f"{server.url}/images", data=noise_jpeg()) as response,
    ):
        assert response.status == 201
        stored = await response.json()
    # What a crash left: a journaled id whose file is in place. And no reserve to give up.
    crashed = str(uuid.uuid4())
    crashed_file = image_file(storage, crashed)
    crashed_file.parent.mkdir(parents=True)
    write_durably(crashed_file, b"half-done")
    with index_of(storage) as db:
        db.execute("INSERT INTO pending (id) VALUES (?)", (crashed,))
    (storage / RESERVE_FILE).unlink()
    assert not (storage / f"{INDEX_FILE}-shm").exists()  # removed by the clean stop
    filler = fill(storage)

    # The first HTTP process opens the index alone, with no room to share it; the other
    # cannot open it, and is started again until it can.
    server = await start_server(storage, *flags, "--http-processes", "2")
    async with session.get(f"{server.url}/images") as response:
        assert [image["id"] for image in await response.json()] == [stored["id"]]
    async with session.get(f"{server.url}{stored['image']}") as response:
        assert response.status == 200
        assert await response.read() == noise_jpeg()
    async with session.get(f"{server.url}/healthz") as response:
        assert response.status == 200
    async with session.get(f"{server.url}/readyz") as response:
        body = await assert_problem(response, 503, "not-ready")
    assert "0 MiB free" in body["detail"]
    assert "kept for deletions" in body["detail"]
    assert not crashed_file.exists()
    async with session.post(f"{server.url}/images", data=samples.small_png()) as response:
        await assert_problem(response, 507, "storage-full")

    filler.unlink()
    await until_ready((session, server.url))
    with index_of(storage) as db:  # the index is open to others again
        journaled = [row[0] for row in db.execute("SELECT id FROM pending")]
    assert crashed not in journaled
    assert (storage / RESERVE_FILE).stat().st_size == MiB
    async with session.post(f"{server.url}/images", data=samples.small_png()) as response:
        assert response.status == 201
    await until_metric((session, server.url), "asgilook_http_processes", lambda n: n == 2)
    server.signal(signal.SIGTERM)
    assert await server.exit_code() == 0


async def test_no_index_and_no_room_for_one_is_a_clear_error(disk: Path) -> None:
    storage = disk / "storage"
    storage.mkdir()
    (storage / INDEX_FILE).touch()  # as a start that found no room leaves: still no index
    fill(storage)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "run.py",
        "--port",
        "0",
        "--storage",
        str(storage),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 1
    assert out == b""
    last_line = err.decode().strip().splitlines()[-1]
    assert last_line.startswith("asgilook-aiohttp: the storage file system is full")
    assert last_line.endswith("free some space there and start again")


async def test_bodies_on_disk_hold_no_more_than_their_allowance(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(upload_memory_mb=0, upload_disk_mb=1)
    first = noise_jpeg((1000, 800))
    assert 600_000 < len(first) < MiB
    go_on = asyncio.Event()

    async def stalling(data: bytes) -> AsyncIterator[bytes]:
        yield data[:600_000]
        await go_on.wait()
        yield data[600_000:]

    holding = asyncio.create_task(client.post("/images", data=stalling(first)))
    await until(lambda: staged_bytes(storage) == 600_000)
    second = await client.post("/images", data=stalling(noise_jpeg((1000, 800), seed=1)))
    body = await assert_problem(second, 507, "storage-full")
    assert "1 MiB" in body["detail"]
    assert second.headers["Retry-After"] == "60"
    assert staged_bytes(storage) == 600_000  # the refused body's file is gone
    await until_metric(client, "asgilook_upload_bytes_staged", lambda staged: staged == 600_000)

    go_on.set()
    assert (await holding).status == 201
    metrics = await scrape(client)
    assert value(metrics, "asgilook_upload_bytes_staged") == 0
    assert [path.split("/")[0] for path in stored_files(storage)] == ["images"]


async def test_bodies_that_never_finish_leave_room_for_uploads_received_in_full(
    make_client: ClientFactory, disk: Path
) -> None:
    storage = disk / "storage"
    client = await make_client(storage_path=storage, upload_memory_mb=1, max_upload_bytes=2 * MiB)
    sent = 1_500_000
    never = asyncio.Event()

    async def stalled(seed: int) -> AsyncIterator[bytes]:
        yield random.Random(seed).randbytes(sent)
        await never.wait()

    # More than the disk holds, as in the report: 12 x 1.5 MB on 16 MiB, one after another.
    posts: list[asyncio.Task[ClientResponse]] = []
    for n in range(12):
        posts.append(asyncio.create_task(client.post("/images", data=stalled(n))))
        await until(  # each held in full, or refused
            lambda: (
                staged_bytes(storage) + sent * sum(post.done() for post in posts)
                == sent * len(posts)
            )
        )
    refused = [post.result() for post in posts if post.done()]
    assert refused
    for response in refused:
        await assert_problem(response, 507, "storage-full")
    assert free_bytes(storage) >= 2 * MiB
    # An upload received in full still has the room its conversion needs.
    await upload(client, noise_jpeg((1000, 800)))
    never.set()
    await asyncio.gather(*posts)
