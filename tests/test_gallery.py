"""The web gallery at /: its headers and caching over plain HTTP, then the page itself in
Debian's Chromium, driven by Playwright against the real server.

Playwright cannot download its own browsers here: it drives /usr/bin/chromium. Where that
is missing the browser tests skip, saying so; with ``ASGILOOK_REQUIRE_ENGINES=1`` (as in
CI) they fail instead. A screenshot of the gallery is kept in the test's directory and,
when ``ASGILOOK_ARTEFACTS`` names a directory, there too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    FilePayload,
    Locator,
    Page,
    Request,
    async_playwright,
    expect,
)

from asgilook_aiohttp.gallery import prefers_html

import samples
from checks import Client, bearer
from engine_postgres import unavailable
from serving import Server, start_server

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying hosts this machine cannot
# reach; the sandbox needs namespaces a container may not give.
_CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
CSP = (
    "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
ASSETS = {
    "/gallery/gallery.js": "text/javascript",
    "/gallery/gallery.css": "text/css",
}
WAIT = 30_000  # ms: a first upload waits for a worker to start

expect.set_options(timeout=WAIT)


# Plain HTTP: what the root and the page's files answer.


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("application/xhtml+xml", True),
        ("text/html, application/json", True),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/*", False),
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0.5, */*", False),
        ("text/html;q=0", False),
        ("text/html;q=nonsense", False),
        ("image/png", False),
    ],
)
def test_the_page_goes_to_clients_that_name_html_first(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


@pytest.mark.parametrize("accept", ["application/json", "*/*", "image/png"])
async def test_the_root_answers_other_clients_with_the_apis_links(
    client: Client, accept: str
) -> None:
    response = await client.get("/", headers={"Accept": accept})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {
        "images": "/images",
        "openapi": "/openapi.json",
        "gallery": "/",
    }
    assert response.headers["Vary"] == "Accept"
    assert response.headers["Content-Security-Policy"] == CSP


async def test_the_root_answers_a_browser_with_the_page(client: Client) -> None:
    response = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Vary"] == "Accept"
    page = await response.text()
    # Nothing inline for the policy to refuse: every script and style is a file of its own.
    assert re.findall(r"<script[^>]*>", page) == [
        '<script type="module" src="/gallery/gallery.js">'
    ]
    assert "<style" not in page
    assert " style=" not in page
    assert not re.search(r"<[^>]*\son\w+=", page)
    for url in re.findall(r'(?:src|href)="(/[^"]*)"', page):
        assert (await client.get(url)).status == 200, url


async def test_the_root_has_no_other_method(client: Client) -> None:
    response = await client.post("/", data=b"x")
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) >= {"GET", "HEAD"}


@pytest.mark.parametrize(
    ("path", "accept", "content_type"),
    [
        ("/", BROWSER_ACCEPT, "text/html"),
        ("/", "application/json", "application/json"),
        *((path, "*/*", content_type) for path, content_type in ASSETS.items()),
    ],
)
async def test_the_pages_files_revalidate_with_their_etags(
    client: Client, path: str, accept: str, content_type: str
) -> None:
    response = await client.get(path, headers={"Accept": accept})
    assert response.status == 200
    assert response.content_type == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == CSP
    assert response.headers["Cache-Control"] == "no-cache"
    body = await response.read()
    etag = response.headers["ETag"]
    if content_type != "application/json":  # that one's tag covers its Vary header too
        assert etag == f'"{hashlib.sha256(body).hexdigest()[:32]}"'

    again = await client.get(path, headers={"Accept": accept, "If-None-Match": etag})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    assert await again.read() == b""
    changed = await client.get(path, headers={"Accept": accept, "If-None-Match": '"other"'})
    assert changed.status == 200
    head = await client.head(path, headers={"Accept": accept})
    assert head.status == 200
    assert head.headers["ETag"] == etag


async def test_the_two_answers_at_the_root_have_different_etags(client: Client) -> None:
    page = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
    links = await client.get("/", headers={"Accept": "application/json"})
    assert page.headers["ETag"] != links.headers["ETag"]
    crossed = await client.get(
        "/", headers={"Accept": "application/json", "If-None-Match": page.headers["ETag"]}
    )
    assert crossed.status == 200


# In a browser.


def _has_chromium() -> bool:
    return CHROMIUM.exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not _has_chromium():
        unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=_CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def server(storage: Path) -> Server:
    return await start_server(storage)


async def open_gallery(browser: Browser, server: Server) -> tuple[BrowserContext, Page, list[str]]:
    """A new browser profile on the gallery; the script and policy errors its page reports,
    as they come."""
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = await context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        # Answers of 4xx are logged as errors too: the tests check those themselves (the
        # browser's own /favicon.ico, a 401 before the token is given). A refusal by the
        # Content-Security-Policy is an error of its own.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", on_console)

    def on_error(error: Error) -> None:
        errors.append(str(error))

    page.on("pageerror", on_error)
    await page.goto(server.url)
    return context, page, errors


def picture(name: str, size: tuple[int, int], tint: int) -> FilePayload:
    """A PNG of smooth colour ramps, as a file the page is given."""
    ramp = Image.linear_gradient("L").resize(size)
    across = ramp.transpose(Image.Transpose.ROTATE_90).resize(size)
    image = Image.merge("RGB", (ramp, across, Image.new("L", size, tint)))
    return {"name": name, "mimeType": "image/png", "buffer": samples.encode(image, "PNG")}


async def listed(session: aiohttp.ClientSession, server: Server) -> list[dict[str, Any]]:
    async with session.get(f"{server.url}/images") as response:
        images: list[dict[str, Any]] = await response.json()
        return images


async def listed_ids(session: aiohttp.ClientSession, server: Server) -> list[str]:
    return [image["id"] for image in await listed(session, server)]


async def until_loaded(images: Locator) -> None:
    # Read as properties: a string for the page to evaluate is what its policy forbids.
    for image in await images.all():
        await expect(image).to_have_js_property("complete", True)
        assert await image.evaluate("image => image.naturalWidth") > 0


async def keep_screenshot(page: Page, tmp_path: Path) -> None:
    shot = tmp_path / "gallery.png"
    await page.screenshot(path=shot)
    if artefacts := os.environ.get("ASGILOOK_ARTEFACTS"):
        _copy_into(shot, Path(artefacts))


def _copy_into(file: Path, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(file, directory / file.name)


async def test_upload_two_view_one_copy_its_link_and_delete_it(
    browser: Browser, server: Server, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # One image uploaded elsewhere: this browser holds no token for it.
    async with session.post(f"{server.url}/images", data=samples.small_png()) as response:
        elsewhere = (await response.json())["id"]
    context, page, errors = await open_gallery(browser, server)
    await expect(page.locator("#grid img")).to_have_count(1)

    await page.set_input_files(
        "#files", [picture("dawn.png", (640, 480), 40), picture("dusk.png", (480, 640), 200)]
    )
    rows = page.locator("#uploads li")
    await expect(rows).to_have_count(2)
    for row in await rows.all():
        await expect(row.locator("output")).to_have_text("Uploaded")
        bar = row.locator("progress")
        assert await bar.evaluate("bar => bar.value === bar.max && bar.max > 1")
    tiles = page.locator("#grid img")
    await expect(tiles).to_have_count(3)
    await until_loaded(tiles)
    uploaded = {tuple(image["size"]): image["id"] for image in await listed(session, server)}
    del uploaded[64, 48]
    # Newest first; the picture of each upload is a thumbnail, the small one's the image.
    order = await tiles.evaluate_all("images => images.map(i => i.closest('li').id)")
    assert sorted(order[:2]) == sorted(f"image-{id}" for id in uploaded.values())
    assert order[2] == f"image-{elsewhere}"
    sources = await tiles.evaluate_all("images => images.map(i => i.getAttribute('src'))")
    assert [src.startswith("/thumbnails/") for src in sources] == [True, True, False]
    assert all(
        alt.startswith("Image of ") for alt in await tiles.evaluate_all("i => i.map(x => x.alt)")
    )
    await keep_screenshot(page, tmp_path)

    # The keyboard alone opens an image.
    target = uploaded[640, 480]
    await page.locator(f"#image-{target} a").focus()
    await page.keyboard.press("Enter")
    viewer = page.locator("#viewer")
    await expect(viewer).to_be_visible()
    await expect(page.locator("#large")).to_have_attribute(
        "src", f"/thumbnails/{target}/320x240.jpeg"
    )
    await expect(page.locator("#original")).to_have_attribute("href", f"/images/{target}.jpeg")
    await expect(page.locator("#original")).to_contain_text("640 \N{MULTIPLICATION SIGN} 480")
    await page.locator("#copy").click()
    await expect(page.locator("#viewer-status")).to_have_text("Link copied.")
    copied = await page.evaluate("navigator.clipboard.readText()")
    assert copied == f"{server.url}/images/{target}.jpeg"

    page.once("dialog", lambda dialog: dialog.accept())
    await page.locator("#delete").click()
    await expect(viewer).to_be_hidden()
    await expect(tiles).to_have_count(2)
    async with session.get(f"{server.url}/images/{target}") as response:
        assert response.status == 404
    await page.reload()
    await expect(tiles).to_have_count(2)
    await expect(page.locator(f"#image-{target}")).to_have_count(0)

    # No token for the image uploaded elsewhere: no delete button; Escape closes.
    await page.locator(f"#image-{elsewhere} a").click()
    await expect(viewer).to_be_visible()
    await expect(page.locator("#delete")).to_be_hidden()
    await page.keyboard.press("Escape")
    await expect(viewer).to_be_hidden()
    assert errors == []
    await context.close()


async def test_a_failed_upload_shows_the_servers_problem_beside_its_file(
    browser: Browser, server: Server, session: aiohttp.ClientSession
) -> None:
    text = b"these are words, not pixels\n"
    async with session.post(f"{server.url}/images", data=text) as response:
        problem: dict[str, Any] = await response.json(content_type=None)
    notes: FilePayload = {"name": "notes.txt", "mimeType": "text/plain", "buffer": text}
    context, page, _ = await open_gallery(browser, server)
    await page.set_input_files("#files", [notes, picture("fine.png", (200, 150), 90)])
    await expect(page.locator("#uploads li", has_text="fine.png").locator("output")).to_have_text(
        "Uploaded"
    )
    note = page.locator("#uploads li", has_text="notes.txt").locator("output")
    await expect(note).to_have_text(problem["detail"])
    await expect(note).to_have_class("error")
    await expect(page.locator("#grid img")).to_have_count(1)
    await context.close()


async def test_the_write_token_is_asked_for_once_and_kept(
    browser: Browser, storage: Path, session: aiohttp.ClientSession
) -> None:
    token = "s3cret-write-token-for-the-gallery-test"
    server = await start_server(storage, env={"ASGILOOK_WRITE_TOKEN": token})
    async with session.post(
        f"{server.url}/images", data=samples.small_png(), headers=bearer(token)
    ) as response:
        elsewhere = (await response.json())["id"]
    context, page, errors = await open_gallery(browser, server)
    await page.set_input_files(
        "#files", [picture("one.png", (300, 200), 10), picture("two.png", (200, 300), 250)]
    )
    ask = page.locator("#ask-token")
    await expect(ask).to_be_visible()
    await page.locator("#token").fill(token)
    await page.keyboard.press("Enter")
    await expect(page.locator("#uploads output")).to_have_text(["Uploaded", "Uploaded"])
    assert await page.evaluate("localStorage.getItem('asgilook.write-token')") == token

    await page.set_input_files("#files", [picture("three.png", (300, 200), 120)])
    await expect(page.locator("#uploads output")).to_have_text(["Uploaded"] * 3)
    await expect(page.locator("#grid img")).to_have_count(4)
    assert len(await listed_ids(session, server)) == 4

    # The write token deletes what this browser did not upload.
    await page.locator(f"#image-{elsewhere} a").click()
    page.once("dialog", lambda dialog: dialog.accept())
    await page.locator("#delete").click()
    await expect(page.locator("#grid img")).to_have_count(3)
    assert elsewhere not in await listed_ids(session, server)
    assert errors == []
    await context.close()


async def test_the_list_is_read_newest_first_a_page_at_a_time_as_it_scrolls(
    browser: Browser, server: Server, session: aiohttp.ClientSession
) -> None:
    async def upload() -> None:
        async with session.post(f"{server.url}/images", data=samples.small_png()) as response:
            assert response.status == 201

    for _ in range(55):
        await upload()
    ids = await listed_ids(session, server)
    context = await browser.new_context(viewport={"width": 900, "height": 640})
    page = await context.new_page()
    lists: list[str] = []

    def on_request(request: Request) -> None:
        if "/images?" in request.url:
            lists.append(request.url)

    page.on("request", on_request)
    await page.goto(server.url)
    tiles = page.locator("#grid li")
    await expect(tiles).to_have_count(48)
    # The first page only, until the end of the grid comes into view.
    await asyncio.sleep(0.5)
    assert lists == [f"{server.url}/images?order=newest&limit=48"]
    shown = await tiles.evaluate_all("items => items.map(i => i.id.slice(6))")
    assert shown == ids[::-1][:48]
    await page.locator("#more").scroll_into_view_if_needed()
    await expect(tiles).to_have_count(55)
    assert await tiles.evaluate_all("items => items.map(i => i.id.slice(6))") == ids[::-1]
    assert lists[1] == f"{server.url}/images?limit=48&after={ids[7]}&order=newest"
    assert len(lists) == 2
    lazy = await page.locator("#grid img").evaluate_all("i => i.map(x => x.loading)")
    assert set(lazy) == {"lazy"}
    await context.close()
