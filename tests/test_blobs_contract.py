"""The blob store's contract, held alike by a local directory and an S3 bucket (on a
real SeaweedFS); then what each does beyond it, and the object store's faults."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import multiprocessing
import random
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver, resource_tracker
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from asgilook_aiohttp.storage import files
from asgilook_aiohttp.storage.files import LocalBlobs, Placement
from asgilook_aiohttp.storage.ports import (
    BlobMissing,
    Blobs,
    Body,
    BytesBody,
    Destination,
    FileBody,
    HandBack,
    Unavailable,
    image_key,
    thumbnail_key,
)
from asgilook_aiohttp.storage.scratch import Scratch

from engine_seaweedfs import SeaweedFS, s3_bucket, seaweedfs  # noqa: F401

if TYPE_CHECKING:
    from asgilook_aiohttp.storage.s3 import S3Blobs

IMAGE = "5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c"
OTHER = "0b7e2f0a-7d0c-4a5e-9a43-3f0c1f6f2b1d"
PREFIX = "library/"
# Time enough for any call to a healthy SeaweedFS on a busy CI machine.
TIMEOUT = 5.0
# The fault tests' timeout, and how much later than it a call may fail.
SHORT_TIMEOUT = 1.0
LATE = 0.5

MakeBlobs = Callable[[], Awaitable[Blobs]]


def some_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(params=["file", "s3"])
def make_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> MakeBlobs:
    """Open a new store (each on the same directory, or bucket) of the kind the test runs with."""
    if request.param == "file":
        scratch = Scratch(tmp_path)
        scratch.open()

        async def local() -> Blobs:
            blobs = LocalBlobs(tmp_path, scratch)
            await blobs.open()
            return blobs

        return local
    engine: SeaweedFS = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")

    async def s3() -> Blobs:
        return await open_s3(engine, bucket, TIMEOUT)

    return s3


async def open_s3(engine: SeaweedFS, bucket: str, seconds: float) -> S3Blobs:
    from asgilook_aiohttp.storage.s3 import S3Blobs  # noqa: PLC0415 - only with aiobotocore

    blobs = S3Blobs(
        bucket,
        PREFIX,
        endpoint=engine.endpoint,
        region=engine.region,
        access_key=engine.access_key,
        secret_key=engine.secret_key,
        timeout=seconds,
    )
    await blobs.open()
    return blobs


@pytest.fixture
async def blobs(make_blobs: MakeBlobs) -> AsyncIterator[Blobs]:
    blobs = await make_blobs()
    yield blobs
    await blobs.close()


@pytest.fixture
async def s3_blobs(seaweedfs: SeaweedFS, s3_bucket: str) -> AsyncIterator[S3Blobs]:  # noqa: F811
    """An S3 store that gives up after SHORT_TIMEOUT."""
    blobs = await open_s3(seaweedfs, s3_bucket, SHORT_TIMEOUT)
    yield blobs
    await blobs.close()


async def store(blobs: Blobs, key: str, data: bytes) -> None:
    """Store a blob as the server does, with its worker's part done in this process."""
    destination = blobs.destination(key)
    try:
        handed_back = destination.put(data)
    finally:
        await blobs.abandon(destination)
    await blobs.keep(key, handed_back)


async def read(body: Body) -> bytes:
    try:
        if isinstance(body, BytesBody):
            return bytes(body.data)
        if isinstance(body, FileBody):
            body.file.seek(body.offset)
            return body.file.read(body.count)
        return b"".join([chunk async for chunk in body.chunks])
    finally:
        await body.close()


async def exists(blobs: Blobs, key: str) -> bool:
    try:
        await (await blobs.body(key, 0, 0)).close()
    except BlobMissing:
        return False
    return True


async def source_bytes(blobs: Blobs, key: str) -> bytes:
    source = await blobs.source(key)
    if isinstance(source, str):
        return await asyncio.to_thread(Path(source).read_bytes)
    return source


# The contract.


@pytest.mark.parametrize(
    "key", [image_key(IMAGE), thumbnail_key(IMAGE, 231, 150)], ids=["image", "thumbnail"]
)
async def test_a_stored_blob_is_served_whole_and_in_ranges(blobs: Blobs, key: str) -> None:
    data = some_bytes(700_000)  # several chunks of a stream
    await store(blobs, key, data)
    assert await read(await blobs.body(key, 0, len(data))) == data
    assert await read(await blobs.body(key, 1000, 500_000)) == data[1000:501_000]
    assert await read(await blobs.body(key, len(data) - 1, 1)) == data[-1:]
    assert await read(await blobs.body(key, 0, 1)) == data[:1]
    assert await read(await blobs.body(key, 0, 0)) == b""
    assert await source_bytes(blobs, key) == data


async def test_a_stored_blob_is_served_by_another_node(blobs: Blobs, make_blobs: MakeBlobs) -> None:
    data = some_bytes(1000)
    await store(blobs, image_key(IMAGE), data)
    other = await make_blobs()
    try:
        assert await read(await other.body(image_key(IMAGE), 0, len(data))) == data
    finally:
        await other.close()


@pytest.mark.parametrize(
    "key", [image_key(IMAGE), thumbnail_key(IMAGE, 231, 150)], ids=["image", "thumbnail"]
)
async def test_a_missing_blob_is_blob_missing(blobs: Blobs, key: str) -> None:
    with pytest.raises(BlobMissing):
        await blobs.body(key, 0, 10)
    with pytest.raises(BlobMissing):
        await blobs.body(key, 0, 0)
    with pytest.raises(BlobMissing):
        await blobs.source(key)


async def test_delete_removes_exactly_the_blobs_named(blobs: Blobs) -> None:
    kept = [image_key(OTHER), thumbnail_key(OTHER, 100, 100)]
    small, large = thumbnail_key(IMAGE, 100, 100), thumbnail_key(IMAGE, 200, 150)
    for key in [image_key(IMAGE), small, large, *kept]:
        await store(blobs, key, key.encode())

    await blobs.delete([small, thumbnail_key(IMAGE, 1, 1), image_key("never-stored")])
    assert not await exists(blobs, small)
    assert await exists(blobs, large)
    assert await exists(blobs, image_key(IMAGE))

    await blobs.delete_image(IMAGE)
    assert not await exists(blobs, image_key(IMAGE))
    assert not await exists(blobs, large)
    for key in kept:
        assert await source_bytes(blobs, key) == key.encode()

    await blobs.delete_image(IMAGE)  # already gone
    await blobs.delete([])


async def test_a_blob_stored_again_replaces_it(blobs: Blobs) -> None:
    key = thumbnail_key(IMAGE, 100, 100)
    await store(blobs, key, b"first")
    await store(blobs, key, b"second")
    assert await source_bytes(blobs, key) == b"second"


async def test_abandoning_a_destination_leaves_the_blob_stored_through_it(blobs: Blobs) -> None:
    key = image_key(IMAGE)
    destination = blobs.destination(key)
    await blobs.keep(key, destination.put(b"stored"))
    await blobs.abandon(destination)
    assert await source_bytes(blobs, key) == b"stored"


async def test_ready_when_healthy(blobs: Blobs) -> None:
    assert await blobs.problem() is None


async def test_everything_stored_is_listed_with_its_size(blobs: Blobs) -> None:
    sizes = {
        image_key(IMAGE): 5,
        thumbnail_key(IMAGE, 100, 100): 3,
        thumbnail_key(IMAGE, 20, 10): 1,
        image_key(OTHER): 0,
    }
    for key, size in sizes.items():
        await store(blobs, key, b"x" * size)
    listed = [stored async for batch in blobs.stored() for stored in batch]
    assert {stored.key: stored.nbytes for stored in listed} == sizes
    assert len(listed) == len(sizes)


async def test_a_digest_is_the_blobs_size_and_sha256(blobs: Blobs) -> None:
    data = some_bytes(3 * 1024 * 1024 + 17)  # several reads
    await store(blobs, image_key(IMAGE), data)
    assert await blobs.digest(image_key(IMAGE)) == (len(data), hashlib.sha256(data).hexdigest())
    await store(blobs, thumbnail_key(IMAGE, 1, 1), b"")
    assert await blobs.digest(thumbnail_key(IMAGE, 1, 1)) == (0, hashlib.sha256().hexdigest())
    with pytest.raises(BlobMissing):
        await blobs.digest(image_key(OTHER))


async def set_aside_bytes(request: pytest.FixtureRequest, name: str) -> bytes:
    """What the store of the test's kind holds at ``name``, read from beside it."""
    if request.node.callspec.params["make_blobs"] == "file":
        directory: Path = request.getfixturevalue("tmp_path")
        return await asyncio.to_thread((directory / name).read_bytes)
    engine: SeaweedFS = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    async with engine.client() as s3:
        response = await s3.get_object(Bucket=bucket, Key=PREFIX + name)
        async with response["Body"] as body:
            return await body.read()


async def test_an_image_set_aside_is_kept_whole_and_listed_no_more(
    blobs: Blobs, request: pytest.FixtureRequest
) -> None:
    await store(blobs, image_key(IMAGE), b"first")
    await store(blobs, thumbnail_key(IMAGE, 1, 1), b"t")
    assert await blobs.set_aside_count() == 0
    assert await blobs.set_aside(image_key(IMAGE)) == f"set-aside/{IMAGE}.jpeg"
    assert not await exists(blobs, image_key(IMAGE))
    assert await exists(blobs, thumbnail_key(IMAGE, 1, 1))

    # Set aside again: what is there already is kept too.
    await store(blobs, image_key(IMAGE), b"second")
    assert await blobs.set_aside(image_key(IMAGE)) == f"set-aside/{IMAGE}.1.jpeg"
    assert await set_aside_bytes(request, f"set-aside/{IMAGE}.jpeg") == b"first"
    assert await set_aside_bytes(request, f"set-aside/{IMAGE}.1.jpeg") == b"second"
    assert await blobs.set_aside_count() == 2
    listed = [stored.key async for batch in blobs.stored() for stored in batch]
    assert listed == [thumbnail_key(IMAGE, 1, 1)]

    with pytest.raises(BlobMissing):
        await blobs.set_aside(image_key(OTHER))
    assert await blobs.set_aside_count() == 2
    with pytest.raises(ValueError, match="not an image's blob key"):
        await blobs.set_aside(thumbnail_key(IMAGE, 1, 1))


def put_in_worker(destination: Destination, data: bytes) -> tuple[bytes | None, list[str]]:
    """What a worker process does with its destination, and which backends it imported."""
    handed_back = destination.put(data)
    return handed_back, [name for name in ("aiobotocore", "botocore") if name in sys.modules]


@pytest.fixture
def worker() -> Iterator[ProcessPoolExecutor]:
    """A worker process started as the server starts them, from a fork server."""
    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
    yield executor
    executor.shutdown()
    # As the server does at exit, so that the next test's workers start from a fork
    # server that preloads what the server chose.
    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


async def test_a_destination_is_put_in_a_worker_process(
    blobs: Blobs, worker: ProcessPoolExecutor
) -> None:
    key = thumbnail_key(IMAGE, 231, 150)
    data = some_bytes(50_000)
    destination = blobs.destination(key)
    running = asyncio.get_running_loop().run_in_executor(worker, put_in_worker, destination, data)
    try:
        handed_back, backends = await running
    finally:
        await blobs.abandon(destination)
    await blobs.keep(key, handed_back)
    assert backends == []
    assert await read(await blobs.body(key, 0, len(data))) == data


# A local directory.


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalBlobs]:
    scratch = Scratch(tmp_path)
    scratch.open()
    blobs = LocalBlobs(tmp_path, scratch)
    await blobs.open()
    yield blobs
    await blobs.close()


async def test_files_keep_their_layout(local: LocalBlobs, tmp_path: Path) -> None:
    assert (tmp_path / "images").is_dir()
    await store(local, image_key(IMAGE), b"image")
    await store(local, thumbnail_key(IMAGE, 231, 150), b"thumbnail")
    assert (tmp_path / "images/5c/fd" / f"{IMAGE}.jpeg").read_bytes() == b"image"
    thumbnails = tmp_path / "thumbnails/5c/fd" / IMAGE
    assert (thumbnails / "231x150.jpeg").read_bytes() == b"thumbnail"
    assert await local.source(image_key(IMAGE)) == str(tmp_path / "images/5c/fd" / f"{IMAGE}.jpeg")
    assert list((tmp_path / "staging").iterdir()) == []


async def test_only_thumbnails_stay_in_the_page_cache(local: LocalBlobs, tmp_path: Path) -> None:
    image = local.destination(image_key(IMAGE))
    thumbnail = local.destination(thumbnail_key(IMAGE, 231, 150))
    assert isinstance(image, Placement)
    assert isinstance(thumbnail, Placement)
    assert not image.cached
    assert thumbnail.cached
    assert Path(image.staging).parent == Path(thumbnail.staging).parent == tmp_path / "staging"
    assert image.staging != thumbnail.staging


async def test_files_no_key_names_are_listed_as_strays(local: LocalBlobs, tmp_path: Path) -> None:
    await store(local, image_key(IMAGE), b"image")
    strays = [
        "images/notes.txt",
        f"images/0b/7e/{IMAGE}.jpeg",  # in another image's directory
        f"images/5c/fd/{IMAGE}.jpeg.part",
        f"thumbnails/5c/fd/{IMAGE}/big.jpeg",
        f"thumbnails/5c/fd/{IMAGE}.jpeg",
    ]
    for name in strays:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"??")
    listed = {stored.name: stored async for batch in local.stored() for stored in batch}
    assert {name: stored.key for name, stored in listed.items()} == {
        f"images/5c/fd/{IMAGE}.jpeg": image_key(IMAGE),
        **dict.fromkeys(strays),
    }
    assert listed["images/notes.txt"].nbytes == 2


async def test_abandon_removes_what_a_failed_worker_left(local: LocalBlobs) -> None:
    destination = local.destination(image_key(IMAGE))
    assert isinstance(destination, Placement)
    await asyncio.to_thread(Path(destination.staging).write_bytes, b"half an ima")
    await local.abandon(destination)
    assert not await asyncio.to_thread(Path(destination.staging).exists)
    assert not await exists(local, image_key(IMAGE))
    with pytest.raises(TypeError):
        await local.abandon(HandBack())


async def test_nothing_is_handed_back_to_keep(local: LocalBlobs) -> None:
    await local.keep(image_key(IMAGE), None)
    with pytest.raises(TypeError):
        await local.keep(image_key(IMAGE), b"bytes")


async def test_a_thumbnail_directory_goes_with_its_last_thumbnail(
    local: LocalBlobs, tmp_path: Path
) -> None:
    small, large = thumbnail_key(IMAGE, 100, 100), thumbnail_key(IMAGE, 200, 150)
    await store(local, small, b"small")
    await store(local, large, b"large")
    directory = tmp_path / "thumbnails/5c/fd" / IMAGE
    await local.delete([small])
    assert directory.is_dir()
    await local.delete([large])
    assert not directory.exists()


async def test_an_unreadable_blob_is_not_missing(local: LocalBlobs, tmp_path: Path) -> None:
    (tmp_path / "images/5c/fd" / f"{IMAGE}.jpeg").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        await local.body(image_key(IMAGE), 0, 10)


async def test_small_bodies_are_read_and_large_ones_sent_from_the_file(local: LocalBlobs) -> None:
    data = some_bytes(files.IN_MEMORY_BYTES + 1)
    await store(local, image_key(IMAGE), data)
    whole = await local.body(image_key(IMAGE), 0, len(data))
    assert isinstance(whole, FileBody)
    assert await read(whole) == data
    part = await local.body(image_key(IMAGE), 1, files.IN_MEMORY_BYTES)
    assert isinstance(part, BytesBody)
    assert await read(part) == data[1:]


async def test_bodies_in_memory_hold_no_more_than_their_bound_at_once(tmp_path: Path) -> None:
    scratch = Scratch(tmp_path)
    scratch.open()
    blobs = LocalBlobs(tmp_path, scratch, in_memory=250_000)
    data = some_bytes(100_000)
    await store(blobs, image_key(IMAGE), data)
    held = [await blobs.body(image_key(IMAGE), 0, len(data)) for _ in range(3)]
    # Two fit in the bound; the third, sent to a client as slow as the others, would not.
    assert [type(body) for body in held] == [BytesBody, BytesBody, FileBody]
    assert [await read(body) for body in held] == [data] * 3  # read() closes each
    again = await blobs.body(image_key(IMAGE), 0, len(data))
    assert isinstance(again, BytesBody)  # what the first ones held was let go
    await again.close()


async def test_a_cached_blob_is_read_on_the_loop(
    local: LocalBlobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = some_bytes(100_000)
    await store(local, image_key(IMAGE), data)
    await read(await local.body(image_key(IMAGE), 0, len(data)))  # its path looked up once

    async def no_thread(path: str, offset: int, count: int) -> bytearray:
        raise AssertionError(f"{path} was opened in a thread")

    monkeypatch.setattr(files, "_open_off_the_loop", no_thread)
    assert await read(await local.body(image_key(IMAGE), 0, len(data))) == data
    assert await read(await local.body(image_key(IMAGE), 10, 20)) == data[10:30]


@pytest.mark.parametrize("cached", ["nothing", "part of the bytes"])
async def test_a_blob_the_kernel_has_not_cached_is_read_off_the_loop(
    local: LocalBlobs, monkeypatch: pytest.MonkeyPatch, cached: str
) -> None:
    data = some_bytes(files.IN_MEMORY_BYTES + 1)
    await store(local, image_key(IMAGE), data)
    if cached == "nothing":
        monkeypatch.setattr(files, "_open_cached", lambda path: None)
    else:
        read_cached = files._read_cached
        monkeypatch.setattr(
            files, "_read_cached", lambda fd, buffer, offset: read_cached(fd, buffer[:10], offset)
        )
    for offset, count in ((0, len(data)), (5, 100_000), (0, 0)):
        assert (
            await read(await local.body(image_key(IMAGE), offset, count))
            == data[offset : offset + count]
        )
    with pytest.raises(BlobMissing):
        await local.body(image_key(OTHER), 0, 10)


@pytest.mark.parametrize(
    "key", ["images/../../etc.jpeg", "images/.hidden.jpeg", "thumbnails/../1x1.jpeg", "etc/x"]
)
async def test_a_key_never_names_a_path_elsewhere(local: LocalBlobs, key: str) -> None:
    with pytest.raises(ValueError, match=r"not an? "):
        await local.source(key)


# An S3 bucket.


async def test_objects_are_kept_under_the_prefix_with_their_checksum(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    data = some_bytes(1000)
    await store(s3_blobs, image_key(IMAGE), data)
    await store(s3_blobs, thumbnail_key(IMAGE, 100, 100), data)
    assert await seaweedfs.keys(s3_bucket) == [
        PREFIX + image_key(IMAGE),
        PREFIX + thumbnail_key(IMAGE, 100, 100),
    ]
    async with seaweedfs.client() as s3:
        head = await s3.head_object(
            Bucket=s3_bucket, Key=PREFIX + image_key(IMAGE), ChecksumMode="ENABLED"
        )
    assert head["ContentType"] == "image/jpeg"
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


async def test_the_worker_hands_the_bytes_back_to_keep(s3_blobs: S3Blobs) -> None:
    assert isinstance(s3_blobs.destination(image_key(IMAGE)), HandBack)
    with pytest.raises(TypeError):
        await s3_blobs.keep(image_key(IMAGE), None)


async def test_a_range_past_the_objects_end_is_missing(s3_blobs: S3Blobs) -> None:
    # Its record says it is longer: the object was replaced since the record was read.
    await store(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"0123456789")
    with pytest.raises(BlobMissing):
        await s3_blobs.body(thumbnail_key(IMAGE, 1, 1), 5, 10)
    with pytest.raises(BlobMissing):
        await s3_blobs.body(thumbnail_key(IMAGE, 1, 1), 20, 5)
    assert await serves(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"0123456789")


async def test_deleting_an_image_pages_through_its_thumbnails(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("asgilook_aiohttp.storage.s3._PAGE", 2)  # S3's is 1000
    await store(s3_blobs, image_key(IMAGE), b"image")
    for size in range(1, 6):
        await store(s3_blobs, thumbnail_key(IMAGE, size, size), b"thumbnail")
    await store(s3_blobs, thumbnail_key(OTHER, 1, 1), b"other")
    await s3_blobs.delete_image(IMAGE)
    assert await seaweedfs.keys(s3_bucket) == [PREFIX + thumbnail_key(OTHER, 1, 1)]


async def test_objects_are_listed_a_page_at_a_time_strays_too(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
    s3_bucket: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("asgilook_aiohttp.storage.s3._PAGE", 2)
    for size in range(1, 4):
        await store(s3_blobs, thumbnail_key(IMAGE, size, size), b"t" * size)
    async with seaweedfs.client() as s3:
        for name in ("images/a/b.jpeg", "notes.txt"):
            await s3.put_object(Bucket=s3_bucket, Key=PREFIX + name, Body=b"??")
        await s3.put_object(Bucket=s3_bucket, Key="elsewhere.jpeg", Body=b"??")
    batches = [batch async for batch in s3_blobs.stored()]
    assert [len(batch) for batch in batches] == [2, 2, 1]
    listed = {stored.name: (stored.key, stored.nbytes) for batch in batches for stored in batch}
    assert listed == {
        "images/a/b.jpeg": (None, 2),
        "notes.txt": (None, 2),
        **{thumbnail_key(IMAGE, n, n): (thumbnail_key(IMAGE, n, n), n) for n in range(1, 4)},
    }


async def test_open_refuses_a_bucket_that_is_not_there(seaweedfs: SeaweedFS) -> None:  # noqa: F811
    with pytest.raises(SystemExit) as refused:
        await open_s3(seaweedfs, "no-such-bucket", SHORT_TIMEOUT)
    assert "there is no bucket 'no-such-bucket'" in str(refused.value)
    assert seaweedfs.endpoint in str(refused.value)


async def test_open_without_a_store_is_unavailable(seaweedfs: SeaweedFS) -> None:  # noqa: F811
    from asgilook_aiohttp.storage.s3 import S3Blobs  # noqa: PLC0415

    with socket.socket() as nothing_listening:
        nothing_listening.bind(("127.0.0.1", 0))
        port = nothing_listening.getsockname()[1]
        blobs = S3Blobs(
            "bucket",
            "",
            endpoint=f"http://127.0.0.1:{port}",
            region=seaweedfs.region,
            access_key=seaweedfs.access_key,
            secret_key=seaweedfs.secret_key,
            timeout=SHORT_TIMEOUT,
        )
        assert await failing_within(blobs.open()) < SHORT_TIMEOUT


# The object store's faults. The big object is more than the sockets' buffers between
# SeaweedFS and the client hold, so that streaming it waits on SeaweedFS.

BIG = 16 * 1024 * 1024


async def put_big(engine: SeaweedFS, bucket: str, key: str) -> bytes:
    data = some_bytes(BIG)
    async with engine.client() as s3:
        await s3.put_object(Bucket=bucket, Key=PREFIX + key, Body=data)
    return data


async def failing_within(call: Awaitable[object]) -> float:
    """How long ``call`` took to fail as the object store being unavailable."""
    started = time.monotonic()
    with pytest.raises(Unavailable) as failed:
        await call
    assert failed.value.dependency == "the object store"
    assert "the object store is unavailable: " in str(failed.value)
    return time.monotonic() - started


async def unready_within(blobs: S3Blobs) -> float:
    """How long ``blobs`` took to say why it is not ready."""
    started = time.monotonic()
    assert "the object store is unavailable: " in (await blobs.problem() or "")
    return time.monotonic() - started


async def drain(chunks: AsyncIterator[bytes]) -> None:
    async for _ in chunks:
        pass


async def serves(blobs: S3Blobs, key: str, data: bytes) -> bool:
    return await read(await blobs.body(key, 0, len(data))) == data


async def test_a_killed_store_is_unavailable_at_once_and_serves_again_once_restarted(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    await put_big(seaweedfs, s3_bucket, image_key(OTHER))
    await store(s3_blobs, image_key(IMAGE), b"image")
    streaming = await s3_blobs.body(image_key(OTHER), 0, BIG)
    chunks = aiter(streaming.chunks)
    await anext(chunks)

    seaweedfs.kill()
    assert await failing_within(drain(chunks)) < SHORT_TIMEOUT
    await streaming.close()
    for call in [
        s3_blobs.body(image_key(IMAGE), 0, 5),
        s3_blobs.body(image_key(IMAGE), 0, 0),
        s3_blobs.source(image_key(IMAGE)),
        s3_blobs.keep(thumbnail_key(IMAGE, 1, 1), b"thumbnail"),
        s3_blobs.delete_image(IMAGE),
    ]:
        assert await failing_within(call) < SHORT_TIMEOUT
    assert await unready_within(s3_blobs) < SHORT_TIMEOUT

    seaweedfs.start()
    assert await s3_blobs.problem() is None
    assert await serves(s3_blobs, image_key(IMAGE), b"image")  # acknowledged, so kept
    await store(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"thumbnail")
    assert await serves(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"thumbnail")


async def test_a_frozen_store_is_unavailable_within_the_timeout_and_serves_once_thawed(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
) -> None:
    await store(s3_blobs, image_key(IMAGE), b"image")
    seaweedfs.freeze()
    waited = await asyncio.gather(
        failing_within(s3_blobs.body(image_key(IMAGE), 0, 5)),
        failing_within(s3_blobs.body(image_key(IMAGE), 0, 0)),
        failing_within(s3_blobs.source(image_key(IMAGE))),
        failing_within(s3_blobs.keep(thumbnail_key(IMAGE, 1, 1), b"thumbnail")),
        # More than the sockets' buffers take: the PUT is left sending, not waiting.
        failing_within(s3_blobs.keep(thumbnail_key(IMAGE, 2, 2), some_bytes(BIG))),
        # Of a key read no more: a store that took the request frozen may carry it out
        # once thawed: the image itself, deleted so, failed a whole run of the suite once.
        failing_within(s3_blobs.delete([thumbnail_key(IMAGE, 3, 3)])),
        unready_within(s3_blobs),
    )
    assert all(SHORT_TIMEOUT * 0.9 < seconds < SHORT_TIMEOUT + LATE for seconds in waited), waited

    seaweedfs.thaw()
    assert await s3_blobs.problem() is None
    assert await serves(s3_blobs, image_key(IMAGE), b"image")
    await store(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"thumbnail")
    assert await serves(s3_blobs, thumbnail_key(IMAGE, 1, 1), b"thumbnail")


async def test_a_body_that_stalls_midway_fails_within_the_timeout(
    s3_blobs: S3Blobs,
    seaweedfs: SeaweedFS,  # noqa: F811
    s3_bucket: str,  # noqa: F811
) -> None:
    data = await put_big(seaweedfs, s3_bucket, image_key(IMAGE))
    streaming = await s3_blobs.body(image_key(IMAGE), 0, BIG)
    chunks = aiter(streaming.chunks)
    await anext(chunks)

    seaweedfs.freeze()
    assert await failing_within(drain(chunks)) < SHORT_TIMEOUT + LATE
    await streaming.close()

    seaweedfs.thaw()
    assert await serves(s3_blobs, image_key(IMAGE), data)
