"""The holders the agent keeps ready for scope requests (daemon/holder.Pool): real ``sleep infinity`` processes,
started together or topped up a few at a time, handed out asleep, reaped when they die in the pool and when the
pool is closed: none is ever left behind, neither a zombie nor an orphan that blocks SIGTERM for ever."""

import os
import signal
import time

from gpu_router import procstat
from gpu_router.daemon import holder


def _gone(pid):
    """No /proc entry at all: neither running nor a zombie waiting to be reaped."""
    return not os.path.exists(f"/proc/{pid}")


def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_pool_hands_out_sleeping_holders_and_close_reaps_every_one():
    pool = holder.Pool(size=3)
    pool.fill(5)
    assert len(pool.pids()) == 3  # bounded by its size
    h = pool.take()
    try:
        # The same holder spawn() makes: recognisable after an agent restart, its identity known for the record.
        assert holder.is_holder(h.pid) and h.child
        assert h.start == procstat.start_ticks(h.pid)
        assert h.pid not in pool.pids()
        pool.fill(3)
        idle = pool.pids()
        assert len(idle) == 3
        pool.close()
        for pid in idle:
            assert _gone(pid), f"pooled holder {pid} left behind after close()"
        assert pool.pids() == []
    finally:
        h.release()
    assert _gone(h.pid)


def test_a_holder_that_died_in_the_pool_is_reaped_and_never_handed_out():
    pool = holder.Pool(size=2)
    try:
        pool.fill(2)
        _until(lambda: (pool._sort(), len(pool.ready) == 2)[1])
        victim = pool.ready[0].pid
        os.kill(victim, signal.SIGKILL)
        _until(lambda: open(f"/proc/{victim}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
        h = pool.take()
        try:
            assert h.pid != victim and holder.is_holder(h.pid)
            assert _gone(victim), "a holder that died in the pool stays a zombie"
        finally:
            h.release()
    finally:
        pool.close()


def test_an_empty_pool_still_gives_a_holder_and_a_failing_spawn_stops_the_filling(monkeypatch):
    pool = holder.Pool(size=2)
    h = pool.take()  # nothing started: the old way, spawned and awaited
    try:
        assert holder.is_holder(h.pid)
    finally:
        h.release()
    monkeypatch.setattr(holder, "SLEEP", ("/nonexistent/sleep",))
    pool.fill(2)
    assert pool.failed == 1 and pool.pids() == []
    assert pool.take() is None


def test_top_up_fills_the_pool_a_few_at_a_time_and_waits_after_a_failed_spawn(monkeypatch):
    """The loop tops the pool up when idle (resident.Agent._top_up_holders): ``limit`` spawns a turn, True while
    more are missing; a spawn that fails is not tried again before TOP_UP_RETRY_S (the loop would otherwise try
    at every turn, and the topping's select(0) would spin)."""
    pool = holder.Pool(size=5)
    taken = None
    try:
        assert pool.top_up(limit=2) is True and len(pool.pids()) == 2
        assert pool.top_up(limit=2) is True and len(pool.pids()) == 4
        assert pool.top_up(limit=2) is False and len(pool.pids()) == 5  # full now
        assert pool.top_up(limit=2) is False and len(pool.pids()) == 5
        taken = pool.take()
        assert holder.is_holder(taken.pid) and taken.pid not in pool.pids() and len(pool.pids()) == 4
        _until(lambda: (pool._sort(), len(pool.ready) == 4)[1])  # kept asleep, none ended behind the caller's back
        with monkeypatch.context() as m:
            m.setattr(holder, "SLEEP", ("/nonexistent/sleep",))
            assert pool.top_up(now=100.0) is False and pool.failed == 1
        assert pool.top_up(now=100.0 + holder.TOP_UP_RETRY_S - 0.1) is False and len(pool.pids()) == 4
        assert pool.top_up(now=100.0 + holder.TOP_UP_RETRY_S) is False and len(pool.pids()) == 5
        idle = pool.pids()
    finally:
        pool.close()
        if taken is not None:
            taken.release()
    for pid in idle:
        assert _gone(pid), f"pooled holder {pid} left behind after close()"
