"""The command line: ``asgilook-aiohttp [COMMAND]`` or ``python -m asgilook_aiohttp``.

With no command, or ``serve``, it runs the server; the operator's commands are in
``commands/``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from . import logs, malloc, supervisor
from .commands import Command, attached, backup, check, delete
from .config import SECRET_VARIABLES, Config, parse_command_line, settings_parser

COMMANDS = {command.name: command for command in (check.COMMAND, *backup.COMMANDS, delete.COMMAND)}


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and not argv[0].startswith("-") else None
    arguments = argv[1:] if name else argv
    command = COMMANDS.get(name or "serve")
    if command is None:
        parser = settings_parser(epilog=_COMMANDS_HELP)
        if name not in (None, "serve"):
            parser.error(f"there is no command {name!r}; {_COMMANDS_HELP}")
    else:
        parser = settings_parser(
            prog=f"asgilook-aiohttp {command.name}",
            description=f"{command.summary[0].upper()}{command.summary[1:]}.",
            usage=f"%(prog)s {command.usage} [SETTING ...]",
        )
        command.arguments(parser)
    flags, parser = parse_command_line(arguments, parser)
    config = Config.from_flags(flags, parser)
    # Read once; the worker processes that decode untrusted images need not see them.
    for secret in SECRET_VARIABLES:
        os.environ.pop(secret, None)
    logs.configure(config.log_format, config.log_level)
    if command is None:
        malloc.keep_freed_memory()
        raise SystemExit(supervisor.run(config))
    raise SystemExit(_run(command, config, flags))


def _run(command: Command, config: Config, flags: dict[str, object]) -> int:
    try:
        return asyncio.run(command.run(config, argparse.Namespace(**flags)))
    except (attached.CannotRun, OSError) as error:
        # OSError: what the system refused the command itself (a directory it may not
        # write in, a full disk), as opposed to the problems it reports and goes on.
        print(f"asgilook-aiohttp {command.name}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


_COMMANDS_HELP = (
    "commands, each with its own --help: serve: run the server (the default); "
    + "; ".join(f"{command.name}: {command.summary}" for command in COMMANDS.values())
)


if __name__ == "__main__":
    main()
