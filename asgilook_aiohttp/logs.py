"""Logging: request ids on every line, an access log, text for people or JSON for machines.

Each request gets an id, the client's ``X-Request-ID`` when it sent a sane one, else a new
one. It is echoed in the response and set in a context variable, so every log line written
while serving the request, from any module, carries it.

Under systemd, with standard error connected to the journal, each line starts with its
syslog priority (``<3>`` for an error), which journald takes as the entry's priority, and
a text record of several lines (a traceback) is folded into one line, so that it stays one
entry: a backslash is written ``\\\\`` and a line break ``\\n``. Lines stay on the stream
systemd gave, rather than going as datagrams in journald's native protocol (which keeps
line breaks): that protocol's socket is a fixed path, which no test could stand in for,
and datagrams would not keep their order with what else reaches standard error (a
crash's traceback, say). A line longer than journald's ``LineMax=`` (48 KiB by default)
is still split into several entries.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from .keys import CLIENT

HEADER = "X-Request-ID"
_request_id: ContextVar[str] = ContextVar("request_id", default="-")
_SANE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_ACCESS_FIELDS = ("remote", "method", "path", "status", "bytes", "duration_ms", "user_agent")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    supplied = request.headers.get(HEADER)
    if supplied is None or not _SANE.fullmatch(supplied):
        # Unique, not secret: no need to ask the system for randomness each time (the
        # generator is seeded afresh in a forked process).
        request_id = f"{random.getrandbits(128):032x}"
    else:
        request_id = supplied
    _request_id.set(request_id)  # the handler runs in a task of its own: no reset needed
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers[HEADER] = request_id
        raise
    response.headers[HEADER] = request_id
    return response


class AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            # Behind a trusted proxy, the client it names (see proxies.py).
            "remote": request.get(CLIENT) or request.remote or "-",
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": _body_bytes(request, response),
            "duration_ms": round(time * 1000, 3),
            "user_agent": request.headers.get("User-Agent", "-"),
        }
        self.logger.info(
            '%s "%s %s" %d %dB %.1fms',
            fields["remote"],
            fields["method"],
            fields["path"],
            fields["status"],
            fields["bytes"],
            fields["duration_ms"],
            extra=fields,
        )


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    # A file sent with sendfile() shows only its headers in body_length.
    return response.content_length or response.body_length


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update({key: getattr(record, key) for key in _ACCESS_FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _ClientFaults(logging.Filter):
    """A request too malformed for aiohttp to parse is the client's mistake, not the
    server's: one INFO line, not an ERROR with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(error, HttpProcessingError):
            record.msg = "refused a malformed request: %s"
            record.args = (error.message,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


class _Throttle(logging.Filter):
    """Lets through at most ``burst`` warnings or errors of each kind (logger, level and
    message template) a minute, so that a flood of one failure cannot fill the disk or
    drown the rest; the first one after a quiet spell says how many were left out."""

    def __init__(self, burst: int = 10, interval: float = 60.0) -> None:
        super().__init__()
        self._burst = burst
        self._interval = interval
        self._kinds: dict[tuple[str, int, object], _Spell] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, record.levelno, record.msg)
        now = _clock()
        spell = self._kinds.get(kind)
        if spell is None or now - spell.started >= self._interval:
            if len(self._kinds) >= _MOST_KINDS:
                self._kinds.clear()
            self._kinds[kind] = _Spell(now)
            if spell is not None and spell.left_out:
                record.msg = f"{record.getMessage()} (and {spell.left_out} like it not logged)"
                record.args = ()
            return True
        spell.passed += 1
        if spell.passed <= self._burst:
            return True
        spell.left_out += 1
        return False


@dataclass
class _Spell:
    started: float
    passed: int = 1
    left_out: int = 0


_clock = time.monotonic
# Messages are templates in the code, so kinds are few; this bounds them all the same.
_MOST_KINDS = 1000


class _JournalLines(logging.Formatter):
    """A line for journald's stream protocol: the record's syslog priority first, and
    nothing after a line break, which would begin another entry."""

    def __init__(self, formatter: logging.Formatter, *, fold: bool) -> None:
        super().__init__()
        self._formatter = formatter
        self._fold = fold

    def format(self, record: logging.LogRecord) -> str:
        line = self._formatter.format(record)
        if self._fold:
            line = fold(line)
        return f"<{_priority(record.levelno)}>{line}"


def fold(text: str) -> str:
    """``text`` on one line; undone by reading ``\\\\`` as a backslash and ``\\n`` as a line
    break, from left to right."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7


def _priority(level: int) -> int:
    return next((priority for least, priority in _PRIORITIES if level >= least), _DEBUG_PRIORITY)


def stderr_is_journal() -> bool:
    """Whether standard error is the journal's stream: systemd says so by naming its
    device and inode in ``JOURNAL_STREAM``, which a redirection of standard error (by a
    shell the service runs, say) leaves behind, pointing elsewhere."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(2)
        return (int(device), int(inode)) == (status.st_dev, status.st_ino)
    except (ValueError, OSError):
        return False


def configure(log_format: str, level: str = "info") -> None:
    """Send ``level`` and above to standard error, as text or as JSON lines."""
    # Neither format shows the process, the thread or the calling line: a record need
    # not find them out, which it would do for every access line.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ClientFaults())
    handler.addFilter(_Throttle())
    handler.addFilter(_RequestIdFilter())
    journal = stderr_is_journal()
    formatter: logging.Formatter
    if log_format == "json":
        # JSON keeps its time, so that its fields are the same wherever it goes; a line
        # break in it is escaped already.
        formatter = _JsonFormatter()
    else:
        # journald stamps each entry with the time it arrived: no need to write another.
        stamp = "" if journal else "%(asctime)s "
        formatter = logging.Formatter(f"{stamp}%(levelname)s %(name)s [%(request_id)s] %(message)s")
    handler.setFormatter(
        _JournalLines(formatter, fold=log_format != "json") if journal else formatter
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
