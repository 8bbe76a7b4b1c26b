"""Log lines that anyone on the network can cause, kept to one short line per interval.

Malformed HTTP requests and a full file-descriptor table make aiohttp and asyncio log a traceback per
event: a peer could then fill the disk (and the journal) at will. :class:`RateLimitFilter` lets one such
record through per interval, as a single line that says how many were left out since the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError

Clock = Callable[[], float]


def once_per(interval: float, clock: Clock = time.monotonic) -> Callable[[], int | None]:
    """A gate: each call returns None while closed, else (at most once per ``interval``) the number of
    calls turned away since it last opened."""
    last = [-float("inf")]
    skipped = [0]

    def gate() -> int | None:
        now = clock()
        if now - last[0] < interval:
            skipped[0] += 1
            return None
        last[0] = now
        count, skipped[0] = skipped[0], 0
        return count

    return gate


def one_line(exc: BaseException | None) -> str:
    """``Type: first line of the message``, shortened and with control characters escaped (the message may
    quote bytes that a peer sent)."""
    if exc is None:
        return ""
    message = getattr(exc, "message", None)  # aiohttp's HTTP errors: str() starts with "400, message:"
    text = " ".join(line.strip() for line in str(message or exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:160]!r}"


class RateLimitFilter(logging.Filter):
    """Lets through one record per ``interval`` seconds of each kind that ``kind`` names (None: not limited);
    those let through lose their traceback and become one line."""

    def __init__(self, kind: Callable[[logging.LogRecord], str | None], interval: float = 60.0,
                 clock: Clock = time.monotonic, level: int | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.interval = interval
        self.clock = clock
        self.level = level
        self._gates: dict[str, Callable[[], int | None]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = self.kind(record)
        if name is None:
            return True
        gate = self._gates.setdefault(name, once_per(self.interval, self.clock))
        skipped = gate()
        if skipped is None:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        first = record.getMessage().splitlines()[0] if record.getMessage() else ""
        message = f"{first}: {one_line(exc)}" if exc is not None else first
        if skipped:
            message += f" ({skipped} more like it in the last {self.interval:g} s not logged)"
        record.msg, record.args = message, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if self.level is not None and record.levelno > self.level:
            record.levelno, record.levelname = self.level, logging.getLevelName(self.level)
        return True


def malformed_request(record: logging.LogRecord) -> str | None:
    """aiohttp's "Error handling request" for a request its parser refused (answered 400)."""
    exc = record.exc_info[1] if record.exc_info else None
    return "malformed" if isinstance(exc, HttpProcessingError) else None


# The logger given to the device site's aiohttp handlers: a malformed request is one warning line at most
# once a minute; other records (bugs) keep their traceback.
PROTOCOL_LOG = logging.getLogger("fedscaled.http.protocol")
PROTOCOL_LOG.addFilter(RateLimitFilter(malformed_request, interval=60.0, level=logging.WARNING))
