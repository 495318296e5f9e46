"""Properties that hold for any input, checked on mutations of the fuzzing seeds: a small,
deterministic run of what ``fuzz/jpeg_fuzz.py`` runs for as long as it is let."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asgilook_aiohttp.imaging import MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS
from asgilook_aiohttp.jpeg import Jpeg

import samples
from checks import Client, assert_problem, index_rows, stored_files

_DETERMINISTIC = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Decoded to compare pixels only when small: a mutated header may claim any size.


@st.composite
def mutated_seeds(draw: st.DrawFn) -> bytes:
    """A seed with a few bytes flipped, inserted, deleted or repeated: repeats are how a
    file grows many scans, segments or frames."""
    data = bytearray(draw(st.sampled_from(samples.fuzz_seeds())))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "marker", "delete", "repeat"]))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "marker":
            data[at:at] = bytes([0xFF, draw(st.integers(0, 255))])
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            piece = data[at : at + draw(st.integers(1, 64))]
            data[at:at] = piece * draw(st.integers(1, 300))
    return bytes(data)


@settings(_DETERMINISTIC, max_examples=500)
@given(mutated_seeds())
def test_strip_metadata_never_raises_and_keeps_the_pixels(data: bytes) -> None:
    stripped = Jpeg(data, MAX_JPEG_SEGMENTS, MAX_JPEG_SCANS).strip_metadata(keep_icc=True)
    if stripped is not None and (pixels := samples.pixels_if_small(data)) is not None:
        assert samples.pixels_if_small(stripped) == pixels


@pytest.mark.parametrize("where", ["headers", "scan"])
@pytest.mark.parametrize(
    "pattern",
    [b"\xff", b"\xff\x00", b"\xff\xd0", b"\xff\xfe\x00\x02", b"\x00", b"\xff\xda\x00\x02"],
)
def test_walking_a_jpeg_costs_little_for_each_byte_whatever_it_holds(
    pattern: bytes, where: str
) -> None:
    # Generous: 16 MiB of the worst of these take the walk a fifth of a second; Python
    # going byte by byte took seconds.
    seed = samples.fuzz_seeds()[0]
    at = 200 if where == "headers" else len(seed) - 2  # in the first segments; before EOI
    data = seed[:at] + pattern * (16 * 1024 * 1024 // len(pattern)) + seed[at:]
    started = time.process_time()
    Jpeg(data, MAX_JPEG_SEGMENTS, MAX_JPEG_SCANS).strip_metadata(keep_icc=True)
    assert time.process_time() - started < 1


async def test_no_upload_is_answered_with_5xx_or_leaves_anything_behind(
    client: Client, storage: Path
) -> None:
    inputs: list[bytes] = []

    @settings(_DETERMINISTIC, max_examples=200, phases=[Phase.generate])
    @given(mutated_seeds())
    def collect(data: bytes) -> None:
        inputs.append(data)

    collect()
    stored = 0
    for data in inputs:
        response = await client.post("/images", data=data)
        if response.status == 201:
            stored += 1
            download = await client.get((await response.json())["image"])
            image = samples.decode(await download.read())
            assert (image.format, image.mode) == ("JPEG", "RGB")
        else:
            assert response.status < 500, await response.text()
            await assert_problem(response, response.status)
        assert index_rows(storage)[0] == stored
        assert len(stored_files(storage)) == stored
    assert 0 < stored < len(inputs)  # the run reached both outcomes
