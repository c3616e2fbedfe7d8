"""VRAM-aware admission end to end: the real agent reads the fake GPUs through the unmodified pynvml binding, the
real wrappers admit fake GPU jobs against its snapshot and the flock ledger, and the fake jobs prove by their own
atomic claims that nothing was ever overcommitted (a job that does not fit dies like a CUDA OOM).
"""

import json
import os
import signal
import subprocess
import time

import pytest

from fakenvml import JOB, fake_gpus, have_pynvml  # noqa: F401  (fixture)
from gpu_router import slots

pytestmark = pytest.mark.skipif(not have_pynvml(), reason="nvidia-ml-py is not installed (bash .ci/deps)")


def write_config(base, fake, *, max_gpu_jobs=64, spill=False, reserve=0, extra=""):
    cfg = base / "config.toml"
    cfg.write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "nvml"
snapshot = "{base}/gpus.json"
sample_interval = "0.2s"
snapshot_max_age = "3s"
reserve_mb = {reserve}
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.fake]
binary = "{JOB}"
probe = "command"
probe_command = ["/bin/cat", "{{input}}"]      # the input file holds the job's size in MiB
threshold = 100000
threshold_unit = "MiB"
admission = "vram"
vram_model = "linear"
vram_per_unit_mb = 1.0
max_gpu_jobs = {max_gpu_jobs}
max_cpu_jobs = 2
spill_to_cpu = {str(spill).lower()}
scope = "off"
{extra}
""")
    return cfg


BINARIES = {}


@pytest.fixture(autouse=True)
def _binaries(gr_bin, agent_bin):
    BINARIES.update(gr=gr_bin, agent=agent_bin)


@pytest.fixture
def host(tmp_path, fake_gpus):  # noqa: F811
    """Two GPUs of different sizes, a foreign process's 1000 MiB on the first, and the real agent watching."""
    fake_gpus.add_gpu(8000, name="Fake A")
    fake_gpus.add_gpu(4000, name="Fake B")
    fake_gpus.set_foreign(0, 1000)
    (tmp_path / "locks").mkdir(mode=0o770)
    cfg = write_config(tmp_path, fake_gpus)
    env = dict(fake_gpus.env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_CACHE_DIR=str(tmp_path),
               GPU_ROUTER_LOG="stderr")
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen([str(BINARIES["agent"])], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    log.close()
    deadline = time.monotonic() + 20
    while not (tmp_path / "gpus.json").exists():
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    snap = json.loads((tmp_path / "gpus.json").read_text())
    assert snap["source"] == "nvml" and [g["total_mb"] for g in snap["gpus"]] == [8000, 4000], snap
    yield tmp_path, fake_gpus, env
    agent.terminate()
    agent.wait(10)


def job(base, env, mb, seconds, log, name):
    size = base / f"size-{name}"
    size.write_text(f"{mb}\n")
    return subprocess.Popen([str(BINARIES["gr"]), "run", "--workload", "fake", "--", "--vram", str(mb), "--seconds",
                             str(seconds), "--log", str(log), str(size)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def replay(log):
    """Per GPU, the largest sum of VRAM held at once, from the jobs' own start/finish records."""
    points = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "start" and rec.get("gpu") is not None:
            points.append((rec["t"], 1, rec["gpu"], rec["vram_mb"]))
        elif rec["event"] == "finish" and rec.get("gpu") is not None:
            points.append((rec["t"], 0, rec["gpu"], -rec["vram_mb"]))
    held, peak = {}, {}
    for _, _, gpu, delta in sorted(points):
        held[gpu] = held.get(gpu, 0) + delta
        peak[gpu] = max(peak.get(gpu, 0), held[gpu])
    return peak


def test_150_wrappers_never_overcommit_any_gpu(host):
    base, fake, env = host
    log = base / "jobs.log"
    sizes = [300 + (i * 397) % 2700 for i in range(150)]  # 300..2999 MiB, varied
    procs = [job(base, env, mb, 1.5, log, i) for i, mb in enumerate(sizes)]
    codes = [p.wait(120) for p in procs]
    outs = [p.stderr.read() for p in procs]
    assert set(codes) <= {0, 75}, [(c, o[-300:]) for c, o in zip(codes, outs) if c not in (0, 75)][:3]
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert not [r for r in records if r["event"] == "oom"], "a fake job hit its CUDA OOM"
    ran = [r for r in records if r["event"] == "start"]
    assert len(ran) == codes.count(0)
    assert {r["gpu"] for r in ran} == {0, 1}, "both GPUs were used"
    assert codes.count(75) > 0, "the load was too light to test refusals"
    peak = replay(log)
    assert peak[0] <= 8000 - 1000 and peak[1] <= 4000, peak
    blocked = [json.loads(x) for o in outs for x in o.splitlines() if '"BLOCKED"' in x]
    assert blocked and {b["GPU_ROUTER_REASON"] for b in blocked} <= {"no-vram-room"}
    routed = [json.loads(x) for o in outs for x in o.splitlines() if '"routed"' in x]
    assert all(int(r["GPU_ROUTER_PREDICTED_VRAM_MB"]) == int(float(r["GPU_ROUTER_METRIC"])) for r in routed)


def test_sigkilled_jobs_free_reservations_and_vram_at_once(host):
    base, fake, env = host
    log = base / "jobs.log"
    procs = [job(base, env, 1500, 60, log, i) for i in range(6)]   # 7000 MiB room on A, 4000 on B: 4 + 2
    fake.wait_for(lambda: len(fake.claims()) == 6, timeout=30)
    assert len([1 for lst in slots.live_reservations(str(base / "locks")).values() for _ in lst]) == 6
    third = job(base, env, 1500, 60, log, "late")
    assert third.wait(30) == 75                                  # full: refused at once
    victims = procs[:3]
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    for p in victims:
        p.wait(10)
    live = slots.live_reservations(str(base / "locks"))
    assert sorted(pid for lst in live.values() for pid, _ in lst) == sorted(p.pid for p in procs[3:])
    assert sorted(pid for _, pid, _ in fake.claims()) == sorted(p.pid for p in procs[3:])
    # Within a sample or two the agent's snapshot shows the VRAM back, and a new job is admitted.
    deadline = time.monotonic() + 10
    while True:
        late = job(base, env, 1500, 0.2, log, "late2")
        if late.wait(30) == 0:
            break
        assert time.monotonic() < deadline, "the freed VRAM never came back"
        time.sleep(0.2)
    for p in procs[3:]:
        p.kill()
        p.wait(10)


def test_foreign_use_shrinks_the_room_and_oversized_jobs_go_to_cpu(host):
    base, fake, env = host
    log = base / "jobs.log"
    fake.set_foreign(1, 3500)                                    # someone else took most of GPU B
    time.sleep(0.6)                                              # the agent's next samples see it
    big = job(base, env, 6500, 0.5, log, "big")                  # fits A only (8000 - 1000 foreign)
    assert big.wait(30) == 0
    routed = [json.loads(x) for x in big.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_DEVICE"] == "0"
    time.sleep(0.6)
    crowded = job(base, env, 7500, 0.5, log, "crowded")          # fits an empty A, but not beside the foreign
    assert crowded.wait(30) == 75
    blocked = [json.loads(x) for x in crowded.stderr.read().splitlines() if '"blocked"' in x][0]
    assert blocked["GPU_ROUTER_REASON"] == "no-vram-room"
    too_big = job(base, env, 8500, 0.5, log, "too-big")           # no GPU here could ever hold it: the CPU
    assert too_big.wait(30) == 0
    routed = [json.loads(x) for x in too_big.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_MODE"] == "CPU" and routed["GPU_ROUTER_REASON"] == "vram-too-large"
    assert not [json.loads(x) for x in log.read_text().splitlines() if json.loads(x)["event"] == "oom"]


def test_lost_gpu_sends_jobs_elsewhere_and_comes_back(host):
    base, fake, env = host
    log = base / "jobs.log"
    fake.lose(0)
    time.sleep(0.8)
    j = job(base, env, 3000, 0.2, log, "a")
    assert j.wait(30) == 0
    routed = [json.loads(x) for x in j.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_DEVICE"] == "1", routed            # GPU 0 is unhealthy: B takes it
    fake.lose(1)
    time.sleep(0.8)
    j = job(base, env, 1000, 0.2, log, "b")
    assert j.wait(30) == 0
    routed = [json.loads(x) for x in j.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_MODE"] == "CPU" and routed["GPU_ROUTER_REASON"] == "gpu-unhealthy"
    fake.lose(0, on=False)
    fake.lose(1, on=False)
    time.sleep(0.8)
    j = job(base, env, 1000, 0.2, log, "c")
    assert j.wait(30) == 0
    routed = [json.loads(x) for x in j.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_MODE"] == "GPU"


def test_agent_gone_means_unknown_state_and_threshold_routing(host):
    base, fake, env = host
    log = base / "jobs.log"
    (base / "gpus.json").unlink()
    (base / "gpus.marshal").unlink()
    env = dict(env, GPU_ROUTER_CONFIG=str(write_config(base, fake).resolve()))
    cfg = base / "config.toml"
    cfg.write_text(cfg.read_text().replace('snapshot = "', 'snapshot = "/nonexistent'))
    j = job(base, env, 500, 0.2, log, "x")
    assert j.wait(30) == 0
    routed = [json.loads(x) for x in j.stderr.read().splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_MODE"] == "GPU" and routed["GPU_ROUTER_GPU_STATE"].startswith("unknown:")


def test_a_job_over_its_prediction_is_recorded_warned_about_and_widens_calibration(host):
    """A job predicted at 1000 MiB (its input says 1000, the model is 1 MiB per unit) claims 1600: the agent's next
    sample shows it over its reservation → one vram-underpredicted event (journal), one calibration sample; calibrate,
    with no inputs, fits the recorded samples and its model then covers the 1600 MiB."""
    base, fake, env = host
    size = base / "size-under"
    size.write_text("1000\n")
    p = subprocess.Popen([str(BINARIES["gr"]), "run", "--workload", "fake", "--", "--vram", "1600", "--seconds", "30",
                          str(size)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = base / "state" / "samples" / "fake.jsonl"
    try:
        deadline = time.monotonic() + 20
        while not samples.exists():
            assert time.monotonic() < deadline, "the agent never recorded the under-prediction"
            time.sleep(0.1)
        rec = [json.loads(x) for x in samples.read_text().splitlines()]
        assert [(r["mode"], r["result"], r["metric"], r["peak_vram_mb"], r["predicted_vram_mb"]) for r in rec] == [
            ("GPU", "underpredicted", "1000", 1600, 1000)]
        time.sleep(0.6)                                              # more samples: still one event for the job
    finally:
        p.kill()
        p.wait(10)
    c = subprocess.run([str(BINARIES["gr"]), "calibrate", "-w", "fake", "--json", "--dry-run"], env=env,
                       capture_output=True, text=True, timeout=60)
    d = json.loads(c.stdout)
    assert d["samples"]["recorded_usable"] == 1 and d["recommendation"]["vram_base_mb"] >= 1600, d
    # The agent's own record of it: one journal event (stderr here, GPU_ROUTER_LOG=stderr) for the job.
    events = [json.loads(x) for x in (base / "agent.log").read_text().splitlines() if x.startswith("{")]
    under = [e for e in events if e.get("GPU_ROUTER_EVENT") == "vram-underpredicted"]
    assert len(under) == 1, under
    e = under[0]
    assert (e["GPU_ROUTER_WORKLOAD"], e["GPU_ROUTER_PID"], e["GPU_ROUTER_PREDICTED_VRAM_MB"],
            e["GPU_ROUTER_MEASURED_VRAM_MB"]) == ("fake", str(p.pid), "1000", "1600")
    from gpu_router.ops import stats

    summary = stats.summarize(under)               # `gpu-router stats` warns
    assert summary["fake"]["underpredicted"] == 1
    assert any("used more VRAM than predicted (up to 1.60x)" in t for t in summary["fake"]["advice"])


def test_admission_asks_for_a_fresh_sample_so_new_foreign_use_is_seen_before_the_job_allocates(tmp_path, fake_gpus):  # noqa: F811
    """The agent samples every 30 s here; a foreign process takes 6000 of 8000 MiB after the last sample. A vram job
    of 3000 MiB must be refused (no-vram-room, exit 75), not admitted into a CUDA OOM: the wrapper asks the agent
    for a new sample (OP=sample on its socket) when the snapshot is older than a moment."""
    fake_gpus.add_gpu(8000)
    (tmp_path / "locks").mkdir(mode=0o770)
    cfg = write_config(tmp_path, fake_gpus)
    cfg.write_text(cfg.read_text().replace('sample_interval = "0.2s"', 'sample_interval = "30s"')
                   .replace('snapshot_max_age = "3s"', 'snapshot_max_age = "60s"'))
    env = dict(fake_gpus.env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_CACHE_DIR=str(tmp_path), GPU_ROUTER_LOG="stderr")
    agent = subprocess.Popen([str(BINARIES["agent"])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "gpus.json").exists():
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)                                   # the snapshot is now older than the wrapper's moment
        foreign = fake_gpus.start_job(6000, 60, gpu=0)    # another user's CUDA process, after the last sample
        log = tmp_path / "jobs.log"
        j = job(tmp_path, env, 3000, 0.2, log, "x")
        assert j.wait(30) == 75
        blocked = [json.loads(x) for x in j.stderr.read().splitlines() if '"blocked"' in x]
        assert blocked and blocked[0]["GPU_ROUTER_REASON"] == "no-vram-room"
        assert not log.exists() or '"oom"' not in log.read_text()
        foreign.kill()
        foreign.wait()
    finally:
        agent.terminate()
        agent.wait(10)
