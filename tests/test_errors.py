"""Every row of the error table: a problem+json answer, and nothing left behind."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import samples
from checks import Client, ClientFactory, assert_nothing_stored, assert_problem

MISSING_ID = "5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c"


@pytest.mark.parametrize(
    "path",
    [
        f"/images/{MISSING_ID}",
        f"/images/{MISSING_ID}.jpeg",
        f"/images/{MISSING_ID.upper()}.jpeg",
        f"/images/{MISSING_ID.replace('-', '')}.jpeg",
        f"/images/{MISSING_ID}.png",
        "/images/not-a-uuid.jpeg",
        "/images/",
        "/nowhere",
    ],
)
async def test_unknown_or_malformed_paths_are_404(client: Client, path: str) -> None:
    for method in ("GET", "HEAD"):
        response = await client.request(method, path)
        assert response.status == 404
    await assert_problem(await client.get(path), 404)


async def test_malformed_form_of_a_stored_id_is_404(client: Client) -> None:
    response = await client.post("/images", data=samples.small_png())
    image_id = (await response.json())["id"]
    await assert_problem(await client.get(f"/images/{image_id.upper()}.jpeg"), 404)
    await assert_problem(await client.get(f"/images/{{{image_id}}}"), 404)


async def test_unsupported_method_is_405_with_allow(client: Client) -> None:
    response = await client.put("/images", data=b"x")
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
    response = await client.delete(f"/images/{MISSING_ID}.jpeg")
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}
    response = await client.put(f"/images/{MISSING_ID}", data=b"x")
    await assert_problem(response, 405)
    assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "DELETE"}
    for path in (f"/thumbnails/{MISSING_ID}/64x48.jpeg", "/healthz", "/readyz"):
        response = await client.post(path, data=b"x")
        await assert_problem(response, 405)
        assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD"}


async def test_empty_body_is_400(client: Client, storage: Path) -> None:
    await assert_problem(await client.post("/images", data=b""), 400, "empty-upload")
    assert_nothing_stored(storage)


async def test_multipart_without_a_file_is_400(client: Client, storage: Path) -> None:
    response = await client.post(
        "/images", data=aiohttp.FormData({"title": "holiday"}, default_to_multipart=True)
    )
    await assert_problem(response, 400, "no-file-part")
    assert_nothing_stored(storage)
    form = aiohttp.FormData()
    form.add_field("title", "holiday")
    form.add_field("image", b"", filename="empty.png")
    await assert_problem(await client.post("/images", data=form), 400, "empty-upload")
    assert_nothing_stored(storage)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"--xyz\r\nno headers end here", {}),
        (b"--xyz\r\na header without a colon\r\n\r\ndata\r\n--xyz--\r\n", {}),
        (b"--xyz\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\ndata\r\n--xyz--\r\n", {}),
        (b"--other\r\n\r\n", {}),
    ],
)
async def test_unreadable_body_is_400(
    client: Client, storage: Path, body: bytes, headers: dict[str, str]
) -> None:
    content_type = "multipart/form-data; boundary=xyz"
    response = await client.post(
        "/images", data=body, headers={"Content-Type": content_type, **headers}
    )
    await assert_problem(response, 400, "malformed-body")
    assert_nothing_stored(storage)


async def test_form_with_too_many_parts_is_400(client: Client, storage: Path) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for number in range(40):
        form.add_field(f"field{number}", "x")
    form.add_field("image", samples.small_png(), filename="a.png")
    body = await assert_problem(await client.post("/images", data=form), 400, "malformed-body")
    assert "more than 32 parts" in body["detail"]
    assert_nothing_stored(storage)


async def test_unsupported_variant_of_a_format_is_415(client: Client, storage: Path) -> None:
    data = samples.dds_with_unknown_pixel_format()
    await assert_problem(await client.post("/images", data=data), 415, "not-an-image")
    assert_nothing_stored(storage)


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is text",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\x89PNG\r\n",
        bytes(range(256)) * 8,
    ],
)
async def test_not_an_image_is_415(client: Client, storage: Path, data: bytes) -> None:
    await assert_problem(await client.post("/images", data=data), 415, "not-an-image")
    assert_nothing_stored(storage)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
async def test_truncated_image_is_422(client: Client, storage: Path, fmt: str) -> None:
    data = samples.encode(samples.photo((200, 150)), fmt)
    response = await client.post("/images", data=data[: len(data) // 2])
    body = await assert_problem(response, 422, "corrupt-image")
    assert "truncated or corrupt" in body["detail"]
    assert_nothing_stored(storage)


async def test_body_over_the_limit_is_413(make_client: ClientFactory, storage: Path) -> None:
    client = await make_client(max_upload_bytes=10_000)
    data = samples.encode(samples.photo((200, 150)), "PNG")
    assert len(data) > 10_000
    body = await assert_problem(await client.post("/images", data=data), 413, "too-large")
    assert "10,000 bytes" in body["detail"]
    assert_nothing_stored(storage)


async def test_streamed_body_over_the_limit_is_refused_early(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(max_upload_bytes=1024 * 1024)
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"\0" * 65536
        for _ in range(2048):  # 128 MiB, far more than the limit
            sent += len(chunk)
            yield chunk
            await asyncio.sleep(0)

    # No Content-Length: the server has to count as the body arrives.
    try:
        response = await client.post("/images", data=endless())
    except aiohttp.ClientError:
        pass  # the server may close the connection before the client reads the answer
    else:
        await assert_problem(response, 413, "too-large")
    assert sent < 32 * 1024 * 1024
    assert_nothing_stored(storage)


async def test_too_many_pixels_is_413_before_decoding(client: Client, storage: Path) -> None:
    # 400 megapixels claimed in a header with a few bytes of data: decoding would report a
    # truncated file (422), so a 413 proves the limit was applied to the header.
    response = await client.post("/images", data=samples.png_header_claiming(20_000, 20_000))
    body = await assert_problem(response, 413, "too-many-pixels")
    assert "20000x20000" in body["detail"]
    assert_nothing_stored(storage)


async def test_pixel_limit_is_configurable(make_client: ClientFactory, storage: Path) -> None:
    client = await make_client(max_pixels=100 * 100)
    data = samples.encode(samples.two_tone((101, 100)), "PNG")
    body = await assert_problem(await client.post("/images", data=data), 413, "too-many-pixels")
    assert "10,000" in body["detail"]
    assert_nothing_stored(storage)
    ok = samples.encode(samples.two_tone((100, 100)), "PNG")
    assert (await client.post("/images", data=ok)).status == 201


async def test_paging_errors_are_400(client: Client) -> None:
    for query in ("limit=0", "limit=1001", "limit=ten", "limit=-1", "limit=", "limit=5.5"):
        await assert_problem(await client.get(f"/images?{query}"), 400, "bad-limit")
    for query in (f"after={MISSING_ID}", "after=nope", f"after={MISSING_ID.upper()}"):
        await assert_problem(await client.get(f"/images?{query}"), 400, "unknown-cursor")


async def test_multipart_over_the_limit_after_a_file_part_is_413(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(max_upload_bytes=200_000)
    form = aiohttp.FormData()
    form.add_field("first", samples.small_png(), filename="a.png")
    form.add_field("image", io.BytesIO(b"\0" * 300_000), filename="b.png")
    await assert_problem(await client.post("/images", data=form), 413, "too-large")
    assert_nothing_stored(storage)


async def test_nested_multipart_is_400(client: Client, storage: Path) -> None:
    inner = aiohttp.MultipartWriter("mixed")
    inner.append(samples.small_png())
    outer = aiohttp.MultipartWriter("form-data")
    outer.append(samples.small_png()).set_content_disposition(
        "form-data", name="photo", filename="a.png"
    )
    outer.append(inner)
    body = await assert_problem(await client.post("/images", data=outer), 400, "malformed-body")
    assert "nested" in body["detail"]
    assert_nothing_stored(storage)
