"""The OpenAPI 3.1 document of the whole HTTP API, kept beside the code as openapi.json."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from aiohttp import web

from . import caching


@functools.cache
def document() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


async def handle(request: web.Request) -> web.Response:
    """The document, with an ETag and the 304 or 412 its preconditions call for."""
    return caching.json_response(request, document())
