"""The lull after a burst (daemon/lull.py): what the agent's loop puts off while wrappers are asking, and the bounds
that keep a steady stream of requests from starving it. The rules on a clock of the test's; then a real agent
object with a real process whose end is heard in the middle of a burst, and real holders for the pool's top-up."""

import os
import subprocess
import time

import pytest

import helpers

from gpu_router import procstat
from gpu_router.daemon import accounting, holder, lull


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def test_the_lull_begins_quiet_s_after_the_last_request_and_never_while_wrappers_wait():
    clock = Clock()
    q = lull.Lull(clock=clock)
    assert q.quiet(busy=False), "an agent that has heard nothing is in a lull"
    q.heard()
    clock.now += lull.QUIET_S / 2
    assert not q.quiet(busy=False)
    clock.now += lull.QUIET_S * 1.01
    assert q.quiet(busy=False)
    assert not q.quiet(busy=True), "a request pending or a scope in flight is no lull, however long ago it came"


def test_put_off_ends_come_in_the_lull_all_together_with_their_status_and_time():
    clock = Clock()
    q = lull.Lull(clock=clock)
    q.heard()
    q.put_off(11, 256, 5000.0)
    q.put_off(12, None, 5000.1)
    q.put_off(12, 3 << 8, 5000.2)   # the zombie's word after the kernel had none: the known status is kept
    q.put_off(11, 9, 5000.3)        # a second word after a known one changes nothing
    assert q.due(busy=False) == []
    clock.now += lull.QUIET_S * 1.01
    assert q.due(busy=True) == [], "still busy: only ends that waited END_WAIT_MAX_S would go"
    assert q.due(busy=False) == [(11, 256, 5000.0), (12, 3 << 8, 5000.1)]
    assert q.due(busy=False) == [] and q.ended == {}


def test_a_steady_stream_of_requests_delays_an_end_at_most_end_wait_max_s_and_not_in_one_lump():
    clock = Clock()
    q = lull.Lull(clock=clock)
    q.put_off(1, 0, 1.0)
    step = lull.QUIET_S / 5
    taken = {}
    while clock.now < 100.0 + 2 * lull.END_WAIT_MAX_S:
        if clock.now >= 100.0 + lull.END_WAIT_MAX_S / 2 and 2 not in q.ended and 2 not in taken:
            q.put_off(2, 0, 2.0)
        q.heard()  # a wrapper connects at every step: never a lull
        for pid, _, _ in q.due(busy=False):
            taken[pid] = clock.now
        clock.now += step
    assert set(taken) == {1, 2}
    assert taken[1] - 100.0 == pytest.approx(lull.END_WAIT_MAX_S, abs=step)
    assert taken[2] > taken[1], "each end goes when it has waited its time, not with the oldest"


def test_everything_goes_when_the_agent_stops_and_wake_says_when_to_look_again():
    clock = Clock()
    q = lull.Lull(clock=clock)
    assert q.wake(waiting_work=False) is None
    q.heard()
    assert q.wake(waiting_work=True) == pytest.approx(clock.now + lull.QUIET_S)  # a short pool, a sample due
    clock.now += 0.01
    q.put_off(7, 0, 1.0)
    assert q.wake(waiting_work=False) == pytest.approx(100.0 + lull.QUIET_S)
    clock.now += lull.END_WAIT_MAX_S - 0.02
    q.heard()  # the lull would begin after the end's limit
    assert q.wake(waiting_work=False) == pytest.approx(100.01 + lull.END_WAIT_MAX_S), "the end's own limit"
    assert q.due(busy=True, everything=True) == [(7, 0, 1.0)]


def test_wake_never_names_a_time_already_past_so_a_loop_waiting_on_something_else_does_not_spin():
    """Past the lull's start, work still waiting waits for something with a wake-up of its own (a scope stuck in
    systemd's queue for up to 5 s, a holder spawn to retry in 5 s): a wake-up now, every turn, was a busy loop."""
    clock = Clock()
    q = lull.Lull(clock=clock)
    q.heard()
    clock.now += lull.QUIET_S * 3
    assert q.wake(waiting_work=True) is None
    q.put_off(8, 0, 1.0)
    assert q.wake(waiting_work=True) == pytest.approx(clock.now + lull.END_WAIT_MAX_S)
    clock.now += lull.END_WAIT_MAX_S * 2
    assert q.wake(waiting_work=False) == clock.now, "an end past its limit: at once (due() takes it this turn)"
    assert q.due(busy=True) == [(8, 0, 1.0)] and q.wake(waiting_work=True) is None


@pytest.fixture
def agent(tmp_path, monkeypatch):
    from gpu_router import journal
    from gpu_router.daemon import service

    base, cfg = helpers.agent_folder(tmp_path, workload='binary = "/bin/true"\nthreshold = 100\n')
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(base))
    monkeypatch.setenv("GPU_ROUTER_LOG", "stderr")
    events = []
    monkeypatch.setattr(journal, "emit", lambda name, msg, fields, **kw: events.append((name, dict(fields))))
    a = service.Agent(str(cfg))
    a.lull = lull.Lull(clock=Clock())
    yield a, events
    a.holder_pool.close()


def _job(a, mode, script):
    proc = subprocess.Popen(["sh", "-c", script])
    job_id = f"tx-{proc.pid}-abcdef"
    job = accounting.JobAccount(job_id, proc.pid, "tx", mode, "cpu" if mode == "CPU" else "0", "150",
                                f"gpu-router-{job_id}.scope", None, None, started=time.time())
    a.track(job)
    return proc, job


def _exit_heard(a, pid):
    """The loop's wake-up for the job's pidfd, dispatched as the loop does."""
    for key, events in a.selector.select(10):
        if key.data == ("exited", pid):
            a._dispatch(key, events, None)
            return time.time()
    raise AssertionError("the job's pidfd never woke the loop")


def test_a_cpu_jobs_end_heard_in_a_burst_is_accounted_in_the_lull_with_its_status_and_time(agent):
    """The job exits while wrappers are asking: nothing is accounted then, its pidfd leaves the selector (no spin
    on a readable fd), its holder is ended at once (its scope goes as soon as it always did: the deb lane's
    upgrade test saw a finished job's scope still listed when the holder waited for the lull), and in the lull
    its account has the exit status seen at its end and the duration up to it, not up to the lull. A real holder
    (no scope here: it sits in the test's own cgroup)."""
    a, events = agent
    proc, job = _job(a, "CPU", "sleep 0.1; exit 3")
    job.holder = holder.spawn()
    a.lull.heard()
    ended = _exit_heard(a, proc.pid)
    assert proc.pid in a.jobs and events == []
    assert a.selector.select(0.05) == [], "the ended job's pidfd is still in the selector"
    st = procstat.read(job.holder.pid)
    assert st is not None and st.gone, "the holder still lives: the scope would wait for the lull"
    held = job.holder.pid
    time.sleep(0.5)
    assert proc.wait() == 3  # the caller reaps it meanwhile: the status was read at the end, from the zombie
    a._end_put_off(a.lull.due(a._busy()))
    assert proc.pid in a.jobs, "accounted before the lull"
    a.lull.clock.now += lull.QUIET_S * 1.01
    a._end_put_off(a.lull.due(a._busy()))
    assert proc.pid not in a.jobs and job.pidfd is None
    assert procstat.read(held) is None, "the holder was not reaped"
    (name, fields), = events
    assert name == "job-finished" and fields["EXIT_STATUS"] == 3 and fields["RESULT"] == "failed"
    assert fields["DURATION_S"] <= ended - job.started + 0.05, "the time spent waiting for the lull was counted"


def test_a_gpu_jobs_end_is_accounted_at_once_even_in_a_burst(agent):
    """Its CUDA OOM evidence is the GPU sample right after its exit (jobend.py): never put off."""
    a, events = agent
    proc, job = _job(a, "GPU", "sleep 0.1; exit 5")
    a.lull.heard()
    _exit_heard(a, proc.pid)
    assert proc.pid not in a.jobs and a.lull.ended == {}
    assert [(n, f["EXIT_STATUS"]) for n, f in events] == [("job-finished", 5)]
    proc.wait()


def test_a_stopping_agent_puts_off_nothing_and_leaves_nothing_put_off(agent):
    """A restart (every upgrade) must not leave an end heard but not accounted: the next agent would find the job
    gone and its exit status with it (the kernel's message was read by this one). Ends heard while stopping are
    accounted at once; those put off before go in the loop's last turn (``due(everything=True)``)."""
    a, events = agent
    first, _ = _job(a, "CPU", "sleep 0.1; exit 6")
    second, _ = _job(a, "CPU", "sleep 0.3; exit 7")
    a.lull.heard()
    _exit_heard(a, first.pid)
    assert first.pid in a.lull.ended
    a.stopping = True
    _exit_heard(a, second.pid)
    assert [f["EXIT_STATUS"] for _, f in events] == [7], "heard while stopping: accounted at once"
    a._end_put_off(a.lull.due(a._busy(), everything=True))
    assert [f["EXIT_STATUS"] for _, f in events] == [7, 6] and a.jobs == {}
    first.wait()
    second.wait()


def test_a_put_off_end_is_taken_by_whoever_accounts_the_job_first(agent):
    """The sample (close_vanished) or a new request from the same PID may close the job before the lull: the
    status seen at its end goes with it, once."""
    a, events = agent
    proc, job = _job(a, "CPU", "sleep 0.1; exit 4")
    a.lull.heard()
    _exit_heard(a, proc.pid)
    proc.wait()
    a.close_vanished()  # the zombie is gone: this path alone would say "unknown"
    assert [(n, f["EXIT_STATUS"], f["RESULT"]) for n, f in events] == [("job-finished", 4, "failed")]
    a.lull.clock.now += lull.QUIET_S * 1.01
    assert a.lull.due(a._busy()) == []


def _pooled(a, n):
    a.holder_pool.fill(n)
    for h in list(a.holder_pool.starting):
        assert holder._await(h, time.monotonic() + 5)
    a.holder_pool._sort()
    assert len(a.holder_pool.ready) == n


def test_the_pool_is_topped_up_in_the_lull_unless_it_is_under_half_full(agent, monkeypatch):
    """Real holders. No systemd in this lane: the agent's connection is said to be open (the one stand-in)."""
    a, _ = agent
    monkeypatch.setattr(a.inflight, "connected", lambda: True)
    _pooled(a, holder.POOL_SIZE // 2)
    a.lull.heard()
    assert a._top_up_holders() is False and len(a.holder_pool.pids()) == holder.POOL_SIZE // 2
    assert a.lull.wake(a._pool_short()) == pytest.approx(a.lull.clock.now + lull.QUIET_S)
    a.lull.clock.now += lull.QUIET_S * 1.01
    while a._top_up_holders():
        pass
    assert len(a.holder_pool.pids()) == holder.POOL_SIZE
    a.holder_pool.close()
    _pooled(a, holder.POOL_SIZE // 2 - 1)
    a.lull.heard()
    assert a._top_up_holders() is True, "under half full: topped up in a burst too"
    assert len(a.holder_pool.pids()) > holder.POOL_SIZE // 2 - 1
    assert all(os.path.exists(f"/proc/{pid}") for pid in a.holder_pool.pids())


def test_a_put_off_jobs_scope_going_away_is_no_oom_kill(agent):
    """The holder of a put-off end is ended at once, so systemd removes the scope's cgroup while the account waits;
    cgroup v1 then signals the OOM eventfd of that cgroup (memory.oom_control: "notified when the cgroup is
    removed"), and read as an OOM count it made the job an oom-kill. The OOM watch is closed once the final
    counters are read, before the holder goes. A real v1 memory cgroup (or v2: memory.events, whose removal
    wakes inotify the same way), a real holder and job in it; the test removes the cgroup as systemd would."""
    a, events = agent
    with helpers.memory_cgroup("lull") as (rel, path):
        h = holder.spawn()
        proc = subprocess.Popen(["sh", "-c", "read x; exit 3"], stdin=subprocess.PIPE)
        try:
            for pid in (h.pid, proc.pid):
                with open(os.path.join(path, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            job = accounting.JobAccount(f"tx-{proc.pid}-abcdef", proc.pid, "tx", "CPU", "cpu", "150",
                                        f"gpu-router-tx-{proc.pid}-abcdef.scope", rel, None, started=time.time())
            job.holder = h
            a.track(job)
            assert job.oomfd is not None, "no OOM watch on the job's cgroup"
            a.lull.heard()
            proc.stdin.close()
            _exit_heard(a, proc.pid)
            assert proc.pid in a.lull.ended and job.oomfd is None
            deadline = time.monotonic() + 5
            while True:  # the holder is dead, not yet reaped: the cgroup is empty
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the cgroup did not empty"
                    time.sleep(0.02)
            for key, ev in a.selector.select(0.3):
                a._dispatch(key, ev, None)
            a.lull.clock.now += lull.QUIET_S * 1.01
            a._end_put_off(a.lull.due(a._busy()))
            (name, fields), = events
            assert (fields["RESULT"], fields["EXIT_STATUS"]) == ("failed", 3), fields
            assert procstat.read(h.pid) is None, "the holder was not reaped"
        finally:
            h.release()
            proc.wait()
