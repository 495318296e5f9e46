"""Fuzz the JPEG walk and the upload decode path with Atheris (libFuzzer), from the seeds
in tests/samples.py, for as long as it is let:

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python fuzz/jpeg_fuzz.py --minutes 5

It runs ``fuzz/target.py`` (see there what counts as a finding), prints how many inputs it
ran in how many minutes and what it found, and keeps each finding in fuzz/findings/; the
corpus grows in fuzz/corpus/. Exits 1 if there were findings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    arguments = parser.parse_args()
    corpus, findings = HERE / "corpus", HERE / "findings"
    corpus.mkdir(exist_ok=True)
    findings.mkdir(exist_ok=True)
    for number, seed in enumerate(samples.fuzz_seeds()):
        (corpus / f"seed-{number:02}").write_bytes(seed)
    found_before = set(findings.iterdir())
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            str(HERE / "target.py"),
            f"-max_total_time={round(arguments.minutes * 60)}",
            "-timeout=30",
            f"-artifact_prefix={findings}/",
            "-print_final_stats=1",
            "-max_len=65536",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    minutes = (time.monotonic() - started) / 60
    runs = next(
        (
            line.split()[-1]
            for line in run.stderr.splitlines()
            if "number_of_executed_units" in line
        ),
        "?",
    )
    new = sorted(set(findings.iterdir()) - found_before)
    print(run.stderr[-3000:] if new or run.returncode else "", end="")
    print(f"seeds: {len(samples.fuzz_seeds())}, corpus: {len(list(corpus.iterdir()))} inputs")
    print(f"ran {runs} inputs in {minutes:.1f} minutes; findings: {len(new)}")
    for path in new:
        print(f"  {path}")
    sys.exit(1 if new else 0)


if __name__ == "__main__":
    main()
