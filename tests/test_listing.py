"""Listing, paging and the single-image resource."""

from __future__ import annotations

import re
from typing import Any

import samples
from checks import Client, assert_problem, image_object


async def upload_many(client: Client, count: int) -> list[dict[str, Any]]:
    images = []
    for number in range(count):
        data = samples.encode(samples.two_tone((20 + number, 20)), "PNG")
        response = await client.post("/images", data=data)
        assert response.status == 201
        images.append(image_object(await response.json()))
    return images


def next_link(headers: Any) -> str | None:
    link = headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


async def test_empty_list(client: Client) -> None:
    response = await client.get("/images")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == []
    assert "Link" not in response.headers


async def test_list_is_oldest_first_with_image_objects(client: Client) -> None:
    uploaded = await upload_many(client, 3)
    response = await client.get("/images")
    assert await response.json() == uploaded
    assert "Link" not in response.headers


async def test_single_image_object(client: Client) -> None:
    (uploaded,) = await upload_many(client, 1)
    response = await client.get(f"/images/{uploaded['id']}")
    assert response.status == 200
    assert await response.json() == uploaded
    assert uploaded["size"] == [20, 20]


async def test_paging_follows_link_headers_to_the_end(client: Client) -> None:
    uploaded = await upload_many(client, 7)
    seen: list[dict[str, Any]] = []
    url: str | None = "/images?limit=3"
    pages = 0
    while url is not None:
        response = await client.get(url)
        assert response.status == 200
        page = await response.json()
        assert len(page) <= 3
        seen.extend(page)
        url = next_link(response.headers)
        pages += 1
    assert pages == 3
    assert seen == uploaded


async def test_link_names_limit_and_last_id(client: Client) -> None:
    uploaded = await upload_many(client, 3)
    response = await client.get("/images?limit=2")
    assert next_link(response.headers) == f"/images?limit=2&after={uploaded[1]['id']}"
    # A page that ends exactly at the last image has no next link.
    response = await client.get(f"/images?limit=1&after={uploaded[1]['id']}")
    assert await response.json() == [uploaded[2]]
    assert "Link" not in response.headers


async def test_newest_first_pages_follow_their_links_to_the_oldest(client: Client) -> None:
    uploaded = await upload_many(client, 5)
    response = await client.get("/images?limit=2&order=newest")
    assert await response.json() == uploaded[:2:-1]
    link = next_link(response.headers)
    assert link == f"/images?limit=2&after={uploaded[3]['id']}&order=newest"
    seen = list(reversed(uploaded[3:]))
    while link is not None:
        response = await client.get(link)
        seen += await response.json()
        link = next_link(response.headers)
    assert seen == uploaded[::-1]
    oldest = await client.get("/images?limit=2&order=oldest")
    assert await oldest.json() == uploaded[:2]


async def test_an_unknown_order_is_400(client: Client) -> None:
    response = await client.get("/images?order=random")
    body = await assert_problem(response, 400, "bad-order")
    assert "'oldest' or 'newest'" in body["detail"]


async def test_after_the_last_image_is_an_empty_page(client: Client) -> None:
    uploaded = await upload_many(client, 2)
    response = await client.get(f"/images?after={uploaded[-1]['id']}")
    assert response.status == 200
    assert await response.json() == []


async def test_default_limit_is_100_and_max_1000(client: Client) -> None:
    images = await upload_many(client, 101)
    response = await client.get("/images")
    assert len(await response.json()) == 100
    assert next_link(response.headers) == f"/images?limit=100&after={images[99]['id']}"
    response = await client.get("/images?limit=1000")
    assert len(await response.json()) == 101
    assert "Link" not in response.headers


async def test_head_matches_get_without_a_body(client: Client) -> None:
    (uploaded,) = await upload_many(client, 1)
    for path in ("/images", f"/images/{uploaded['id']}", uploaded["image"]):
        get = await client.get(path)
        head = await client.head(path)
        assert head.status == 200
        assert head.headers["Content-Type"] == get.headers["Content-Type"]
        assert head.headers["Content-Length"] == str(len(await get.read()))
        assert await head.read() == b""
