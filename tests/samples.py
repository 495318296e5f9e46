"""Deterministic sample images, made in memory, in the formats users upload."""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from typing import Any

from PIL import Image, ImageCms

RED = (220, 20, 30)
BLUE = (20, 40, 210)
GPS_IFD = 0x8825
ORIENTATION = 0x0112
# What a photo may say about where it was taken, besides EXIF: Pillow's JPEG save options.
PRIVATE_METADATA = {
    "comment": b"taken at home",
    "xmp": b"<x:xmpmeta xmlns:x='adobe:ns:meta/'>secret place</x:xmpmeta>",
}


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def two_tone(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """Red on the left half, blue on the right: shows where a rotation went."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def photo(size: tuple[int, int] = (4000, 3000), seed: int = 0) -> Image.Image:
    """Photo-like content (smooth gradients and grain) that JPEG and PNG can't shrink away;
    the same for the same seed."""
    ramp = Image.linear_gradient("L").resize(size)
    noise = random.Random(seed).randbytes(size[0] * size[1])
    grain = Image.blend(ramp, Image.frombytes("L", size, noise), 0.3)
    return Image.merge("RGB", (ramp, grain, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


@functools.cache
def small_png() -> bytes:
    """The 64x48 two-tone image as a PNG: an upload that converts in a moment."""
    return encode(two_tone(), "PNG")


@functools.cache
def slow_png() -> bytes:
    """A 12-megapixel PNG: about half a second of work for a worker."""
    return encode(photo((4000, 3000)), "PNG", compress_level=1)


@functools.cache
def megabyte_png() -> bytes:
    """A 1200x900 PNG of about 1.25 MB: more than a 1 MiB upload memory holds."""
    return encode(photo((1200, 900)), "PNG")


def exif_with_gps(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    gps = exif.get_ifd(GPS_IFD)
    gps[1] = "N"
    gps[2] = (52.0, 13.0, 7.5)
    return exif


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in (RED, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def grey16_png(value: int, size: tuple[int, int] = (32, 24)) -> bytes:
    return encode(Image.new("I;16", size, value), "PNG")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its few bytes of pixel data could never fill."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def exif_with_bad_field(orientation: int) -> bytes:
    """EXIF whose XResolution is text where a fraction belongs, as broken cameras write."""

    def entry(tag: int, kind: int, count: int, value: bytes) -> bytes:
        return struct.pack(">HHI", tag, kind, count) + value

    entries = [
        entry(ORIENTATION, 3, 1, struct.pack(">HH", orientation, 0)),
        entry(0x011A, 2, 4, b"abc\0"),
    ]
    ifd = struct.pack(">H", len(entries)) + b"".join(entries) + b"\0\0\0\0"
    return b"Exif\0\0MM\0*" + struct.pack(">I", 8) + ifd


def dds_with_unknown_pixel_format() -> bytes:
    data = bytearray(encode(Image.new("RGBA", (4, 4)), "DDS"))
    struct.pack_into("<I", data, 80, 0)  # the pixel format's flags: none Pillow knows
    return bytes(data)


def quadrants(size: tuple[int, int] = (60, 40)) -> Image.Image:
    """Four colours, one per quadrant: every flip and turn gives a different picture."""
    width, height = size
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (width // 2, 0, width, height // 2))
    image.paste((20, 200, 40), (0, height // 2, width // 2, height))
    image.paste((240, 220, 20), (width // 2, height // 2, width, height))
    return image
