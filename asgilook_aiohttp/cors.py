"""CORS, for web pages on other origins that call the API (off unless origins are named).

Every answer to an allowed origin says so (``Access-Control-Allow-Origin``) and lets the
page read the headers this API's clients use; errors included, so that a page can read
why it was refused. The headers are added as each response is prepared, not by a
middleware, so that every response gets them: those that middleware further in send
themselves (at the client's pace) and files sent after the handler has returned alike.
An answer that depends on the ``Origin`` says so with ``Vary: Origin``.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an
allowed origin is answered 204 with what the resource allows, whatever was asked: the
browser compares, and says exactly which method or header was not allowed. From any other
origin it is refused, 403 problem+json, without the headers that would let it through.
No credentials are allowed: the API takes bearer tokens, not cookies.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .errors import Problem

ANY = "*"
# What this API's clients read, beyond what browsers show a page anyway.
_EXPOSED = (
    "Accept-Ranges, Allow, Content-Length, Content-Range, ETag, Link, Location, "
    "Retry-After, WWW-Authenticate, X-Request-ID"
)
# Request headers the API reads, beyond those a page may send without asking.
_ACCEPTED = frozenset(
    name.lower()
    for name in (
        hdrs.AUTHORIZATION,
        hdrs.CONTENT_TYPE,
        hdrs.IF_MATCH,
        hdrs.IF_NONE_MATCH,
        hdrs.IF_MODIFIED_SINCE,
        hdrs.IF_UNMODIFIED_SINCE,
        hdrs.IF_RANGE,
        hdrs.RANGE,
        "X-Request-ID",
    )
)
# An hour: a page's calls skip most preflights, and a changed --cors-origin reaches the
# browsers within the hour.
_MAX_AGE = "3600"


class Cors:
    """The policy for ``origins``: its ``preflight`` middleware goes after the one that
    makes problems of errors, and ``on_response_prepare`` is the app's signal."""

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = ANY in origins
        self._origins = frozenset(origins)

    def allowed(self, request: web.BaseRequest) -> str | None:
        """What ``Access-Control-Allow-Origin`` says to this request; None for a request
        from an origin that is not allowed, or from no origin where origins are named.
        With any origin allowed, every answer says so, asked or not: a cache that kept
        one asked without an origin (an ``<img>``'s, a CDN's) gives it to pages too."""
        if self._any:
            return ANY
        origin = request.headers.get(hdrs.ORIGIN)
        return origin if origin is not None and origin.lower() in self._origins else None

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if not self._any:
            _vary_on_origin(response)
        allowed = self.allowed(request)
        if allowed is not None:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = _EXPOSED

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method != hdrs.METH_OPTIONS
            or hdrs.ORIGIN not in request.headers
            or hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers
        ):
            return await handler(request)
        methods = _methods(request.match_info)
        if methods is None:  # nothing here, preflight or not: the usual 404
            return await handler(request)
        if self.allowed(request) is None:
            raise Problem(
                403,
                "origin-not-allowed",
                "web pages from this origin may not call this API; the server's "
                "--cors-origin setting names those that may",
            )
        asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(sorted(methods)),
            hdrs.ACCESS_CONTROL_MAX_AGE: _MAX_AGE,
        }
        if accepted := [name for name in _names(asked) if name in _ACCEPTED]:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(accepted)
        return web.Response(status=204, headers=headers)


def _methods(match_info: web.UrlMappingMatchInfo) -> set[str] | None:
    """The methods of the resource a request is for; None if there is none."""
    error = match_info.http_exception
    if isinstance(error, web.HTTPMethodNotAllowed):
        return set(error.allowed_methods)
    if error is not None:
        return None
    handler = match_info.handler
    if isinstance(handler, type) and issubclass(handler, web.View):
        return {method for method in hdrs.METH_ALL if hasattr(handler, method.lower())}
    return {match_info.route.method}


def _names(header: str) -> list[str]:
    return [name.strip().lower() for name in header.split(",") if name.strip()]


def _vary_on_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY)
    if vary is None:
        response.headers[hdrs.VARY] = hdrs.ORIGIN
    elif not {name.strip().lower() for name in vary.split(",")} & {"origin", "*"}:
        response.headers[hdrs.VARY] = f"{vary}, {hdrs.ORIGIN}"
