"""``asgilook-aiohttp backup DEST`` and ``restore SRC``: to be written."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from . import Command


def _destination(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("destination", type=Path)


def _source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path)


async def _back_up(config: Config, args: argparse.Namespace) -> int:
    return 2


async def _restore(config: Config, args: argparse.Namespace) -> int:
    return 2


COMMANDS = (
    Command("backup", "copy the library while it serves", _destination, _back_up),
    Command("restore", "copy a backup into an empty storage", _source, _restore),
)
