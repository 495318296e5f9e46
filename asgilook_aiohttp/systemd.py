"""The two systemd protocols a service speaks: readiness notification and socket activation.

Both are small enough to speak directly (see sd_notify(3) and sd_listen_fds(3)); outside
systemd, with their environment variables unset, every function here does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import MutableMapping

_FIRST_PASSED_FD = 3  # SD_LISTEN_FDS_START


def notify(*assignments: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Send ``READY=1``, ``STATUS=...`` and the like to the service manager, if any."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as channel:
        try:
            channel.connect(address)
            channel.sendall("\n".join(assignments).encode())
        except OSError:
            return False
    return True


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between keep-alive pings (half the watchdog timeout), or None if unwatched."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


async def keep_alive(interval: float) -> None:
    """Ping the watchdog for as long as the event loop gets round to it."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The sockets systemd passed to this process, taking them over; [] if none."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)  # so that worker processes don't believe they were passed them
    sockets = []
    for fd in range(_FIRST_PASSED_FD, _FIRST_PASSED_FD + count):
        os.set_inheritable(fd, False)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue  # a FIFO or a file (ListenFIFO=, say): not ours to serve
        passed = socket.socket(fileno=fd)
        # Only listening stream sockets can carry HTTP; others (a datagram socket for
        # something else, say) are not ours to serve.
        if passed.type == socket.SOCK_STREAM and passed.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sockets.append(passed)
        else:
            passed.detach()
    return sockets
