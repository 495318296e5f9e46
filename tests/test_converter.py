"""The process pool under trouble: killed workers, slow and hungry images, overload."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from asgilook_aiohttp.converter import ConversionTimedOut, QueueFull, WorkerLost

import samples
from checks import (
    Client,
    ClientFactory,
    assert_nothing_stored,
    assert_problem,
    converter_of,
    fill_the_queue,
    lose_every_worker,
    process_exists,
    scrape,
    until,
    value,
    wait_until_busy,
)


def _wait_for(path: str) -> None:
    """Keep the worker busy until the test creates ``path``."""
    while not os.path.exists(path):
        time.sleep(0.01)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


async def test_conversion_runs_in_a_worker_process(client: Client) -> None:
    pids = converter_of(client).worker_pids()
    assert len(pids) == 1
    assert os.getpid() not in pids
    assert process_exists(pids[0])
    before = converter_of(client).jobs_started
    assert (await client.post("/images", data=samples.small_png())).status == 201
    assert converter_of(client).jobs_started == before + 1
    assert converter_of(client).worker_pids() == pids


async def test_worker_count_is_configurable(make_client: ClientFactory) -> None:
    client = await make_client(workers=3)
    assert len(set(converter_of(client).worker_pids())) == 3


async def test_worker_killed_mid_job_costs_only_that_upload(client: Client, storage: Path) -> None:
    upload = asyncio.create_task(client.post("/images", data=io.BytesIO(samples.slow_png())))
    await wait_until_busy(converter_of(client))
    (victim,) = converter_of(client).worker_pids()
    os.kill(victim, signal.SIGKILL)

    response = await upload
    body = await assert_problem(response, 503, "worker-lost")
    assert "stopped unexpectedly" in body["detail"]
    assert int(response.headers["Retry-After"]) > 0
    assert_nothing_stored(storage)
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0

    retry = await client.post("/images", data=samples.small_png())
    assert retry.status == 201
    (replacement,) = converter_of(client).worker_pids()
    assert replacement != victim


async def test_other_workers_keep_their_jobs_when_one_dies(make_client: ClientFactory) -> None:
    client = await make_client(workers=2)
    uploads = [
        asyncio.create_task(client.post("/images", data=io.BytesIO(samples.slow_png())))
        for _ in range(2)
    ]
    await wait_until_busy(converter_of(client), workers=2)
    victim = converter_of(client).worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    statuses = sorted([(await upload).status for upload in uploads])
    assert statuses == [201, 503]


async def test_upload_handed_ahead_to_a_worker_that_dies_is_converted_all_the_same(
    client: Client, storage: Path
) -> None:
    pool = converter_of(client)
    stuck = asyncio.create_task(pool.run(time.sleep, 30))
    await wait_until_busy(pool)
    behind = asyncio.create_task(client.post("/images", data=samples.small_png()))
    await until(lambda: pool.waiting == 1)  # handed to the busy worker, behind the job
    (victim,) = pool.worker_pids()
    os.kill(victim, signal.SIGKILL)

    with pytest.raises(WorkerLost):
        await stuck
    response = await behind
    assert response.status == 201
    stored = await response.json()
    assert (await client.get(stored["image"])).status == 200
    listed = await (await client.get("/images")).json()
    assert [image["id"] for image in listed] == [stored["id"]]
    (replacement,) = pool.worker_pids()
    assert replacement != victim
    assert (pool.waiting, pool.busy) == (0, 0)


async def test_job_handed_ahead_runs_after_the_one_before_it_times_out(
    make_client: ClientFactory,
) -> None:
    pool = converter_of(await make_client(conversion_timeout=2))
    (stuck_worker,) = pool.worker_pids()
    stuck = asyncio.create_task(pool.run(time.sleep, 30))
    await wait_until_busy(pool)
    behind = asyncio.create_task(pool.run(os.getpid))
    await until(lambda: pool.waiting == 1)

    with pytest.raises(ConversionTimedOut):
        await stuck
    ran_in = await behind
    assert ran_in != stuck_worker
    assert pool.worker_pids() == [ran_in]


async def test_time_limit_of_a_job_handed_ahead_runs_from_its_own_start(
    make_client: ClientFactory,
) -> None:
    pool = converter_of(await make_client(conversion_timeout=1.8))
    (worker,) = pool.worker_pids()
    # One worker: the second job waits for the first, 2 s in all, each within 1.8 s.
    first, second = await asyncio.gather(pool.run(_pid_after, 1), pool.run(_pid_after, 1))
    assert first == second == worker
    assert pool.worker_pids() == [worker]


async def test_without_a_queue_a_busy_worker_is_handed_nothing_more(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    pool = converter_of(await make_client(queue_size=0))
    gate = tmp_path / "gate"
    running = asyncio.create_task(pool.run(_wait_for, str(gate)))
    await wait_until_busy(pool)
    with pytest.raises(QueueFull):
        await pool.run(os.getpid)
    gate.touch()
    await running


async def test_a_line_of_jobs_drains_and_leaves_the_workers_free(
    make_client: ClientFactory,
) -> None:
    pool = converter_of(await make_client(workers=2))
    async with asyncio.timeout(30):  # a job left in line would wait for ever
        # Equal jobs on two workers finish together, freeing both in one turn of the loop.
        for _ in range(3):
            await asyncio.gather(*(pool.run(time.sleep, 0.05) for _ in range(12)))
        assert (pool.waiting, pool.busy) == (0, 0)
        assert await pool.run(os.getpid) in pool.worker_pids()


async def test_a_job_cancelled_while_waiting_in_line_leaves_it(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    pool = converter_of(await make_client())
    gate = tmp_path / "gate"
    running = asyncio.create_task(pool.run(_wait_for, str(gate)))
    await wait_until_busy(pool)
    behind = asyncio.create_task(pool.run(os.getpid))
    in_line = asyncio.create_task(pool.run(os.getpid))
    await until(lambda: pool.waiting == 2)
    in_line.cancel()
    with pytest.raises(asyncio.CancelledError):
        await in_line
    assert pool.waiting == 1
    gate.touch()
    await asyncio.gather(running, behind)
    assert (pool.waiting, pool.busy) == (0, 0)
    assert await pool.run(os.getpid) in pool.worker_pids()


async def test_idle_workers_are_handed_jobs_before_busy_ones(make_client: ClientFactory) -> None:
    pool = converter_of(await make_client(workers=2))
    pids = await asyncio.gather(*(pool.run(_pid_after, 0.3) for _ in range(2)))
    assert sorted(pids) == sorted(pool.worker_pids())


async def test_uploads_fail_at_once_when_no_worker_can_be_started(
    make_client: ClientFactory, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(workers=2)
    await lose_every_worker(client, monkeypatch)

    uploads = [client.post("/images", data=samples.small_png()) for _ in range(6)]
    async with asyncio.timeout(20):
        responses = await asyncio.gather(*uploads)
    for response in responses:
        await assert_problem(response, 503, "worker-lost")
    assert_nothing_stored(storage)


async def test_conversion_over_the_time_limit_is_503_and_the_worker_replaced(
    make_client: ClientFactory, storage: Path
) -> None:
    # Well under the slow PNG's half second, and still room for a tiny image's conversion
    # on a new worker of a loaded machine (0.05 s was not, now and then).
    client = await make_client(conversion_timeout=0.15)
    (slow_worker,) = converter_of(client).worker_pids()
    response = await client.post("/images", data=io.BytesIO(samples.slow_png()))
    body = await assert_problem(response, 503, "conversion-timeout")
    assert "longer than 0.15 s" in body["detail"]
    assert "Retry-After" in response.headers
    assert_nothing_stored(storage)
    assert value(await scrape(client), "asgilook_upload_bytes_in_memory") == 0

    await until(lambda: not process_exists(slow_worker) and not converter_of(client).busy)
    tiny = samples.encode(Image.new("RGB", (8, 8)), "PNG")
    assert (await client.post("/images", data=tiny)).status == 201


async def test_full_queue_is_503_at_once(make_client: ClientFactory, storage: Path) -> None:
    client = await make_client(workers=1, queue_size=1)
    running, queued = await fill_the_queue(client)

    refused = await client.post("/images", data=samples.small_png())
    body = await assert_problem(refused, 503, "queue-full")
    assert "busy" in body["detail"]
    assert "Retry-After" in refused.headers
    assert not running.done()

    assert (await running).status == 201
    assert (await queued).status == 201
    listed = await (await client.get("/images")).json()
    assert len(listed) == 2


async def test_image_needing_more_memory_than_a_worker_may_use_is_413(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client(worker_memory_mb=160)
    (worker,) = converter_of(client).worker_pids()
    # 36 megapixels, under the pixel limit, but about 150 MB per decoded copy.
    data = samples.encode(Image.new("RGB", (6000, 6000), samples.RED), "PNG")
    body = await assert_problem(await client.post("/images", data=data), 413, "too-much-memory")
    assert "memory" in body["detail"]
    assert_nothing_stored(storage)
    assert converter_of(client).worker_pids() == [worker]
    assert (await client.post("/images", data=samples.small_png())).status == 201


def test_a_worker_whose_server_is_gone_before_it_starts_ends_at_once() -> None:
    dead = subprocess.Popen(["true"])  # a pid no process has once it is reaped
    dead.wait()
    worker = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time, sys; from asgilook_aiohttp import imaging; "
            f"imaging.init_worker(1 << 30, {dead.pid}); time.sleep(30); sys.exit(3)",
        ],
        timeout=20,
        check=False,
    )
    assert worker.returncode == -signal.SIGKILL
