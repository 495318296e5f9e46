"""The sockets the server listens on: those systemd passed, else a Unix socket, else TCP.

The main process opens them once, before any HTTP process starts, and every HTTP process
accepts connections from the same ones, so whichever is free first takes the next.
"""

from __future__ import annotations

import errno
import socket
import stat
from pathlib import Path
from typing import Any

from . import systemd
from .config import Config

# As many connections as may wait to be accepted, past which the kernel refuses more.
_BACKLOG = 128


def open_sockets(config: Config) -> list[socket.socket]:
    if passed := systemd.listen_sockets():
        return passed
    if config.unix_path is not None:
        _remove_stale_socket(config.unix_path)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(str(config.unix_path))
            unix.listen(_BACKLOG)
        except BaseException:
            unix.close()
            raise
        return [unix]
    return _tcp_sockets(config.host, config.port)


def _tcp_sockets(host: str, port: int) -> list[socket.socket]:
    """One listening socket per address ``host`` stands for (both families for a name
    like localhost), all on the same port: the one the first was given when ``port`` is
    0."""
    addresses = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    opened: list[socket.socket] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            listener = socket.socket(family, kind, protocol)
            opened.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Otherwise it would take the IPv4 address too, which its sibling binds.
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            chosen_port = opened[0].getsockname()[1] if len(opened) > 1 else address[1]
            listener.bind((address[0], chosen_port, *address[2:]))
            listener.listen(_BACKLOG)
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a server that is gone would make binding fail; one that a
    live server answers on is not ours to take."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as probe:
        probe.setblocking(False)
        # Only a refused connection proves nobody is there; busy, another kind of socket
        # or an answer all mean the path is in use.
        if probe.connect_ex(str(path)) != errno.ECONNREFUSED:
            raise SystemExit(f"asgilook-aiohttp: {path} is a socket in use by another process")
    path.unlink()


def url(address: Any) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
