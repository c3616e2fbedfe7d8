"""Room under lag, through the real wrapper (issue 11): a snapshot written here as the agent would have written it
a moment ago, real wrappers admitting against it and the real flock ledger, real processes whose pids live or die.

No agent and no fake NVML are needed: what is under test is how the wrapper reads a snapshot that lags behind the
ledger (finished jobs still in it, new jobs not yet in it, no fresh snapshot at all).
"""

import json
import os
import subprocess
import time

import pytest

from gpu_router import slots, snapshot

SLEEPER = "#!/bin/sh\nexec sleep 30\n"


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    (tmp_path / "locks").mkdir(mode=0o770)
    job = tmp_path / "job"
    job.write_text(SLEEPER)
    job.chmod(0o755)
    size = tmp_path / "input"
    size.write_bytes(b"x" * 100)
    procs = []

    def configure(extra="", max_age="5s"):
        (tmp_path / "config.toml").write_text(f"""
[router]
lock_dir = "{tmp_path}/locks"
[gpu]
snapshot = "{tmp_path}/gpus.json"
snapshot_max_age = "{max_age}"
[agent]
socket = "{tmp_path}/agent.sock"
[workloads.w]
binary = "{job}"
probe = "file-size"
threshold = 1000000000
admission = "vram"
gpu_vram_mb = 3700
max_cpu_jobs = 0
scope = "off"
{extra}
""")

    def publish(processes=(), total=16384, age=0.0, foreign=0):
        used = foreign + sum(p["used_mb"] for p in processes)
        ours = sum(p["used_mb"] for p in processes if p["ours"])
        snapshot.write(str(tmp_path / "gpus.json"), {
            "version": 1, "time": time.time() - age, "source": "nvml", "error": None, "driver": "x",
            "gpus": [{"index": 0, "uuid": "GPU-0", "name": "Fake", "total_mb": total, "used_mb": used,
                      "free_mb": total - used, "healthy": True, "health": "ok", "ours_mb": ours,
                      "foreign_mb": used - ours, "processes": list(processes)}]})

    def start():
        """A wrapper; returns (Popen, first event line) once it has exec'd its job or exited."""
        env = dict(clean_env, GPU_ROUTER_CONFIG=str(tmp_path / "config.toml"), GPU_ROUTER_LOG="stderr",
                   GPU_ROUTER_CACHE_DIR=str(tmp_path))
        p = subprocess.Popen([str(gr_bin), "run", "--workload", "w", "--", str(size)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stderr.readline()  # the routed or blocked event (the job's sleep writes nothing)
        return p, json.loads(line)

    yield configure, publish, start, tmp_path
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def dead_pids(n):
    out = []
    for _ in range(n):
        p = subprocess.Popen(["/bin/true"])
        p.wait()
        out.append(p.pid)
    return out


def test_finished_jobs_in_a_lagging_snapshot_do_not_block_an_empty_gpu(rig):
    """Three 3700 MiB jobs ended after the last sample, three new ones were admitted: a 4th fits the empty 16 GiB
    GPU. Before the fix the finished jobs' use counted as ours on top of the new reservations: no-vram-room, exit 75
    (a burnt try for a runner that counts failures)."""
    configure, publish, start, _ = rig
    configure()
    gone = dead_pids(3)
    publish([{"pid": pid, "used_mb": 3700, "ours": True, "job": pid} for pid in gone])
    routed = [start()[1] for _ in range(4)]
    assert [e["GPU_ROUTER_MODE"] for e in routed] == ["GPU"] * 4, routed
    p, e = start()                                    # the 5th does not fit beside 4 reservations: refused
    assert (e["GPU_ROUTER_MODE"], e["GPU_ROUTER_REASON"]) == ("BLOCKED", "no-vram-room") and p.wait(10) == 75


def test_live_untracked_use_still_counts(rig):
    """The same snapshot with the processes alive (our jobs that hold no reservation): their use counts."""
    configure, publish, start, _ = rig
    configure()
    holders = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        publish([{"pid": h.pid, "used_mb": 3700, "ours": True, "job": None} for h in holders])
        assert start()[1]["GPU_ROUTER_MODE"] == "GPU"   # 16384 − 11100 = 5284: one fits
        assert start()[1]["GPU_ROUTER_REASON"] == "no-vram-room"
    finally:
        for h in holders:
            h.kill()
            h.wait()


CLOSER = """#!/usr/bin/python3
import os, sys, time
os.closerange(3, 65536)        # a job that drops what it inherited (a daemonising tool, close_range)
open(os.path.join(os.path.dirname(sys.argv[0]), "closed-%d" % os.getpid()), "w").close()
time.sleep(30)
"""


def test_a_job_that_closes_its_reservation_still_counts_while_it_runs(rig):
    """A job that closes its inherited descriptors drops its reservation's lock, but its VRAM is still in use:
    the reservation counts while the process runs, and only then is it gone. Before: the next wrappers admitted
    into VRAM that job still held (a CUDA OOM waiting to happen); the same gap opens at every job's exit, between
    exit_files() releasing the lock and the process being reaped."""
    configure, publish, start, tmp = rig
    configure()
    (tmp / "job").write_text(CLOSER)
    publish(total=8000)                               # 2 x 3700 fit in 8000, a 3rd does not
    first, e = start()
    assert e["GPU_ROUTER_MODE"] == "GPU"
    deadline = time.monotonic() + 20
    while not (tmp / f"closed-{first.pid}").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    assert slots.live_reservations(str(tmp / "locks"))["gpu0"] == [(first.pid, 3700)]
    assert start()[1]["GPU_ROUTER_MODE"] == "GPU"
    p, e = start()
    assert (e["GPU_ROUTER_MODE"], e["GPU_ROUTER_REASON"]) == ("BLOCKED", "no-vram-room") and p.wait(10) == 75
    first.kill()
    first.wait()                                      # reaped: its reservation is gone, its room is free
    assert start()[1]["GPU_ROUTER_MODE"] == "GPU"


def test_vram_mode_is_not_capped_at_one_job_per_gpu(rig):
    """No max_gpu_jobs in a vram profile: as many as fit (4 × 3700 in 16384). Before: the default slot cap of 1."""
    configure, publish, start, tmp = rig
    configure()
    publish()
    events = [start()[1] for _ in range(5)]
    assert [e["GPU_ROUTER_MODE"] for e in events] == ["GPU"] * 4 + ["BLOCKED"], events
    assert len(slots.live_reservations(str(tmp / "locks"))["gpu0"]) == 4


def test_an_explicit_slot_cap_still_caps(rig):
    configure, publish, start, _ = rig
    configure("max_gpu_jobs = 2")
    publish()
    events = [start()[1] for _ in range(3)]
    assert [e["GPU_ROUTER_MODE"] for e in events] == ["GPU", "GPU", "BLOCKED"]
    assert events[2]["GPU_ROUTER_REASON"] == "gpu-slots-full"


@pytest.mark.parametrize("extra, admitted", [
    ("max_gpu_jobs = 8\nvram_model = \"linear\"\nvram_per_unit_mb = 37.0", 1),  # worst case: the whole GPU
    ("max_gpu_jobs = 8\nblind_max_gpu_jobs = 3", 3),                             # the operator's safe cap
    ("", 4),                                                                       # 3700 each: 4 fit the worst case
])
def test_blind_admission_is_capped_by_the_worst_case_not_the_slot_cap(rig, extra, admitted):
    """A snapshot older than its max age: the GPU's size is still known, its use is not. Before the fix vram mode
    fell back to the slot cap (8 here): OOMs. Now: floor((total − reserve) / largest plausible prediction), or
    blind_max_gpu_jobs."""
    configure, publish, start, _ = rig
    configure(extra, max_age="1s")
    publish(age=30)
    events = [start()[1] for _ in range(admitted + 1)]
    assert [e["GPU_ROUTER_MODE"] for e in events] == ["GPU"] * admitted + ["BLOCKED"], events
    assert events[-1]["GPU_ROUTER_REASON"] == "blind-cap"
    assert all(e["GPU_ROUTER_GPU_STATE"] == "unknown:stale-snapshot" for e in events)
