"""The worker processes that run Pillow, kept off the event loop and kept alive.

Each worker is its own single-process ``ProcessPoolExecutor`` (a "lane"). A plain pool of
N processes is broken for good as soon as one of them dies, failing every job it holds;
with lanes, a worker that crashes or is killed for running too long costs only the job it
was running, and its lane is rebuilt in the background. Each lane holds its running job
and the next one, already in the worker's pipe, so a worker starts its next job the
moment it is done rather than after a round trip through the event loop; a job that
waited behind one whose worker died never ran, and is given to another worker. Beyond
that, jobs wait in a bounded queue, so overload is answered at once with 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
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
# Between attempts to start a worker that failed to start.
_RETRY_START_SECONDS = 1
# A lane's running job and the one after it.
_JOBS_PER_LANE = 2


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
        self.generation = 0  # which process: a job is told apart from a later one's
        self.jobs = 0  # submitted and not yet done
        self.last_job: asyncio.Future[Any] | None = None
        self.rebuild: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=_context(),
            initializer=imaging.init_worker,
            initargs=(self._memory_limit_bytes,),
        )
        loop = asyncio.get_running_loop()
        # Starting the process now, not at the first upload, also tells us its pid.
        self.pid = await loop.run_in_executor(self._executor, os.getpid)
        self.killed = False
        self.generation += 1

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Hand a job to the worker; raises ``BrokenProcessPool`` if it has died."""
        if self._executor is None:
            raise BrokenProcessPool("the worker is being replaced")
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

    def can_take_a_job(self) -> bool:
        return self.jobs < _JOBS_PER_LANE and self.rebuild is None and self.is_alive()


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
        self._waiters: collections.deque[asyncio.Future[_Lane]] = collections.deque()
        self._jobs_started = 0

    async def start(self) -> None:
        await asyncio.gather(*(lane.start() for lane in self._lanes))

    async def close(self) -> None:
        await asyncio.gather(*self._rebuilds(), return_exceptions=True)
        await asyncio.gather(*(lane.stop() for lane in self._lanes))

    def _rebuilds(self) -> list[asyncio.Task[None]]:
        return [lane.rebuild for lane in self._lanes if lane.rebuild is not None]

    @property
    def busy(self) -> int:
        """Workers running a job (or being restarted after one)."""
        return sum(1 for lane in self._lanes if lane.jobs or lane.rebuild is not None)

    @property
    def waiting(self) -> int:
        """Jobs not running yet: queued for a worker, or next in line at one."""
        queued_at_lanes = sum(max(0, lane.jobs - 1) for lane in self._lanes)
        return len(self._waiters) + queued_at_lanes

    @property
    def jobs_started(self) -> int:
        """Jobs handed to a worker since start-up."""
        return self._jobs_started

    def worker_pids(self) -> list[int]:
        return [lane.pid for lane in self._lanes if lane.pid is not None]

    async def is_working(self) -> bool:
        """At least one worker can take jobs; idle workers found dead are replaced first."""
        for lane in self._lanes:
            if lane.jobs == 0 and lane.rebuild is None and not lane.is_alive():
                self._rebuild(lane)
        if rebuilds := self._rebuilds():
            await asyncio.wait(rebuilds)
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
        if not any(lane.jobs == 0 and lane.can_take_a_job() for lane in self._lanes) and (
            self.waiting >= self._queue_size
        ):
            raise QueueFull(
                f"all {len(self._lanes)} conversion workers are busy and "
                f"{self.waiting} uploads are waiting; try again shortly"
            )
        while True:
            lane = await self._acquire()
            ahead = lane.last_job
            if ahead is not None and ahead.done():
                ahead = None
            try:
                job = lane.submit(fn, *args)
            except BrokenProcessPool:  # it died since it was found alive: try another
                self._lane_died(lane)
                self._release(lane)
                continue
            self._jobs_started += 1
            lane.last_job = job
            # The lane is free again only when its process is, whatever happens to this task.
            job.add_done_callback(functools.partial(self._job_done, lane, lane.generation))
            if ahead is not None:
                # The job ahead started first, so within the time limit from now it has
                # ended or overrun (when no one is left waiting to stop it).
                await asyncio.wait({ahead}, timeout=self._timeout)
                if not ahead.done():
                    lane.kill()
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
                if ahead is not None and _broken(ahead):
                    continue  # never started: its worker died on the job ahead of it
                raise WorkerLost("the worker converting this image stopped unexpectedly") from None

    async def _acquire(self) -> _Lane:
        """A lane with room for a job, the least busy first, in the order jobs came."""
        if not self._waiters and (lane := self._free_lane()) is not None:
            lane.jobs += 1
            return lane
        waiter: asyncio.Future[_Lane] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._dispatch()
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed a lane just as it was cancelled
            raise

    def _free_lane(self) -> _Lane | None:
        lanes = [lane for lane in self._lanes if lane.can_take_a_job()]
        return min(lanes, key=lambda lane: lane.jobs, default=None)

    def _dispatch(self) -> None:
        """Hand free lanes to waiting jobs; replace dead idle workers while jobs wait."""
        while self._waiters:
            if self._waiters[0].done():  # cancelled
                self._waiters.popleft()
                continue
            lane = self._free_lane()
            if lane is None:
                break
            lane.jobs += 1
            self._waiters.popleft().set_result(lane)
        if self._waiters:
            for lane in self._lanes:
                if lane.jobs == 0 and lane.rebuild is None and not lane.is_alive():
                    self._rebuild(lane)

    def _job_done(self, lane: _Lane, generation: int, job: asyncio.Future[Any]) -> None:
        # A job can finish just as its time runs out and its worker is killed; and when a
        # worker dies, each of its two jobs reports it: one rebuild, not two.
        if (lane.killed or _broken(job)) and generation == lane.generation:
            self._lane_died(lane)
        self._release(lane)

    def _lane_died(self, lane: _Lane) -> None:
        if lane.rebuild is None:
            self._rebuild(lane)

    def _release(self, lane: _Lane) -> None:
        lane.jobs -= 1
        self._dispatch()

    def _rebuild(self, lane: _Lane) -> None:
        lane.rebuild = asyncio.create_task(self._restart(lane))

    async def _restart(self, lane: _Lane) -> None:
        try:
            await lane.restart()
        except (OSError, BrokenProcessPool):
            _log.exception("could not restart a conversion worker")
            others = [other for other in self._lanes if other is not lane]
            if not any(other.is_alive() or other.rebuild is not None for other in others):
                self._fail_waiters(WorkerLost("no conversion worker could be started"))
            await asyncio.sleep(_RETRY_START_SECONDS)  # jobs still waiting try it again then
        finally:
            lane.rebuild = None
            self._dispatch()

    def _fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)


def _broken(job: asyncio.Future[Any]) -> bool:
    return job.cancelled() or isinstance(job.exception(), BrokenProcessPool)
