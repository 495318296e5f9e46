"""The worker processes that run Pillow, kept off the event loop and kept alive.

Each worker is its own single-process ``ProcessPoolExecutor`` (a "lane"). A plain pool of
N processes is broken for good as soon as one of them dies, failing every job it holds;
with lanes, a worker that crashes or is killed for running too long costs only the job it
was running, and its lane is rebuilt in the background.

A lane is handed its next job while it still runs one. Should its worker die before
finishing the first, the second never started, and it is handed to a worker once more;
its time limit runs from when the first is done. Other jobs wait their turn in line,
and the line (jobs handed ahead included) is bounded, so overload is answered at once
with 503.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import os
import select
import signal
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, resource_tracker
from typing import Any, TypeVar

from . import imaging
from .arena import Arena

T = TypeVar("T")

_log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
# How long a killed worker may take to be noticed gone.
_REAP_SECONDS = 5
# A worker is handed its next job while it still runs one, so that it can start on it
# the moment it is done instead of idling through the round trip to the server: under
# load this took idle CPU from 12% to 3% and 0.3 MP uploads from 150-180/s to 170-190/s
# (alternating runs). The job handed ahead counts as queued.
_JOBS_PER_WORKER = 2


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
    # Forking a process that runs threads (asyncio's executors) can deadlock the child;
    # forkserver children start from a clean, single-threaded server that has already
    # imported Pillow.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([imaging.__name__])
    return context


def start_helper_processes() -> int:
    """Start multiprocessing's resource tracker (it unlinks the semaphores of processes
    that die) and fork server now, so that the processes forked from this one share them
    instead of each starting its own; the fork server's pid."""
    resource_tracker.ensure_running()
    _context()  # which the fork server preloads
    forkserver.ensure_running()
    server: Any = forkserver._forkserver  # its pid is not public
    pid: int = server._forkserver_pid
    return pid


def restart_fork_server() -> int:
    """Start a fork server in place of one that has died; its pid."""
    return start_helper_processes()  # it notices the old one gone, and starts another


def share_fork_server() -> None:
    """In a process forked from the one that started the fork server: start workers
    with that one. multiprocessing would otherwise ask the kernel whether its own child
    is alive, find it no child of this process, and fail."""
    server: Any = forkserver._forkserver
    exited = os.pidfd_open(server._forkserver_pid)

    def ensure_running() -> None:
        poll = select.poll()
        poll.register(exited, select.POLLIN)
        if poll.poll(0):
            raise BrokenProcessPool("the fork server that starts conversion workers is gone")

    server.ensure_running = ensure_running


def stop_helper_processes() -> None:
    """Stop multiprocessing's fork server and resource tracker and wait for them, once
    every process that used them is gone. Left alone, each exits only after noticing that
    the process that started it has, so a service manager would find it still running."""
    # Both are module-level singletons; their _stop() closes the pipe that keeps the
    # process running and reaps it. It does nothing for one that never started.
    forkserver._forkserver._stop()  # type: ignore[attr-defined]
    resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


class _Lane:
    """One worker process and the executor that feeds it."""

    def __init__(self, memory_limit_bytes: int, arena: Arena | None) -> None:
        self._memory_limit_bytes = memory_limit_bytes
        self._arena = arena
        self._executor: ProcessPoolExecutor | None = None
        self._starting = asyncio.Lock()
        # The executor's own future of each job handed over and not yet done: it is done as
        # soon as the result is back from the worker, a loop turn before the job is.
        self._handed: dict[asyncio.Future[Any], concurrent.futures.Future[Any]] = {}
        self._stopped = False
        self.pid: int | None = None
        # Readable once the worker has exited, before anyone has reaped it (None where
        # pidfds are not supported): until reaped, the executor takes jobs for it.
        self._exit_fd: int | None = None
        self.killed = False
        # Each start is a new generation: news of a job from an earlier one is stale.
        self.generation = 0
        self.jobs = 0
        self.rebuilding = False

    @property
    def accepting(self) -> bool:
        """Its worker may be handed a job now (it may still need starting first)."""
        return not self.rebuilding and not self.killed and self.jobs < _JOBS_PER_WORKER

    async def ensure_running(self) -> None:
        """Start the worker, or replace it if it has died or been killed."""
        async with self._starting:
            if self._stopped:
                raise BrokenProcessPool("the conversion workers have been stopped")
            if self._executor is None or not self.is_alive():
                await self._stop()
                await self._start()

    async def _start(self) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=_context(),
            initializer=imaging.init_worker,
            initargs=(self._memory_limit_bytes, os.getpid(), self._arena),
        )
        self.generation += 1
        self.killed = False
        loop = asyncio.get_running_loop()
        # Starting the process now, not at the first upload, also tells us its pid.
        self.pid = await loop.run_in_executor(self._executor, os.getpid)
        with contextlib.suppress(OSError):  # Linux before 5.3, or it is gone already
            self._exit_fd = os.pidfd_open(self.pid)

    async def submit(
        self, fn: Callable[..., T], *args: Any
    ) -> tuple[asyncio.Future[T], asyncio.Future[Any] | None]:
        """Hand a job to the worker (replacing the worker first if it died while idle).

        Returns the job and the one the worker runs before it, if any. Raises
        ``BrokenProcessPool`` if the worker turns out dead: the job never reached it.
        """
        await self.ensure_running()
        assert self._executor is not None
        ahead = next((job for job in self._handed if not job.done()), None)
        handed = self._executor.submit(fn, *args)
        job = asyncio.wrap_future(handed)
        self._handed[job] = handed
        job.add_done_callback(self._handed.pop)
        return job, ahead

    def kill_if_running(self, job: asyncio.Future[Any]) -> bool:
        """Kill the worker if it is still running ``job``; False if the job is done.

        Past that point the worker may have moved on to the job behind it.
        """
        handed = self._handed.get(job)
        if handed is None or handed.done():
            return False
        self.killed = True
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return True

    async def stop(self) -> None:
        """Stop the worker for good, once its jobs are done."""
        async with self._starting:
            self._stopped = True
            await self._stop()

    async def _stop(self) -> None:
        exit_fd, self._exit_fd = self._exit_fd, None
        try:
            if self._executor is not None:
                executor, self._executor = self._executor, None
                await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        finally:
            if exit_fd is not None:
                os.close(exit_fd)
        self.pid = None
        self.killed = False  # whatever was killed is gone now

    def is_alive(self) -> bool:
        """Its process runs and it has not been killed (its replacement is under way)."""
        if self._executor is None or self.pid is None or self.killed:
            return False
        if self._exit_fd is not None:
            poll = select.poll()  # not select(), which fails on descriptors past 1023
            poll.register(self._exit_fd, select.POLLIN)
            return not poll.poll(0)
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
        *,
        arena: Arena | None = None,
        observe: JobObserver | None = None,
    ) -> None:
        self._observe = observe
        self._lanes = [_Lane(memory_limit_bytes, arena) for _ in range(workers)]
        self._queue_size = queue_size
        self._timeout = timeout
        self._waiters: collections.deque[asyncio.Future[_Lane]] = collections.deque()
        self._jobs_started = 0
        self._rebuilds: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        await asyncio.gather(*(lane.ensure_running() for lane in self._lanes))

    async def close(self) -> None:
        self._closing = True
        while self._waiters:
            if not (waiter := self._waiters.popleft()).done():
                waiter.set_exception(WorkerLost("the server is stopping"))
        await asyncio.gather(*self._rebuilds, return_exceptions=True)
        await asyncio.gather(*(lane.stop() for lane in self._lanes))

    @property
    def busy(self) -> int:
        """Workers running a job (or being restarted after one)."""
        return sum(1 for lane in self._lanes if lane.jobs or lane.rebuilding)

    @property
    def waiting(self) -> int:
        """Jobs waiting for a worker: for a free one, or behind another job in one."""
        handed_ahead = sum(lane.jobs - 1 for lane in self._lanes if lane.jobs > 1)
        return len(self._waiters) + handed_ahead

    @property
    def jobs_started(self) -> int:
        """Jobs handed to a worker since start-up."""
        return self._jobs_started

    def worker_pids(self) -> list[int]:
        return [lane.pid for lane in self._lanes if lane.pid is not None]

    async def is_working(self) -> bool:
        """At least one worker can take jobs; idle workers found dead are replaced first."""
        for lane in self._lanes:
            if not lane.jobs and not lane.rebuilding and not self._closing:
                try:
                    await lane.ensure_running()
                except (OSError, BrokenProcessPool):
                    _log.exception("could not restart a conversion worker")
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
        try:
            return await self._run_once(fn, args, retry=False)
        except _NeverStarted:
            pass  # it never reached a live worker, or waited behind one whose worker died
        try:
            return await self._run_once(fn, args, retry=True)  # once more, ahead of the line
        except _NeverStarted as never:
            raise never.lost from None

    async def _run_once(self, fn: Callable[..., T], args: tuple[Any, ...], *, retry: bool) -> T:
        lane = await self._take_lane(retry=retry)
        try:
            job, ahead = await lane.submit(fn, *args)
        except BaseException as error:
            broken = isinstance(error, BrokenProcessPool)
            self._lane_released(lane, lane.generation, broken=broken)
            if self._closing:
                raise WorkerLost("the server is stopping") from None
            if not isinstance(error, (OSError, BrokenProcessPool)):
                raise
            _log.exception("could not start a conversion worker")
            lost = WorkerLost("no conversion worker could be started")
            raise _NeverStarted(lost) if broken else lost from None
        self._jobs_started += 1
        job.add_done_callback(functools.partial(self._job_done, lane, lane.generation))
        if ahead is not None:
            # Its own time limit stops it first; this is only the backstop.
            done, _ = await asyncio.wait({ahead}, timeout=self._timeout + _REAP_SECONDS)
            if not done:
                lane.kill_if_running(ahead)
        done, _ = await asyncio.wait({job}, timeout=self._timeout)
        if not done and lane.kill_if_running(job):
            # Jobs write files: the caller may clean up only once the worker is gone.
            await asyncio.wait({job}, timeout=_REAP_SECONDS)
            raise ConversionTimedOut(
                f"the conversion took longer than {self._timeout:g} s and was stopped"
            )
        if not done:  # done in the worker just now: its result is on its way
            await asyncio.wait({job})
        try:
            return job.result()
        except BrokenProcessPool:
            lost = WorkerLost("the worker converting this image stopped unexpectedly")
            if ahead is not None and _died_running(ahead):
                raise _NeverStarted(lost) from None
            raise lost from None

    async def _take_lane(self, *, retry: bool) -> _Lane:
        """The least busy worker that can take a job, waiting in line for one if need be."""
        if self._closing:
            raise WorkerLost("the server is stopping")
        lane = None if self._waiters else self._least_busy()
        if not retry and (lane is None or lane.jobs) and self.waiting >= self._queue_size:
            raise QueueFull(
                f"all {len(self._lanes)} conversion workers are busy and "
                f"{self.waiting} uploads are waiting; try again shortly"
            )
        if lane is not None:
            lane.jobs += 1
            return lane
        waiter: asyncio.Future[_Lane] = asyncio.get_running_loop().create_future()
        if retry:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # unless already passed over
                    self._waiters.remove(waiter)
            elif waiter.exception() is None:  # handed a lane it will not use now
                lane = waiter.result()
                self._lane_released(lane, lane.generation, broken=False)
            raise

    def _least_busy(self) -> _Lane | None:
        accepting = [lane for lane in self._lanes if lane.accepting]
        return min(accepting, key=lambda lane: lane.jobs, default=None)

    def _hand_out_lanes(self) -> None:
        """Give lanes with room to the jobs first in line."""
        while self._waiters and (lane := self._least_busy()) is not None:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled, and its task not yet resumed to leave the line
                continue
            lane.jobs += 1
            waiter.set_result(lane)

    def _job_done(self, lane: _Lane, generation: int, job: asyncio.Future[Any]) -> None:
        self._lane_released(lane, generation, broken=_died_running(job))

    def _lane_released(self, lane: _Lane, generation: int, *, broken: bool) -> None:
        lane.jobs -= 1
        current = generation == lane.generation and not self._closing
        # A job can finish just as its time runs out and its worker is killed.
        if current and (broken or lane.killed) and not lane.rebuilding:
            lane.rebuilding = True
            rebuild = asyncio.create_task(self._rebuild(lane))
            self._rebuilds.add(rebuild)
            rebuild.add_done_callback(self._rebuilds.discard)
        else:
            self._hand_out_lanes()

    async def _rebuild(self, lane: _Lane) -> None:
        try:
            await lane.ensure_running()
        except (OSError, BrokenProcessPool):
            # The lane takes jobs all the same: its next job tries to start it again.
            _log.exception("could not restart a conversion worker")
        finally:
            lane.rebuilding = False
            self._hand_out_lanes()


class _NeverStarted(Exception):
    """The job never ran, so it may be handed out again; ``lost`` is the answer if not."""

    def __init__(self, lost: WorkerLost) -> None:
        super().__init__(str(lost))
        self.lost = lost


def _died_running(job: asyncio.Future[Any]) -> bool:
    """The job ended because its worker died (or was stopped) before it finished."""
    return job.cancelled() or isinstance(job.exception(), BrokenProcessPool)
