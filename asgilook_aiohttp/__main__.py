"""The command line: ``asgilook-aiohttp`` or ``python -m asgilook_aiohttp``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from . import logs, malloc
from .config import SECRET_VARIABLES, Config
from .server import serve


def main(argv: Sequence[str] | None = None) -> None:
    config = Config.from_sources(argv)
    # Read once; the worker processes that decode untrusted images need not see them.
    for name in SECRET_VARIABLES:
        os.environ.pop(name, None)
    logs.configure(config.log_format)
    malloc.keep_freed_memory()
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
