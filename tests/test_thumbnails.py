"""Thumbnails: the sizes offered, exact dimensions, made once, kept within a budget."""

from __future__ import annotations

import asyncio
import io
import itertools
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

import pytest
from PIL import Image

from asgilook_aiohttp.converter import Converter
from asgilook_aiohttp.imaging import Converted
from asgilook_aiohttp.journal import Journal
from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.files import LocalBlobs
from asgilook_aiohttp.storage.ports import Destination, ImageRecord, Totals, image_key
from asgilook_aiohttp.storage.scratch import Scratch
from asgilook_aiohttp.storage.sqlite import SqliteIndex
from asgilook_aiohttp.thumbnails import TOUCH_INTERVAL, Thumbnails

import samples
from checks import (
    Client,
    ClientFactory,
    assert_problem,
    converter_of,
    fill_the_queue,
    lose_every_worker,
    stored_files,
)


async def upload(client: Client, image: Image.Image, fmt: str = "PNG", **options: Any) -> Any:
    data = samples.encode(image, fmt, **options)
    response = await client.post("/images", data=io.BytesIO(data))
    assert response.status == 201, await response.text()
    return await response.json()


async def upload_photo(client: Client, seed: int) -> Any:
    """A 2000x1500 photo; its largest thumbnail is about 225 kB."""
    return await upload(client, samples.photo((2000, 1500), seed), "JPEG", quality=90)


def thumbnail_files(storage: Path) -> list[Path]:
    return sorted((storage / "thumbnails").rglob("*.jpeg"))


def conversions(client: Client) -> int:
    return converter_of(client).jobs_started


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 360), [(320, 180), (160, 90)]),
        ((1000, 750), [(500, 375), (250, 187), (125, 93)]),
        ((100, 80), []),
        ((128, 128), [(64, 64)]),
        ((127, 4000), []),
    ],
)
async def test_listed_sizes_and_each_is_exact(
    client: Client, size: tuple[int, int], expected: list[tuple[int, int]]
) -> None:
    image = await upload(client, samples.two_tone(size))
    assert image["thumbnails"] == [f"/thumbnails/{image['id']}/{w}x{h}.jpeg" for w, h in expected]
    for url, (width, height) in zip(image["thumbnails"], expected, strict=True):
        response = await client.get(url)
        assert response.status == 200
        assert response.content_type == "image/jpeg"
        thumbnail = samples.decode(await response.read())
        assert thumbnail.format == "JPEG"
        assert thumbnail.size == (width, height)


async def test_thumbnail_keeps_the_picture(client: Client) -> None:
    image = await upload(client, samples.two_tone((640, 360)))
    thumbnail = samples.decode(await (await client.get(image["thumbnails"][0])).read())
    left: Any = thumbnail.getpixel((40, 90))
    right: Any = thumbnail.getpixel((280, 90))
    assert left[0] > 180  # red on the left
    assert right[2] > 180  # blue on the right


async def test_minimum_side_is_configurable(make_client: ClientFactory) -> None:
    client = await make_client(min_thumbnail_side=100)
    image = await upload(client, samples.two_tone((640, 360)))
    assert image["thumbnails"] == [f"/thumbnails/{image['id']}/320x180.jpeg"]


async def test_unlisted_sizes_unknown_ids_and_malformed_paths_are_404(client: Client) -> None:
    image = await upload(client, samples.two_tone((640, 360)))
    base = f"/thumbnails/{image['id']}"
    for path in (
        f"{base}/321x180.jpeg",
        f"{base}/640x360.jpeg",
        f"{base}/80x45.jpeg",
        f"{base}/0320x180.jpeg",
        f"{base}/320X180.jpeg",
        f"{base}/320x180.png",
        f"{base}/320x180",
        f"/thumbnails/{image['id'].upper()}/320x180.jpeg",
        "/thumbnails/5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c/320x180.jpeg",
    ):
        await assert_problem(await client.get(path), 404)
        assert (await client.head(path)).status == 404


async def test_a_thumbnail_no_worker_can_make_is_503_and_leaves_nothing(
    client: Client, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = await upload(client, samples.photo((640, 480)))
    await lose_every_worker(client, monkeypatch)
    response = await client.get(image["thumbnails"][0])
    await assert_problem(response, 503, "worker-lost")
    assert int(response.headers["Retry-After"]) > 0
    assert thumbnail_files(storage) == []
    assert_thumbnail_rows_name_the_files(storage)


async def test_a_thumbnail_while_the_queue_is_full_is_503_and_made_later(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(workers=1, queue_size=1)
    image = await upload(client, samples.photo((640, 480)))
    running, queued = await fill_the_queue(client)

    response = await client.get(image["thumbnails"][0])
    await assert_problem(response, 503, "queue-full")
    assert int(response.headers["Retry-After"]) > 0
    assert thumbnail_files(storage) == []
    assert_thumbnail_rows_name_the_files(storage)

    assert (await running).status == 201
    assert (await queued).status == 201
    later = await client.get(image["thumbnails"][0])
    assert later.status == 200
    assert samples.decode(await later.read()).size == (320, 240)


async def test_a_thumbnail_over_the_time_limit_is_503_and_leaves_nothing(
    make_client: ClientFactory, storage: Path
) -> None:
    uploader = await make_client()
    image = await upload(uploader, samples.photo((4000, 3000)), "JPEG", quality=90)
    stored = stored_files(storage)
    await uploader.close()
    # Making the 2000x1500 thumbnail of a 12 MP photo takes tens of milliseconds.
    client = await make_client(conversion_timeout=0.01)
    response = await client.get(image["thumbnails"][0])
    body = await assert_problem(response, 503, "conversion-timeout")
    assert "longer than 0.01 s" in body["detail"]
    assert int(response.headers["Retry-After"]) > 0
    assert stored_files(storage) == stored
    assert_thumbnail_rows_name_the_files(storage)


async def test_thumbnails_of_a_rotated_photo_are_upright(client: Client) -> None:
    # Orientation 6: the camera was turned a quarter clockwise; red ends up on top.
    image = await upload(
        client, samples.two_tone((400, 200)), "JPEG", exif=samples.exif_with_gps(6)
    )
    assert image["size"] == [200, 400]
    assert image["thumbnails"] == [f"/thumbnails/{image['id']}/100x200.jpeg"]
    thumbnail = samples.decode(await (await client.get(image["thumbnails"][0])).read())
    assert thumbnail.size == (100, 200)
    top: Any = thumbnail.getpixel((50, 40))
    bottom: Any = thumbnail.getpixel((50, 160))
    assert top[0] > 180  # red
    assert bottom[2] > 180  # blue


async def test_made_once_then_served_from_storage(client: Client, storage: Path) -> None:
    image = await upload(client, samples.two_tone((640, 360)))
    before = conversions(client)
    first = await (await client.get(image["thumbnails"][0])).read()
    assert conversions(client) == before + 1
    (kept,) = thumbnail_files(storage)
    assert kept.read_bytes() == first
    for _ in range(3):
        assert await (await client.get(image["thumbnails"][0])).read() == first
    assert conversions(client) == before + 1


async def test_concurrent_first_requests_run_one_conversion(
    make_client: ClientFactory,
) -> None:
    client = await make_client(workers=2)
    image = await upload(client, samples.photo((3000, 2000)), "JPEG", quality=90)
    before = conversions(client)
    responses = await asyncio.gather(*(client.get(image["thumbnails"][0]) for _ in range(8)))
    bodies = {await response.read() for response in responses}
    assert [response.status for response in responses] == [200] * 8
    assert len(bodies) == 1
    assert conversions(client) == before + 1
    assert samples.decode(bodies.pop()).size == (1500, 1000)


async def test_thumbnails_keep_the_icc_profile(client: Client) -> None:
    profile = samples.srgb_profile()
    image = await upload(client, samples.two_tone((640, 360)), icc_profile=profile)
    thumbnail = samples.decode(await (await client.get(image["thumbnails"][1])).read())
    assert thumbnail.info.get("icc_profile") == profile


def assert_thumbnail_rows_name_the_files(storage: Path) -> None:
    """Each thumbnail row names a file of its size, and each thumbnail file has a row."""
    with sqlite3.connect(storage / INDEX_FILE) as db:
        rows = db.execute("SELECT image_id, width, height, bytes FROM thumbnails").fetchall()
    on_disk = {
        f"{path.parent.name}/{path.name}": path.stat().st_size for path in thumbnail_files(storage)
    }
    assert {f"{image_id}/{w}x{h}.jpeg": size for image_id, w, h, size in rows} == on_disk


async def test_kept_thumbnails_stay_within_the_budget(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(thumbnail_budget_mb=1)
    budget = 1024 * 1024
    images = [await upload_photo(client, seed) for seed in range(5)]
    bodies = []
    for image in images:
        response = await client.get(image["thumbnails"][0])
        assert response.status == 200
        bodies.append(await response.read())
        assert sum(path.stat().st_size for path in thumbnail_files(storage)) <= budget
    assert sum(len(body) for body in bodies) > budget, "the test must overflow the budget"
    assert_thumbnail_rows_name_the_files(storage)
    # The latest is kept; an evicted one is made again, identical.
    kept = [path.read_bytes() for path in thumbnail_files(storage)]
    assert bodies[-1] in kept
    assert bodies[0] not in kept
    before = conversions(client)
    assert await (await client.get(images[0]["thumbnails"][0])).read() == bodies[0]
    assert conversions(client) == before + 1


async def test_eviction_spares_recently_served_thumbnails(
    make_client: ClientFactory, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(thumbnail_budget_mb=1)
    # Five thumbnails of about 225 kB each: the fifth needs one of the others to go.
    images = [await upload_photo(client, seed) for seed in range(5)]
    bodies = [await (await client.get(image["thumbnails"][0])).read() for image in images[:2]]
    # Hours later the first is served again; then new thumbnails push past the budget.
    ticks = itertools.count(int(time.time()) + 2 * TOUCH_INTERVAL)
    monkeypatch.setattr(time, "time", lambda: float(next(ticks)))
    assert await (await client.get(images[0]["thumbnails"][0])).read() == bodies[0]
    for image in images[2:]:
        bodies.append(await (await client.get(image["thumbnails"][0])).read())
    assert 0 < sum(map(len, bodies)) - 1024 * 1024 < min(map(len, bodies))
    kept = [path.read_bytes() for path in thumbnail_files(storage)]
    assert len(kept) == 4
    assert bodies[0] in kept
    assert bodies[1] not in kept


async def test_concurrent_thumbnails_over_the_budget_stay_consistent(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(thumbnail_budget_mb=1, workers=2)
    images = [await upload_photo(client, seed) for seed in range(8)]
    responses = await asyncio.gather(*(client.get(image["thumbnails"][0]) for image in images))
    assert [response.status for response in responses] == [200] * len(images)
    bodies = [await response.read() for response in responses]
    assert sum(map(len, bodies)) > 1024 * 1024, "the test must overflow the budget"
    # Every kept file is in the index and the other way round, within the budget.
    assert_thumbnail_rows_name_the_files(storage)
    kept_bytes = sum(path.stat().st_size for path in thumbnail_files(storage))
    assert kept_bytes <= 1024 * 1024 + max(map(len, bodies))


class _SmallFileConverter:
    """Stands in for the worker pool: each "thumbnail" is 1000 bytes, made at once but
    only after yielding, so that concurrent makes interleave as they do under load."""

    async def run(self, fn: Any, source: str, destination: Destination, *size: int) -> Converted:
        await asyncio.sleep(0)
        handed_back = destination.put(b"\xff" * 1000)
        return Converted(size[0], size[1], 1000, "0" * 64, handed_back)


async def test_eviction_amid_concurrent_makes_keeps_rows_and_files_together(
    tmp_path: Path,
) -> None:
    scratch = Scratch(tmp_path)
    scratch.open()
    blobs = LocalBlobs(tmp_path, scratch)
    await blobs.open()
    index = SqliteIndex(tmp_path / INDEX_FILE, tmp_path / RESERVE_FILE)
    await index.open()
    journal = Journal(index, blobs, lease=60)
    counted: list[Totals] = []
    store = Thumbnails(
        index,
        blobs,
        journal,
        cast(Converter, _SmallFileConverter()),
        budget_bytes=1500,
        quality=90,
        conversion_timeout=60,
        counted=counted.append,
    )
    images = [
        ImageRecord(f"{n:08d}-0000-4000-8000-000000000000", 0, 64, 64, 1, "0" * 64)
        for n in range(40)
    ]
    for image in images:
        blobs.destination(image_key(image.id)).put(b"\xff")
        await index.journal([image.id], journal.owner, 60)
        await index.add(image, journal.owner)
    for batch in range(0, 40, 4):
        await asyncio.gather(*(store.make(image, 32, 32) for image in images[batch : batch + 4]))

    assert_thumbnail_rows_name_the_files(tmp_path)
    kept = thumbnail_files(tmp_path)
    kept_bytes = (await index.totals()).thumbnail_bytes
    assert kept_bytes == 1000 * len(kept) == sum(path.stat().st_size for path in kept)
    assert counted[-1].thumbnail_bytes == kept_bytes
    # Thumbnails still being handed out when the last eviction ran may overshoot, by at
    # most the rest of their batch; the next eviction takes them into account.
    assert kept_bytes <= 1500 + 3 * 1000
    await blobs.close()
    await index.close()
