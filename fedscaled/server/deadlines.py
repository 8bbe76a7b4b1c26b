"""How long a request body may take to arrive.

A device that sends part of its body and then keeps the socket open would otherwise hold its handler
(and, for an upload, the round's result slot) forever. Two bounds, both daemon options:

- ``body_timeout``: the longest silence between two pieces of the body (enforced within 1/8 of it:
  a silence of ``body_timeout`` is always allowed, one of 9/8 of it never);
- ``min_body_rate``: the whole body of N bytes must arrive within ``body_timeout + N / min_body_rate``
  seconds, which also stops a body trickled a byte at a time just often enough to stay under the first.

When either fires, the body is refused with the route's "bad body" error; the handler then ends, so its
``finally`` clauses (slot release, buffer release) run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fedscaled.errors import FedError

DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MIN_BODY_RATE = 16 * 1024  # bytes per second
SLACK = 1.125  # a silence may last up to body_timeout * SLACK before it is refused (see body_deadline)


@dataclass(frozen=True)
class BodyTimeouts:
    """``idle``: seconds allowed between two chunks; ``min_rate``: bytes per second, on average."""

    idle: float = DEFAULT_BODY_TIMEOUT
    min_rate: int = DEFAULT_MIN_BODY_RATE

    def allowed(self, size: int) -> float:
        """Seconds a body of ``size`` bytes may take in all."""
        return self.idle + size / self.min_rate


@contextlib.asynccontextmanager
async def body_deadline(timeouts: BodyTimeouts, size: int, error: type[FedError],
                        received: Callable[[], int]) -> AsyncIterator[Callable[[], None]]:
    """Bound the reading of a body of (at most) ``size`` bytes.

    Yields ``progress``: call it after each chunk to restart the silence timer. Raises ``error`` (a
    message saying which bound fired and how many bytes, from ``received()``, had come) on timeout.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + timeouts.allowed(size)
    # Moving the timer on every chunk cost ~5 % of the upload path's CPU (a 4 MB body comes in ~16 chunks;
    # each reschedule looks the loop up, which is a getpid syscall, and re-heaps a timer). So the timer is
    # moved only once it is due within ``idle``, and then to ``idle * SLACK`` ahead: a silence is still
    # allowed at least ``idle``, and at most ``idle * SLACK``.
    ahead = timeouts.idle * SLACK
    try:
        async with asyncio.timeout_at(min(loop.time() + ahead, end)) as timer:
            def progress() -> None:
                now = loop.time()
                due = timer.when()
                if due is not None and due - now < timeouts.idle:
                    timer.reschedule(min(now + ahead, end))

            yield progress
    except TimeoutError:
        got = received()
        if loop.time() >= end:
            raise error(f"truncated body: it arrived slower than {timeouts.min_rate} bytes/s "
                        f"({got} bytes in {timeouts.allowed(size):.0f} s)") from None
        raise error(f"truncated body: no data for {timeouts.idle:g} s ({got} bytes received)") from None
