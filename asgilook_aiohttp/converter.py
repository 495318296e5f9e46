"""The worker processes that run Pillow, kept off the event loop and kept alive.

Each worker is its own single-process ``ProcessPoolExecutor`` (a "lane"). A plain pool of
N processes is broken for good as soon as one of them dies, failing every job it holds;
with lanes, a worker that crashes or is killed for running too long costs only the job it
was running, and its lane is rebuilt in the background. Jobs wait for a free lane in an
asyncio queue whose length is bounded, so overload is answered at once with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from . import imaging

T = TypeVar("T")

_log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
# How long a killed worker may take to be noticed gone.
_REAP_SECONDS = 5


class ConverterUnavailable(Exception):
    """No conversion this time, through no fault of the image; the client may retry."""

    retry_after = RETRY_AFTER_SECONDS


class QueueFull(ConverterUnavailable):
    pass


class ConversionTimedOut(ConverterUnavailable):
    pass


class WorkerLost(ConverterUnavailable):
    pass


def _context() -> multiprocessing.context.ForkServerContext:
    # Forking a process that runs threads (asyncio's executors, aiofiles) can deadlock
    # the child; forkserver children start from a clean, single-threaded server that
    # has already imported Pillow.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([imaging.__name__])
    return context


class _Lane:
    """One worker process and the executor that feeds it."""

    def __init__(self, memory_limit_bytes: int) -> None:
        self._memory_limit_bytes = memory_limit_bytes
        self._executor: ProcessPoolExecutor | None = None
        self.pid: int | None = None
        self.killed = False

    async def start(self) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=_context(),
            initializer=imaging.init_worker,
            initargs=(self._memory_limit_bytes, os.getpid()),
        )
        loop = asyncio.get_running_loop()
        # Starting the process now, not at the first upload, also tells us its pid.
        self.pid = await loop.run_in_executor(self._executor, os.getpid)
        self.killed = False

    async def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Hand a job to the worker, replacing the worker first if it died while idle."""
        if self._executor is not None and self.is_alive():
            with contextlib.suppress(BrokenProcessPool):
                return asyncio.wrap_future(self._executor.submit(fn, *args))
        await self.restart()
        assert self._executor is not None
        return asyncio.wrap_future(self._executor.submit(fn, *args))

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def kill(self) -> None:
        self.killed = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    def is_alive(self) -> bool:
        """Its process runs and it has not been killed (its replacement is under way)."""
        if self._executor is None or self.pid is None or self.killed:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


JobObserver = Callable[[str, str, float], None]
"""Told of every job: the function's name, its outcome and the seconds it took."""

_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (QueueFull, "queue_full"),
    (ConversionTimedOut, "timeout"),
    (WorkerLost, "worker_lost"),
    (imaging.ImageRejected, "rejected"),
    (asyncio.CancelledError, "cancelled"),
)


class Converter:
    def __init__(
        self,
        workers: int,
        queue_size: int,
        timeout: float,
        memory_limit_bytes: int,
        observe: JobObserver | None = None,
    ) -> None:
        self._observe = observe
        self._lanes = [_Lane(memory_limit_bytes) for _ in range(workers)]
        self._queue_size = queue_size
        self._timeout = timeout
        self._idle: asyncio.Queue[_Lane] = asyncio.Queue()
        self._waiting = 0
        self._jobs_started = 0
        self._rebuilds: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await asyncio.gather(*(lane.start() for lane in self._lanes))
        for lane in self._lanes:
            self._idle.put_nowait(lane)

    async def close(self) -> None:
        await asyncio.gather(*self._rebuilds, return_exceptions=True)
        await asyncio.gather(*(lane.stop() for lane in self._lanes))

    @property
    def busy(self) -> int:
        """Workers running a job (or being restarted after one)."""
        return len(self._lanes) - self._idle.qsize()

    @property
    def waiting(self) -> int:
        """Jobs queued for a free worker."""
        return self._waiting

    @property
    def jobs_started(self) -> int:
        """Jobs handed to a worker since start-up."""
        return self._jobs_started

    def worker_pids(self) -> list[int]:
        return [lane.pid for lane in self._lanes if lane.pid is not None]

    async def is_working(self) -> bool:
        """At least one worker can take jobs; idle workers found dead are replaced first."""
        for _ in range(self._idle.qsize()):
            lane = self._idle.get_nowait()
            try:
                if not lane.is_alive():
                    await lane.restart()
            except (OSError, BrokenProcessPool):
                _log.exception("could not restart a conversion worker")
            finally:
                self._idle.put_nowait(lane)
        return any(lane.is_alive() for lane in self._lanes)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker, within the time limit.

        Raises ``ConverterUnavailable`` when the queue is full, the job ran out of time or
        its worker died; whatever ``fn`` raises otherwise is re-raised here.
        """
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await self._run(fn, *args)
            outcome = "ok"
            return result
        except BaseException as error:
            outcome = next((name for kind, name in _OUTCOMES if isinstance(error, kind)), outcome)
            raise
        finally:
            if self._observe is not None:
                self._observe(fn.__name__, outcome, time.perf_counter() - started)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._idle.empty() and self._waiting >= self._queue_size:
            raise QueueFull(
                f"all {len(self._lanes)} conversion workers are busy and "
                f"{self._waiting} uploads are waiting; try again shortly"
            )
        self._waiting += 1
        try:
            lane = await self._idle.get()
        finally:
            self._waiting -= 1
        self._jobs_started += 1
        try:
            job = await lane.submit(fn, *args)
        except BaseException as error:
            # Cancelled or failed while (re)starting its worker: the lane must not be lost.
            self._idle.put_nowait(lane)
            if isinstance(error, (OSError, BrokenProcessPool)):
                _log.exception("could not start a conversion worker")
                raise WorkerLost("no conversion worker could be started") from None
            raise
        # The lane is free again only when its process is, whatever happens to this task.
        job.add_done_callback(lambda done: self._job_done(lane, done))
        finished, _ = await asyncio.wait({job}, timeout=self._timeout)
        if not finished:
            lane.kill()
            # Jobs write files: the caller may clean up only once the worker is gone.
            await asyncio.wait({job}, timeout=_REAP_SECONDS)
            raise ConversionTimedOut(
                f"the conversion took longer than {self._timeout:g} s and was stopped"
            )
        try:
            return job.result()
        except BrokenProcessPool:
            raise WorkerLost("the worker converting this image stopped unexpectedly") from None

    def _job_done(self, lane: _Lane, job: asyncio.Future[Any]) -> None:
        broken = not job.cancelled() and isinstance(job.exception(), BrokenProcessPool)
        # A job can finish just as its time runs out and its worker is killed.
        if broken or lane.killed:
            rebuild = asyncio.create_task(self._rebuild(lane))
            self._rebuilds.add(rebuild)
            rebuild.add_done_callback(self._rebuilds.discard)
        else:
            self._idle.put_nowait(lane)

    async def _rebuild(self, lane: _Lane) -> None:
        try:
            await lane.restart()
        except (OSError, BrokenProcessPool):
            # The lane goes back all the same: its next job tries to start it again.
            _log.exception("could not restart a conversion worker")
        finally:
            self._idle.put_nowait(lane)
