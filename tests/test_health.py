"""Liveness and readiness, as a load balancer or systemd would ask."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
from pathlib import Path

import pytest

import samples
from checks import Client, assert_problem, converter_of, lose_every_worker, process_exists, until
from serving import proc_stat


async def test_alive(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "alive"}
    assert (await client.head("/healthz")).status == 200


async def test_ready(client: Client) -> None:
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}


async def test_not_ready_while_storage_cannot_be_written(client: Client, storage: Path) -> None:
    # Root ignores permission bits, so put a file where the staging directory should be.
    staging = storage / "staging"
    shutil.rmtree(staging)
    staging.write_text("not a directory")
    body = await assert_problem(await client.get("/readyz"), 503, "not-ready")
    assert "not writable" in body["detail"]

    staging.unlink()
    staging.mkdir()
    assert (await client.get("/readyz")).status == 200


async def test_not_ready_while_no_worker_can_run(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await lose_every_worker(client, monkeypatch)
    body = await assert_problem(await client.get("/readyz"), 503, "not-ready")
    assert "no conversion worker" in body["detail"]
    head = await client.head("/readyz")  # HEAD answers as GET does, without the body
    assert head.status == 503
    assert await head.read() == b""
    assert (await client.get("/healthz")).status == 200


async def test_an_idle_worker_that_died_is_replaced_and_ready(client: Client) -> None:
    converter = converter_of(client)
    (worker,) = converter.worker_pids()
    os.kill(worker, signal.SIGKILL)
    await until(lambda: not process_exists(worker))
    assert (await client.get("/readyz")).status == 200
    (replacement,) = converter.worker_pids()
    assert replacement != worker
    assert process_exists(replacement)


async def test_an_upload_while_a_dead_idle_worker_is_unreaped_succeeds(client: Client) -> None:
    (worker,) = converter_of(client).worker_pids()
    forkserver = int(proc_stat(worker)[1])
    # The forkserver reaps its children: stopped, it leaves the killed worker a zombie,
    # which the executor still takes jobs for and which still answers kill(pid, 0).
    exited = os.pidfd_open(worker)
    os.kill(forkserver, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        await until(lambda: _has_exited(exited) and proc_stat(worker)[0] == "Z")
        upload = asyncio.create_task(client.post("/images", data=samples.small_png()))
        await until(lambda: converter_of(client).busy == 1)
        await asyncio.sleep(0.1)  # time to hand the job to the dead worker, if it would
    finally:
        os.kill(forkserver, signal.SIGCONT)
        os.close(exited)
    assert (await upload).status == 201


def _has_exited(pidfd: int) -> bool:
    """Every thread of the process has exited (reaped or not)."""
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    return bool(poll.poll(0))


async def test_an_upload_after_an_idle_worker_died_succeeds(client: Client) -> None:
    (worker,) = converter_of(client).worker_pids()
    os.kill(worker, signal.SIGKILL)
    await until(lambda: not process_exists(worker))
    response = await client.post("/images", data=samples.small_png())
    assert response.status == 201
