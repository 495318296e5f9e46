"""The application factory: routes, middleware, and the Store's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .caching import Pace
from .config import Config
from .connections import close_if_body_unread, sent_at_pace
from .cors import Cors
from .errors import problem_middleware
from .gallery import add_routes as add_gallery
from .inflight import InFlight
from .keys import CONFIG, IN_FLIGHT, METRICS, SEND_PACE, STORE
from .logs import request_id_middleware
from .metrics import Metrics
from .openapi import handle as openapi_document
from .proxies import trusted_proxies
from .store import Store
from .views import Health, ImageCollection, ImageFile, ImageItem, Readiness, Thumbnail

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_SIDE = "[1-9][0-9]{0,5}"


async def _store(app: web.Application) -> AsyncIterator[None]:
    async with Store.open(app[CONFIG], app[METRICS]) as store:
        app[STORE] = store
        yield


def create_app(config: Config) -> web.Application:
    in_flight = InFlight()
    metrics = Metrics()
    pace = Pace(config.min_body_rate, config.body_rate_window)
    middlewares = [
        in_flight.middleware,
        sent_at_pace(pace),
        request_id_middleware,
        metrics.middleware,
        problem_middleware,
    ]
    # Each only when configured: no cost otherwise.
    if config.trusted_proxies:
        middlewares.insert(0, trusted_proxies(config.trusted_proxies))
    cors = Cors(config.cors_origins) if config.cors_origins else None
    if cors is not None:
        middlewares.append(cors.preflight)  # refusals become problems, with an id
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes)
    app[CONFIG] = config
    app[SEND_PACE] = pace
    app[IN_FLIGHT] = in_flight
    app[METRICS] = metrics
    app.on_response_prepare.append(metrics.on_response_prepare)
    app.on_response_prepare.append(close_if_body_unread)
    if cors is not None:
        app.on_response_prepare.append(cors.on_response_prepare)
    app.cleanup_ctx.append(_store)
    app.router.add_view("/images", ImageCollection, name="images")
    app.router.add_view(f"/images/{{image_id:{_UUID}}}.jpeg", ImageFile, name="image-file")
    app.router.add_view(f"/images/{{image_id:{_UUID}}}", ImageItem, name="image")
    app.router.add_view(
        f"/thumbnails/{{image_id:{_UUID}}}/{{width:{_SIDE}}}x{{height:{_SIDE}}}.jpeg",
        Thumbnail,
        name="thumbnail",
    )
    app.router.add_view("/healthz", Health, name="health")
    app.router.add_view("/readyz", Readiness, name="readiness")
    app.router.add_get("/metrics", metrics.handle, name="metrics")
    add_gallery(app)
    app.router.add_get("/openapi.json", openapi_document, name="openapi")
    return app
