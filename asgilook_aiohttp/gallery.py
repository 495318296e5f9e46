"""The web gallery: one page and its script and style, shipped in the package, at ``/``.

``GET /`` answers a browser (an ``Accept`` that names HTML ahead of JSON) with the page,
and any other client with a small JSON document of the API's links, so the root never
stands in an API client's way. Every answer here forbids anything from another origin,
inline script and style included, and carries an ETag of its bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from . import caching

_SECURITY = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
# Both answers at / differ by Accept: a cache must keep them apart.
_NEGOTIATED = {**_SECURITY, hdrs.VARY: "Accept"}
_LINKS = {"images": "/images", "openapi": "/openapi.json", "gallery": "/"}
_HTML = ("text/html", "application/xhtml+xml")
_JSON = ("application/json", "application/*", "*/*")


@dataclass(frozen=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> _Asset:
        body = resources.files(__package__).joinpath("gallery", name).read_bytes()
        return cls(body, content_type, hashlib.sha256(body).hexdigest()[:32])

    def response(self, request: web.Request, headers: dict[str, str]) -> web.Response:
        return caching.revalidated_response(
            request, self.body, self.etag, self.content_type, headers, charset="utf-8"
        )


def add_routes(app: web.Application) -> None:
    page = _Asset.load("index.html", "text/html")

    async def root(request: web.Request) -> web.Response:
        if prefers_html(request.headers.get(hdrs.ACCEPT, "")):
            return page.response(request, _NEGOTIATED)
        return caching.json_response(request, _LINKS, _NEGOTIATED)

    app.router.add_get("/", root, name="root")
    for name, content_type in (("gallery.js", "text/javascript"), ("gallery.css", "text/css")):
        app.router.add_get(f"/gallery/{name}", _static(_Asset.load(name, content_type)))


def _static(asset: _Asset) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return asset.response(request, _SECURITY)

    return handle


def prefers_html(accept: str) -> bool:
    """Whether ``accept`` names HTML itself, at least as high as anything JSON matches.

    Only a named HTML type counts, not ``*/*``: browsers name it, and a client that takes
    anything (curl, say) is better served by the JSON."""
    html = json = 0.0
    for item in accept.split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        quality = _quality(params)
        if media_type.lower() in _HTML:
            html = max(html, quality)
        elif media_type.lower() in _JSON:
            json = max(json, quality)
    return html > 0 and html >= json


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0
