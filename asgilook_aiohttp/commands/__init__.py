"""The operator's commands, run beside the server on the storage it serves: ``check``,
``backup``, ``restore`` and ``delete``.

Each reads the same settings as the server (flags, environment, ``--config``) and adds
arguments of its own. It reports on standard output, shows progress on standard error,
and exits 0 when all went well, 1 when it found or left problems, and 2 when it could
not run at all.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from ..config import Config


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    """One sentence, for ``--help``."""
    usage: str
    """Its own arguments, for ``--help``: ``"DEST"``."""
    arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the command's own arguments to the parser of the settings."""
    run: Callable[[Config, argparse.Namespace], Coroutine[object, object, int]]
    """Does the work; the exit status. Raises ``attached.CannotRun``."""
