"""Access control: every combination of write token, delete token, none and wrong."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

import samples
from checks import Client, ClientFactory, assert_problem, bearer, index_rows

WRITE_TOKEN = "write-token-for-tests"


@pytest.fixture
async def guarded(make_client: ClientFactory) -> Client:
    return await make_client(write_token=WRITE_TOKEN)


async def upload(client: Client, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.post("/images", data=samples.small_png(), headers=headers or {})
    assert response.status == 201
    image: dict[str, Any] = await response.json()
    return image


async def test_open_uploads_without_a_write_token(client: Client) -> None:
    image = await upload(client)
    assert len(image["delete_token"]) >= 32
    assert "delete_token" not in await (await client.get(f"/images/{image['id']}")).json()
    listed = await (await client.get("/images")).json()
    assert "delete_token" not in listed[0]


async def test_uploads_need_the_write_token_when_one_is_set(guarded: Client, storage: Path) -> None:
    response = await guarded.post("/images", data=samples.small_png())
    await assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    await assert_problem(
        await guarded.post("/images", data=samples.small_png(), headers=bearer("wrong")), 403
    )
    basic = {"Authorization": f"Basic {WRITE_TOKEN}"}
    await assert_problem(
        await guarded.post("/images", data=samples.small_png(), headers=basic), 401
    )
    assert index_rows(storage) == (0, 0)  # refused before any id was journaled
    await upload(guarded, bearer(WRITE_TOKEN))


@pytest.mark.parametrize("write_token", [None, WRITE_TOKEN])
async def test_delete_with_the_images_own_token(
    make_client: ClientFactory, write_token: str | None
) -> None:
    client = await make_client(write_token=write_token)
    uploader = bearer(WRITE_TOKEN) if write_token else None
    image, other = await upload(client, uploader), await upload(client, uploader)
    url = f"/images/{image['id']}"

    response = await client.delete(url)
    await assert_problem(response, 401, "unauthorized")
    assert "Bearer" in response.headers["WWW-Authenticate"]
    existing = await client.delete(url, headers=bearer("wrong"))
    refusal = await assert_problem(existing, 403, "forbidden")
    # Another image's token is just as wrong; and it says nothing of existence.
    await assert_problem(await client.delete(url, headers=bearer(other["delete_token"])), 403)
    missing = f"/images/{uuid.uuid4()}"
    absent = await client.delete(missing, headers=bearer("wrong"))
    assert await assert_problem(absent, 403) == refusal
    assert "WWW-Authenticate" not in existing.headers
    assert "WWW-Authenticate" not in absent.headers
    await assert_problem(await client.delete(missing, headers=bearer(image["delete_token"])), 403)
    assert (await client.get(url)).status == 200

    assert (await client.delete(url, headers=bearer(image["delete_token"]))).status == 204
    assert (await client.get(url)).status == 404
    assert (await client.get(f"/images/{other['id']}")).status == 200


async def test_the_write_token_deletes_any_image(guarded: Client) -> None:
    image = await upload(guarded, bearer(WRITE_TOKEN))
    url = f"/images/{image['id']}"
    assert (await guarded.delete(url, headers=bearer(WRITE_TOKEN))).status == 204
    await assert_problem(await guarded.delete(url, headers=bearer(WRITE_TOKEN)), 404)


async def test_without_a_write_token_configured_no_token_is_the_write_token(
    client: Client,
) -> None:
    image = await upload(client)
    for token in ("", "None", "null"):
        headers = {"Authorization": f"Bearer {token}"}
        response = await client.delete(f"/images/{image['id']}", headers=headers)
        assert response.status in (401, 403)


async def test_reads_stay_public(guarded: Client) -> None:
    image = await upload(guarded, bearer(WRITE_TOKEN))
    for url in ("/images", f"/images/{image['id']}", image["image"], *image["thumbnails"]):
        assert (await guarded.get(url)).status == 200


async def test_delete_tokens_are_stored_only_as_hashes(client: Client, storage: Path) -> None:
    image = await upload(client)
    index = (storage / "index.sqlite3").read_bytes()
    wal = storage / "index.sqlite3-wal"
    stored = index + (wal.read_bytes() if wal.exists() else b"")
    assert image["delete_token"].encode() not in stored
