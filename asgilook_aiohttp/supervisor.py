"""The main process: it opens the sockets, starts the HTTP processes that serve on them,
replaces any that dies or stops answering, and is the one the service manager talks to.

It runs no event loop and no threads of its own, so that it may fork a new HTTP process
at any time; each starts from the modules already imported here, sharing their memory.
An HTTP process tells it ``ready`` once it serves, and ``alive`` every ``heartbeat``
seconds after, over a pipe. The first HTTP process starts alone, so that opening the
storage (creating or upgrading the index, sweeping what a crash left) happens once; the
others start together once it serves.

READY=1 goes to systemd once every HTTP process serves. WATCHDOG=1 pings go on while
every process has been heard from within the watchdog's time; one that has not is
killed and replaced, and should no replacement get going in that time either, the pings
stop and systemd restarts the whole service. On SIGTERM or SIGINT, every HTTP process
drains its requests and stops, and then so does this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from types import FrameType

from . import connections, converter, listening, server, systemd
from .accepting import Board
from .config import Config
from .fleet import Fleet

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Restarts of an HTTP process that keeps dying are spaced out, from this to at most
# _LONGEST_PAUSE, doubling each time it dies before it has served for _STEADY seconds.
_FIRST_PAUSE = 0.5
_LONGEST_PAUSE = 30.0
_STEADY = 60.0
_LONGEST_HEARTBEAT = 1.0
# Beyond the drain's own timeout, for the HTTP processes to stop their workers and exit.
_LAST_CHANCE = 10.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def run(config: Config) -> int:
    """Serve with ``config.http_processes`` HTTP processes until signalled; the exit
    status."""
    connections.raise_open_file_limit()  # for the HTTP processes, which inherit it
    try:
        sockets = listening.open_sockets(config)
    except OSError as error:
        raise SystemExit(f"asgilook-aiohttp: cannot listen: {error.strerror}") from None
    with contextlib.ExitStack() as stack:
        for sock in sockets:
            stack.callback(sock.close)
        fork_server = converter.start_helper_processes()
        stack.callback(converter.stop_helper_processes)
        return _Supervisor(config, sockets, fork_server).run()


@dataclasses.dataclass
class _Process:
    number: int
    pid: int
    exited: int
    """A pidfd: readable once the process has exited."""
    channel: int
    """The pipe's read end: what the process tells."""
    started: float
    heard: float
    ready: bool = False
    unread: bytes = b""


class _Supervisor:
    def __init__(self, config: Config, sockets: Sequence[socket.socket], fork_server: int) -> None:
        self._config = config
        self._sockets = sockets
        self._count = config.http_processes
        self._urls = ", ".join(listening.url(sock.getsockname()) for sock in sockets)
        self._processes: dict[int, _Process] = {}
        # When each HTTP process was last heard from, or when it last died.
        self._heard: dict[int, float] = {}
        self._pauses: dict[int, float] = {}
        self._restarts: dict[int, float] = {}  # when each process that died is to be started
        self._board = Board(self._count)
        self._selector = selectors.DefaultSelector()
        self._watch_fork_server(fork_server)
        self._stop_requested = False
        self._ready_announced = False
        self._wake = (-1, -1)
        """The pipe signals wake the main process through."""
        self._watchdog = systemd.watchdog_interval()
        # A process not heard from for the watchdog's interval (half its timeout) is
        # killed in time for the next ping to go out.
        self._silence = self._watchdog
        self._heartbeat = min(_LONGEST_HEARTBEAT, (self._watchdog or 2.0) / 2)

    def run(self) -> int:
        systemd.notify("STATUS=starting: opening the storage and the worker processes")
        wake_read, wake_write = self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(wake_read, selectors.EVENT_READ)
        previous = signal.set_wakeup_fd(wake_write)
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_stop_signal)
        try:
            started = self._start_all()
            if started:
                print(f"asgilook-aiohttp listening on {self._urls}", flush=True)
                systemd.notify("READY=1", f"STATUS={self._status()}")
                self._ready_announced = True
                self._keep_serving()
                systemd.notify(
                    "STOPPING=1",
                    f"STATUS=stopping: {len(self._processes)} HTTP processes draining",
                )
            status = self._stop_all()
            return status if started or self._stop_requested else 1
        except BaseException:
            # Its helpers wait for every process that holds them: those must go first.
            self._kill_all("is left without a main process")
            raise
        finally:
            signal.set_wakeup_fd(previous)
            self._selector.close()
            os.close(wake_read)
            os.close(wake_write)

    def _watch_fork_server(self, pid: int) -> None:
        self._fork_server = pid, os.pidfd_open(pid)
        self._selector.register(self._fork_server[1], selectors.EVENT_READ, ("fork server", None))

    def _replace_fork_server(self) -> None:
        """Start a fork server in place of one that died, and have every HTTP process
        drain and be replaced, so that the new ones start their workers with it."""
        pid, exited = self._fork_server
        self._selector.unregister(exited)
        os.close(exited)
        _log.error(
            "the fork server of the conversion workers (pid %d) exited; starting "
            "another, and the HTTP processes again",
            pid,
        )
        self._watch_fork_server(converter.restart_fork_server())
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_requested = True

    def _tell_status(self) -> None:
        if self._ready_announced:
            systemd.notify(f"STATUS={self._status()}")

    def _status(self) -> str:
        serving = sum(1 for process in self._processes.values() if process.ready)
        share = f"{serving} of {self._count}" if serving < self._count else f"{self._count}"
        return f"serving on {self._urls} with {share} HTTP processes"

    def _start_all(self) -> bool:
        """Start the first HTTP process, then, once it serves, the others; whether it
        serves. Any other that fails to start is started again later."""
        self._start(0)
        while not self._processes[0].ready:
            if self._stop_requested or self._turn(None):
                return False  # it failed to start and said why
        for number in range(1, self._count):
            self._start(number)
        while not self._stop_requested and any(
            not process.ready for process in self._processes.values()
        ):
            for process, status in self._turn(None):
                self._replace_later(process, status)
        return not self._stop_requested

    def _keep_serving(self) -> None:
        next_ping = time.monotonic()
        while not self._stop_requested:
            now = time.monotonic()
            for number, due in list(self._restarts.items()):
                if due <= now:
                    del self._restarts[number]
                    try:
                        self._start(number)
                    except OSError as error:  # out of processes or memory, say
                        _log.error("cannot start HTTP process %d: %s", number, error)
                        self._restarts[number] = now + _LONGEST_PAUSE
            if self._watchdog is not None and now >= next_ping:
                if self._all_heard_from(now):
                    systemd.notify("WATCHDOG=1")
                next_ping = now + self._watchdog
            deadlines = [*self._restarts.values()]
            if self._watchdog is not None:
                deadlines.append(next_ping)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for process, status in self._turn(timeout):
                self._replace_later(process, status)

    def _all_heard_from(self, now: float) -> bool:
        """Whether every HTTP process has been heard from within the watchdog's interval,
        or, having died or been killed for its silence just now, is being replaced; kills
        any that is silent. False while one that died is not replaced in that time."""
        assert self._silence is not None
        silent = [number for number, heard in self._heard.items() if now - heard > self._silence]
        for number in silent:
            if (process := self._processes.get(number)) is not None:
                _log.error(
                    "HTTP process %d (pid %d) has not answered for %.1f s; killing it",
                    number,
                    process.pid,
                    now - process.heard,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                self._heard[number] = now
        return all(number in self._processes for number in silent)

    def _replace_later(self, process: _Process, status: int) -> None:
        lived = time.monotonic() - process.started
        pause = self._pauses.get(process.number, 0.0)
        pause = _FIRST_PAUSE if lived >= _STEADY or not pause else min(2 * pause, _LONGEST_PAUSE)
        self._pauses[process.number] = pause
        self._restarts[process.number] = time.monotonic() + pause
        _log.error(
            "HTTP process %d (pid %d) %s; starting another in %.1f s",
            process.number,
            process.pid,
            _how_it_ended(status),
            pause,
        )
        self._tell_status()

    def _stop_all(self) -> int:
        """Ask every HTTP process to drain and stop, and wait until all have; the exit
        status: 0 if all stopped cleanly."""
        for sock in self._sockets:
            sock.close()  # so that no connection waits where nobody will accept it
        self._restarts.clear()
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        failed = False
        deadline = time.monotonic() + self._config.shutdown_timeout + _LAST_CHANCE
        while self._processes:
            if (left := deadline - time.monotonic()) <= 0:
                self._kill_all("did not stop in time")
            for process, status in self._turn(max(left, 0.1)):
                # One still starting up has no handler for the signals yet.
                stopped = status in (-signal.SIGTERM, -signal.SIGINT) and not process.ready
                if status != 0 and not stopped:
                    _log.error(
                        "HTTP process %d (pid %d) %s",
                        process.number,
                        process.pid,
                        _how_it_ended(status),
                    )
                    failed = True
        return 1 if failed else 0

    def _kill_all(self, why: str) -> None:
        for process in self._processes.values():
            _log.error("HTTP process %d (pid %d) %s; killing it", process.number, process.pid, why)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)

    def _start(self, number: int) -> None:
        channel_read, channel_write = os.pipe2(os.O_CLOEXEC)
        parent = os.getpid()
        gc.freeze()  # what is allocated so far stays shared with the child, not copied
        # Until the child has its own handlers, a stop signal must wait, not run the
        # main process's handler in the child and be lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(channel_read)
                self._become_http_process(number, channel_write, parent)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        os.close(channel_write)
        now = time.monotonic()
        process = _Process(number, pid, os.pidfd_open(pid), channel_read, now, now)
        self._processes[number] = process
        self._heard[number] = now
        self._selector.register(process.exited, selectors.EVENT_READ, ("exited", process))
        self._selector.register(channel_read, selectors.EVENT_READ, ("told", process))

    def _turn(self, timeout: float | None) -> list[tuple[_Process, int]]:
        """Wait up to ``timeout`` for news from the HTTP processes, or a signal; the
        processes that exited meanwhile, reaped, with their exit status."""
        exited = []
        for key, _ in self._selector.select(timeout):
            if key.data is None:  # a signal arrived
                with contextlib.suppress(BlockingIOError):
                    os.read(key.fd, 512)
                continue
            event, process = key.data
            if event == "fork server":
                self._replace_fork_server()
                continue
            assert isinstance(process, _Process)
            if self._processes.get(process.number) is not process:
                continue  # reaped already, earlier in this turn
            if event == "told":
                self._hear(process)
            else:
                exited.append((process, self._reap(process)))
        return exited

    def _hear(self, process: _Process) -> None:
        told = os.read(process.channel, 4096)
        if not told:  # it exited: its pidfd tells
            self._selector.unregister(process.channel)
            return
        lines = (process.unread + told).split(b"\n")
        process.unread = lines.pop()
        process.heard = self._heard[process.number] = time.monotonic()
        if b"ready" in lines and not process.ready:
            process.ready = True
            self._tell_status()

    def _reap(self, process: _Process) -> int:
        _, status = os.waitpid(process.pid, 0)
        del self._processes[process.number]
        self._heard[process.number] = time.monotonic()
        self._board.gone(process.number)
        for fd in (process.exited, process.channel):
            with contextlib.suppress(KeyError):
                self._selector.unregister(fd)
            os.close(fd)
        return os.waitstatus_to_exitcode(status)

    def _become_http_process(self, number: int, channel: int, parent: int) -> None:
        """In the child: serve as HTTP process ``number``, then exit; never returns."""
        status = 1
        try:
            _die_with(parent)
            signal.set_wakeup_fd(-1)
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            self._selector.close()
            for fd in (*self._wake, self._fork_server[1]):
                os.close(fd)
            converter.share_fork_server()
            for process in self._processes.values():
                os.close(process.exited)
                os.close(process.channel)
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)  # systemd hears from the main process alone
            _spare_workers_the_main_module()
            fleet = Fleet(parent, self._count, number, self._board)
            config = self._config.for_http_process(number)
            os.set_blocking(channel, False)

            def tell(message: str) -> None:
                with contextlib.suppress(BlockingIOError, BrokenPipeError):
                    os.write(channel, f"{message}\n".encode())

            asyncio.run(
                server.serve(config, self._sockets, fleet, tell=tell, heartbeat=self._heartbeat)
            )
            status = 0
        except SystemExit as error:
            if isinstance(error.code, str):
                print(error.code, file=sys.stderr)
            status = 1 if isinstance(error.code, str) else error.code or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)


def _die_with(parent: int) -> None:
    """Be killed when the main process ends: killed itself, it cannot ask."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the request took hold
        os._exit(1)


def _how_it_ended(status: int) -> str:
    return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"


def _spare_workers_the_main_module() -> None:
    """Keep multiprocessing from importing the program that started the server (the
    console script, run.py) in each conversion worker, as it does for the functions a
    program defines itself: the workers' functions live in the package, and importing
    the program would import the whole server into every worker."""
    main = sys.modules["__main__"]
    main.__spec__ = None
    with contextlib.suppress(AttributeError):
        del main.__file__
