"""``asgilook-aiohttp check``: to be written."""

from __future__ import annotations

import argparse

from ..config import Config
from . import Command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repair", action="store_true")
    parser.add_argument("--json", action="store_true")


async def _run(config: Config, args: argparse.Namespace) -> int:
    return 2


COMMAND = Command(name="check", summary="verify the whole library", arguments=_arguments, run=_run)
