"""What every benchmark needs: the real server as a subprocess, test images, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    process: asyncio.subprocess.Process
    url: str

    async def stop(self) -> None:
        self.process.terminate()
        await self.process.wait()


async def start_server(storage: Path, *flags: str, env: dict[str, str] | None = None) -> Server:
    """``run.py`` on a free loopback port, with fresh or given storage; quiet. ``env`` is
    added to the environment."""
    return await start_python(
        str(ROOT / "run.py"), "--port", "0", "--storage", str(storage), *flags, env=env
    )


async def start_python(*arguments: str, env: dict[str, str] | None = None) -> Server:
    """A Python program that prints the loopback address it serves on, once it does;
    ``env`` is added to the environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert match, line
    return Server(process, match.group(0))


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Photo-like content: smooth gradients with grain, the same for the same seed."""
    ramp = Image.linear_gradient("L").resize(size)
    noise = Image.frombytes("L", size, random.Random(seed).randbytes(size[0] * size[1]))
    grain = Image.blend(ramp, noise, 0.3)
    return Image.merge("RGB", (ramp, grain, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _tree(pid: int) -> dict[int, list[str]]:
    """The /proc/<pid>/stat fields (after the command name) of a process and all its
    descendants, by pid, the process itself first."""
    children: dict[int, list[int]] = {}
    fields: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                process = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        fields[int(entry.name)] = process
        children.setdefault(int(process[1]), []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in fields:
            found[current] = fields[current]
        todo.extend(children.get(current, []))
    return found


def tree_memory(pid: int) -> tuple[int, int]:
    """Bytes held by a process and all its descendants (Linux /proc), as (RSS, PSS) summed.
    The RSS sum counts memory they share once for each of them; the PSS sum splits it
    between them, so it is what the tree holds."""
    members = _tree(pid)
    pages = sum(int(process[21]) for process in members.values())
    proportional_kib = 0
    for member in members:
        with contextlib.suppress(OSError), open(f"/proc/{member}/smaps_rollup") as rollup:
            proportional_kib += sum(
                int(line.split()[1]) for line in rollup if line.startswith("Pss:")
            )
    return pages * os.sysconf("SC_PAGE_SIZE"), proportional_kib * 1024


def tree_cpu(pid: int, *, reaped: bool = False) -> tuple[float, float]:
    """CPU seconds used so far by the server: by the process and the HTTP processes it
    forked, and by its live conversion side (multiprocessing's fork servers and resource
    tracker, and the workers they started). With ``reaped``, the latter also counts their
    children that have exited and been waited for, such as the workers a pool replaced."""
    tick = os.sysconf("SC_CLK_TCK")
    last = 15 if reaped else 13  # utime, stime, then the waited-for children's
    server = workers = 0
    for member, process in _tree(pid).items():
        if _is_multiprocessing(member):
            workers += sum(int(n) for n in process[11:last])
        else:
            server += int(process[11]) + int(process[12])
    return server / tick, workers / tick


def _is_multiprocessing(pid: int) -> bool:
    """Whether the process runs multiprocessing's code (a fork server, the resource
    tracker, a worker forked from a fork server), not the server's."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return b"multiprocessing" in cmdline.read()
    except OSError:
        return False


def tree_cpu_total(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants, with every child
    that exited and was waited for by any of them: the whole of what a server that
    forks and reaps its own processes (PostgreSQL's postmaster) has cost."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum(int(n) for process in _tree(pid).values() for n in process[11:15]) / tick


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine has spent so far, from /proc/stat and /proc: ``busy``
    in all, of it ``interrupts`` (hard and soft interrupts, such as loopback networking,
    which no process is charged with) and ``kernel_threads`` (kthreadd's children, such
    as writeback workers), and ``capacity``, all CPUs' time whether busy or not. Time
    waiting for the disk or taken by the hypervisor (steal) is not busy."""
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(n) for n in stat.readline().split()[1:9]
        )
    busy = user + nice + system + irq + softirq
    kernel_threads = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as process:
                    fields = process.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] in ("0", "2") and entry.name != "1":  # kthreadd and its children
                kernel_threads += int(fields[11]) + int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "busy": busy / tick,
        "interrupts": (irq + softirq) / tick,
        "kernel_threads": kernel_threads / tick,
        "capacity": (busy + idle + iowait + steal) / tick,
    }
