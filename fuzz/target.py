"""The libFuzzer target that ``fuzz/jpeg_fuzz.py`` runs: each input is walked and stripped
by ``jpeg.Jpeg`` and converted by ``imaging.convert`` in a process set up as a worker is.

A finding is an exception other than a refusal (a 500 for the user), a file left by a
refusal, a stored file that is not an RGB JPEG, a stripped JPEG whose pixels differ from
the input's, or an input that takes longer than a second plus 10 microseconds a byte.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import atheris  # type: ignore[import-untyped]
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

with atheris.instrument_imports():
    from asgilook_aiohttp import imaging, jpeg
    from asgilook_aiohttp.storage.files import Placement

    import samples

_SECONDS = 1.0
_SECONDS_PER_BYTE = 10e-6
_WORKER_MEMORY = 1024 * 1024 * 1024


def fuzz(argv: list[str]) -> None:
    imaging.init_worker(_WORKER_MEMORY, os.getppid())
    scratch = Path(tempfile.mkdtemp(prefix="jpeg-fuzz-"))
    placement = Placement(str(scratch / "staging"), str(scratch / "final.jpeg"), cached=True)

    def one_input(data: bytes) -> None:
        started = time.process_time()
        stripped = jpeg.Jpeg(
            data, imaging.MAX_JPEG_SEGMENTS, imaging.MAX_JPEG_SCANS
        ).strip_metadata(keep_icc=True)
        try:
            imaging.convert(data, placement, 50_000_000, 90)
        except imaging.ImageRejected:
            assert not os.listdir(scratch), "a refused upload left a file"
        else:
            with Image.open(placement.final) as stored:
                assert (stored.format, stored.mode) == ("JPEG", "RGB"), stored
            os.unlink(placement.final)
        seconds = time.process_time() - started
        assert seconds < _SECONDS + len(data) * _SECONDS_PER_BYTE, f"{seconds:.1f} s"
        if stripped is not None and (pixels := samples.pixels_if_small(data)) is not None:
            assert samples.pixels_if_small(stripped) == pixels, "stripping changed the pixels"

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    fuzz(sys.argv)
