"""Whether a job still runs, and a zombie's exit code, read from real processes (procstat.read underneath)."""

import subprocess
import time

from gpu_router import procstat
from gpu_router.daemon import liveness, procevents


class _Job:
    def __init__(self, pid, pid_start):
        self.pid, self.pid_start = pid, pid_start


def _until_gone(pid):
    deadline = time.monotonic() + 10
    while not procstat.read(pid).gone:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_job_is_alive_while_it_runs_as_itself_and_dead_once_it_exits():
    p = subprocess.Popen(["sh", "-c", "read x; exit 7"], stdin=subprocess.PIPE)
    try:
        start = procstat.start_ticks(p.pid)
        assert liveness.job_alive(_Job(p.pid, start)) and liveness.job_alive(_Job(p.pid, None))
        assert not liveness.job_alive(_Job(p.pid, start + 1))       # a reused PID is another process
        assert procevents.zombie_status(p.pid) is None               # running: no wait status yet
        p.stdin.close()
        _until_gone(p.pid)
        assert not liveness.job_alive(_Job(p.pid, start))
        assert liveness.job_alive(_Job(p.pid, start), zombie_ok=True)
        assert procevents.exit_code(procevents.zombie_status(p.pid)) == 7
    finally:
        p.wait()
    assert not liveness.job_alive(_Job(p.pid, start), zombie_ok=True)


def test_a_zombie_killed_by_a_signal_reads_as_128_plus_it():
    p = subprocess.Popen(["sleep", "30"])
    try:
        p.kill()
        _until_gone(p.pid)
        assert procevents.exit_code(procevents.zombie_status(p.pid)) == 128 + 9
    finally:
        p.wait()
