"""Who may write: the optional write token, and each image's own delete token.

Reads are public. With a write token configured, uploads need it; a deletion needs either
the write token or the delete token the image was created with. A wrong delete token is
refused the same way whether or not the image exists, so tokens can't be probed.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from .errors import Problem

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="asgilook-aiohttp"'}


def bearer_token(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_write_token(token: str | None, write_token: str | None) -> bool:
    if token is None or write_token is None:
        return False
    return hmac.compare_digest(token.encode(), write_token.encode())


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, _CHALLENGE)


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", detail)


def check_upload(request: web.Request, write_token: str | None) -> None:
    """Raise unless uploads are open or the request carries the write token."""
    if write_token is None:
        return
    token = bearer_token(request)
    if token is None:
        raise unauthorized("uploads need 'Authorization: Bearer <write token>'")
    if not is_write_token(token, write_token):
        raise forbidden("the bearer token is not this server's write token")
