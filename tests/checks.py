"""Assertions about what a user sees: problem responses, metrics and what is left on disk."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from asgilook_aiohttp import converter
from asgilook_aiohttp.converter import Converter
from asgilook_aiohttp.keys import STORE
from asgilook_aiohttp.storage.backends import INDEX_FILE

import samples

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def converter_of(client: Client) -> Converter:
    return client.app[STORE].converter


async def wait_until_busy(pool: Converter, workers: int = 1) -> None:
    await until(lambda: pool.busy >= workers)


async def fill_the_queue(client: Client) -> tuple[asyncio.Task[Any], asyncio.Task[Any]]:
    """For an app with one worker and room for one upload in its queue: a slow upload
    converting and a small one queued, both still to be answered."""
    running = asyncio.create_task(client.post("/images", data=io.BytesIO(samples.slow_png())))
    await wait_until_busy(converter_of(client))
    queued = asyncio.create_task(client.post("/images", data=samples.small_png()))
    await until(lambda: converter_of(client).waiting == 1)
    return running, queued


async def lose_every_worker(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill the app's workers and let no new one start, as when the host cannot fork."""

    def cannot_fork(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(converter, "ProcessPoolExecutor", cannot_fork)
    pids = converter_of(client).worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    await until(lambda: not any(process_exists(pid) for pid in pids))


def stored_files(storage: Path) -> list[str]:
    """Every file under the storage directory but the index's own."""
    return sorted(
        str(path.relative_to(storage))
        for path in storage.rglob("*")
        if path.is_file() and not path.name.startswith(INDEX_FILE)
    )


def image_file(storage: Path, image_id: str) -> Path:
    """Where the embedded blob store keeps an image."""
    return storage / "images" / image_id[:2] / image_id[2:4] / f"{image_id}.jpeg"


def staged_bytes(storage: Path) -> int:
    """Bytes of upload bodies written to staging files (those that did not fit in memory)."""
    return sum(path.stat().st_size for path in (storage / "staging").glob("*.upload"))


def index_rows(storage: Path) -> tuple[int, int]:
    """(stored images, journaled ids), read from the index file itself."""
    with sqlite3.connect(storage / INDEX_FILE) as db:
        (images,) = db.execute("SELECT count(*) FROM images").fetchone()
        (pending,) = db.execute("SELECT count(*) FROM pending").fetchone()
    return images, pending


async def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Wait for state that lives outside the event loop (processes, counters) to change."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110 - nothing to await on but time
            await asyncio.sleep(0.005)


async def until_metric(
    source: MetricsSource, name: str, wanted: Callable[[float], bool]
) -> Metrics:
    """Wait for a value the server reports on /metrics to be as ``wanted``; return the
    metrics read then."""
    async with asyncio.timeout(30):
        while not wanted(value(metrics := await scrape(source), name)):  # noqa: ASYNC110 - nor here
            await asyncio.sleep(0.005)
    return metrics


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_nothing_stored(storage: Path) -> None:
    """No image listed, no file left (the journal may hold spare ids: no trace of anyone's)."""
    assert stored_files(storage) == []
    assert index_rows(storage)[0] == 0


async def assert_problem(
    response: ClientResponse, status: int, slug: str | None = None
) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status; returns its body."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    assert body["title"]
    assert len(body["detail"]) > 20
    if slug is not None:
        assert body["type"] == f"tag:asgilook-aiohttp,2026:{slug}"
    return body


def image_object(created: dict[str, Any]) -> dict[str, Any]:
    """The image object in a 201 body: the body without its one-time delete token."""
    assert len(created["delete_token"]) >= 32
    return {key: value for key, value in created.items() if key != "delete_token"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# The app under a test client, or a server process: a session and its URL.
MetricsSource = Client | tuple[aiohttp.ClientSession, str]


async def scrape(source: MetricsSource) -> Metrics:
    if isinstance(source, tuple):
        session, url = source
        async with session.get(f"{url}/metrics") as response:
            return await _parsed(response)
    return await _parsed(await source.get("/metrics"))


async def _parsed(response: ClientResponse) -> Metrics:
    assert response.status == 200
    assert response.content_type == "text/plain"
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """One series' value; a series the server does not report fails the test."""
    series = (name, tuple(sorted(labels.items())))
    assert series in metrics, f"no series {name} {labels} in /metrics"
    return metrics[series]
