"""Taking connections from listening sockets that several HTTP processes share, in turn.

Every process waiting on a shared socket is woken for each new connection, and the one
that gets there first takes it, and asyncio then takes every other one waiting: a burst
of new connections tends to land on one process while the others idle. Here each
process writes how many connections it holds on a board in memory they all share, as it
looks for a new one and every ``_REFRESH_SECONDS``; one that holds more than one beyond
the least loaded other leaves the next connection to it. Should that one not even look
within ``_LONGEST_WAIT`` (its event loop stuck), the others take the connections, and
wait for it no more until it looks.
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
# Connections closing are not written at once: a process holding them writes its count
# again this often.
_REFRESH_SECONDS = 0.1
# Longer than a busy process may go unscheduled on a machine whose CPUs are all in use.
_LONGEST_WAIT = 0.05
# As asyncio does when the process is out of descriptors or memory: try again later.
_PAUSE_AFTER_ERROR = 1.0


class Board:
    """How many connections each HTTP process holds, and how many times it has written
    that, in shared memory: made before the processes are forked, so that all of them see
    the same. Only a process itself writes its own."""

    def __init__(self, count: int) -> None:
        self._memory = mmap.mmap(-1, 16 * count)
        self._slots = memoryview(self._memory).cast("q")
        for number in range(count):
            self.gone(number)

    def holds(self, number: int, connections: int) -> None:
        self._slots[2 * number] = connections
        self._slots[2 * number + 1] += 1

    def gone(self, number: int) -> None:
        self._slots[2 * number] = _ABSENT

    def least_loaded_elsewhere(self, number: int) -> tuple[int, int] | None:
        """Of the other running processes, the one holding the fewest connections: how
        many, and how many times it has written that; None if no other runs."""
        others = [
            (self._slots[2 * other], self._slots[2 * other + 1])
            for other in range(len(self._slots) // 2)
            if other != number and self._slots[2 * other] != _ABSENT
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
        self._looked = 0
        self._unresponsive_at: int | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        sock.setblocking(False)
        self._refresh = self._loop.call_soon(self._write_holding)
        self._listen()

    def _listen(self) -> None:
        self._resume = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._take_one)

    def _pause(self, seconds: float) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(seconds, self._listen)

    def _holding(self) -> int:
        return self._held() + len(self._connecting)

    def _write_holding(self) -> None:
        self._board.holds(self._number, self._holding())
        self._refresh = self._loop.call_later(_REFRESH_SECONDS, self._write_holding)

    def _take_one(self) -> None:
        holding = self._holding()
        self._board.holds(self._number, holding)
        if self._leaves_it(holding):
            self._pause(_RECHECK_SECONDS)
            return
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

    def _leaves_it(self, holding: int) -> bool:
        """Whether to leave the next connection to the least loaded other process: while
        it holds more than one fewer, unless it has not written its count for
        ``_LONGEST_WAIT`` (then not until it writes again)."""
        fewest = self._board.least_loaded_elsewhere(self._number)
        if fewest is None or holding <= fewest[0] + 1:
            self._waiting_since = None
            return False
        looked = fewest[1]
        if looked == self._unresponsive_at:
            return False
        now = self._loop.time()
        if self._waiting_since is None or looked != self._looked:
            self._waiting_since, self._looked = now, looked
        if now - self._waiting_since < _LONGEST_WAIT:
            return True
        self._waiting_since, self._unresponsive_at = None, looked
        return False

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
        self._refresh.cancel()
        if self._resume is not None:
            self._resume.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._board.gone(self._number)
