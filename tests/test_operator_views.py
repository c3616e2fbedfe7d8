"""The operator's views (issue 10): `jobs` (history joined by job id), `status` with running jobs and the waiting
queue, `drain` / `resume`; through the real launcher, real flock holders and /proc (the journal-reading half is in
the real-systemd lane, tests/systemd/test_operator_day.py)."""

import json
import signal
import subprocess
import time

import pytest

import helpers
from gpu_router.ops import jobs as J

PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 1, "max_cpu_jobs": 1,
           "gpu_args": ["--device", "cuda"], "cpu_args": ["--device", "cpu"], "gpu_vram_mb": 3700,
           "cpu_ram_mb": 11000}


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    r = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE)},
                    host={"gpu_vram_mb": 8192, "ram_mb": 32768, "other_ram_mb": 3072})
    r.doc["agent"] = {"state_dir": str(tmp_path / "state")}
    r.rewrite()
    return r


def cli(rig, *args):
    return subprocess.run([rig.gr_bin] + [str(a) for a in args], env=rig.env, capture_output=True, text=True,
                          timeout=60)


def data(tmp_path, size):
    path = tmp_path / f"in-{size}.bin"
    path.write_bytes(b"x" * size)
    return path


def wait_started(rig, proc):
    deadline = time.monotonic() + 20
    while not (rig.log / f"{proc.pid}.start").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)


# ---- drain / resume ------------------------------------------------------------------------------------------

def test_drain_sends_gpu_jobs_to_the_cpu_and_resume_undoes_it(rig, tmp_path):
    small = data(tmp_path, 10)
    assert rig.run("w", small).event("routed")["GPU_ROUTER_MODE"] == "GPU"
    p = cli(rig, "drain", "--reason", "driver update", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["drained"] and d["action"] == "cpu" and d["state"]["reason"] == "driver update"
    res = rig.run("w", small)
    assert res.rc == 0
    routed = res.event("routed")
    assert (routed["GPU_ROUTER_MODE"], routed["GPU_ROUTER_REASON"]) == ("CPU", "drained")
    st = json.loads(cli(rig, "status", "--json").stdout)
    assert st["drain"]["action"] == "cpu" and st["drain"]["reason"] == "driver update"
    assert "GPU admission: DRAINED since" in cli(rig, "status").stdout
    assert cli(rig, "resume").returncode == 0
    assert rig.run("w", small).event("routed")["GPU_ROUTER_MODE"] == "GPU"
    assert json.loads(cli(rig, "status", "--json").stdout)["drain"] is None


def test_drain_block_gives_the_retry_code_and_leaves_cpu_jobs_alone(rig, tmp_path):
    assert cli(rig, "drain", "--block").returncode == 0
    res = rig.run("w", data(tmp_path, 10))
    assert res.rc == 75 and res.event("blocked")["GPU_ROUTER_REASON"] == "drained"
    assert rig.run("w", data(tmp_path, 5000)).event("routed")["GPU_ROUTER_MODE"] == "CPU"


def test_drain_wait_reports_running_gpu_jobs(rig, tmp_path):
    holder = rig.spawn("w", data(tmp_path, 10), env={"JOB_SLEEP": "60"})
    try:
        wait_started(rig, holder)
        p = cli(rig, "drain", "--wait", "0.5", "--json")
        assert p.returncode == 1
        assert json.loads(p.stdout)["gpu_jobs_running"] == {"w": 1}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    p = cli(rig, "drain", "--wait", "5s")
    assert p.returncode == 0 and "no GPU job is running" in p.stdout


# ---- status: running jobs and the queue -----------------------------------------------------------------------

def test_status_lists_running_jobs_and_waiters(rig, tmp_path):
    rig.doc["workloads"]["w"]["wait"] = "30s"
    rig.rewrite()
    small = data(tmp_path, 10)
    holder = rig.spawn("w", small, env={"JOB_SLEEP": "60"})
    waiter = None
    try:
        wait_started(rig, holder)
        waiter = rig.spawn("w", small, env={"JOB_SLEEP": "0"})
        deadline = time.monotonic() + 20
        while True:
            st = json.loads(cli(rig, "status", "--json").stdout)
            if st["waiting"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        [job] = st["jobs"]
        assert (job["pid"], job["workload"], job["mode"], job["device"], job["slot"], job["input"]) == (
            holder.pid, "w", "GPU", "0", 0, str(small))
        assert job["user"] == "root" and job["elapsed_s"] is not None and job["job"].startswith("w-")
        [w] = st["waiting"]
        assert (w["pid"], w["position"], w["pool"]) == (waiter.pid, 1, "gpu")
        text = cli(rig, "status").stdout
        assert "running jobs: 1" in text and small.name in text and "waiting: 1" in text
        assert "None" not in text
        p = cli(rig, "status", "--watch", "0.1", "--count", "2", "--json")
        docs = [json.loads(line) for line in p.stdout.splitlines()]
        assert len(docs) == 2 and docs[0]["jobs"][0]["pid"] == holder.pid
    finally:
        for proc in (holder, waiter):
            if proc is not None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
    assert json.loads(cli(rig, "status", "--json").stdout)["jobs"] == []


def test_status_and_its_watch_print_a_members_input_name_escaped(rig, tmp_path):
    """Issue 17 (7): an input name with ESC sequences reached root's terminal raw through status and --watch."""
    evil = tmp_path / "clip\x1b]0;owned\x07\x1b[2J\x9b31m\nfake.mp3"
    evil.write_bytes(b"x" * 10)
    holder = rig.spawn("w", evil, env={"JOB_SLEEP": "60"})
    try:
        wait_started(rig, holder)
        deadline = time.monotonic() + 20
        while not json.loads(cli(rig, "status", "--json").stdout)["jobs"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert json.loads(cli(rig, "status", "--json").stdout)["jobs"][0]["input"] == str(evil)  # exact in JSON
        for args in (("status",), ("status", "--watch", "0.1", "--count", "2")):
            text = cli(rig, *args).stdout
            assert "\\x1b]0;owned\\x07" in text and "\\nfake.mp3" in text, text
            assert not any(c in text for c in "\x1b\x07\x9b"), text
            assert not any(line.startswith("fake.mp3") for line in text.splitlines())
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# ---- jobs: the join ---------------------------------------------------------------------------------------------

def ev(kind, job, t, **fields):
    e = {"GPU_ROUTER_EVENT": kind, "GPU_ROUTER_JOB": job, "GPU_ROUTER_WORKLOAD": "w",
         "__REALTIME_TIMESTAMP": str(int(t * 1e6)), "MESSAGE": f"{kind} {job}"}
    e.update({k if k.startswith("_") else f"GPU_ROUTER_{k}": v for k, v in fields.items()})
    return e


def test_jobs_join_events_by_job_id():
    events = [
        ev("job-finished", "w-1", 110, RESULT="success", EXIT_STATUS="0", DURATION_S="9.5", PEAK_RAM_MB="812.5",
           PEAK_VRAM_MB="3100", PEAK_VRAM_SOURCE="accounting", MODE="GPU"),
        ev("routed", "w-1", 100, MODE="GPU", DEVICE="0", SLOT="0", INPUT="/d/a.mp3", WAITED_S="1.5",
           PREDICTED_VRAM_MB="3700", _SYSTEMD_UNIT="runner.service", _UID="998"),
        ev("blocked", "w-2", 105, MODE="BLOCKED", REASON="gpu-slots-full", INPUT="/d/b.mp3"),
        ev("routed", "w-3", 106, MODE="CPU", DEVICE="cpu", INPUT="/d/c.mp3"),
        ev("probe-failed", "w-4", 107, REASON="input-missing", INPUT="/d/x", ON_PROBE_ERROR="fail"),
    ]
    jobs = J.join(events)
    assert [j["job"] for j in jobs] == ["w-1", "w-2", "w-3", "w-4"]
    a = jobs[0]
    assert (a["mode"], a["device"], a["result"], a["exit_status"], a["duration_s"], a["waited_s"]) == (
        "GPU", "0", "success", 0, 9.5, 1.5)
    assert (a["peak_ram_mb"], a["peak_vram_mb"], a["predicted_vram_mb"], a["caller_unit"], a["uid"]) == (
        812.5, 3100, 3700, "runner.service", 998)
    assert [e["event"] for e in a["events"]] == ["routed", "job-finished"]
    assert jobs[1]["result"] == "blocked" and jobs[2]["result"] == "running" and jobs[3]["result"] == "refused"
    assert [j["job"] for j in J.select(jobs, mode="gpu")] == ["w-1"]
    assert [j["job"] for j in J.select(jobs, result="blocked")] == ["w-2"]
    assert [j["job"] for j in J.select(jobs, unit="runner.service")] == ["w-1"]
    text = J.table(jobs, now=120)
    assert text.splitlines()[0].split()[:3] == ["START", "JOB", "WORKLOAD"]
    assert "runner.service/998" in text and "3100/3700" in text and "a.mp3" in text
    assert "None" not in text and "None" not in J.one(a)
    assert a["peak_vram_source"] == "accounting" and "3100 MB accounting (predicted 3700 MB)" in J.one(a)


# ---- trap 7: a partial view of the journal is said, not silently undercounted ------------------------------------

@pytest.mark.parametrize("command", ["stats", "jobs"])
def test_a_user_outside_the_journal_groups_is_told_the_counts_are_partial(rig, command):
    empty = helpers.public_tmpdir()
    env = dict(rig.env, HOME="/")
    root = subprocess.run([rig.gr_bin, command, "--json", "-D", str(empty)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert root.returncode == 0, root.stderr
    assert json.loads(root.stdout)["partial"] is False
    p = subprocess.run(helpers.as_user() + [rig.gr_bin, command, "--json", "-D", str(empty)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["partial"] is True and "systemd-journal" in d["note"]
    assert "partial view" in p.stderr


def test_a_job_without_an_outcome_is_running_only_while_its_process_lives(tmp_path):
    import os

    alive = {"pid": os.getpid(), "scope": None, "result": "running"}
    assert J.still_running(alive)
    assert not J.still_running(dict(alive, scope="gpu-router-w-1-abc.scope"))  # not in that scope
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not J.still_running({"pid": dead.pid, "scope": None})


def test_the_metrics_exporter_reads_the_same_drain_state(rig):
    from gpu_router import config
    from gpu_router.daemon import metrics

    cfg = config.load(str(rig.config), use_cache=False)
    assert metrics.drain_state(cfg) is False
    assert cli(rig, "drain").returncode == 0
    assert metrics.drain_state(cfg) is True
    assert cli(rig, "resume").returncode == 0
    assert metrics.drain_state(cfg) is False


def test_a_finished_job_without_a_scope_is_untracked_not_lost(rig, tmp_path):
    """scope = "off": no agent follows the job, so no outcome will come; `jobs` says so instead of "no-outcome"."""
    jobs = J.join([ev("routed", "w-9", 100, MODE="CPU", DEVICE="cpu", PID="999999999"),
                   ev("routed", "w-8", 100, MODE="CPU", DEVICE="cpu", PID="999999998", SCOPE="gpu-router-w-8.scope")])
    assert [j["result"] for j in J.settle(jobs)] == ["untracked", "no-outcome"]
