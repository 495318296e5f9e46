"""Errors as RFC 9457 problem details, for every 4xx and 5xx the service sends.

Views and the upload reader raise ``Problem``; the store lets the converter's and the
image code's own exceptions through, and the middleware gives each its status here,
so the HTTP meaning of a failure is decided in one place.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler

from . import imaging, space
from .converter import ConversionTimedOut, ConverterUnavailable, QueueFull, WorkerLost
from .metrics import PROBLEM
from .storage.ports import Unavailable
from .store import NotFound
from .thumbnails import MadeElsewhere

_log = logging.getLogger(__name__)

CONTENT_TYPE = "application/problem+json"
_TYPE_PREFIX = "tag:asgilook-aiohttp,2026:"


class Problem(Exception):
    """An error response: ``slug`` names the kind of problem, ``detail`` this occurrence."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {
            "type": f"{_TYPE_PREFIX}{self.slug}" if self.slug else "about:blank",
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        return web.Response(
            status=self.status,
            text=json.dumps(body),
            content_type=CONTENT_TYPE,
            headers=self.headers,
        )


def not_found(detail: str) -> Problem:
    return Problem(404, "", detail)


def bad_request(slug: str, detail: str) -> Problem:
    return Problem(400, slug, detail)


def payload_too_large(detail: str) -> Problem:
    return Problem(413, "too-large", detail)


def dependency_unavailable(error: Unavailable) -> Problem:
    # What failed, and where, is for operators: the log has it, not every client.
    _log.warning("%s", error)
    return Problem(
        503,
        "dependency-unavailable",
        f"{error.dependency} is unavailable: it failed or did not answer in time; "
        f"try again in {error.retry_after} s",
        {"Retry-After": str(error.retry_after)},
    )


_IMAGE_PROBLEMS: dict[type[imaging.ImageRejected], tuple[int, str]] = {
    imaging.NotAnImage: (415, "not-an-image"),
    imaging.CorruptImage: (422, "corrupt-image"),
    imaging.TooManyPixels: (413, "too-many-pixels"),
    imaging.TooMuchMemory: (413, "too-much-memory"),
    imaging.TooComplex: (422, "too-complex"),
}

_UNAVAILABLE: dict[type[ConverterUnavailable], str] = {
    QueueFull: "queue-full",
    ConversionTimedOut: "conversion-timeout",
    WorkerLost: "worker-lost",
    MadeElsewhere: "thumbnail-in-progress",
}

# aiohttp's own errors keep these headers (Allow on 405, for one); the body is ours.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate", "Location")


def _from_http_exception(error: web.HTTPException) -> Problem:
    headers = {name: error.headers[name] for name in _KEPT_HEADERS if name in error.headers}
    detail = {
        404: "there is no resource at this URL; image ids are lower-case UUIDs",
        405: f"this resource allows only {error.headers.get('Allow', 'other methods')}",
    }.get(error.status, error.text or HTTPStatus(error.status).description)
    return Problem(error.status, "", detail, headers)


def to_problem(error: Exception) -> Problem | None:
    """The problem an exception stands for, or None if it is a bug."""
    if isinstance(error, Problem):
        return error
    if isinstance(error, imaging.ImageRejected):
        status, slug = _IMAGE_PROBLEMS[type(error)]
        return Problem(status, slug, str(error))
    if isinstance(error, NotFound):
        return not_found(str(error))
    if isinstance(error, Unavailable):
        return dependency_unavailable(error)
    if isinstance(error, ConverterUnavailable):
        slug = _UNAVAILABLE[type(error)]
        return Problem(503, slug, str(error), {"Retry-After": str(error.retry_after)})
    if isinstance(error, web.HTTPException) and error.status >= 400:
        return _from_http_exception(error)
    if isinstance(error, ConnectionError):
        # The client went away mid-request; no one will read this, but it is no server bug.
        return Problem(400, "incomplete-request", "the connection closed before the request ended")
    if space.is_full(error):
        # Our own refusals say which room ran out; the system's errors only that it did.
        detail = (
            str(error)
            if isinstance(error, space.StorageFull)
            else "the server's storage is full; nothing was stored or changed, try again later"
        )
        return Problem(507, "storage-full", detail, {"Retry-After": "60"})
    return None


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as error:
        problem = to_problem(error)
        if problem is not None:
            request[PROBLEM] = problem.slug or str(problem.status)
            return problem.response()
        if isinstance(error, web.HTTPException):
            raise
        _log.exception("unhandled error serving %s %s", request.method, request.path)
        return Problem(
            500, "", "the server failed to handle this request; the error is logged"
        ).response()
