"""The command line: ``asgilook-aiohttp`` or ``python -m asgilook_aiohttp``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .config import Config
from .server import serve


def main(argv: Sequence[str] | None = None) -> None:
    config = Config.from_sources(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
