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


def pixels_if_small(data: bytes, most: int = 1_000_000) -> bytes | None:
    """The RGB pixels of an image of at most ``most`` pixels, or None for any other data."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > most:
                return None
            return image.convert("RGB").tobytes()
    except Exception:
        return None


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


def _header_segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG Pillow wrote, up to its first scan."""
    segments: list[tuple[int, int, int]] = []
    pos = 2
    while not segments or segments[-1][0] != 0xDA:
        end = pos + 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        segments.append((jpeg[pos + 1], pos, end))
        pos = end
    return segments


def with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming another size; its scans are left as they are."""
    data = bytearray(jpeg)
    for marker, start, _ in _header_segments(jpeg):
        if 0xC0 <= marker <= 0xC2:
            struct.pack_into(">HH", data, start + 5, height, width)
    return bytes(data)


def jpeg_claiming(width: int, height: int, mode: str = "RGB") -> bytes:
    """An 8x8 JPEG whose frame header claims another size."""
    return with_frame_size(encode(Image.new(mode, (8, 8), 128), "JPEG"), width, height)


def progressive_jpeg_with_extra_scans(
    extra: int, size: tuple[int, int] = (320, 240), mode: str = "RGB"
) -> bytes:
    """A progressive photo whose first scan's header is repeated ``extra`` times before its
    EOI, with no data: each is one more pass over the image for a decoder, and changes no
    pixel. Pillow writes 10 scans for colour, 6 for grey."""
    data = encode(photo(size).convert(mode), "JPEG", quality=80, progressive=True)
    _, start, end = _header_segments(data)[-1]
    return data[:-2] + data[start:end] * extra + data[-2:]


def jpeg_with_header_padding(padding: bytes) -> bytes:
    """The 64x48 two-tone JPEG with ``padding`` after its first segment (JFIF)."""
    data = encode(two_tone(), "JPEG")
    _, _, end = _header_segments(data)[0]
    return data[:end] + padding + data[end:]


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one icon is declared 16x16 but is the whole of ``png``."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def lab_profile() -> bytes:
    """A valid ICC profile, of the Lab colour space: it cannot describe RGB pixels."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()


def broken_rgb_profile() -> bytes:
    """The sRGB profile with its red colorant and tone curves overwritten: its header still
    reads as RGB, but no colour transform can be built from it."""
    profile = bytearray(srgb_profile())
    (tags,) = struct.unpack_from(">I", profile, 128)
    for index in range(tags):
        signature, offset, size = struct.unpack_from(">4sII", profile, 132 + 12 * index)
        if signature in (b"rXYZ", b"rTRC"):
            profile[offset : offset + size] = b"\xff" * size
    return bytes(profile)


@functools.cache
def fuzz_seeds() -> tuple[bytes, ...]:
    """Small images of every kind the JPEG walk and the decoders branch on: where fuzzing
    starts from."""
    image = photo((48, 32))
    return (
        encode(image, "JPEG", quality=80),
        encode(image, "JPEG", quality=80, progressive=True),
        encode(image.convert("L"), "JPEG", progressive=True),
        encode(image.convert("CMYK"), "JPEG"),
        encode(
            image,
            "JPEG",
            icc_profile=srgb_profile(),
            exif=exif_with_gps(6),
            restart_marker_blocks=1,
            **PRIVATE_METADATA,
        ),
        encode(image, "MPO", save_all=True, append_images=[image]),
        encode(image, "PNG", icc_profile=srgb_profile()),
        animated_gif(),
        encode(image, "WEBP", lossless=True),
        encode(image, "TIFF", compression="tiff_deflate"),
        encode(image, "BMP"),
        encode(image, "ICO"),
    )
