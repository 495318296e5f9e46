"""The typed keys of the application's state, kept apart to avoid import cycles."""

from aiohttp import web

from .caching import Pace
from .config import Config
from .inflight import InFlight
from .metrics import Metrics
from .store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
METRICS = web.AppKey("metrics", Metrics)
SEND_PACE = web.AppKey("send_pace", Pace)
"""The slowest a client may take what it is sent."""
CLIENT = web.RequestKey("client", str)
"""The client's address as a trusted proxy names it, where it differs from the peer's."""
