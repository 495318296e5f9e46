"""The OpenAPI document at /openapi.json: served, valid, true to the app's routes, and
to what a live server answers (Schemathesis)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import hdrs, web
from openapi_schema_validator import OAS31Validator
from openapi_schema_validator import validate as validate_instance
from openapi_spec_validator import validate

from asgilook_aiohttp.app import create_app
from asgilook_aiohttp.config import Config
from asgilook_aiohttp.openapi import document

import samples
from checks import Client
from serving import start_server

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def test_the_document_is_served_as_json(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == document()
    again = await client.get("/openapi.json", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(document())
    assert document()["openapi"].startswith("3.1.")


# The headers whose presence or value a client acts on, as the server sends them.
_DOCUMENTED_HEADERS = {
    "Accept-Ranges",
    "Cache-Control",
    "Content-Length",
    "Content-Range",
    "Content-Security-Policy",
    "ETag",
    "Last-Modified",
    "Link",
    "Location",
    "Retry-After",
    "Vary",
    "WWW-Authenticate",
    "X-Request-ID",
}


def _resolved(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """The component ``node`` refers to, or ``node`` itself."""
    if "$ref" not in node:
        return node
    kind, name = node["$ref"].split("/")[-2:]
    component: dict[str, Any] = spec["components"][kind][name]
    return component


def test_answers_name_their_headers_as_sent() -> None:
    """Each answer's headers are keyed by the header's own name, not by the name of the
    component describing it ("WWW-Authenticate-required" was never sent)."""
    spec = document()
    named = set()
    for item in spec["paths"].values():
        for method in _METHODS:
            for answer in item.get(method.lower(), {}).get("responses", {}).values():
                named |= set(_resolved(spec, answer).get("headers", {}))
    assert named == _DOCUMENTED_HEADERS


def _served(app: web.Application) -> dict[str, set[str]]:
    """Each path the app serves, spelled as OpenAPI does, with the methods it answers."""
    served: dict[str, set[str]] = {}
    for resource in app.router.resources():
        # aiohttp's "{image_id:regex}" is OpenAPI's "{image_id}"; canonical drops the regex.
        path = resource.canonical
        for route in resource:
            if route.method == hdrs.METH_ANY:
                view = route.handler
                methods = {m for m in _METHODS if hasattr(view, m.lower())}
            else:
                methods = {route.method}
            served.setdefault(path, set()).update(methods)
    return served


def test_the_document_describes_every_route_the_app_serves(config: Config) -> None:
    documented = {
        path: {method.upper() for method in item if method.upper() in _METHODS}
        for path, item in document()["paths"].items()
    }
    assert documented == _served(create_app(config))


async def test_a_created_image_matches_its_schema(client: Client) -> None:
    # Schemathesis sends no image that converts: this is the 201 it cannot reach.
    response = await client.post("/images", data=samples.encode(samples.photo((640, 360)), "PNG"))
    assert response.status == 201
    body = await response.json()
    assert body["thumbnails"]
    spec = document()
    created = spec["paths"]["/images"]["post"]["responses"]["201"]
    schema = {**created["content"]["application/json"]["schema"], **spec}
    validate_instance(body, schema, cls=OAS31Validator)
    assert response.headers["Location"] == body["image"]


async def test_schemathesis_finds_nothing_against_a_live_server(
    storage: Path, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Every operation, with generated and broken input: no 5xx, every answer (status,
    content type, headers, body) as the document says, every error problem+json."""
    server = await start_server(storage, "--http-processes", "1", stderr=asyncio.subprocess.DEVNULL)
    # An image with thumbnails, so that the image routes are reached beyond their 404s.
    photo = samples.encode(samples.photo((640, 360)), "PNG")
    async with session.post(f"{server.url}/images", data=photo) as response:
        assert response.status == 201
        image: dict[str, Any] = await response.json()
    width, height = image["size"][0] // 2, image["size"][1] // 2
    settings = tmp_path / "schemathesis.toml"
    settings.write_text(
        f"""
[dictionaries.ids]
values = ["{image["id"]}"]
[dictionaries.widths]
values = [{width}]
[dictionaries.heights]
values = [{height}]
[parameters]
"path.image_id" = {{ dictionary = "ids", probability = 0.5 }}
"path.width" = {{ dictionary = "widths", probability = 0.7 }}
"path.height" = {{ dictionary = "heights", probability = 0.7 }}
"""
    )
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(settings), "--no-color"),
        *("run", f"{server.url}/openapi.json", "--checks", "all"),
        # Schema-valid is not enough to succeed here: generated bytes are seldom an image,
        # a well-formed cursor need not name a stored image, and a precondition may fail.
        *("--exclude-checks", "positive_data_acceptance"),
        *("--max-examples", "20", "--seed", "15", "--generation-database", "none"),
        # One worker: with two threads, Hypothesis parsing source to describe a strategy
        # met CPython 3.11.7's spurious "AST constructor recursion depth mismatch"
        # (python/cpython#106905) and Schemathesis reported an error.
        *("--workers", "1", "--request-timeout", "10"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(120):
        output, _ = await process.communicate()
    report = output.decode()
    assert process.returncode == 0, report
    assert time.monotonic() - started < 60, report
