"""``asgilook-aiohttp delete ID… --reason TEXT``: take images down without their tokens.

The deletion is the server's own (record first, then the blobs, journaled between), so
from the moment it is committed every process and node answers 404 for the image, its
file and its thumbnails, and a restart cannot bring it back. Each one is logged, with
the reason, at WARNING: under systemd, run as ``systemd-cat asgilook-aiohttp delete …``
to keep it in the journal beside the server's lines.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import uuid

from ..config import Config
from ..storage.ports import BlobMissing, image_key
from . import Command
from .attached import attached, describe

_log = logging.getLogger("asgilook_aiohttp.moderation")


def _image_id(text: str) -> str:
    try:
        return str(uuid.UUID(text.removesuffix(".jpeg").rpartition("/")[2]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an image id (or the URL of an image)"
        ) from None


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ids",
        nargs="+",
        metavar="ID",
        type=_image_id,
        help="an image's id, or its URL (/images/ID or /images/ID.jpeg)",
    )
    parser.add_argument(
        "--reason",
        default="",
        help="why, for the log: a report's reference, say (default: none given)",
    )


async def _run(config: Config, args: argparse.Namespace) -> int:
    reason = " ".join(args.reason.split()) or "none given"
    operator = getpass.getuser()
    missing = left = 0
    async with attached(config) as library:
        for image_id in dict.fromkeys(args.ids):
            journal = library.journal
            deleted = await library.index.delete(image_id, None, journal.owner, journal.lease)
            if deleted is None:
                missing += 1
                print(f"{image_id}: no such image in {describe(config)}")
                continue
            await journal.undo([image_id])
            _log.warning(
                "image %s deleted by the operator (%s); reason: %s", image_id, operator, reason
            )
            try:
                await (await library.blobs.body(image_key(image_id), 0, 0)).close()
            except BlobMissing:
                print(f"{image_id}: deleted")
            else:
                left += 1
                print(
                    f"{image_id}: deleted from the index, so never served again; its files "
                    f"could not be removed now, and the server removes them within "
                    f"{config.lease_seconds:g} seconds"
                )
    return 1 if missing or left else 0


COMMAND = Command(
    name="delete",
    summary="take images down without their delete tokens, with the server running",
    usage="ID [ID ...] [--reason TEXT]",
    arguments=_arguments,
    run=_run,
)
