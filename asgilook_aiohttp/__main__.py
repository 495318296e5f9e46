"""The command line: ``asgilook-aiohttp`` or ``python -m asgilook_aiohttp``."""

from __future__ import annotations

import os
from collections.abc import Sequence

from . import logs, malloc, supervisor
from .config import SECRET_VARIABLES, Config


def main(argv: Sequence[str] | None = None) -> None:
    config = Config.from_sources(argv)
    # Read once; the worker processes that decode untrusted images need not see them.
    for name in SECRET_VARIABLES:
        os.environ.pop(name, None)
    logs.configure(config.log_format)
    malloc.keep_freed_memory()
    raise SystemExit(supervisor.run(config))


if __name__ == "__main__":
    main()
