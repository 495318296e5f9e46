"""The HTTP processes of one server: who they are, the board on which they take turns
with connections, and how one scrape of /metrics reports them all.

Each process serves its own series on a private socket; the one a scrape reaches asks
the others for theirs and reports the sum, so that one scrape covers the whole server
whichever process answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .accepting import Board
from .metrics import Metrics

# A process too busy to answer within this is left out of the scrape, not waited for.
_ANSWER_SECONDS = 1.0


@dataclass(frozen=True)
class Fleet:
    main_pid: int
    """The main process's pid: it tells this server's processes from another's."""
    count: int
    number: int
    """This process's own number, from 0 to ``count - 1``."""
    board: Board

    def _address(self, number: int) -> str:
        # An abstract socket: no file to make or remove, gone with the process.
        return f"\0asgilook-aiohttp/{self.main_pid}/{number}/metrics"

    async def serve(self, metrics: Metrics) -> asyncio.Server:
        """Answer the others with this process's own series."""

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                writer.write(metrics.own_series())
                await writer.drain()
            writer.close()

        return await asyncio.start_unix_server(answer, path=self._address(self.number))

    async def others_series(self) -> list[bytes]:
        """The other processes' series, of those that answer in time."""
        others = [number for number in range(self.count) if number != self.number]
        answers = await asyncio.gather(*(self._series_of(number) for number in others))
        return [answer for answer in answers if answer is not None]

    async def _series_of(self, number: int) -> bytes | None:
        try:
            async with asyncio.timeout(_ANSWER_SECONDS):
                reader, writer = await asyncio.open_unix_connection(self._address(number))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):  # being replaced, or stuck: its watchdog will tell
            return None
