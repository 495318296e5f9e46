"""Uploads of every common format, each downloaded again and decoded; bodies received in
memory or straight to disk."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from email.utils import parsedate_to_datetime
from functools import partial
from operator import eq
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageOps

from asgilook_aiohttp.storage.scratch import Scratch

import samples
from checks import (
    Client,
    ClientFactory,
    assert_problem,
    scrape,
    staged_bytes,
    stored_files,
    until,
    until_metric,
    value,
)

UUID = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


async def upload_and_fetch(
    client: Client, data: bytes | aiohttp.FormData, **kwargs: Any
) -> tuple[dict[str, Any], Image.Image]:
    """Upload, check the 201 and the download, and return the image object and the JPEG."""
    sent = time.time()
    response = await client.post("/images", data=data, **kwargs)
    assert response.status == 201, await response.text()
    image = await response.json()
    assert re.fullmatch(UUID, image["id"])
    assert response.headers["Location"] == f"/images/{image['id']}.jpeg" == image["image"]
    # The upload time, to the second.
    assert sent - 1 < parsedate_to_datetime(image["modified"]).timestamp() <= time.time()
    assert image["modified"].endswith(" GMT")

    download = await client.get(image["image"])
    assert download.status == 200
    assert download.content_type == "image/jpeg"
    body = await download.read()
    assert int(download.headers["Content-Length"]) == len(body)
    stored = samples.decode(body)
    assert stored.format == "JPEG"
    assert stored.mode == "RGB"
    assert list(stored.size) == image["size"]
    return image, stored


def near(pixel: Any, expected: Any, tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", {}),
        ("JPEG", {"quality": 95}),
        ("WEBP", {"lossless": True}),
        ("BMP", {}),
        ("TIFF", {}),
        ("GIF", {}),
    ],
)
async def test_formats_round_trip(client: Client, fmt: str, options: dict[str, Any]) -> None:
    data = samples.encode(samples.two_tone((64, 48)), fmt, **options)
    image, stored = await upload_and_fetch(client, data)
    assert image["size"] == [64, 48]
    assert near(stored.getpixel((8, 24)), samples.RED, tolerance=24)
    assert near(stored.getpixel((56, 24)), samples.BLUE, tolerance=24)


async def test_animated_gif_keeps_first_frame(client: Client) -> None:
    image, stored = await upload_and_fetch(client, samples.animated_gif())
    assert image["size"] == [40, 30]
    assert near(stored.getpixel((20, 15)), samples.RED, tolerance=24)


async def test_cmyk_jpeg_becomes_rgb(client: Client) -> None:
    cmyk = Image.new("CMYK", (50, 40), (0, 255, 255, 0))
    _, stored = await upload_and_fetch(client, samples.encode(cmyk, "JPEG", quality=95))
    assert near(stored.getpixel((25, 20)), (255, 0, 0))


async def test_16_bit_grey_png_is_scaled_not_clipped(client: Client) -> None:
    _, stored = await upload_and_fetch(client, samples.grey16_png(32768))
    assert near(stored.getpixel((16, 12)), (128, 128, 128), tolerance=3)


async def test_transparency_becomes_white(client: Client) -> None:
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    image.paste((20, 40, 210, 255), (0, 0, 20, 40))
    _, stored = await upload_and_fetch(client, samples.encode(image, "PNG"))
    assert near(stored.getpixel((30, 20)), (255, 255, 255), tolerance=3)
    assert near(stored.getpixel((10, 20)), samples.BLUE)


async def test_palette_transparency_becomes_white(client: Client) -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, *samples.RED])
    image.paste(1, (0, 0, 20, 40))
    data = samples.encode(image, "GIF", transparency=0)
    _, stored = await upload_and_fetch(client, data)
    assert near(stored.getpixel((30, 20)), (255, 255, 255), tolerance=3)
    assert near(stored.getpixel((10, 20)), samples.RED, tolerance=24)


async def test_exif_rotation_is_applied_and_metadata_removed(client: Client, storage: Path) -> None:
    # Orientation 6: the camera was turned a quarter clockwise; viewers rotate to show it.
    original = samples.two_tone((64, 48))
    data = samples.encode(
        original,
        "JPEG",
        quality=95,
        exif=samples.exif_with_gps(6),
        **samples.PRIVATE_METADATA,
    )
    image, stored = await upload_and_fetch(client, data)
    assert image["size"] == [48, 64]
    assert near(stored.getpixel((24, 8)), samples.RED, tolerance=24)
    assert near(stored.getpixel((24, 56)), samples.BLUE, tolerance=24)
    assert dict(stored.getexif()) == {}
    assert "comment" not in stored.info
    assert "xmp" not in stored.info
    on_disk = (storage / stored_files(storage)[0]).read_bytes()
    assert b"Exif" not in on_disk
    assert b"home" not in on_disk
    assert b"secret" not in on_disk


async def test_icc_profile_is_kept_when_reencoding(client: Client) -> None:
    profile = samples.srgb_profile()
    data = samples.encode(samples.two_tone(), "PNG", icc_profile=profile)
    _, stored = await upload_and_fetch(client, data)
    assert stored.info.get("icc_profile") == profile


async def test_upright_jpeg_keeps_its_pixels_and_profile_but_loses_metadata(
    client: Client,
) -> None:
    profile = samples.srgb_profile()
    data = samples.encode(
        samples.photo((320, 240)),
        "JPEG",
        quality=85,
        icc_profile=profile,
        exif=samples.exif_with_gps(1),
        **samples.PRIVATE_METADATA,
    )
    _, stored = await upload_and_fetch(client, data)
    assert stored.tobytes() == samples.decode(data).tobytes()
    assert stored.info.get("icc_profile") == profile
    assert dict(stored.getexif()) == {}
    assert "comment" not in stored.info
    assert "xmp" not in stored.info


async def test_progressive_jpeg_is_stored_without_reencoding(client: Client) -> None:
    data = samples.encode(samples.photo((320, 240)), "JPEG", quality=80, progressive=True)
    _, stored = await upload_and_fetch(client, data)
    assert stored.tobytes() == samples.decode(data).tobytes()


async def test_greyscale_jpeg_is_stored_as_rgb(client: Client) -> None:
    data = samples.encode(Image.new("L", (30, 20), 90), "JPEG")
    _, stored = await upload_and_fetch(client, data)
    assert near(stored.getpixel((15, 10)), (90, 90, 90), tolerance=3)


@pytest.mark.parametrize(
    ("names", "chosen"),
    [
        (("other", "image"), 1),  # the part named "image" wins, wherever it is
        (("photo", "second"), 0),  # else the first file part
    ],
)
async def test_multipart_chooses_the_image_part(
    client: Client, names: tuple[str, str], chosen: int
) -> None:
    sizes = [(30, 20), (10, 12)]
    form = aiohttp.FormData()
    form.add_field("title", "holiday")
    for name, size in zip(names, sizes, strict=True):
        form.add_field(name, samples.encode(samples.two_tone(size), "PNG"), filename=f"{name}.png")
    image, _ = await upload_and_fetch(client, form)
    assert image["size"] == list(sizes[chosen])


async def test_multipart_leaves_only_the_stored_image(client: Client, storage: Path) -> None:
    form = aiohttp.FormData()
    form.add_field("first", samples.small_png(), filename="a.png")
    form.add_field("image", samples.small_png(), filename="b.png")
    response = await client.post("/images", data=form)
    image = await response.json()
    assert stored_files(storage) == [
        f"images/{image['id'][:2]}/{image['id'][2:4]}/{image['id']}.jpeg"
    ]


async def test_a_replaced_part_that_cannot_be_removed_still_lets_the_next_one_go(
    make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(upload_memory_mb=1)

    async def cannot_remove(self: Scratch, path: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Scratch, "discard", cannot_remove)
    form = aiohttp.FormData()
    form.add_field("attachment", io.BytesIO(os.urandom(2 * 1024 * 1024)), filename="big.bin")
    form.add_field("image", io.BytesIO(samples.small_png()), filename="b")
    await assert_problem(await client.post("/images", data=form), 500)
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0


async def test_content_type_of_a_raw_upload_does_not_matter(client: Client) -> None:
    data = samples.small_png()
    image, _ = await upload_and_fetch(client, data, headers={"Content-Type": "text/plain"})
    assert image["size"] == [64, 48]


@pytest.mark.parametrize("orientation", range(1, 9))
async def test_every_exif_orientation_is_applied(client: Client, orientation: int) -> None:
    original = samples.quadrants()
    exif = Image.Exif()
    exif[samples.ORIENTATION] = orientation
    data = samples.encode(original, "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(samples.decode(data))
    _, stored = await upload_and_fetch(client, data)
    assert stored.size == upright.size
    width, height = stored.size
    for x, y in ((width // 4, height // 4), (3 * width // 4, 3 * height // 4)):
        assert near(stored.getpixel((x, y)), upright.getpixel((x, y)), tolerance=24)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
async def test_broken_exif_still_uploads_upright(client: Client, fmt: str) -> None:
    data = samples.encode(samples.two_tone((64, 48)), fmt, exif=samples.exif_with_bad_field(6))
    image, stored = await upload_and_fetch(client, data)
    assert image["size"] == [48, 64]
    assert dict(stored.getexif()) == {}


async def test_floating_point_grey_is_scaled(client: Client) -> None:
    # From 0.0 at the top to 1.0 at the bottom, as scientific and HDR tools write floats.
    ramp = Image.linear_gradient("L").convert("F").point(lambda v: v / 255)
    _, stored = await upload_and_fetch(client, samples.encode(ramp, "TIFF"))
    assert near(stored.getpixel((128, 2)), (0, 0, 0), tolerance=8)
    assert near(stored.getpixel((128, 128)), (128, 128, 128), tolerance=8)
    assert near(stored.getpixel((128, 253)), (255, 255, 255), tolerance=8)


def _recorded(method: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def recording(*args: Any) -> Any:
        calls.append(method.__name__)
        return method(*args)

    return recording


async def test_in_memory_spilled_and_on_disk_bodies_store_the_same_jpeg(
    make_client: ClientFactory, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = samples.megabyte_png()
    assert len(upload) > 1024 * 1024
    written: list[str] = []
    monkeypatch.setattr(Scratch, "stage", _recorded(Scratch.stage, written))
    stored = []
    # All in memory; in memory until the 1 MiB budget runs out, then all to disk; all to disk.
    for memory_mb in (128, 1, 0):
        client = await make_client(upload_memory_mb=memory_mb)
        response = await client.post("/images", data=io.BytesIO(upload))
        assert response.status == 201, await response.text()
        image = await response.json()
        stored.append(await (await client.get(image["image"])).read())
        assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0
        await client.close()
    assert stored[0] == stored[1] == stored[2]
    assert written == ["stage", "stage"]
    assert [path.split("/")[0] for path in stored_files(storage)] == ["images"] * 3


async def test_bodies_arriving_together_each_store_their_own_pixels(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    uploads = [
        samples.encode(samples.photo((900, 700), seed), "JPEG", quality=95) for seed in range(3)
    ]
    piece = 50_000  # not a whole number of the server's 64 KiB pages
    rounds = [asyncio.Event() for _ in range(max(len(upload) for upload in uploads) // piece + 1)]

    async def in_turns(upload: bytes) -> AsyncIterator[bytes]:
        for turn, start in enumerate(range(0, len(upload), piece)):
            await rounds[turn].wait()
            yield upload[start : start + piece]

    posting = [
        asyncio.create_task(client.post("/images", data=in_turns(upload))) for upload in uploads
    ]
    # Each round's pieces are all held before the next is sent, so the bodies' pages
    # alternate in memory (until the first body is whole, and may be converted and gone).
    for turn, round_started in enumerate(rounds):
        round_started.set()
        if (turn + 1) * piece < min(len(upload) for upload in uploads):
            sent = (turn + 1) * piece * len(uploads)
            await until_metric(client, "asgilook_upload_bytes_in_memory", partial(eq, sent))
    for upload, response in zip(uploads, await asyncio.gather(*posting), strict=True):
        assert response.status == 201, await response.text()
        stored = await (await client.get((await response.json())["image"])).read()
        assert samples.decode(stored).tobytes() == samples.decode(upload).tobytes()
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0


async def test_a_body_stays_in_memory_until_its_worker_is_done(
    client: Client, storage: Path
) -> None:
    slow_png = samples.slow_png()
    posting = asyncio.create_task(client.post("/images", data=io.BytesIO(slow_png)))
    metrics = await until_metric(client, "asgilook_conversion_workers_busy", bool)
    assert value(metrics, "asgilook_upload_bytes_in_memory") == len(slow_png)
    assert not [path for path in stored_files(storage) if path.endswith(".upload")]
    assert (await posting).status == 201
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0


async def test_a_body_that_outgrows_the_memory_lets_go_of_it_while_it_still_arrives(
    make_client: ClientFactory, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(upload_memory_mb=1)
    upload = samples.megabyte_png()
    assert len(upload) > 1_200_000
    go_on = asyncio.Event()

    async def stalling_body() -> AsyncIterator[bytes]:
        yield upload[:1_100_000]  # more than the 1 MiB there is
        await go_on.wait()
        yield upload[1_100_000:]

    written: list[str] = []
    monkeypatch.setattr(Scratch, "stage", _recorded(Scratch.stage, written))
    posting = asyncio.create_task(client.post("/images", data=stalling_body()))
    await until(lambda: staged_bytes(storage) == 1_100_000)  # all that was sent so far
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0
    # The memory is free for the next upload meanwhile.
    small = samples.small_png()
    assert (await client.post("/images", data=small)).status == 201
    assert written == ["stage"]
    go_on.set()
    assert (await posting).status == 201


@pytest.mark.parametrize("memory_mb", [128, 0])
async def test_a_body_in_flight_is_held_in_memory_only_within_the_budget(
    make_client: ClientFactory, storage: Path, memory_mb: int
) -> None:
    client = await make_client(upload_memory_mb=memory_mb)
    upload = samples.encode(samples.photo((600, 400)), "PNG")
    go_on = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield upload[:50_000]
        await go_on.wait()
        yield upload[50_000:]

    posting = asyncio.create_task(client.post("/images", data=slow_body()))
    metrics = await until_metric(  # the server has taken in all that was sent
        client,
        "asgilook_upload_bytes_in_memory",
        lambda held: held + staged_bytes(storage) == 50_000,
    )
    held = value(metrics, "asgilook_upload_bytes_in_memory")
    spooled = [path for path in stored_files(storage) if path.startswith("staging/")]
    if memory_mb:
        assert held == 50_000
        assert spooled == []
    else:
        assert held == 0
        assert len(spooled) == 1
    go_on.set()
    response = await posting
    assert response.status == 201
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0
    assert [path.split("/")[0] for path in stored_files(storage)] == ["images"]
