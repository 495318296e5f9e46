"""HTTP caching of originals, thumbnails and lists: validators, 304, 206, 416, 412."""

from __future__ import annotations

import hashlib
import shutil
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from asgilook_aiohttp.caching import http_date

import samples
from checks import Client, ClientFactory, assert_problem

IMMUTABLE = "public, max-age=31536000, immutable"


async def upload(client: Client) -> dict[str, Any]:
    data = samples.encode(samples.photo((640, 480)), "PNG")
    response = await client.post("/images", data=data)
    assert response.status == 201
    image: dict[str, Any] = await response.json()
    return image


@pytest.fixture
async def image(client: Client) -> dict[str, Any]:
    return await upload(client)


@pytest.fixture(params=["original", "thumbnail"])
def url(request: pytest.FixtureRequest, image: dict[str, Any]) -> str:
    return str(image["image"] if request.param == "original" else image["thumbnails"][0])


async def fetch(client: Client, url: str, **headers: str) -> tuple[Any, bytes]:
    response = await client.get(url, headers=headers)
    return response, await response.read()


async def test_validators_come_from_the_bytes(
    client: Client, image: dict[str, Any], url: str
) -> None:
    response, body = await fetch(client, url)
    assert response.status == 200
    assert response.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    assert response.headers["Last-Modified"] == image["modified"]
    assert response.headers["Cache-Control"] == IMMUTABLE
    assert response.headers["Accept-Ranges"] == "bytes"
    head = await client.head(url)
    assert head.status == 200
    assert head.headers["ETag"] == response.headers["ETag"]
    assert head.headers["Content-Length"] == str(len(body))
    assert await head.read() == b""


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_none_match_gives_304_with_the_headers(
    client: Client, url: str, method: str
) -> None:
    response, _ = await fetch(client, url)
    etag = response.headers["ETag"]
    for condition in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = await client.request(method, url, headers={"If-None-Match": condition})
        assert again.status == 304, condition
        assert again.headers["ETag"] == etag
        assert again.headers["Cache-Control"] == IMMUTABLE
        assert again.headers["Last-Modified"] == response.headers["Last-Modified"]
        assert await again.read() == b""
    other, _ = await fetch(client, url, **{"If-None-Match": '"other"'})
    assert other.status == 200


async def test_if_modified_since(client: Client, image: dict[str, Any], url: str) -> None:
    modified = parsedate_to_datetime(image["modified"]).timestamp()
    etag = (await client.get(url)).headers["ETag"]
    response, _ = await fetch(client, url, **{"If-Modified-Since": image["modified"]})
    assert response.status == 304
    assert response.headers["Cache-Control"] == IMMUTABLE
    assert response.headers["ETag"] == etag
    earlier = formatdate(modified - 1, usegmt=True)
    response, _ = await fetch(client, url, **{"If-Modified-Since": earlier})
    assert response.status == 200
    # If-None-Match wins over If-Modified-Since.
    headers = {"If-Modified-Since": image["modified"], "If-None-Match": '"other"'}
    response, _ = await fetch(client, url, **headers)
    assert response.status == 200


async def test_ranges(client: Client, url: str) -> None:
    _, whole = await fetch(client, url)
    size = len(whole)
    for header, expected, first, last in (
        ("bytes=0-99", whole[:100], 0, 99),
        ("bytes=100-", whole[100:], 100, size - 1),
        ("bytes=-50", whole[-50:], size - 50, size - 1),
        (f"bytes=10-{size + 100}", whole[10:], 10, size - 1),
    ):
        response, body = await fetch(client, url, Range=header)
        assert response.status == 206, header
        assert body == expected
        assert response.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
        assert response.headers["ETag"] == f'"{hashlib.sha256(whole).hexdigest()[:32]}"'


async def test_unsatisfiable_range_is_416(client: Client, url: str) -> None:
    _, whole = await fetch(client, url)
    for unsatisfiable in (f"bytes={len(whole)}-", "bytes=-0", "bytes=-000"):
        response = await client.get(url, headers={"Range": unsatisfiable})
        await assert_problem(response, 416, "range-not-satisfiable")
        assert response.headers["Content-Range"] == f"bytes */{len(whole)}"


async def test_unreadable_range_is_ignored(client: Client, url: str) -> None:
    _, whole = await fetch(client, url)
    for header in ("bytes=0-1,5-6", "lines=1-2", "bytes=9-3"):
        response, body = await fetch(client, url, Range=header)
        assert response.status == 200, header
        assert body == whole


async def test_if_range(client: Client, image: dict[str, Any], url: str) -> None:
    first, whole = await fetch(client, url)
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    # An original's upload date pins its bytes; a thumbnail made again (after an eviction,
    # on another server) could differ under the same date, so only its ETag counts.
    date_is_strong = url == image["image"]
    for condition, partial in (
        (etag, True),
        (modified, date_is_strong),
        ('"other"', False),
        (f"W/{etag}", False),
    ):
        response, body = await fetch(client, url, Range="bytes=0-9", **{"If-Range": condition})
        assert response.status == (206 if partial else 200), condition
        assert body == (whole[:10] if partial else whole)


async def test_failed_if_match_is_412(client: Client, url: str) -> None:
    response, _ = await fetch(client, url)
    assert (await fetch(client, url, **{"If-Match": response.headers["ETag"]}))[0].status == 200
    await assert_problem(await client.get(url, headers={"If-Match": '"other"'}), 412)
    await assert_problem(
        await client.get(url, headers={"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}),
        412,
    )


async def test_validators_survive_a_restart_and_a_copied_storage(
    make_client: ClientFactory, storage: Path, tmp_path: Path
) -> None:
    first = await make_client()
    image = await upload(first)
    urls = [image["image"], *image["thumbnails"]]
    seen = {}
    for url in urls:
        response, body = await fetch(first, url)
        seen[url] = (response.headers["ETag"], response.headers["Last-Modified"], body)
    await first.close()

    copy = tmp_path / "copy"
    shutil.copytree(storage, copy, copy_function=shutil.copy)  # new mtimes, same bytes
    for restarted in (await make_client(), await make_client(storage_path=copy)):
        for url, (etag, modified, body) in seen.items():
            response, again = await fetch(restarted, url, **{"If-None-Match": etag})
            assert response.status == 304
            response, again = await fetch(restarted, url)
            assert (response.headers["ETag"], response.headers["Last-Modified"]) == (etag, modified)
            assert again == body


async def test_a_full_page_gaining_a_next_link_changes_its_etag(client: Client) -> None:
    await upload(client)
    page = await client.get("/images?limit=1")
    assert "Link" not in page.headers
    await upload(client)
    again = await client.get("/images?limit=1", headers={"If-None-Match": page.headers["ETag"]})
    assert again.status == 200
    assert again.headers["ETag"] != page.headers["ETag"]
    assert "after=" in again.headers["Link"]
    unchanged = await client.get(
        "/images?limit=1", headers={"If-None-Match": again.headers["ETag"]}
    )
    assert unchanged.status == 304
    assert unchanged.headers["Link"] == again.headers["Link"]


async def test_list_is_revalidated_and_its_etag_follows_its_content(client: Client) -> None:
    empty = await client.get("/images")
    assert empty.headers["Cache-Control"] == "no-cache"
    etag = empty.headers["ETag"]
    again = await client.get("/images", headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    await upload(client)
    changed = await client.get("/images", headers={"If-None-Match": etag})
    assert changed.status == 200
    assert changed.headers["ETag"] != etag
    assert len(await changed.json()) == 1


def test_http_dates_are_imf_fixdate() -> None:
    for timestamp in (0, 951_782_400, 1_577_208_739, 1_709_164_800, 4_102_444_799):
        assert http_date(timestamp) == formatdate(timestamp, usegmt=True)
