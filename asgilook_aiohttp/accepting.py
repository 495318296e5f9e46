"""Taking connections from listening sockets that several HTTP processes share, in turn.

Every process waiting on a shared socket is woken for each new connection, and the one
that gets there first takes it, and asyncio then takes every other one waiting: a burst
of new connections tends to land on one process while the others idle. Here each
process writes how many connections it holds on a board in memory they all share, and
one that holds more than one connection beyond the least loaded other lets that one
take the next. A process that lets connections pass for longer than ``_LONGEST_WAIT``
takes them anyway: the others may be too busy to.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
from collections.abc import Callable

_log = logging.getLogger(__name__)

_ABSENT = -1
_RECHECK_SECONDS = 0.001
_LONGEST_WAIT = 0.01
# As asyncio does when the process is out of descriptors or memory: try again later.
_PAUSE_AFTER_ERROR = 1.0


class Board:
    """How many connections each HTTP process holds, in shared memory; made before the
    processes are forked, so that all of them see the same."""

    def __init__(self, count: int) -> None:
        self._memory = mmap.mmap(-1, 8 * count)
        self._counts = memoryview(self._memory).cast("q")
        for number in range(count):
            self._counts[number] = _ABSENT

    def holds(self, number: int, connections: int) -> None:
        self._counts[number] = connections

    def gone(self, number: int) -> None:
        self._counts[number] = _ABSENT

    def fewest_elsewhere(self, number: int) -> int | None:
        """The fewest connections another running process holds; None if none runs."""
        others = [
            count
            for other, count in enumerate(self._counts)
            if other != number and count != _ABSENT
        ]
        return min(others, default=None)


class InTurn:
    """Accepts connections on ``sock`` for ``protocol``, in turn with the other processes
    on ``board``; ``held`` counts the connections this process holds."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[], asyncio.BaseProtocol],
        board: Board,
        number: int,
        held: Callable[[], int],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._protocol = protocol
        self._board = board
        self._number = number
        self._held = held
        self._connecting: set[asyncio.Task[object]] = set()
        self._waiting_since: float | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        self._listen()

    def _listen(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._take_one)

    def _pause(self, seconds: float) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(seconds, self._listen)

    def _take_one(self) -> None:
        holding = self._held() + len(self._connecting)
        self._board.holds(self._number, holding)
        fewest = self._board.fewest_elsewhere(self._number)
        now = self._loop.time()
        if fewest is not None and holding > fewest + 1:
            self._waiting_since = self._waiting_since or now
            if now - self._waiting_since < _LONGEST_WAIT:
                self._pause(_RECHECK_SECONDS)
                return
        self._waiting_since = None
        try:
            connection, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another process took it, or the client gave up
        except OSError as error:
            _log.warning("cannot accept connections for now: %s", error)
            self._pause(_PAUSE_AFTER_ERROR)
            return
        connection.setblocking(False)
        self._board.holds(self._number, holding + 1)
        connecting = self._loop.create_task(self._connect(connection))
        self._connecting.add(connecting)
        connecting.add_done_callback(self._connecting.discard)

    async def _connect(self, connection: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, connection)
        except Exception as error:  # the client is gone already, say
            _log.info("could not take a connection: %s", error)
            connection.close()

    def close(self) -> None:
        """Accept no more connections here; once every process has closed the socket,
        new connections are refused."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._board.gone(self._number)
