"""CORS: pages on the origins named may call the API; off unless named."""

from __future__ import annotations

import base64
import signal
from pathlib import Path
from typing import Any

import pytest
import test_gallery
from aiohttp import web
from playwright.async_api import Browser
from playwright.async_api import Error as PlaywrightError
from pytest_aiohttp import AiohttpServer

import samples
from checks import Client, ClientFactory, assert_problem
from serving import start_server

PAGE = "https://photos.example.org"
browser = test_gallery.browser  # the fixture: Debian's Chromium, or a skip
UUID = "5cfd9fb6-259a-4c72-b8b0-5f4c35edcd3c"


@pytest.fixture
async def cors_client(make_client: ClientFactory) -> Client:
    return await make_client(cors_origins=(PAGE, "http://localhost:3000"))


def vary(response: Any) -> list[str]:
    return [name.strip().lower() for name in response.headers.get("Vary", "").split(",")]


def exposed(response: Any) -> set[str]:
    header = response.headers["Access-Control-Expose-Headers"]
    return {name.strip().lower() for name in header.split(",")}


async def test_a_preflight_from_an_allowed_origin_is_answered_204(cors_client: Client) -> None:
    response = await cors_client.options(
        "/images",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-request-id",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {"GET", "HEAD", "POST"}
    assert response.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-request-id"
    )
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "origin" in vary(response)
    assert await response.read() == b""


async def test_a_preflight_says_what_the_resource_allows_whatever_was_asked(
    cors_client: Client,
) -> None:
    response = await cors_client.options(
        f"/images/{UUID}",
        headers={
            "Origin": PAGE,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "X-Unheard-Of, If-Match",
        },
    )
    assert response.status == 204
    methods = {m.strip() for m in response.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {"GET", "HEAD", "DELETE"}  # no PUT: the browser refuses it
    assert response.headers["Access-Control-Allow-Headers"] == "if-match"
    # A route made with add_get, not a view, has its methods too.
    response = await cors_client.options(
        "/metrics", headers={"Origin": PAGE, "Access-Control-Request-Method": "GET"}
    )
    assert response.status == 204
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "HEAD"}


async def test_a_preflight_from_another_origin_is_refused(cors_client: Client) -> None:
    response = await cors_client.options(
        "/images",
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
    )
    await assert_problem(response, 403, "origin-not-allowed")
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers
    assert "origin" in vary(response)
    assert response.headers["X-Request-ID"]


async def test_a_preflight_for_no_resource_is_404(cors_client: Client) -> None:
    response = await cors_client.options(
        "/nothing-here", headers={"Origin": PAGE, "Access-Control-Request-Method": "GET"}
    )
    await assert_problem(response, 404)


async def test_answers_to_an_allowed_origin_say_so_and_keep_their_vary(
    cors_client: Client,
) -> None:
    response = await cors_client.get("/", headers={"Origin": PAGE, "Accept": "application/json"})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert vary(response) == ["accept", "origin"]
    assert {"etag", "location", "x-request-id", "retry-after", "content-range"} <= exposed(response)
    upload = await cors_client.post(
        "/images", data=samples.small_png(), headers={"Origin": "http://localhost:3000"}
    )
    assert upload.status == 201
    assert upload.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    image = await upload.json()
    # A stored image is sent as a file, after the handler; a 304 as well.
    response = await cors_client.get(image["image"], headers={"Origin": PAGE})
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert vary(response) == ["origin"]
    response = await cors_client.get(
        image["image"], headers={"Origin": PAGE, "If-None-Match": response.headers["ETag"]}
    )
    assert response.status == 304
    assert response.headers["Access-Control-Allow-Origin"] == PAGE


async def test_errors_carry_the_headers_so_a_page_can_read_them(cors_client: Client) -> None:
    response = await cors_client.get(f"/images/{UUID}", headers={"Origin": PAGE})
    await assert_problem(response, 404)
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    response = await cors_client.put("/images", headers={"Origin": PAGE})
    await assert_problem(response, 405)
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert "allow" in exposed(response)
    # An OPTIONS that is no preflight is what it always was.
    response = await cors_client.options("/images", headers={"Origin": PAGE})
    await assert_problem(response, 405)


async def test_other_origins_and_none_get_no_allowance_but_vary(cors_client: Client) -> None:
    for headers in ({"Origin": "https://elsewhere.example"}, {}):
        response = await cors_client.get("/images", headers=headers)
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Access-Control-Expose-Headers" not in response.headers
        assert "origin" in vary(response)


async def test_any_origin(make_client: ClientFactory) -> None:
    client = await make_client(cors_origins=("*",))
    response = await client.get("/images", headers={"Origin": "https://anywhere.example"})
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "origin" not in vary(response)  # the same answer for every origin
    # Asked without an origin too, as an <img> or a CDN would, and then kept for pages.
    response = await client.get("/images")
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "ETag" in response.headers["Access-Control-Expose-Headers"]
    response = await client.options(
        "/images",
        headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST"},
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_off_by_default(client: Client) -> None:
    response = await client.get("/images", headers={"Origin": PAGE})
    assert response.status == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control")]
    assert "Vary" not in response.headers
    response = await client.options(
        "/images", headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"}
    )
    await assert_problem(response, 405)
    assert "Access-Control-Allow-Origin" not in response.headers


# In a browser: a page on another origin calls the API of a real server.


@pytest.fixture
async def page_origin(aiohttp_server: AiohttpServer) -> str:
    """An origin of its own (another port on loopback) with an empty page."""

    async def empty(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>elsewhere</title>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/", empty)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


# The page uploads with a header that needs a preflight, reads the headers an API client
# reads, reads a problem, then deletes with its token.
_CALLS = """async (api) => {
    const png = Uint8Array.from(atob(%r), (c) => c.charCodeAt(0));
    const upload = await fetch(api + "/images", {
        method: "POST", body: png, headers: {"X-Request-ID": "from-the-page"}});
    const image = await upload.json();
    const missing = await fetch(api + "/images/%s", {headers: {"If-None-Match": '"x"'}});
    const gone = await fetch(api + "/images/" + image.id, {
        method: "DELETE", headers: {"Authorization": "Bearer " + image.delete_token}});
    return {
        status: upload.status,
        location: upload.headers.get("Location"),
        requestId: upload.headers.get("X-Request-ID"),
        missing: missing.status,
        problem: (await missing.json()).type,
        deleted: gone.status,
    };
}"""


async def test_a_page_on_an_allowed_origin_calls_the_api_in_a_browser(
    browser: Browser, page_origin: str, tmp_path: Path
) -> None:
    calls = _CALLS % (base64.b64encode(samples.small_png()).decode(), UUID)
    allowed = await start_server(tmp_path / "allowed", "--cors-origin", page_origin)
    closed = await start_server(tmp_path / "closed")
    page = await browser.new_page()
    try:
        await page.goto(page_origin)
        answers = await page.evaluate(calls, allowed.url)
        assert answers["status"] == 201
        assert answers["location"].startswith("/images/")
        assert answers["requestId"] == "from-the-page"
        assert answers["missing"] == 404
        assert answers["problem"] == "about:blank"
        assert answers["deleted"] == 204
        with pytest.raises(PlaywrightError, match="Failed to fetch"):
            await page.evaluate(calls, closed.url)
    finally:
        await page.close()
        for server in (allowed, closed):
            server.signal(signal.SIGTERM)
            assert await server.exit_code() == 0
