"""The wrapper end to end through the real launcher: real processes, real flock, real signals, real sockets.

Concurrency is measured on the fake job's own records (start/end times and a counter under its own flock), never
on what the wrapper says about itself. Events are checked on what was actually written: JSON lines on stderr, or
datagrams on a journald-protocol socket of the test's own.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import pytest

import helpers
from gpu_router import journal

SMALL, BIG = 100, 5000  # bytes: under / over the threshold below
PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 2, "max_cpu_jobs": 1,
           "gpu_args": ["--device", "cuda"], "cpu_args": ["--device", "cpu", "--threads", "1"]}


def rig_for(tmp_path, gr_bin, clean_env, router=None, gpu=None, host=None, **profile):
    table = dict(PROFILE)
    table.update(profile)
    return helpers.Rig(tmp_path, gr_bin, clean_env, {"w": table}, router=router, gpu=gpu, host=host)


def make_input(folder, size, name=None):
    path = pathlib.Path(folder) / (name or f"in-{size}.bin")
    path.write_bytes(b"x" * size)
    return path


def wait_for_file(path, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def start_holder(rig, path, sleep=60, env=None):
    """A wrapper whose job holds its slot (sleeping) until killed; returns once the job has started."""
    err = open(rig.root / f"holder-{time.monotonic_ns()}.err", "wb")
    p = rig.spawn("w", path, env=dict({"JOB_SLEEP": str(sleep)}, **(env or {})), stderr=err)
    err.close()
    wait_for_file(rig.log / f"{p.pid}.start")
    return p


def kill(p):
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(10)


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    return rig_for(tmp_path, gr_bin, clean_env)


@pytest.fixture
def jsock():
    js = helpers.JournalSocket()
    yield js
    js.close()


def check_lock_fds(record, lock_dir, expected):
    """The job holds exactly the expected lock files, and no other descriptor into the lock dir."""
    held = sorted(t for t in record["fds"].values() if t.startswith(str(lock_dir)))
    assert held == sorted(str(lock_dir / e) for e in expected), record["fds"]


# ---- routing, arguments, environment, exec ------------------------------------------------------------------

def test_gpu_job_is_execd_with_its_args_gpu_args_and_device(rig, jsock):
    small = make_input(rig.root, SMALL, "in small.bin")
    p = subprocess.Popen(rig.argv("w", "--model", "x", small), env=dict(rig.env, GPU_ROUTER_LOG="",
                                                                          GPU_ROUTER_JOURNAL_SOCKET=jsock.path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert err == b"", "with journald reachable nothing goes to stderr"
    rec, = rig.records()
    assert rec["pid"] == p.pid, "the job must be the wrapper's own process (exec)"
    assert rec["argv"] == [str(rig.job), "--model", "x", str(small), "--device", "cuda"]
    assert (rec["mode"], rec["cuda"], rec["cuda_order"]) == ("GPU", "0", "PCI_BUS_ID")
    check_lock_fds(rec, rig.lock_dir, ["w.gpu0.0"])
    ev, = jsock.wait_for(lambda e: e.get("GPU_ROUTER_EVENT") == "routed")
    assert ev["MESSAGE_ID"] == journal.MESSAGE_IDS["routed"]
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_WORKLOAD"]) == ("GPU", "under-threshold", "w")
    assert (ev["GPU_ROUTER_METRIC"], ev["GPU_ROUTER_THRESHOLD"], ev["GPU_ROUTER_UNIT"]) == ("100", "1000", "bytes")
    assert (ev["GPU_ROUTER_DEVICE"], ev["GPU_ROUTER_SLOT"], ev["GPU_ROUTER_INPUT"]) == ("0", "0", str(small))
    assert ev["GPU_ROUTER_PID"] == str(p.pid) and ev["GPU_ROUTER_JOB"] == rec["job"]
    assert ev["GPU_ROUTER_GPU_STATE"] == "unknown:no-snapshot"
    assert ev["SYSLOG_IDENTIFIER"] == "gpu-router" and ev["PRIORITY"] == "6"
    assert "GPU_ROUTER_PROBE_ERROR" not in ev


def test_cpu_job_gets_cpu_args_and_an_empty_cuda_visible_devices(rig):
    big = make_input(rig.root, BIG)
    res = rig.run("w", big, env={"CUDA_VISIBLE_DEVICES": "0,1"})  # the caller's value must not leak through
    assert res.rc == 0, res
    rec, = rig.records()
    assert rec["argv"] == [str(rig.job), str(big), "--device", "cpu", "--threads", "1"]
    assert (rec["mode"], rec["cuda"]) == ("CPU", "")
    check_lock_fds(rec, rig.lock_dir, ["w.cpu.0"])
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_DEVICE"], ev["GPU_ROUTER_SLOT"]) == \
        ("CPU", "over-threshold", "cpu", "0")
    assert ev["GPU_ROUTER_METRIC"] == "5000"


def test_job_signal_dispositions_are_the_callers(rig, tmp_path):
    """Python ignores SIGPIPE and SIGXFSZ at start-up; exec keeps ignored signals ignored, so the wrapper must
    restore them, or `job | head` no longer ends the job the way it did without the router. (The job here is a
    shell script: a Python job would ignore them itself.)"""
    sigjob = tmp_path / "sigjob"
    sigjob.write_text('#!/bin/sh\nexec grep -E "^Sig(Ign|Blk)" /proc/self/status > "$OUT.$$"\n')
    sigjob.chmod(0o755)
    rig.doc["workloads"]["w"]["binary"] = str(sigjob)
    rig.rewrite()
    out = tmp_path / "sig"
    direct = subprocess.Popen([str(sigjob)], env=dict(rig.env, OUT=str(out)))
    assert direct.wait(30) == 0
    p = subprocess.Popen(rig.argv("w", make_input(tmp_path, SMALL)), env=dict(rig.env, OUT=str(out)),
                         stderr=subprocess.DEVNULL)
    assert p.wait(30) == 0
    base = dict(line.split() for line in open(f"{out}.{direct.pid}").read().replace(":", "").splitlines())
    got = dict(line.split() for line in open(f"{out}.{p.pid}").read().replace(":", "").splitlines())
    assert int(got["SigIgn"], 16) & (1 << (signal.SIGPIPE - 1)) == 0, "SIGPIPE is ignored in the job"
    assert got == base


@pytest.mark.parametrize("code", [0, 1, 3, 75, 255])
def test_exit_status_passes_through(rig, code):
    res = rig.run("w", make_input(rig.root, SMALL), env={"JOB_EXIT": str(code)})
    assert res.rc == code


def test_signal_to_the_wrapper_pid_reaches_the_job(rig):
    p = rig.spawn("w", make_input(rig.root, SMALL), env={"JOB_SLEEP": "60"})
    wait_for_file(rig.log / f"{p.pid}.start")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(10) == -signal.SIGTERM
    # A caller started from a background shell ignores SIGINT, and exec (rightly) passes that on: give the wrapper
    # the default disposition a foreground caller has, so the test measures the wrapper, not how pytest was started.
    p = rig.spawn("w", make_input(rig.root, SMALL), env={"JOB_SLEEP": "60"},
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_file(rig.log / f"{p.pid}.start")
    os.kill(p.pid, signal.SIGINT)  # Python's own SIGINT handler must not survive into the job either
    assert p.wait(10) == -signal.SIGINT


def test_argv0_dispatch_through_a_symlink(rig, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "w").symlink_to(rig.gr_bin)
    small = make_input(tmp_path, SMALL)
    p = subprocess.run([str(bindir / "w"), "--flag", small], env=rig.env, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    rec, = rig.records()
    assert rec["argv"] == [str(rig.job), "--flag", str(small), "--device", "cuda"]
    # a wrapped binary with another name: the workload comes from `gpu-router wrap`'s record
    (bindir / "whisper-ctranslate2").symlink_to(rig.gr_bin)
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "whisper-ctranslate2.workload").write_text("w\n")
    p = subprocess.run([str(bindir / "whisper-ctranslate2"), small], env=rig.env, capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert helpers.stderr_events(p.stderr.decode())[0]["GPU_ROUTER_WORKLOAD"] == "w"
    # unknown link name, no record: a config error naming the workload
    (bindir / "other").symlink_to(rig.gr_bin)
    p = subprocess.run([str(bindir / "other"), small], env=rig.env, capture_output=True, timeout=30)
    assert p.returncode == 2 and b"no workload profile named 'other'" in p.stderr


def test_missing_or_unexecutable_binary(rig, tmp_path):
    rig.doc["workloads"]["w"]["binary"] = str(tmp_path / "nope")
    rig.rewrite()
    res = rig.run("w", make_input(tmp_path, SMALL))
    assert res.rc == 127 and "cannot run" in res.err
    ev = res.event("job-finished")
    assert (ev["GPU_ROUTER_RESULT"], ev["GPU_ROUTER_EXIT_STATUS"]) == ("failed", "127")
    (tmp_path / "noexec").write_text("#!/bin/sh\n")
    rig.doc["workloads"]["w"]["binary"] = str(tmp_path / "noexec")
    rig.rewrite()
    assert rig.run("w", make_input(tmp_path, SMALL)).rc == 126


def test_profile_env_is_added(rig):
    rig.doc["workloads"]["w"]["env"] = {"JOB_EXIT": "7"}
    rig.rewrite()
    assert rig.run("w", make_input(rig.root, SMALL)).rc == 7


# ---- admission: slots, retry codes, SIGKILL, the bounded wait ---------------------------------------------------

def test_200_wrappers_at_once_never_exceed_the_slots(tmp_path, gr_bin, clean_env):
    """2 GPU slots + 1 CPU slot, 200 wrappers started together: at no instant do more than 2 GPU jobs and 1 CPU
    job run (per the jobs' own clocks and their own flock counter), and every other wrapper exits 75."""
    rig = rig_for(tmp_path, gr_bin, clean_env)
    small, big = make_input(tmp_path, SMALL), make_input(tmp_path, BIG)
    errs = tmp_path / "errs"
    errs.mkdir()
    env = {"JOB_SLEEP": "2.5"}
    rig.warm("w", small, env={"JOB_SLEEP": "0"})  # the config cache is warm on a running system
    for f in rig.log.iterdir():
        f.unlink()
    procs = []
    for i in range(200):
        with open(errs / f"{i}.err", "wb") as err:
            procs.append((i, rig.spawn("w", small if i % 2 == 0 else big, env=env, stderr=err)))
    rcs = {}
    for i, p in procs:
        rcs[i] = p.wait(120)
    assert set(rcs.values()) <= {0, 75}, sorted(set(rcs.values()))
    ran = {p.pid: i for i, p in procs if rcs[i] == 0}
    records = rig.records()
    assert len(records) == len(ran) == len(rig.starts())
    assert {r["pid"] for r in records} == set(ran)
    gpu = [(r["start"], r["end"]) for r in records if r["mode"] == "GPU"]
    cpu = [(r["start"], r["end"]) for r in records if r["mode"] == "CPU"]
    assert helpers.max_overlap(gpu) == 2, "GPU jobs must overlap (2 slots), never 3"
    assert helpers.max_overlap(cpu) == 1
    assert max(r["concurrent"] for r in records if r["mode"] == "GPU") == 2
    assert max(r["concurrent"] for r in records if r["mode"] == "CPU") == 1
    for r in records:
        assert r["mode"] == ("GPU" if r["argv"][1] == str(small) else "CPU")
    blocked = 0
    for i, p in procs:
        events = helpers.stderr_events((errs / f"{i}.err").read_text())
        if rcs[i] == 75:
            ev, = events
            blocked += 1
            assert ev["MESSAGE_ID"] == journal.MESSAGE_IDS["blocked"] and ev["GPU_ROUTER_MODE"] == "BLOCKED"
            assert ev["GPU_ROUTER_REASON"] == ("gpu-slots-full" if i % 2 == 0 else "cpu-slots-full")
            assert ev["GPU_ROUTER_PID"] == str(p.pid)
            assert "GPU_ROUTER_SLOT" not in ev and "GPU_ROUTER_DEVICE" not in ev
        else:
            ev, = events
            assert ev["GPU_ROUTER_EVENT"] == "routed" and ev["GPU_ROUTER_PID"] == str(p.pid)
    assert blocked == 200 - len(ran) and blocked >= 150


def test_custom_retry_exit_code(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, router={"retry_exit_code": 99}, max_gpu_jobs=1)
    rig.doc["workloads"]["v"] = dict(rig.doc["workloads"]["w"], retry_exit_code=42)
    rig.rewrite()
    small = make_input(tmp_path, SMALL)
    holder = start_holder(rig, small)
    try:
        res = rig.run("w", small)
        assert res.rc == 99 and "exit 99" in res.err
        assert res.event("blocked")["GPU_ROUTER_REASON"] == "gpu-slots-full"
        other = start_holder_named(rig, "v", small)
        try:
            assert rig.run("v", small).rc == 42
        finally:
            kill(other)
    finally:
        kill(holder)


def start_holder_named(rig, name, path):
    p = subprocess.Popen(rig.argv(name, path), env=dict(rig.env, JOB_SLEEP="60"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    wait_for_file(rig.log / f"{p.pid}.start")
    return p


def test_sigkilled_job_frees_its_slot_at_once(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1)
    small = make_input(tmp_path, SMALL)
    holder = start_holder(rig, small)
    try:
        res = rig.run("w", small)
        assert res.rc == 75
        ev = res.event("blocked")
        assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["PRIORITY"]) == ("BLOCKED", "gpu-slots-full", "5")
        assert ev["GPU_ROUTER_METRIC"] == "100" and ev["GPU_ROUTER_WORKLOAD"] == "w"
    finally:
        kill(holder)
    assert holder.returncode == -signal.SIGKILL
    started = time.monotonic()
    res = rig.run("w", small)
    assert res.rc == 0 and time.monotonic() - started < 5
    assert res.event("routed")["GPU_ROUTER_SLOT"] == "0"


def test_spill_to_cpu_when_the_gpu_is_full(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1, spill_to_cpu=True)
    small = make_input(tmp_path, SMALL)
    holder = start_holder(rig, small)
    try:
        res = rig.run("w", small)
        assert res.rc == 0
        ev = res.event("routed")
        assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_DEVICE"]) == \
            ("CPU", "spill:gpu-slots-full", "cpu")
        assert [r for r in rig.records() if r["pid"] != holder.pid][0]["argv"][-1] == "1"  # cpu_args
    finally:
        kill(holder)


def test_bounded_wait_admits_in_arrival_order(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1, wait="20s")
    small = make_input(tmp_path, SMALL)
    queue = rig.lock_dir / "w.gpu.queue"
    holder = start_holder(rig, small, sleep=60)
    waiters = []
    try:
        for n in range(5):
            err = open(tmp_path / f"w{n}.err", "wb")
            waiters.append(rig.spawn("w", small, env={"JOB_SLEEP": "0.2"}, stderr=err))
            err.close()
            deadline = time.monotonic() + 20
            while len([x for x in os.listdir(queue) if not x.startswith(".")]) < n + 1:  # its ticket is in
                assert time.monotonic() < deadline and waiters[-1].poll() is None
                time.sleep(0.01)
        time.sleep(0.3)
        assert all(w.poll() is None for w in waiters), "waiters must wait, not give up"
        kill(holder)
        assert [w.wait(30) for w in waiters] == [0] * 5
    finally:
        kill(holder)
        for w in waiters:
            kill(w)
    order = [r["pid"] for r in sorted(rig.records(), key=lambda r: r["start"]) if r["pid"] != holder.pid]
    assert order == [w.pid for w in waiters]
    records = [r for r in rig.records() if r["pid"] != holder.pid]
    assert helpers.max_overlap([(r["start"], r["end"]) for r in records]) == 1
    for n, w in enumerate(waiters):
        ev, = helpers.stderr_events((tmp_path / f"w{n}.err").read_text())
        assert ev["GPU_ROUTER_EVENT"] == "routed" and float(ev["GPU_ROUTER_WAITED_S"]) > 0
        check_lock_fds(next(r for r in records if r["pid"] == w.pid), rig.lock_dir, ["w.gpu0.0"])
    assert [x for x in os.listdir(queue)] == [], "every ticket is gone"


def test_bounded_wait_gives_up_after_the_wait(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1, wait="1s")
    small = make_input(tmp_path, SMALL)
    holder = start_holder(rig, small)
    try:
        started = time.monotonic()
        res = rig.run("w", small)
        took = time.monotonic() - started
        assert res.rc == 75 and 1.0 <= took < 4, took
        ev = res.event("blocked")
        assert ev["GPU_ROUTER_REASON"] == "gpu-slots-full" and float(ev["GPU_ROUTER_WAITED_S"]) >= 1.0
    finally:
        kill(holder)


def test_queued_waiter_killed_does_not_block_the_queue(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1, wait="20s")
    small = make_input(tmp_path, SMALL)
    queue = rig.lock_dir / "w.gpu.queue"
    holder = start_holder(rig, small)
    try:
        first = rig.spawn("w", small)
        deadline = time.monotonic() + 20
        while not [x for x in os.listdir(queue) if not x.startswith(".")]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        kill(first)  # dies holding the head ticket
        second = rig.spawn("w", small)
        time.sleep(0.3)
        kill(holder)
        assert second.wait(10) == 0
    finally:
        kill(holder)


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _bad_input(kind, folder):
    folder = pathlib.Path(folder)
    if kind == "missing":
        return folder / "missing.wav", "input-missing"
    if kind == "empty":
        (folder / "empty.wav").write_bytes(b"")
        return folder / "empty.wav", "input-empty"
    if kind == "directory":
        (folder / "dir.wav").mkdir()
        return folder / "dir.wav", "input-not-regular"
    if kind == "fifo":
        os.mkfifo(folder / "fifo.wav")
        return folder / "fifo.wav", "input-not-regular"
    if kind == "corrupt":
        import random

        (folder / "corrupt.wav").write_bytes(random.Random(1).randbytes(8192))
        return folder / "corrupt.wav", "probe-failed"
    raise ValueError(kind)


BAD_KINDS = ["missing", "empty", "directory", "fifo", "corrupt"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_routes_to_cpu_with_a_probe_failed_event(tmp_path, gr_bin, clean_env, kind):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe="ffprobe-duration", threshold=3600, input="arg:2")
    path, reason = _bad_input(kind, tmp_path)
    res = rig.run("w", "--in", path, timeout=30)
    assert res.rc == 0, res
    rec, = rig.records()
    assert (rec["mode"], rec["cuda"]) == ("CPU", "")
    assert rec["argv"] == [str(rig.job), "--in", str(path), "--device", "cpu", "--threads", "1"]
    pf = res.event("probe-failed")
    assert pf["MESSAGE_ID"] == journal.MESSAGE_IDS["probe-failed"]
    assert (pf["GPU_ROUTER_REASON"], pf["GPU_ROUTER_INPUT"], pf["GPU_ROUTER_ON_PROBE_ERROR"]) == \
        (reason, str(path), "cpu")
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_METRIC"]) == ("CPU", "probe-failed",
                                                                                         "unknown")
    assert ev["GPU_ROUTER_PROBE_ERROR"] == reason
    assert ev["GPU_ROUTER_METRIC"] != "0"


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_with_on_probe_error_fail_exits_65(tmp_path, gr_bin, clean_env, kind):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe="ffprobe-duration", threshold=3600, input="arg:1",
                  on_probe_error="fail")
    path, reason = _bad_input(kind, tmp_path)
    res = rig.run("w", path, timeout=30)
    assert res.rc == 65, res
    assert rig.starts() == []
    assert res.event("probe-failed")["GPU_ROUTER_REASON"] == reason
    assert [e for e in res.events if e["GPU_ROUTER_EVENT"] == "routed"] == []
    assert 'on_probe_error = "fail"' in res.err


def test_probe_error_exit_code_is_configurable(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, router={"probe_error_exit_code": 11}, on_probe_error="fail")
    assert rig.run("w", tmp_path / "nope").rc == 11  # no input found at all


def test_no_input_among_the_args(rig):
    res = rig.run("w", "--only", "options")
    assert res.rc == 0 and res.event("probe-failed")["GPU_ROUTER_REASON"] == "no-input"
    assert "GPU_ROUTER_INPUT" not in res.event("routed")


def test_fifo_input_is_not_read_and_its_writer_loses_nothing(tmp_path, gr_bin, clean_env):
    """The job reads the FIFO itself: the writer's data must reach it whole, and the wrapper must not hang."""
    rig = rig_for(tmp_path, gr_bin, clean_env, probe="ffprobe-duration", threshold=3600)
    fifo = tmp_path / "stream.wav"
    os.mkfifo(fifo)
    data = os.urandom(300_000)
    errors = []

    def writer():
        try:
            with open(fifo, "wb") as f:
                f.write(data)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.05)
    res = rig.run("w", fifo, env={"JOB_READ": str(fifo), "JOB_COPY": str(tmp_path / "copy")}, timeout=30)
    t.join(10)
    assert res.rc == 0, res
    assert not errors, errors
    assert (tmp_path / "copy").read_bytes() == data
    assert res.event("probe-failed")["GPU_ROUTER_REASON"] == "input-not-regular"


def test_hung_probe_is_killed_with_its_children(tmp_path, gr_bin, clean_env):
    marker = f"{os.getpid()}{int(time.time()) % 100000}.25"
    rig = rig_for(tmp_path, gr_bin, clean_env, probe="command", probe_timeout="1s",
                  probe_command=["/bin/sh", "-c", f"sleep {marker} & sleep {marker}", "sh", "{input}"])
    started = time.monotonic()
    res = rig.run("w", make_input(tmp_path, SMALL), timeout=30)
    took = time.monotonic() - started
    assert res.rc == 0 and 1.0 <= took < 4, (res, took)
    assert res.event("probe-failed")["GPU_ROUTER_REASON"] == "probe-timeout"
    assert res.event("routed")["GPU_ROUTER_MODE"] == "CPU"
    time.sleep(0.2)
    assert helpers.processes_with_arg(marker) == [], "a sleep of the hung probe survived"


@pytest.mark.parametrize("name", ["with space.wav", "new\nline.wav", "ünï ✓ 音.wav", "-dash.wav", "$(x) `y`.wav"])
def test_awkward_names_reach_probe_job_and_journal_intact(tmp_path_factory, tmp_path, gr_bin, clean_env, jsock,
                                                          name):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe="ffprobe-duration", threshold=10)
    path = tmp_path / name
    shutil.copy(helpers.media(tmp_path_factory, "2s.wav"), path)
    res = rig.run("w", "--", path, env={"GPU_ROUTER_LOG": "", "GPU_ROUTER_JOURNAL_SOCKET": jsock.path})
    assert res.rc == 0, res
    rec, = rig.records()
    assert rec["argv"] == [str(rig.job), "--", str(path), "--device", "cuda"]
    ev, = jsock.wait_for(lambda e: e.get("GPU_ROUTER_EVENT") == "routed")
    assert ev["GPU_ROUTER_INPUT"] == str(path)
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_UNIT"]) == ("GPU", "seconds")
    assert float(ev["GPU_ROUTER_METRIC"]) == pytest.approx(2.0, abs=0.1)


@pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv to run as nobody")
def test_unreadable_input_as_unprivileged_caller(gr_bin, clean_env):
    root = helpers.public_tmpdir()
    try:
        rig = helpers.Rig(root, gr_bin, clean_env, {"w": dict(PROFILE)})
        os.chown(rig.cache, 65534, 65534)
        rig.lock_dir.mkdir(mode=0o770)  # as tmpfiles.d makes it, with the caller's group
        os.chown(rig.lock_dir, 0, 65534)
        rig.lock_dir.chmod(0o2770)
        secret = make_input(root, SMALL, "secret.bin")
        secret.chmod(0o600)
        res = rig.run("w", secret, user="nobody")
        assert res.rc == 0, res
        assert res.event("probe-failed")["GPU_ROUTER_REASON"] == "input-unreadable"
        rec, = rig.records()
        assert rec["mode"] == "CPU"
        assert os.stat(rig.lock_dir / "w.cpu.0").st_uid == 65534  # the caller's own lock file
        secret.chmod(0o644)  # control: the same user, now readable, gets the GPU
        res = rig.run("w", secret, user="nobody")
        assert res.event("routed")["GPU_ROUTER_MODE"] == "GPU"
    finally:
        shutil.rmtree(root)


# ---- lock dir safety --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["symlink", "world-writable", "sticky-world-writable", "file"])
def test_untrustworthy_lock_dir_is_refused_with_69(rig, how, tmp_path):
    real = tmp_path / "real-locks"
    real.mkdir(mode=0o770)
    if how == "symlink":
        rig.lock_dir.symlink_to(real)
    elif how == "file":
        rig.lock_dir.write_text("")
    else:
        rig.lock_dir.mkdir()
        rig.lock_dir.chmod(0o777 if how == "world-writable" else 0o1777)
    res = rig.run("w", make_input(tmp_path, SMALL))
    assert res.rc == 69, res
    assert f"lock directory {rig.lock_dir}" in res.err
    assert {"symlink": "is a symlink", "file": "not a directory"}.get(how, "writable by others") in res.err
    assert rig.starts() == [] and list(real.iterdir()) == []
    assert res.event("config-error")["GPU_ROUTER_WORKLOAD"] == "w"


def test_planted_lock_file_symlink_is_refused(rig, tmp_path):
    rig.lock_dir.mkdir(mode=0o770)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (rig.lock_dir / "w.gpu0.0").symlink_to(victim)
    res = rig.run("w", make_input(tmp_path, SMALL))
    assert res.rc == 69 and "is a symlink; refusing it" in res.err
    assert rig.starts() == [] and victim.read_text() == "precious"


def test_planted_fifo_lock_file_does_not_hang_the_wrapper(rig, tmp_path):
    rig.lock_dir.mkdir(mode=0o770)
    os.mkfifo(rig.lock_dir / "w.gpu0.0")
    res = rig.run("w", make_input(tmp_path, SMALL), timeout=20)
    assert res.rc == 69 and rig.starts() == []


# ---- multi-metric profiles -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("media,mode,reason", [("2s-64x48.mkv", "GPU", "under-threshold"),
                                               ("2s-320x240.mkv", "CPU", "over-threshold")])
def test_two_probes_each_must_be_under(tmp_path_factory, tmp_path, gr_bin, clean_env, media, mode, reason):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe=["ffprobe-duration", "video-pixels"], threshold=[10, 10000])
    res = rig.run("w", helpers.media(tmp_path_factory, media))
    assert res.rc == 0, res
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"]) == (mode, reason)
    duration, pixels = ev["GPU_ROUTER_METRIC"].split(",")
    assert float(duration) == pytest.approx(2.0, abs=0.1)
    assert pixels == ("3072" if mode == "GPU" else "76800")
    assert (ev["GPU_ROUTER_UNIT"], ev["GPU_ROUTER_THRESHOLD"]) == ("seconds,pixels", "10,10000")
    assert rig.records()[0]["mode"] == mode


def test_a_long_small_video_is_over_on_duration_alone(tmp_path_factory, tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe=["ffprobe-duration", "video-pixels"], threshold=[1.5, 10000])
    res = rig.run("w", helpers.media(tmp_path_factory, "2s-64x48.mkv"))
    assert res.event("routed")["GPU_ROUTER_MODE"] == "CPU"


@pytest.mark.parametrize("media,mode", [("2s-64x48.mkv", "GPU"), ("2s-320x240.mkv", "CPU")])
def test_combine_product(tmp_path_factory, tmp_path, gr_bin, clean_env, media, mode):
    rig = rig_for(tmp_path, gr_bin, clean_env, probe=["ffprobe-duration", "video-pixels"], combine="product",
                  threshold=20000)
    res = rig.run("w", helpers.media(tmp_path_factory, media))
    ev = res.event("routed")
    assert ev["GPU_ROUTER_MODE"] == mode
    assert float(ev["GPU_ROUTER_METRIC"]) == pytest.approx(2.0 * (3072 if mode == "GPU" else 76800), rel=0.05)
    assert (ev["GPU_ROUTER_UNIT"], ev["GPU_ROUTER_THRESHOLD"]) == ("seconds*pixels", "20000")


# ---- GPU state from the agent's snapshot ------------------------------------------------------------------------

def test_snapshot_device_choice_and_uuid(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env)
    rig.write_snapshot([helpers.gpu_entry(0, used_mb=9000), helpers.gpu_entry(1, used_mb=100)])
    res = rig.run("w", make_input(tmp_path, SMALL))
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_DEVICE"], ev["GPU_ROUTER_GPU_STATE"]) == ("1", "ok")
    rec, = rig.records()
    assert rec["cuda"] == helpers.gpu_entry(1)["uuid"] and rec["cuda_order"] == "PCI_BUS_ID"
    check_lock_fds(rec, rig.lock_dir, ["w.gpu1.0"])


def test_snapshot_visible_devices_index(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, gpu={"visible_devices": "index"})
    rig.write_snapshot([helpers.gpu_entry(0, used_mb=9000), helpers.gpu_entry(1, used_mb=100)])
    assert rig.run("w", make_input(tmp_path, SMALL)).rc == 0
    assert rig.records()[0]["cuda"] == "1"


@pytest.mark.parametrize("gpus,error,reason", [
    ([helpers.gpu_entry(0, healthy=False, health="xid-79")], None, "gpu-unhealthy"),
    ([], None, "no-gpu"),
    ([], "NVML init failed: driver not loaded", "gpu-unhealthy"),
])
def test_snapshot_without_a_usable_gpu_sends_work_to_cpu(tmp_path, gr_bin, clean_env, gpus, error, reason):
    rig = rig_for(tmp_path, gr_bin, clean_env)
    rig.write_snapshot(gpus, error=error)
    res = rig.run("w", make_input(tmp_path, SMALL))
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_GPU_STATE"]) == ("CPU", reason, "ok")
    assert rig.records()[0]["cuda"] == ""


def test_stale_snapshot_is_unknown_and_threshold_decides(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, host={"gpus": 2})
    rig.write_snapshot([helpers.gpu_entry(0, healthy=False)], age=60)
    holder = start_holder(rig, make_input(tmp_path, SMALL))
    try:
        holder2 = start_holder(rig, make_input(tmp_path, SMALL))
        try:
            res = rig.run("w", make_input(tmp_path, SMALL))  # gpu0's two slots are taken: the assumed gpu1
            ev = res.event("routed")
            assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_GPU_STATE"]) == ("GPU", "unknown:stale-snapshot")
            assert ev["GPU_ROUTER_DEVICE"] == "1"
        finally:
            kill(holder2)
    finally:
        kill(holder)


def test_vram_admission_counts_live_reservations(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, admission="vram", gpu_vram_mb=3000, max_gpu_jobs=8)
    rig.write_snapshot([helpers.gpu_entry(0, total_mb=8000, used_mb=500)])
    small = make_input(tmp_path, SMALL)
    a = start_holder(rig, small)
    b = start_holder(rig, small)
    try:
        ledger = sorted(os.listdir(rig.lock_dir / "vram"))
        assert ledger == sorted([f"gpu0.{a.pid}", f"gpu0.{b.pid}"])
        rec = next(r for r in rig.starts() if r["pid"] == a.pid)
        check_lock_fds(rec, rig.lock_dir, ["w.gpu0.0", f"vram/gpu0.{a.pid}"])
        res = rig.run("w", small)  # 8000 - 500 - 2×3000 = 1500 < 3000
        assert res.rc == 75
        ev = res.event("blocked")
        assert (ev["GPU_ROUTER_REASON"], ev["GPU_ROUTER_PREDICTED_VRAM_MB"]) == ("no-vram-room", "3000")
        kill(a)
        res = rig.run("w", small)
        assert res.rc == 0
        ev = res.event("routed")
        assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_PREDICTED_VRAM_MB"]) == ("GPU", "3000")
        assert f"gpu0.{a.pid}" not in os.listdir(rig.lock_dir / "vram")  # the killed job's was swept
        from gpu_router import slots

        assert slots.live_reservations(str(rig.lock_dir)) == {"gpu0": [(b.pid, 3000)]}  # the finished one is dead
    finally:
        kill(a)
        kill(b)


def test_vram_too_large_goes_to_cpu(tmp_path, gr_bin, clean_env):
    rig = rig_for(tmp_path, gr_bin, clean_env, admission="vram", gpu_vram_mb=30000)
    rig.write_snapshot([helpers.gpu_entry(0, total_mb=16384)])
    res = rig.run("w", make_input(tmp_path, SMALL))
    ev = res.event("routed")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_REASON"]) == ("CPU", "vram-too-large")


# ---- journald failures never stop the job ---------------------------------------------------------------------

def test_journal_socket_absent_falls_back_to_stderr(rig, tmp_path):
    res = rig.run("w", make_input(tmp_path, SMALL),
                  env={"GPU_ROUTER_LOG": "", "GPU_ROUTER_JOURNAL_SOCKET": str(tmp_path / "no-socket")})
    assert res.rc == 0 and res.event("routed")["GPU_ROUTER_MODE"] == "GPU"


def test_stuck_journald_does_not_stop_the_job(rig, tmp_path):
    folder = helpers.public_tmpdir()
    path = str(folder / "s")
    s, c = helpers.stuck_socket(path)
    try:
        started = time.monotonic()
        res = rig.run("w", make_input(tmp_path, SMALL), env={"GPU_ROUTER_LOG": "", "GPU_ROUTER_JOURNAL_SOCKET": path},
                      timeout=30)
        assert res.rc == 0 and len(rig.records()) == 1
        assert time.monotonic() - started < 5
        assert res.event("routed")["GPU_ROUTER_MODE"] == "GPU"  # it went to stderr instead
    finally:
        s.close()
        c.close()
        shutil.rmtree(folder)


def test_no_sink_at_all_still_runs_the_job(rig, tmp_path):
    argv = rig.argv("w", make_input(tmp_path, SMALL))
    p = subprocess.run(argv, env=dict(rig.env, GPU_ROUTER_LOG="", GPU_ROUTER_JOURNAL_SOCKET=str(tmp_path / "x")),
                       stdout=subprocess.DEVNULL, timeout=30,
                       preexec_fn=lambda: os.close(2))
    assert p.returncode == 0 and len(rig.records()) == 1


def test_blocked_and_probe_failed_events_on_the_journal_socket(tmp_path, gr_bin, clean_env, jsock):
    rig = rig_for(tmp_path, gr_bin, clean_env, max_gpu_jobs=1, max_cpu_jobs=1)
    env = {"GPU_ROUTER_LOG": "", "GPU_ROUTER_JOURNAL_SOCKET": jsock.path}
    holder = start_holder(rig, make_input(tmp_path, SMALL), env=env)
    try:
        res = rig.run("w", make_input(tmp_path, SMALL), env=env)
        assert res.rc == 75
        ev, = jsock.wait_for(lambda e: e.get("GPU_ROUTER_MODE") == "BLOCKED")
        assert ev["MESSAGE_ID"] == "4de208b7d75b4d139f59bd4bc777a4e1" and ev["GPU_ROUTER_REASON"] == "gpu-slots-full"
        assert "retries later" in ev["MESSAGE"]
        res = rig.run("w", tmp_path / "missing.bin", env=env)  # no input → CPU, with its own probe-failed event
        assert res.rc == 0
        pf, = jsock.wait_for(lambda e: e.get("GPU_ROUTER_EVENT") == "probe-failed")
        assert pf["MESSAGE_ID"] == journal.MESSAGE_IDS["probe-failed"] and pf["GPU_ROUTER_REASON"] == "no-input"
    finally:
        kill(holder)


# ---- the hot path stays light -----------------------------------------------------------------------------------

HEAVY = {"json", "enum", "re", "subprocess", "dataclasses", "tomllib", "socket", "structlog", "argparse",
         "signal", "pynvml", "systemd", "pystemd", "asyncio", "logging", "difflib",
         "os", "posixpath", "_collections_abc"}  # os: ~1.1 ms for what posix has (agent/fastos.py)
# The package's own modules a common job does not need (issue 20: each costs ~0.1-0.2 ms of every job's start):
# the ledger's and queue's readers (vram admission, wait), the trusted state-file reader (only when a drain file or
# a wrap record is there), the external probes' guardian and select (a file-size probe here), stat.py (the built-in
# _stat has what it re-exports).
NOT_ON_COMMON_PATH = {"gpu_router.trust", "gpu_router.procstat", "gpu_router.atomicfile",
                      "gpu_router.wrapper.guardian", "select", "stat"}


@pytest.mark.parametrize("sink,size", [("journald", SMALL), ("stderr", SMALL), ("journald", BIG)],
                         ids=["gpu-journald", "gpu-stderr", "cpu-journald"])
def test_cached_run_imports_nothing_heavy(rig, tmp_path, jsock, sink, size):
    """HACKING.md's budget: a job that hits the config cache imports only builtins and cheap stdlib modules, and
    only the package modules its path needs (a GPU job with a fresh snapshot, and a CPU job)."""
    small = make_input(tmp_path, size)
    env = dict(rig.env, GPU_ROUTER_JOURNAL_SOCKET=jsock.path, GPU_ROUTER_LOG="" if sink == "journald" else "stderr")
    rig.write_snapshot([helpers.gpu_entry(0)])
    rig.warm("w", small, env=env)
    p = subprocess.run([helpers.PYTHON, "-X", "importtime", "-IS", rig.gr_bin] + rig.argv("w", small)[1:],
                       env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    full = {line.split("|")[-1].strip() for line in p.stderr.splitlines()
            if line.startswith("import time:") and not line.endswith("package")}
    imported = {name.split(".")[0] for name in full}
    assert imported & HEAVY == set(), sorted(imported & HEAVY)
    assert full & NOT_ON_COMMON_PATH == set(), sorted(full & NOT_ON_COMMON_PATH)
    assert "gpu_router" in imported and "gpu_router.slots" in full
