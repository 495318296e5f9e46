"""``asgilook-aiohttp delete ID… --reason TEXT``: take images down without their tokens.

The deletion is the server's own (record first, then the blobs, journaled between), so
from the moment it is committed every process and node answers 404 for the image, its
file and its thumbnails, and a restart cannot bring it back. Each one is logged, with
the reason, at WARNING: under systemd, run as ``systemd-cat asgilook-aiohttp delete …``
to keep it in the journal beside the server's lines.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import re
import urllib.parse

from ..config import Config
from ..storage.ports import Unavailable, holds, image_key
from . import Command
from .attached import Attached, attached, describe

_log = logging.getLogger("asgilook_aiohttp.moderation")


_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# An id, or the path of any URL of the image: its object, its file or a thumbnail.
_ID_OR_PATH = re.compile(
    rf"(?:.*/(?:images|thumbnails)/)?(?P<id>{_UUID})(?:\.jpeg|/[1-9][0-9]*x[1-9][0-9]*\.jpeg)?",
    re.IGNORECASE,
)


def _image_id(text: str) -> str:
    match = _ID_OR_PATH.fullmatch(urllib.parse.urlsplit(text.strip()).path)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an image id, nor the URL of an image or of one of its thumbnails"
        )
    return match["id"].lower()


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ids",
        nargs="+",
        metavar="ID",
        type=_image_id,
        help="an image's id, or any URL of it (/images/ID, /images/ID.jpeg, a thumbnail's)",
    )
    parser.add_argument(
        "--reason",
        default="",
        help="why, for the log: a report's reference, say (default: none given)",
    )


async def _run(config: Config, args: argparse.Namespace) -> int:
    reason = " ".join(args.reason.split()) or "none given"
    operator = getpass.getuser()
    problems = 0
    async with attached(config) as library:
        for image_id in dict.fromkeys(args.ids):
            done, said = await _delete(library, config, image_id, operator, reason)
            problems += not done
            print(f"{image_id}: {said}")
    return 1 if problems else 0


async def _delete(
    library: Attached, config: Config, image_id: str, operator: str, reason: str
) -> tuple[bool, str]:
    """Whether the image and its files are gone, and what to say of it."""
    journal = library.journal
    try:
        deleted = await library.index.delete(image_id, None, journal.owner, journal.lease)
    except Unavailable as error:
        return False, f"not deleted: {error}"
    if deleted is None:
        return False, f"no such image in {describe(config)}"
    await journal.undo([image_id])
    _log.warning("image %s deleted by the operator (%s); reason: %s", image_id, operator, reason)
    with contextlib.suppress(Unavailable):
        if not await holds(library.blobs, image_key(image_id)):
            return True, "deleted"
    return False, (
        "deleted from the index, so never served again; its files could not be removed "
        f"now, and the server removes them within {config.lease_seconds:g} seconds"
    )


COMMAND = Command(
    name="delete",
    summary="take images down without their delete tokens, with the server running",
    usage="ID [ID ...] [--reason TEXT]",
    arguments=_arguments,
    run=_run,
)
