"""Metadata removal from a JPEG file without touching its compressed pixels.

A JPEG is a run of marker segments; the pixels are in the entropy-coded data after each
start-of-scan (SOS). Dropping the APPn segments that carry EXIF, XMP, IPTC and the like,
and the comments, leaves the decoded pixels exactly as they were.
"""

from __future__ import annotations

_SOI = 0xD8
_EOI = 0xD9
_SOS = 0xDA
_COM = 0xFE
_APP0 = 0xE0
_APP2 = 0xE2
_APP14 = 0xEE
_APP15 = 0xEF
# Huffman-coded baseline, extended and progressive frames: what every decoder reads.
_SUPPORTED_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_OTHER_FRAMES = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def strip_metadata(data: bytes) -> bytes | None:
    """The same JPEG with only what decoding needs, plus its ICC profile.

    Kept: JFIF (APP0), ICC profile chunks (APP2), the Adobe colour-transform flag (APP14)
    and every non-APP segment. Anything after the first image's EOI (the extra pictures
    of an MPO file, trailing junk) is cut. Returns None when the data is not a JPEG this
    function can rewrite safely (unknown frame type, broken segment structure); the caller
    re-encodes instead.
    """
    if data[:2] != b"\xff\xd8":
        return None
    kept = [data[:2]]
    pos = 2
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            kept.append(b"\xff\xd9")
            return b"".join(kept)
        if marker in _STANDALONE or marker == _SOI:
            kept.append(data[pos : pos + 2])
            pos += 2
            continue
        if marker in _OTHER_FRAMES:
            return None
        if pos + 4 > len(data):
            return None
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end <= pos + 3 or end > len(data):
            return None
        segment = data[pos:end]
        if _is_needed(marker, segment):
            kept.append(segment)
        pos = end
        if marker == _SOS:
            scan_end = _end_of_scan(data, pos)
            kept.append(data[pos:scan_end])
            pos = scan_end
    return None


def _is_needed(marker: int, segment: bytes) -> bool:
    payload = segment[4:]
    if marker == _APP0:
        return payload.startswith(b"JFIF\x00")
    if marker == _APP2:
        return payload.startswith(b"ICC_PROFILE\x00")
    if marker == _APP14:
        return payload.startswith(b"Adobe")
    return not (_APP0 <= marker <= _APP15 or marker == _COM)


def _end_of_scan(data: bytes, pos: int) -> int:
    """Index of the first marker after entropy-coded data starting at ``pos``.

    Inside a scan, 0xFF is followed by 0x00 (a stuffed data byte) or a restart marker
    (0xD0-0xD7); anything else ends the scan.
    """
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        follower = data[pos + 1]
        if follower == 0x00 or 0xD0 <= follower <= 0xD7:
            pos += 2
        elif follower == 0xFF:
            pos += 1
        else:
            return pos
