"""A JPEG file's marker segments, found the way a decoder finds them, and metadata removal
without touching its compressed pixels.

A JPEG is a run of marker segments; the pixels are in the entropy-coded data after each
start-of-scan (SOS). Dropping the APPn segments that carry EXIF, XMP, IPTC and the like,
and the comments, leaves the decoded pixels exactly as they were.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SOI = b"\xff\xd8"
_EOI = 0xD9
_SOS = 0xDA
_COM = 0xFE
_APP0 = 0xE0
_APP2 = 0xE2
_APP14 = 0xEE
_APP15 = 0xEF
# Frames other than Huffman-coded baseline, extended and progressive: not every decoder
# reads them.
_OTHER_FRAMES = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Entropy-coded data and stray bytes run up to the next marker: 0xFF, after any fill
# bytes (0xFF), followed by a byte other than 0x00 (a stuffed 0xFF) and those of the
# markers that neither carry nor end anything (TEM, RSTn, and an SOI out of place).
# Decoders skip stray bytes between segments the same way. Matched in C, not byte by byte
# in Python, so that long runs of fill bytes or stuffed bytes cost little.
_UP_TO_A_MARKER = re.compile(rb"(?:[^\xff]++|\xff++[\x00\x01\xd0-\xd8])*+")
_FILL = re.compile(rb"\xff*+")


class Segment(NamedTuple):
    """Where a marker segment lies in the file (from its marker, after any fill bytes; a
    scan with its entropy-coded data); ``marker`` is None for stray bytes."""

    marker: int | None
    start: int
    end: int


class Jpeg:
    """The first image of a JPEG file, walked as a decoder walks it: SOI, then segments up
    to its EOI, stepping over stray bytes between them.

    The walk stops after ``max_segments + 1`` segments (see ``too_long``), or after
    ``max_scans + 1`` scans, so that it costs little whatever the file holds.
    """

    def __init__(self, data: bytes, max_segments: int, max_scans: int) -> None:
        self._data = data
        self.segments = _segments(data, max_segments + 1, max_scans + 1)
        self.too_long = len(self.segments) > max_segments

    @property
    def scans(self) -> int:
        """Start-of-scan segments: each is another pass over the blocks it covers."""
        return sum(1 for segment in self.segments if segment.marker == _SOS)

    @property
    def stray_bytes_in_headers(self) -> int:
        """Bytes before the first scan that belong to no segment (fill bytes included)."""
        stray, end = 0, len(_SOI)
        for marker, start, next_end in self.segments:
            stray += start - end if marker is not None else next_end - start
            if marker == _SOS:
                break
            end = next_end
        return stray

    def strip_metadata(self, *, keep_icc: bool) -> bytes | None:
        """The same JPEG with only what decoding needs, plus its ICC profile if ``keep_icc``.

        Kept: JFIF (APP0), ICC profile chunks (APP2), the Adobe colour-transform flag
        (APP14) and every non-APP segment. Anything after the first image's EOI (the extra
        pictures of an MPO file, trailing junk) is cut. Returns None when the data is not a
        JPEG this method can rewrite safely (unknown frame type, stray bytes, no EOI); the
        caller re-encodes instead.
        """
        kept = [_SOI]
        for marker, start, end in self.segments:
            if marker is None or marker in _OTHER_FRAMES:
                return None
            segment = self._data[start:end]
            if marker == _EOI:
                kept.append(segment)
                return b"".join(kept)
            if _is_needed(marker, segment, keep_icc):
                kept.append(segment)
        return None


def is_jpeg(data: bytes) -> bool:
    """Whether the data starts as every JPEG does (SOI, then a marker)."""
    return data.startswith(_SOI + b"\xff")


def _segments(data: bytes, limit: int, scan_limit: int) -> list[Segment]:
    segments: list[Segment] = []
    if not data.startswith(_SOI):
        return segments
    pos = len(_SOI)
    scans = 0
    while pos < len(data) and len(segments) < limit and scans < scan_limit:
        at = _past(_FILL, data, pos) - 1  # the last 0xFF before the marker byte
        if at < pos or at + 1 >= len(data) or _is_in_data(data[at + 1]):
            end = _past(_UP_TO_A_MARKER, data, pos)
            if end == pos:  # only fill bytes left: a marker cut off
                break
            segments.append(Segment(None, pos, end))
            pos = end
            continue
        marker = data[at + 1]
        if marker == _EOI:
            segments.append(Segment(marker, at, at + 2))
            break
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if at + 4 > len(data) or end < at + 4 or end > len(data):
            break  # cut off, or a length no decoder would accept
        if marker == _SOS:
            end = _past(_UP_TO_A_MARKER, data, end)
            scans += 1
        segments.append(Segment(marker, at, end))
        pos = end
    return segments


def _past(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    match = pattern.match(data, pos)
    assert match is not None  # both patterns match the empty string
    return match.end()


def _is_in_data(marker_byte: int) -> bool:
    return marker_byte in (0x00, 0x01) or 0xD0 <= marker_byte <= 0xD8


def _is_needed(marker: int, segment: bytes, keep_icc: bool) -> bool:
    payload = segment[4:]
    if marker == _APP0:
        return payload.startswith(b"JFIF\x00")
    if marker == _APP2:
        return keep_icc and payload.startswith(b"ICC_PROFILE\x00")
    if marker == _APP14:
        return payload.startswith(b"Adobe")
    return not (_APP0 <= marker <= _APP15 or marker == _COM)
