"""The typed keys of the application's state, kept apart to avoid import cycles."""

from aiohttp import web

from .config import Config
from .store import Store

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
