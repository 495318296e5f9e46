"""asgilook-aiohttp: a self-hosted image-sharing service on aiohttp."""

__version__ = "0.1.0"
