"""Pillow work that runs inside the worker processes: plain, picklable functions.

Nothing here knows about asyncio or HTTP. Failures are raised as ``ImageRejected``
subclasses, which carry a message meant for the person who sent the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import select
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageCms, UnidentifiedImageError
from PIL import _imaging as pillow_core

from . import malloc
from .arena import Arena, InArena
from .jpeg import Jpeg, is_jpeg
from .storage.ports import Destination

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the picture upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255)
_SRGB = ImageCms.createProfile("sRGB")
# Decoding takes time in proportion to pixels, whatever the size of the file. Any image of
# up to _FREE_PIXELS is decoded; a larger one only if its file has a byte for every
# _PIXELS_PER_BYTE pixels, which leaves out nothing but near-empty images: decompression
# bombs, made to keep a worker busy or its memory full for the cost of a few bytes.
_FREE_PIXELS = 16_000_000
_PIXELS_PER_BYTE = 1024
# A progressive JPEG is decoded by one pass over the image for each scan; encoders write
# few, and libtiff refuses JPEG data with more than this by default.
MAX_JPEG_SCANS = 100
# Pillow reads a JPEG's headers in Python, one segment, and one byte between segments, at
# a time: a file of nothing but empty segments or stray bytes would keep it busy.
MAX_JPEG_SEGMENTS = 1000
_MAX_JPEG_STRAY_BYTES = 64 * 1024
# ICO decodes its largest icon while opening, at whatever size the icon's own header says.
_DECODED_WHILE_OPENING = ["ICO"]
# Of Pillow's 16 MiB blocks of image memory.
_KEPT_IMAGE_BLOCKS = 4


class _Worker:
    """What a worker process keeps from its start-up for its jobs."""

    arena: Arena | None = None


class ImageRejected(Exception):
    """The upload cannot be stored; the message says why."""


class NotAnImage(ImageRejected):
    pass


class CorruptImage(ImageRejected):
    pass


class TooManyPixels(ImageRejected):
    pass


class TooMuchMemory(ImageRejected):
    pass


class TooComplex(ImageRejected):
    """Decoding would cost far more than an image of this size ever needs."""


class Converted(NamedTuple):
    width: int
    height: int
    nbytes: int
    sha256: str
    handed_back: bytes | None = None
    """The JPEG, where its destination hands it back for the server to store."""


def init_worker(memory_limit_bytes: int, server_pid: int, arena: Arena | None = None) -> None:
    """Set up a worker process: make it die with the server, cap its memory so one
    hostile image can't exhaust the host, and keep the arena that uploads arrive in."""
    _Worker.arena = arena
    _die_with(server_pid)
    # The arena is mapped whole into the worker's address space, beside what it may use.
    address_space = memory_limit_bytes + (arena.size_bytes if arena else 0)
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    # The pixel limit is checked against the header, with a message that gives the size;
    # Pillow's own check, with its fixed limit, would get in first.
    Image.MAX_IMAGE_PIXELS = None
    # Import every format plugin now rather than during the worker's first job.
    Image.init()
    # Keep freed image memory for the next job instead of handing it back to the kernel
    # and faulting fresh pages in again: 2 MP conversions took 40 ms of CPU in place of
    # 50-54 ms in the server's workers (bench/benchmark.py), for at most 64 MiB kept.
    pillow_core.set_blocks_max(_KEPT_IMAGE_BLOCKS)  # what PILLOW_BLOCKS_MAX would set
    malloc.keep_freed_memory()


def _die_with(server_pid: int) -> None:
    """Be killed as soon as the server exits. Its forkserver outlives it (each worker
    keeps the forkserver's liveness pipe open), and an orphaned worker could otherwise
    move a file into images/ after the next start-up's sweep, where no index row or
    journal entry names it."""
    try:
        server = os.pidfd_open(server_pid)
    except ProcessLookupError:
        # Gone before this worker started: nothing else would end it, for it holds its
        # own job queue open and would wait on it for good.
        os.kill(os.getpid(), signal.SIGKILL)
    except OSError:  # Linux before 5.3: the service manager's kill must do
        return

    def watch() -> None:
        select.select([server], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-server", daemon=True).start()


def convert_upload(
    upload: InArena | Path, destination: Destination, max_pixels: int, quality: int
) -> Converted:
    """Turn an upload, in the arena or in a file (removed once read), into the JPEG put at
    ``destination``."""
    if isinstance(upload, InArena):
        assert _Worker.arena is not None, "the worker was started without the arena"
        data = _Worker.arena.read(upload)
    else:
        data = upload.read_bytes()
        upload.unlink()
    return convert(data, destination, max_pixels, quality)


def convert(data: bytes, destination: Destination, max_pixels: int, quality: int) -> Converted:
    """Turn an image's bytes into the JPEG put at ``destination``."""
    try:
        jpeg, size = _to_jpeg(data, max_pixels, quality)
    except MemoryError:
        raise TooMuchMemory(
            "converting this image needs more memory than a worker may use; send a smaller image"
        ) from None
    return _put(jpeg, size, destination)


def _put(jpeg: bytes, size: tuple[int, int], destination: Destination) -> Converted:
    handed_back = destination.put(jpeg)
    return Converted(size[0], size[1], len(jpeg), hashlib.sha256(jpeg).hexdigest(), handed_back)


def make_thumbnail(
    source: str | bytes, destination: Destination, width: int, height: int, quality: int
) -> Converted:
    """Scale a stored JPEG, read from the path or the bytes ``source``, to exactly
    ``width`` x ``height``, put at ``destination``."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        # Let the JPEG decoder skip detail the thumbnail can't show: it decodes at 1/2,
        # 1/4 or 1/8 scale straight from the DCT data, still at least the target size.
        image.draft("RGB", (width, height))
        icc_profile = image.info.get("icc_profile")
        thumbnail = image.resize((width, height), Image.Resampling.LANCZOS)
    output = io.BytesIO()
    thumbnail.save(output, "JPEG", quality=quality, icc_profile=icc_profile)
    return _put(output.getvalue(), thumbnail.size, destination)


def _to_jpeg(data: bytes, max_pixels: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    layout = _jpeg_layout(data) if is_jpeg(data) else None
    budget = min(max_pixels, max(_FREE_PIXELS, len(data) * _PIXELS_PER_BYTE))
    image = _open(data, max_pixels, budget)
    # Pillow's decoders fail in many ways on hostile data (OSError, SyntaxError, ValueError,
    # TypeError, struct.error, zlib.error, ...); each means the image can't be decoded.
    try:
        # Frames, tiles and icons that turn out larger than the header said stop here.
        with _pillow_pixel_limit(budget):
            orientation = _orientation(image)
            if orientation == 1 and layout and _is_colour_jpeg(image):
                # An unusable profile is dropped rather than stored for viewers to trip on.
                keep_icc = _is_usable_rgb(_parsed(image.info.get("icc_profile")))
                if stripped := layout.strip_metadata(keep_icc=keep_icc):
                    size = image.size
                    # Kept as it is, it need only prove that it decodes: every byte of it is
                    # still entropy-decoded at 1/8 scale, without the full-size inverse DCT.
                    image.draft("RGB", (size[0] // 8 or 1, size[1] // 8 or 1))
                    image.load()
                    return stripped, size
            image.load()
        if orientation in _UPRIGHT:
            image = image.transpose(_UPRIGHT[orientation])
        rgb, icc_profile = _to_rgb(image)
        rgb.info = {}  # Pillow would otherwise copy comments from the source into the JPEG
        output = io.BytesIO()
        rgb.save(output, "JPEG", quality=quality, icc_profile=icc_profile)
    except MemoryError:
        raise
    except Image.DecompressionBombError as error:
        raise _too_complex_for_its_size(
            f"holds a larger picture than its header says ({error})", len(data)
        ) from None
    except Exception as error:
        raise CorruptImage(
            f"the {image.format} image is truncated or corrupt and cannot be decoded ({error})"
        ) from None
    return output.getvalue(), rgb.size


def _jpeg_layout(data: bytes) -> Jpeg:
    """The JPEG's segments, once they are known to cost little to decode."""
    layout = Jpeg(data, MAX_JPEG_SEGMENTS, MAX_JPEG_SCANS)
    if layout.scans > MAX_JPEG_SCANS:
        raise TooComplex(
            f"the JPEG has more than {MAX_JPEG_SCANS} scans, each one more pass over the "
            "whole image; encoders write about 10"
        )
    if layout.too_long:
        raise TooComplex(
            f"the JPEG has more than {MAX_JPEG_SEGMENTS:,} marker segments; "
            "no encoder writes that many"
        )
    if (stray := layout.stray_bytes_in_headers) > _MAX_JPEG_STRAY_BYTES:
        raise TooComplex(
            f"the JPEG has {stray:,} bytes outside any segment before its first scan; "
            f"at most {_MAX_JPEG_STRAY_BYTES:,} are accepted"
        )
    return layout


def _open(data: bytes, max_pixels: int, budget: int) -> Image.Image:
    try:
        image = _identify(data, budget)
    except Image.DecompressionBombError as error:
        raise _too_complex_for_its_size(
            f"holds a larger picture than its header says ({error})", len(data)
        ) from None
    except UnidentifiedImageError:
        if is_jpeg(data):
            raise CorruptImage(
                "the JPEG image is corrupt: its headers cannot be read "
                "(such as a frame of 0 pixels, or no frame at all)"
            ) from None
        raise NotAnImage(
            "the body is not an image in any format this server can read "
            "(JPEG, PNG, GIF, WebP, TIFF, BMP and others are accepted)"
        ) from None
    except NotImplementedError as error:
        raise NotAnImage(f"this variant of the image format is not supported ({error})") from None
    except MemoryError:
        raise
    except Exception as error:
        raise CorruptImage(
            f"the image is truncated or corrupt and cannot be decoded ({error})"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(image.size, max_pixels)
    if width * height > budget:
        raise _too_complex_for_its_size(f"has {_pixels(image.size)}", len(data))
    if width == 0 or height == 0:
        raise CorruptImage("the image has no pixels (its width or height is 0)")
    return image


def _identify(data: bytes, budget: int) -> Image.Image:
    """Open the image, reading no more than its header where the format allows."""
    Image.init()
    try:
        # Pillow's own pixel check would get in before the header check, which names the size.
        with _pillow_pixel_limit(None):
            return Image.open(
                io.BytesIO(data),
                formats=[name for name in Image.ID if name not in _DECODED_WHILE_OPENING],
            )
    except UnidentifiedImageError:
        with _pillow_pixel_limit(budget):
            return Image.open(io.BytesIO(data), formats=_DECODED_WHILE_OPENING)


@contextlib.contextmanager
def _pillow_pixel_limit(pixels: int | None) -> Iterator[None]:
    """Have Pillow refuse any image, frame or tile of more than ``pixels`` as it reads it."""
    saved = Image.MAX_IMAGE_PIXELS
    # Pillow refuses images of over twice its limit, and warns of those over it.
    Image.MAX_IMAGE_PIXELS = None if pixels is None else pixels // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_many_pixels(size: tuple[int, int], max_pixels: int) -> TooManyPixels:
    return TooManyPixels(
        f"the image has {_pixels(size)}; this server accepts at most {max_pixels:,}"
    )


def _too_complex_for_its_size(found: str, nbytes: int) -> TooComplex:
    return TooComplex(
        f"the image {found} in only {nbytes:,} bytes; beyond {_FREE_PIXELS:,} pixels this "
        f"server accepts only images with a byte of file for every {_PIXELS_PER_BYTE:,} "
        "pixels, as anything emptier is a decompression bomb rather than a picture"
    )


def _pixels(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"


def _orientation(image: Image.Image) -> int:
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: it is dropped anyway, so show the pixels as they are
        return 1
    return orientation if isinstance(orientation, int) else 1


def _is_colour_jpeg(image: Image.Image) -> bool:
    return image.format in ("JPEG", "MPO") and image.mode == "RGB"


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bytes | None]:
    """Opaque RGB pixels, and the ICC profile that still describes them, if any."""
    icc_profile = image.info.get("icc_profile") or None
    profile = _parsed(icc_profile)
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8_bit_grey(image)
    if profile and _colour_space(profile) in ("CMYK", "GRAY") and image.mode in ("CMYK", "L"):
        try:
            converted = ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
        except ImageCms.PyCMSError:
            pass
        else:
            assert converted is not None  # profileToProfile returns None only in place
            return converted, None
    kept_profile = icc_profile if _is_usable_rgb(profile) else None
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, kept_profile
    return image.convert("RGB"), kept_profile


def _to_8_bit_grey(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit and floating-point grey to 0-255 rather than clipping it."""
    if image.mode.startswith("I;16"):
        return image.convert("I").point(lambda value: value * (255 / 65535)).convert("L")
    # 32-bit integers and floats say nothing of their range: judge it from the pixels.
    _, high = image.getextrema()
    assert isinstance(high, (int, float))
    if image.mode == "F" and high <= 1.0:
        scale = 255.0  # floating-point images usually run from 0 to 1
    elif high <= 255:
        scale = 1.0
    elif high <= 65535:
        scale = 255 / 65535
    else:
        scale = 255 / high
    return image.point(lambda value: value * scale).convert("L")


def _parsed(icc_profile: bytes | None) -> ImageCms.ImageCmsProfile | None:
    if not icc_profile:
        return None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    except (ImageCms.PyCMSError, OSError):
        return None


def _colour_space(profile: ImageCms.ImageCmsProfile) -> str:
    return str(profile.profile.xcolor_space).strip()


def _is_usable_rgb(profile: ImageCms.ImageCmsProfile | None) -> bool:
    """Whether colour management can use the profile for RGB pixels."""
    if profile is None or _colour_space(profile) != "RGB":
        return False
    try:
        # Tags are read as a transform needs them: a profile that parses may still be broken.
        ImageCms.buildTransform(profile, _SRGB, "RGB", "RGB")
    except ImageCms.PyCMSError:
        return False
    return True
