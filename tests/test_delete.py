"""Deleting an image takes it, its thumbnails and its files away for good."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

from asgilook_aiohttp.journal import SPARE_IDS
from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.sqlite import SqliteIndex

import samples
from checks import (
    Client,
    ClientFactory,
    assert_nothing_stored,
    assert_problem,
    bearer,
    converter_of,
    image_object,
    index_rows,
    stored_files,
    until,
    wait_until_busy,
)


async def upload(
    client: Client, size: tuple[int, int] = (640, 360), token: str | None = None
) -> dict[str, Any]:
    data = samples.encode(samples.photo(size), "JPEG", quality=90)
    headers = bearer(token) if token else {}
    response = await client.post("/images", data=io.BytesIO(data), headers=headers)
    assert response.status == 201
    image: dict[str, Any] = await response.json()
    return image


async def test_delete_removes_everything(client: Client, storage: Path) -> None:
    image = await upload(client)
    kept = await upload(client)
    for url in image["thumbnails"]:
        assert (await client.get(url)).status == 200
    assert len(stored_files(storage)) == 4

    response = await client.delete(f"/images/{image['id']}", headers=bearer(image["delete_token"]))
    assert response.status == 204
    assert await response.read() == b""

    for url in (f"/images/{image['id']}", image["image"], *image["thumbnails"]):
        await assert_problem(await client.get(url), 404)
    assert await (await client.get("/images")).json() == [image_object(kept)]
    assert stored_files(storage) == [f"images/{kept['id'][:2]}/{kept['id'][2:4]}/{kept['id']}.jpeg"]
    assert index_rows(storage) == (1, SPARE_IDS - 2)  # the deletion's journal entry is gone


async def test_deleting_twice_or_an_unknown_id(make_client: ClientFactory) -> None:
    client = await make_client(write_token="the-write-token")
    image = await upload(client, token="the-write-token")
    url = f"/images/{image['id']}"
    assert (await client.delete(url, headers=bearer(image["delete_token"]))).status == 204
    # The image's own token now matches nothing: refused like any wrong token.
    await assert_problem(await client.delete(url, headers=bearer(image["delete_token"])), 403)
    # The write token may know: the image is gone.
    await assert_problem(await client.delete(url, headers=bearer("the-write-token")), 404)
    missing = f"/images/{uuid.uuid4()}"
    await assert_problem(await client.delete(missing, headers=bearer("the-write-token")), 404)
    await assert_problem(await client.delete(image["image"]), 405)


async def test_a_thumbnail_being_made_does_not_bring_files_back(
    client: Client, storage: Path
) -> None:
    image = await upload(client, (4000, 3000))
    making = asyncio.create_task(client.get(image["thumbnails"][0]))
    await wait_until_busy(converter_of(client))
    deleting = await client.delete(f"/images/{image['id']}", headers=bearer(image["delete_token"]))
    assert deleting.status == 204

    response = await making
    await assert_problem(response, 404)
    await until(lambda: converter_of(client).busy == 0)
    assert_nothing_stored(storage)


async def test_an_interrupted_delete_is_finished_at_start_up(
    make_client: ClientFactory, storage: Path
) -> None:
    first = await make_client()
    image = await upload(first)
    assert (await first.get(image["thumbnails"][0])).status == 200
    await first.close()
    # A crash after the index forgot the image but before its files were removed, and
    # then the lease of the node that crashed ran out.
    index = SqliteIndex(storage / INDEX_FILE, storage / RESERVE_FILE)
    await index.open()
    assert await index.delete(image["id"], None, "a-node-that-crashed", 0) is not None
    await index.close()
    assert len(stored_files(storage)) == 2

    await make_client()
    assert_nothing_stored(storage)


async def test_delete_honours_preconditions(client: Client) -> None:
    image = await upload(client)
    url = f"/images/{image['id']}"
    token = bearer(image["delete_token"])
    current = (await client.get(url)).headers["ETag"]
    for condition in (
        {"If-Match": '"stale"'},
        {"If-None-Match": current},
        {"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
    ):
        await assert_problem(await client.delete(url, headers={**token, **condition}), 412)
    assert (await client.get(url)).status == 200
    await assert_problem(await client.get(url, headers={"If-Match": '"stale"'}), 412)
    # Preconditions never turn a refusal into a 412: a wrong token is still 403.
    wrong = {**bearer("wrong"), "If-None-Match": "*"}
    await assert_problem(await client.delete(url, headers=wrong), 403)
    assert (await client.delete(url, headers={**token, "If-Match": current})).status == 204


async def test_paging_survives_the_deletion_of_its_anchor(client: Client) -> None:
    images = [await upload(client) for _ in range(3)]
    first = await client.get("/images?limit=1")
    next_page = first.headers["Link"].split(">")[0][1:]
    anchor = images[0]
    await client.delete(f"/images/{anchor['id']}", headers=bearer(anchor["delete_token"]))
    following = await client.get(next_page)
    assert following.status == 200
    assert [image["id"] for image in await following.json()] == [images[1]["id"]]
