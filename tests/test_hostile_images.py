"""Images made to cost a worker far more than their size, or to smuggle in what should not
be stored: each is refused cheaply with a problem, or stored clean."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import samples
from checks import Client, assert_nothing_stored, assert_problem, stored_files


async def _stored(client: Client, data: bytes) -> tuple[bytes, Image.Image]:
    response = await client.post("/images", data=data)
    assert response.status == 201, await response.text()
    stored = await (await client.get((await response.json())["image"])).read()
    return stored, samples.decode(stored)


@pytest.mark.parametrize("mode", ["RGB", "L"])
async def test_a_progressive_jpeg_with_over_100_scans_is_refused_before_decoding(
    client: Client, storage: Path, mode: str
) -> None:
    # Grey JPEGs are re-encoded, not kept as they are: the scans are counted for both.
    data = samples.progressive_jpeg_with_extra_scans(150, mode=mode)
    body = await assert_problem(await client.post("/images", data=data), 422, "too-complex")
    assert "scans" in body["detail"]
    assert_nothing_stored(storage)


async def test_the_scan_bomb_of_the_issue_is_refused_at_once(client: Client, storage: Path) -> None:
    # 7000x7000 declared, then 10,000 empty scans: it kept a worker busy for 30 s.
    data = samples.progressive_jpeg_with_extra_scans(10_000, size=(16, 16), mode="L")
    data = samples.with_frame_size(data, 7000, 7000)
    body = await assert_problem(await client.post("/images", data=data), 422, "too-complex")
    assert "scans" in body["detail"]
    assert_nothing_stored(storage)


async def test_a_progressive_jpeg_within_the_scan_limit_keeps_its_pixels(client: Client) -> None:
    data = samples.progressive_jpeg_with_extra_scans(80)
    _, stored = await _stored(client, data)
    assert stored.tobytes() == samples.decode(data).tobytes()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(samples.jpeg_claiming(7000, 7000), id="jpeg"),
        pytest.param(samples.jpeg_claiming(7000, 7000, mode="L"), id="grey-jpeg"),
        pytest.param(samples.encode(Image.new("1", (7000, 7000)), "PNG", optimize=True), id="png"),
        pytest.param(
            samples.encode(Image.new("RGB", (7000, 7000)), "WEBP", lossless=True), id="webp"
        ),
    ],
)
async def test_a_small_file_of_many_pixels_is_refused_before_decoding(
    client: Client, storage: Path, data: bytes
) -> None:
    assert len(data) < 40_000  # 49 megapixels, under the pixel limit
    body = await assert_problem(await client.post("/images", data=data), 422, "too-complex")
    assert "7000x7000 = 49,000,000 pixels" in body["detail"]
    assert_nothing_stored(storage)


async def test_an_icon_holding_a_larger_image_than_it_declares_is_refused(
    client: Client, storage: Path
) -> None:
    png = samples.encode(Image.new("1", (7000, 7000)), "PNG", optimize=True)
    data = samples.ico_holding(png)
    body = await assert_problem(await client.post("/images", data=data), 422, "too-complex")
    assert "larger picture than its header says" in body["detail"]
    assert_nothing_stored(storage)


async def test_a_large_flat_image_with_a_byte_for_every_1024_pixels_is_stored(
    client: Client,
) -> None:
    data = samples.encode(Image.new("RGB", (5000, 4000), (255, 255, 255)), "PNG")
    assert 5000 * 4000 / len(data) < 1024
    _, stored = await _stored(client, data)
    assert stored.size == (5000, 4000)


@pytest.mark.parametrize(
    "padding",
    [
        pytest.param(b"\xff\xfe\x00\x02" * 2000, id="empty-comments"),
        pytest.param(b"\xff" * 100_000, id="fill-bytes"),
        pytest.param(b"\x00" * 100_000, id="stray-bytes"),
    ],
)
async def test_a_jpeg_with_a_padded_header_is_refused_before_pillow_reads_it(
    client: Client, storage: Path, padding: bytes
) -> None:
    data = samples.jpeg_with_header_padding(padding)
    await assert_problem(await client.post("/images", data=data), 422, "too-complex")
    assert_nothing_stored(storage)


@pytest.mark.parametrize("size", [(0, 48), (64, 0)])
async def test_a_jpeg_of_0_pixels_is_corrupt_not_unknown(
    client: Client, storage: Path, size: tuple[int, int]
) -> None:
    data = samples.jpeg_claiming(*size)
    await assert_problem(await client.post("/images", data=data), 422, "corrupt-image")
    assert_nothing_stored(storage)


@pytest.mark.parametrize(
    "profile",
    [
        pytest.param(samples.lab_profile(), id="lab"),
        pytest.param(samples.broken_rgb_profile(), id="broken-rgb"),
        pytest.param(samples.srgb_profile()[:300], id="truncated"),
    ],
)
async def test_an_unusable_profile_on_an_upright_jpeg_is_dropped_and_its_pixels_kept(
    client: Client, storage: Path, profile: bytes
) -> None:
    data = samples.encode(samples.photo((320, 240)), "JPEG", quality=85, icc_profile=profile)
    stored_bytes, stored = await _stored(client, data)
    assert "icc_profile" not in stored.info
    assert b"ICC_PROFILE" not in stored_bytes
    assert stored.tobytes() == samples.decode(data).tobytes()
    # Still the upload's own compressed data, not a re-encoding.
    assert stored_bytes.endswith(data[data.rindex(b"\xff\xda") :])
    assert len(stored_files(storage)) == 1


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_an_unusable_rgb_profile_is_not_kept_when_reencoding(
    client: Client, fmt: str
) -> None:
    data = samples.encode(
        samples.two_tone(),
        fmt,
        icc_profile=samples.broken_rgb_profile(),
        exif=samples.exif_with_gps(6),
    )
    _, stored = await _stored(client, data)
    assert "icc_profile" not in stored.info
