"""monitor.py: health tracking, Xid hold-off, ours vs foreign, publication; in process and as a running loop."""

import json
import os
import signal
import subprocess
import time

import pytest

from fakenvml import PYTHON, FakeGpus, fake_gpus, have_pynvml  # noqa: F401  (fake_gpus is a fixture)
from gpu_router.daemon import gpu_backends as gpu, monitor
from gpu_router import snapshot

from helpers import LIB  # noqa: E402 - .build/lib, made by conftest.py

HAVE_PYNVML = have_pynvml()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def nvml(fake_gpus):
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding for /usr/bin/python3")
    fake_gpus.preload()
    yield fake_gpus


@pytest.fixture
def make_monitor(nvml, tmp_path):
    """Monitor over the in-process fake with captured events and a hand-driven monotonic clock."""
    made = []

    def make(**kw):
        events = []
        clock = Clock()
        kw.setdefault("snapshot_path", str(tmp_path / "run" / "gpus.json"))
        os.makedirs(os.path.dirname(kw["snapshot_path"]), exist_ok=True)
        m = monitor.Monitor(gpu.NvmlBackend(call_timeout_s=kw.pop("call_timeout_s", 2.0)).open(),
                            emit=lambda event, message, fields: events.append((event, message, fields)),
                            monotonic=clock, **kw)
        m.events, m.clock_ = events, clock
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def health(snap):
    return [g["health"] for g in snap["gpus"]]


def changes(m):
    out = [(f.get("DEVICE"), f["HEALTH"]) for e, _msg, f in m.events if e == "gpu-health"]
    m.events.clear()
    return out


# ---------------------------------------------------------------- ours vs foreign

def test_a_job_whose_reservation_ends_during_the_sample_is_still_ours(make_monitor, nvml):
    """A job the backend saw whose reservation is gone by the time the ledger is read (it just ended) is ours, never
    foreign use: the PIDs of the previous ledger read count too, for two sample intervals (not longer: a PID may be
    reused). Before the ledger read moved after the backend's sample (it costs the agent's loop a grace period), a
    read before the sample did this."""
    nvml.add_gpu(16384)
    job = nvml.start_job(3000, 60, gpu=0)
    try:
        FakeGpus.wait_for(lambda: len(nvml.claims()) == 1)
        ledger = [job.pid]
        m = make_monitor(reserved_pids=lambda: list(ledger), interval=1.0)
        g0 = m.sample_once()["gpus"][0]
        assert (g0["ours_mb"], g0["foreign_mb"]) == (3000, 0), g0
        ledger.clear()  # the job's reservation ends; the backend still lists its process
        m.clock_.t += 1.0
        g0 = m.sample_once()["gpus"][0]
        assert (g0["ours_mb"], g0["foreign_mb"]) == (3000, 0), g0
        assert g0["processes"] == [{"pid": job.pid, "used_mb": 3000, "ours": True, "job": job.pid}]
        m.clock_.t += 2.5  # the last read that named it is older than two intervals now
        assert m.sample_once()["gpus"][0]["ours_mb"] == 0
    finally:
        job.kill()
        job.wait()


def test_the_ledger_is_read_only_for_a_process_no_accounted_job_explains(make_monitor, nvml):
    """reserved_pids() reads /proc/locks (an RCU grace period of the agent's loop): not at all while no GPU lists a
    process or the accounted jobs (known_pids) explain each one, once per sample otherwise."""
    nvml.add_gpu(16384)
    reads = []

    def ledger():
        reads.append(1)
        return []

    accounted = []
    m = make_monitor(reserved_pids=ledger, known_pids=lambda: list(accounted))
    m.sample_once()
    assert reads == []  # no process on any GPU
    env = dict(nvml.env, CUDA_VISIBLE_DEVICES="0")
    parent = subprocess.Popen(["/bin/sh", "-c", f"{' '.join(nvml.job_cmd(3000, 60))}; exit $?"], env=env)
    procs = [parent]
    try:
        FakeGpus.wait_for(lambda: len(nvml.claims()) == 1)
        accounted.append(parent.pid)  # an accounted job; its child holds the VRAM
        g0 = m.sample_once()["gpus"][0]
        assert (g0["ours_mb"], reads) == (3000, []), (g0, reads)
        accounted.clear()  # its account closed while the backend still lists its process: the last sample knew it
        m.clock_.t += 1.0
        g0 = m.sample_once()["gpus"][0]
        assert (g0["ours_mb"], reads) == (3000, []), (g0, reads)
        accounted.append(parent.pid)
        m.clock_.t += 1.0
        procs.append(nvml.start_job(2000, 60, gpu=0))  # another user's
        FakeGpus.wait_for(lambda: len(nvml.claims()) == 2)
        g0 = m.sample_once()["gpus"][0]
        assert (g0["ours_mb"], g0["foreign_mb"], len(reads)) == (3000, 2000, 1), (g0, reads)
    finally:
        for _g, pid, _mb in nvml.claims():
            os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.kill()
            p.wait()


def test_foreign_and_ours_processes(make_monitor, nvml):
    nvml.add_gpu(16384, name="NVIDIA Fake 16GB")
    nvml.add_gpu(8192, name="NVIDIA Fake 8GB")
    nvml.set_foreign(0, 512)  # driver overhead / another container: foreign, no process
    env = nvml.env
    env["CUDA_VISIBLE_DEVICES"] = "0"
    cmd = " ".join(nvml.job_cmd(3000, 60))
    parent = subprocess.Popen(["/bin/sh", "-c", f"{cmd}; exit $?"], env=env)  # the job runs as sh's child
    foreign = nvml.start_job(2000, 60, gpu=0)
    try:
        FakeGpus.wait_for(lambda: len(nvml.claims()) == 2)
        child = next(pid for _g, pid, _mb in nvml.claims() if pid != foreign.pid)
        m = make_monitor(reserved_pids=lambda: [parent.pid])
        snap = m.sample_once()
        g0, g1 = snap["gpus"]
        assert (g0["used_mb"], g0["ours_mb"], g0["foreign_mb"], g0["free_mb"]) == (5512, 3000, 2512, 10872)
        assert sorted((p["pid"], p["used_mb"], p["ours"], p["job"]) for p in g0["processes"]) == sorted(
            [(child, 3000, True, parent.pid), (foreign.pid, 2000, False, None)])  # job: the reservation's holder
        assert (g1["used_mb"], g1["ours_mb"], g1["foreign_mb"]) == (0, 0, 0)
        assert set(g0) == {"index", "uuid", "name", "total_mb", "used_mb", "free_mb", "healthy", "health",
                           "ours_mb", "foreign_mb", "processes", "utilization"}  # utilization: NVML's busy %
        assert set(snap) == {"version", "time", "source", "error", "driver", "gpus"}
        assert snapshot.read(m.snapshot_path, 5.0) == (snap, "ok")
        # Without the reservation the same job is foreign (once the read that named it is two intervals old)
        m.reserved_pids = lambda: []
        m.clock_.t += 2 * m.interval + 0.1
        assert m.sample_once()["gpus"][0]["ours_mb"] == 0
    finally:
        for _g, pid, _mb in nvml.claims():
            os.kill(pid, signal.SIGKILL)
        for p in (parent, foreign):
            p.kill()
            p.wait()


def test_another_users_process_with_real_vram_is_journaled_once(make_monitor, nvml):
    """vram-foreign: a process that is not a job appears with >= 256 MiB; each process once, at most one event
    per GPU per 5 minutes unless a larger one appears; our jobs, small processes and driver overhead never."""
    nvml.add_gpu(32768)
    nvml.set_foreign(0, 900)                             # no process: driver overhead, never an event
    ours = nvml.start_job(3000, 60, gpu=0)
    small = nvml.start_job(100, 60, gpu=0)               # a monitoring tool's context: under the floor
    procs = [ours, small]
    try:
        m = make_monitor(reserved_pids=lambda: [ours.pid])

        def foreign_events():
            out = [f for e, _msg, f in m.events if e == "vram-foreign"]
            m.events.clear()
            return out

        m.sample_once()
        assert foreign_events() == []
        big = nvml.start_job(6000, 60, gpu=0)
        procs.append(big)
        m.sample_once()
        [f] = foreign_events()
        assert (f["DEVICE"], f["PID"], f["USED_VRAM_MB"], f["FOREIGN_MB"], f["TOTAL_MB"]) == \
            (0, big.pid, 6000, 900 + 100 + 6000, 32768)
        assert f["COMM"] == open(f"/proc/{big.pid}/comm").read().strip()
        m.sample_once()
        assert foreign_events() == []                    # the same process: once
        second = nvml.start_job(2000, 60, gpu=0)
        procs.append(second)
        m.clock_.t += 60
        m.sample_once()
        assert foreign_events() == []                    # smaller, within the quiet 5 minutes
        larger = nvml.start_job(7000, 60, gpu=0)
        procs.append(larger)
        m.sample_once()
        assert [f["PID"] for f in foreign_events()] == [larger.pid]   # larger than any reported: at once
        for p in (second, larger):
            p.kill()
            p.wait()
        FakeGpus.wait_for(lambda: all(pid not in (second.pid, larger.pid) for _g, pid, _mb in nvml.claims()))
        m.sample_once()                                  # they are gone from the GPU
        again = nvml.start_job(2000, 60, gpu=0)
        procs.append(again)
        m.clock_.t += 301
        m.sample_once()
        assert [f["PID"] for f in foreign_events()] == [again.pid]    # after the quiet time, any new one
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_cgroup_path_makes_a_process_ours(tmp_path):
    """The cgroup rule, against a fake /proc: our scopes' processes count as ours whoever their parents are."""
    proc = tmp_path / "proc"

    def add(pid, ppid, cgroup):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (py (weird) name) S {ppid} 1 1 0 -1 0\n")
        (proc / str(pid) / "cgroup").write_text(cgroup)

    add(100, 1, "0::/system.slice/runner.service\n")
    add(200, 100, "0::/gpu-router.slice/gpu-router-gpu.slice/gpu-router-whisper-7.scope\n")
    add(300, 200, "1:name=systemd:/gpu-router.slice/gpu-router-gpu.slice/gpu-router-whisper-7.scope\n")
    add(400, 100, "0::/user.slice/user-1000.slice/session-1.scope\n")
    add(500, 400, "0::/user.slice\n")
    m = monitor.Monitor(gpu.NoGpuBackend(), snapshot_path=None, proc_root=str(proc))
    cache = {}
    assert m.is_ours(200, set(), cache) and m.is_ours(300, set(), cache)
    assert not m.is_ours(400, set(), cache) and not m.is_ours(100, set(), cache)
    assert m.is_ours(500, {400}, {}) and not m.is_ours(100, {400}, {})
    assert not m.is_ours(999, set(), {})  # gone already


def test_reserved_pids_failure_counts_nothing_as_ours(make_monitor, nvml):
    nvml.add_gpu(8192)

    def broken():
        raise OSError("ledger unreadable")

    m = make_monitor(reserved_pids=broken)
    assert m.sample_once()["gpus"][0]["healthy"]


# ---------------------------------------------------------------- health

def test_gpu_lost_mid_run_flips_and_recovers(make_monitor, nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(8192)
    m = make_monitor()
    assert health(m.sample_once()) == ["ok", "ok"] and changes(m) == []
    nvml.lose(1)
    snap = m.sample_once()
    assert health(snap) == ["ok", "gpu-lost"] and snap["gpus"][1]["healthy"] is False
    assert snap["gpus"][1]["free_mb"] is None
    ev = m.events[0]
    assert ev[0] == "gpu-health" and ev[2]["DEVICE"] == 1 and ev[2]["UUID"] == nvml.uuid(1)
    assert ev[2]["HEALTH"] == "gpu-lost" and ev[2]["REASON"] == "GPU is lost"
    assert changes(m) == [(1, "gpu-lost")]
    m.sample_once()
    assert changes(m) == []  # one event per change, not per sample
    nvml.lose(1, False)
    assert health(m.sample_once()) == ["ok", "ok"]
    assert changes(m) == [(1, "ok")]
    nvml.reset_required(0)
    assert health(m.sample_once()) == ["reset-required", "ok"] and changes(m) == [(0, "reset-required")]
    nvml.reset_required(0, False)
    assert health(m.sample_once()) == ["ok", "ok"] and changes(m) == [(0, "ok")]


def test_critical_xid_holds_gpu_off_then_recovers(make_monitor, nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(16384)
    m = make_monitor(xid_holdoff_s=300)
    m.sample_once()
    nvml.xid(1, 79)
    snap = m.sample_once()
    assert health(snap) == ["ok", "xid-79"] and not snap["gpus"][1]["healthy"]
    assert snap["gpus"][1]["free_mb"] == 16384  # memory still known; the GPU is just not trusted
    assert changes(m) == [(1, "xid-79")]
    m.clock_.t += 200
    assert health(m.sample_once()) == ["ok", "xid-79"]
    nvml.xid(1, 48)  # another critical Xid restarts the hold-off, under its own code
    assert health(m.sample_once()) == ["ok", "xid-48"] and changes(m) == [(1, "xid-48")]
    m.clock_.t += 299
    assert health(m.sample_once()) == ["ok", "xid-48"]
    m.clock_.t += 2
    assert health(m.sample_once()) == ["ok", "ok"] and changes(m) == [(1, "ok")]


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68])
def test_application_xids_are_ignored(make_monitor, nvml, xid):
    nvml.add_gpu(16384)
    m = make_monitor()
    m.sample_once()
    nvml.xid(0, xid)
    assert health(m.sample_once()) == ["ok"] and changes(m) == []
    assert m.ignored_xids == [(0, xid)]


def test_ignore_list_is_configurable(make_monitor, nvml):
    nvml.add_gpu(16384)
    m = make_monitor(xid_ignore=(13, 94))
    m.sample_once()
    nvml.xid(0, 94)
    assert health(m.sample_once()) == ["ok"]
    nvml.xid(0, 31)  # not in this ignore list: critical here
    assert health(m.sample_once()) == ["xid-31"]


def test_xid_hold_off_outlasts_a_lost_gpu(make_monitor, nvml):
    nvml.add_gpu(16384)
    m = make_monitor(xid_holdoff_s=60)
    m.sample_once()
    nvml.xid(0, 79)
    nvml.lose(0)
    assert health(m.sample_once()) == ["gpu-lost"]  # the query failure is the worse news
    nvml.lose(0, False)
    assert health(m.sample_once()) == ["xid-79"]    # queries work again, the Xid hold-off still runs
    m.clock_.t += 61
    assert health(m.sample_once()) == ["ok"]
    assert changes(m) == [(0, "gpu-lost"), (0, "xid-79"), (0, "ok")]


def test_init_failure_in_snapshot_and_events(make_monitor, nvml):
    nvml.add_gpu(16384)
    nvml.fail_init()
    m = make_monitor()
    snap = m.sample_once()
    assert snap["source"] == "nvml" and snap["error"] == "init-failed: Driver Not Loaded" and snap["gpus"] == []
    assert snapshot.read(m.snapshot_path, 5.0)[0]["error"] == "init-failed: Driver Not Loaded"
    ev = [f for _e, _m, f in m.events]
    assert ev == [{"HEALTH": "init-failed", "REASON": "init-failed: Driver Not Loaded", "SOURCE": "nvml"}]
    m.events.clear()
    m.sample_once()
    assert m.events == []
    nvml.fail_init(False)
    snap = m.sample_once()
    assert snap["error"] is None and health(snap) == ["ok"]
    assert [f["HEALTH"] for _e, _m, f in m.events] == ["ok"]


def test_hung_nvml_marks_gpus_unhealthy_and_returns(make_monitor, nvml):
    nvml.add_gpu(16384)
    m = make_monitor(call_timeout_s=0.2)
    m.sample_once()
    nvml.hang(1.0, gpu=0)
    t0 = time.monotonic()
    snap = m.sample_once()
    assert time.monotonic() - t0 < 0.8
    assert health(snap) == ["error:timeout"] and snap["error"].startswith("timeout:")
    nvml.hang(0, gpu=0)
    m.backend._stuck.join(5)
    assert health(m.sample_once()) == ["ok"]
    assert changes(m) == [(0, "error:timeout"), (None, "timeout"), (0, "ok"), (None, "ok")]


def test_publish_failure_does_not_stop_sampling(nvml, tmp_path):
    nvml.add_gpu(8192)
    m = monitor.Monitor(gpu.NvmlBackend().open(), snapshot_path=str(tmp_path / "missing" / "gpus.json"),
                        emit=lambda *a: None)
    try:
        snap = m.sample_once()
        assert snap["gpus"][0]["healthy"] and "missing" in m.write_error
    finally:
        m.close()


def test_describe():
    assert monitor.describe(None) == "GPU state unknown"
    assert monitor.describe({"source": "none", "error": None, "gpus": []}) == "no GPU"
    ok = {"index": 0, "healthy": True, "health": "ok"}
    bad = {"index": 1, "healthy": False, "health": "xid-79"}
    assert monitor.describe({"gpus": [ok, dict(ok, index=1)]}) == "2 GPUs healthy"
    assert monitor.describe({"gpus": [ok, bad]}) == "1 of 2 GPUs healthy (GPU 1: xid-79)"
    assert monitor.describe({"source": "nvml", "error": "init-failed: Driver Not Loaded", "gpus": []}) == \
        "no GPU (nvml: init-failed: Driver Not Loaded)"


# ---------------------------------------------------------------- the running loop, as the agent runs it

RUNNER = """
import signal, sys, threading
sys.path.insert(0, {lib!r})
from gpu_router.daemon import monitor
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
m = monitor.Monitor({prefer!r}, snapshot_path=sys.argv[1], interval=0.05, xid_holdoff_s=0.5, call_timeout_s=2)
m.run(stop)
"""


def wait_snapshot(path, predicate, timeout=10):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        snap, reason = snapshot.read(path, 5.0)
        last = (snap, reason)
        if snap is not None and predicate(snap):
            return snap
        time.sleep(0.02)
    raise AssertionError(f"snapshot never matched; last: {last}")


def start_runner(env, path, prefer="auto"):
    env = dict(env, GPU_ROUTER_LOG="stderr")
    return subprocess.Popen([PYTHON, "-c", RUNNER.format(lib=str(LIB), prefer=prefer), path], env=env,
                            stderr=subprocess.PIPE, text=True)


def stop_runner(proc):
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_agent_loop_publishes_and_tracks_health(fake_gpus, tmp_path):
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding for /usr/bin/python3")
    fake_gpus.add_gpu(16384, name="NVIDIA Fake 16GB")
    fake_gpus.add_gpu(8192, name="NVIDIA Fake 8GB")
    path = str(tmp_path / "gpus.json")
    proc = start_runner(fake_gpus.env, path)
    job = None
    try:
        snap = wait_snapshot(path, lambda s: health(s) == ["ok", "ok"])
        assert snap["source"] == "nvml" and [g["total_mb"] for g in snap["gpus"]] == [16384, 8192]
        job = fake_gpus.start_job(4000, 60, gpu=1)
        wait_snapshot(path, lambda s: s["gpus"][1]["foreign_mb"] == 4000 and s["gpus"][1]["free_mb"] == 4192)
        job.kill()
        job.wait()
        wait_snapshot(path, lambda s: s["gpus"][1]["used_mb"] == 0)
        fake_gpus.lose(1)
        wait_snapshot(path, lambda s: health(s) == ["ok", "gpu-lost"])
        fake_gpus.lose(1, False)
        wait_snapshot(path, lambda s: health(s) == ["ok", "ok"])
        fake_gpus.xid(0, 13)
        fake_gpus.xid(0, 79)
        wait_snapshot(path, lambda s: health(s) == ["xid-79", "ok"])
        wait_snapshot(path, lambda s: health(s) == ["ok", "ok"])  # 0.5 s hold-off
    finally:
        if job and job.poll() is None:
            job.kill()
        events = stop_runner(proc)
    seen = [(e.get("GPU_ROUTER_DEVICE"), e["GPU_ROUTER_HEALTH"]) for e in events
            if e.get("GPU_ROUTER_EVENT") == "gpu-health"]
    assert seen == [("1", "gpu-lost"), ("1", "ok"), ("0", "xid-79"), ("0", "ok")]
    health_events = [e for e in events if e.get("GPU_ROUTER_EVENT") == "gpu-health"]
    assert all(e["MESSAGE_ID"] == "a25b79794e8d4660a62ed16a535b122f" for e in health_events)
    [foreign] = [e for e in events if e.get("GPU_ROUTER_EVENT") == "vram-foreign"]  # the 4000 MiB job: not ours
    assert (foreign["GPU_ROUTER_DEVICE"], foreign["GPU_ROUTER_PID"], foreign["GPU_ROUTER_USED_VRAM_MB"]) == \
        ("1", str(job.pid), "4000")
    assert foreign["MESSAGE_ID"] == "7f0e3c5a1d6b4e2f9a8c4b7d2e1f6a93" and len(events) == len(health_events) + 1


def test_agent_loop_on_nvidia_smi_fallback(fake_gpus, tmp_path):
    fake_gpus.add_gpu(16384)
    path = str(tmp_path / "gpus.json")
    proc = start_runner(fake_gpus.env_smi_only, path)
    try:
        snap = wait_snapshot(path, lambda s: health(s) == ["ok"])
        assert snap["source"] == "nvidia-smi"
        fake_gpus.fail_init()
        snap = wait_snapshot(path, lambda s: s["error"] is not None)
        assert snap["error"].startswith("init-failed") and health(snap) == ["init-failed"]
        fake_gpus.fail_init(False)
        wait_snapshot(path, lambda s: health(s) == ["ok"])
    finally:
        events = stop_runner(proc)
    assert [e["GPU_ROUTER_HEALTH"] for e in events] == ["init-failed", "init-failed", "ok", "ok"]
