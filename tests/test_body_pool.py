"""The upload body pool: reuse, its byte bound, and the idle trim that gives memory back."""

from __future__ import annotations

import asyncio

from fedscaled.core.aligned import ALIGNMENT
from fedscaled.server.body_pool import GRANULE, BodyPool


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_released_buffer_is_reused_and_the_view_is_aligned_where_asked() -> None:
    pool = BodyPool()
    raw, body = pool.acquire(4_000_000, 136)
    assert body.shape[0] == 4_000_000 and (body.ctypes.data + 136) % ALIGNMENT == 0
    pool.release(raw)
    again, body2 = pool.acquire(4_000_100, 200)
    assert again is raw and (body2.ctypes.data + 200) % ALIGNMENT == 0
    assert len(pool) == 0 and pool.free_bytes == 0


def test_as_many_buffers_as_were_in_flight_are_kept() -> None:
    # 50 uploads in flight at once: all 50 buffers come back and serve the next 50 without a new allocation.
    pool = BodyPool()
    first = [pool.acquire(1_000_000, 0)[0] for _ in range(50)]
    for raw in first:
        pool.release(raw)
    assert len(pool) == 50
    second = [pool.acquire(1_000_000, 0)[0] for _ in range(50)]
    assert {id(r) for r in second} == {id(r) for r in first}


def test_a_much_larger_buffer_is_not_spent_on_a_small_body() -> None:
    pool = BodyPool()
    big, _ = pool.acquire(10_000_000, 0)
    pool.release(big)
    small, _ = pool.acquire(100_000, 0)
    assert small is not big and len(pool) == 1


def test_free_buffers_stay_within_max_bytes_oldest_dropped_first() -> None:
    size = 4 * GRANULE
    pool = BodyPool(max_bytes=3 * (size + GRANULE))
    raws = [pool.acquire(size, 0)[0] for _ in range(5)]
    for raw in raws:
        pool.release(raw)
    assert len(pool) == 3 and pool.free_bytes <= pool.max_bytes
    kept = {id(pool.acquire(size, 0)[0]) for _ in range(3)}
    assert kept == {id(r) for r in raws[2:]}


def test_buffers_idle_past_the_limit_are_trimmed_newer_ones_kept() -> None:
    clock = FakeClock()
    pool = BodyPool(idle_seconds=60, clock=clock)
    old, _ = pool.acquire(100_000, 0)
    new, _ = pool.acquire(100_000, 0)
    pool.release(old)
    clock.now += 30
    pool.release(new)
    clock.now += 30  # old is 60 s idle, new 30 s
    pool.trim()
    assert len(pool) == 1 and pool.acquire(100_000, 0)[0] is new


def test_the_trim_timer_empties_an_idle_pool_by_itself() -> None:
    async def scenario() -> tuple[int, int, int]:
        pool = BodyPool(idle_seconds=0.05)
        raws = [pool.acquire(200_000, 0)[0] for _ in range(4)]
        for raw in raws:
            pool.release(raw)
        held = len(pool)
        for _ in range(100):  # bounded: 2 s at most
            await asyncio.sleep(0.02)
            if len(pool) == 0:
                break
        return held, len(pool), pool.free_bytes

    held, left, left_bytes = asyncio.run(scenario())
    assert held == 4 and left == 0 and left_bytes == 0


def test_close_drops_everything() -> None:
    pool = BodyPool()
    pool.release(pool.acquire(100_000, 0)[0])
    pool.close()
    assert len(pool) == 0 and pool.free_bytes == 0
