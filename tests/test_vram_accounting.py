"""Exact VRAM peaks from the driver's per-process accounting (issue 9): the NVML backend through the real pynvml
binding against the fake libnvidia-ml (which keeps each process's peak after it exits, in a bounded ring, with an
accounting mode that starts off), the nvidia-smi backend against the fake nvidia-smi, and the agent end to end: a
GPU job shorter than the agent's sampling interval gets its exact peak, or, where accounting cannot be had, a
peak marked "sampled" that never becomes a calibration sample on too few samples.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from fakenvml import JOB, PYTHON, fake_gpus, have_pynvml  # noqa: F401  (fake_gpus is a fixture)
from gpu_router.daemon import accounting, gpu_backends as gpu

HAVE_PYNVML = have_pynvml()
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="turning accounting on needs root (as on a real driver)")


@pytest.fixture
def nvml(fake_gpus):
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding (bash .ci/deps)")
    fake_gpus.preload()
    made = []
    fake_gpus.backend = lambda **kw: made.append(gpu.NvmlBackend(**dict({"accounting": "auto"}, **kw)).open()) \
        or made[-1]
    yield fake_gpus
    for b in made:
        b.close()


def short_job(fake, mb, seconds=0.3, then=None, gpu_index=0, env=None):
    """A fake GPU job that holds mb MiB for `seconds`, then `then` MiB for 0.1 s, and exits; returns its pid."""
    extra = ["--then", f"{then}:0.1"] if then is not None else []
    run_env = dict(env or fake.env, CUDA_VISIBLE_DEVICES=str(gpu_index))
    p = subprocess.run(fake.job_cmd(mb, seconds, *extra), env=run_env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p


def pid_of(fake, mb):
    """The PID of the finished job that peaked at mb (the fake ring's view)."""
    return next(pid for pid, peak in fake.accounted(0).items() if peak == mb)


# ---------------------------------------------------------------- NVML backend, in process

@root_only
def test_nvml_backend_turns_accounting_on_and_reports_the_peak_of_a_finished_job(nvml):
    nvml.add_gpu(8000)
    assert not nvml.accounting_mode(0)                       # the driver's default
    b = nvml.backend(call_timeout_s=5)
    g = b.sample()["gpus"][0]
    assert g["accounting"] == "on" and g["health"] == "ok" and nvml.accounting_mode(0)
    notes = b.drain_notes()
    assert [(lvl, f["accounting"]) for lvl, _m, f in notes] == [("info", "on")] and "turned on" in notes[0][1]
    b.sample()
    assert b.drain_notes() == []                             # said once
    started = time.time()
    p = short_job(nvml, 900, then=450)                       # 900 MiB for 0.3 s, then half, then exit
    pid = pid_of(nvml, 900)
    assert nvml.claims() == []                               # gone: no sample can see it any more
    assert b.accounted_peaks([pid], device=0, job_started=started, not_before=started - 2) == {pid: 900}, p.stderr
    # A PID the ring does not hold made no context on this GPU: 0 MiB, as the driver vouches.
    assert b.accounted_peaks([pid, 999999], device=0, job_started=started) == {pid: 900}
    # A record older than the job's first process belongs to an earlier process that had the same PID.
    assert b.accounted_peaks([pid], device=0, job_started=started, not_before=time.time() + 60) == {}
    # A job that started before the mode came on is not covered in full: the samples answer.
    assert b.accounted_peaks([pid], device=0, job_started=started - 3600) is None


@root_only
def test_the_ring_is_bounded_and_an_overflowed_ring_vouches_for_nothing(nvml):
    nvml.add_gpu(8000)
    nvml.set_accounting_buffer(0, 2)
    b = nvml.backend(call_timeout_s=5)
    b.sample()
    started = time.time()
    for mb in (101, 102, 103):
        short_job(nvml, mb, seconds=0)
    assert sorted(nvml.accounted(0).values()) == [102, 103]  # the oldest was pushed out, as in the driver
    first = next(iter(nvml.accounted(0)))
    assert b.accounted_peaks([first], device=0, job_started=started) == {first: nvml.accounted(0)[first]}
    assert b.accounted_peaks([first, 4000000], device=0, job_started=started) is None  # full ring: not vouched


def test_accounting_refused_or_unsupported_leaves_the_gpu_usable_and_answers_none(nvml):
    nvml.add_gpu(8000)
    nvml.add_gpu(4000)
    nvml.deny_accounting(0)
    nvml.accounting_unsupported(1)
    b = nvml.backend(call_timeout_s=5)
    g = {x["index"]: x for x in b.sample()["gpus"]}
    assert (g[0]["health"], g[0]["accounting"], g[0]["total_mb"]) == ("ok", "no-permission", 8000)
    assert (g[1]["health"], g[1]["accounting"], g[1]["total_mb"]) == ("ok", "unsupported", 4000)
    notes = b.drain_notes()
    assert sorted(f["accounting"] for _l, _m, f in notes) == ["no-permission", "unsupported"]
    assert all(lvl == "warning" and "sampled" in m for lvl, m, _f in notes)
    b.sample()
    assert b.drain_notes() == []                             # once, not every sample
    started = time.time()
    short_job(nvml, 300, seconds=0)
    assert b.accounted_peaks([12345], device=0, job_started=started) is None
    assert b.accounted_peaks([12345], device=1, job_started=started) is None
    nvml.set_accounting(0, True)                             # the admin turns it on: seen, used for later jobs
    assert b.sample()["gpus"][0]["accounting"] == "on"
    assert b.accounted_peaks([12345], device=0, job_started=started) is None  # that job started before


def test_policy_off_never_touches_the_mode(nvml):
    nvml.add_gpu(8000)
    b = nvml.backend(call_timeout_s=5, accounting="off")
    g = b.sample()["gpus"][0]
    assert "accounting" not in g and not nvml.accounting_mode(0)
    assert b.accounted_peaks([1], device=0) is None and b.drain_notes() == []


# ---------------------------------------------------------------- nvidia-smi backend

@pytest.mark.parametrize("lines,expected", [
    (["GPU-a, 100, 700", "GPU-a, 101, 50", "GPU-b, 100, 999"], {100: 700, 101: 50}),
    (["GPU-a, 100, 700 MiB"], {100: 700}),
    (["GPU-a, 100, [N/A]"], None),                       # the driver does not know it: not 0
    (["GPU-a, 100, [Not Supported]"], None),
    (["GPU-a, 100, "], None),
    ([], None),                                          # nothing listed (mode off lists nothing): not known
    (["No data", "GPU-a, 7, 1", "garbage,,", "GPU-a, x, 5"], None),  # none of ours
    (["GPU-a, 100, 300", "GPU-a, 100, 700"], {100: 700}),  # a reused PID: the last row, the one that ended last
])
def test_smi_accounted_apps_parsing(lines, expected):
    assert gpu.parse_accounted_apps(lines, {"GPU-a": 0}, [100, 101]) == expected


def test_smi_backend_turns_accounting_on_and_reads_accounted_apps(fake_gpus, monkeypatch):
    fake_gpus.add_gpu(8000)
    fake_gpus.add_gpu(4000)
    fake_gpus.deny_accounting(1)
    script = fake_gpus.install_smi()
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_gpus.state))
    b = gpu.SmiBackend(str(script), call_timeout_s=5, accounting="auto")
    g = {x["index"]: x for x in b.sample()["gpus"]}
    if os.geteuid() == 0:
        assert g[0]["accounting"] == "on" and fake_gpus.accounting_mode(0)
    assert g[1]["accounting"] == "no-permission" and g[1]["health"] == "ok"
    if os.geteuid() != 0:
        return
    started = time.time()
    short_job(fake_gpus, 640, then=10, env=fake_gpus.env_smi_only)
    pid = pid_of(fake_gpus, 640)
    assert b.accounted_peaks([pid], device=0, job_started=started) == {pid: 640}
    assert b.accounted_peaks([pid], device=1, job_started=started) is None
    (fake_gpus.state / "smi_accounted_odd").write_text(f"{fake_gpus.uuid(0)}, {pid}, [N/A]\n")
    assert b.accounted_peaks([pid], device=0, job_started=started) == {pid: 640}  # the later row wins


# ---------------------------------------------------------------- what calibration may take

def test_a_sampled_peak_becomes_a_calibration_sample_only_after_enough_samples():
    job = accounting.JobAccount("w-1-a", 1, "w", "GPU", "0", "12", None, None, None)
    job.peak_known = True
    job.take_accounted(None)
    assert job.vram_source == "sampled" and not job.peaks_known(gpu_sampling=True)   # never sampled
    for n in range(1, accounting.MIN_VRAM_SAMPLES):
        job.sample({1: 500 + n})
        assert not job.peaks_known(gpu_sampling=True), n   # a short job's max of a few samples is a guess
    job.sample({1: 400, 77: 300})                           # its child too: the job's use is the sum
    assert job.peaks_known(gpu_sampling=True) and job.peak_vram_mb == 700 and job.accounting_pids() == [1, 77]
    exact = accounting.JobAccount("w-2-a", 2, "w", "GPU", "0", "12", None, None, None)
    exact.peak_known = True
    exact.take_accounted({2: 900, 5: 100})
    assert exact.peaks_known(gpu_sampling=True)              # the driver's peaks: no samples needed
    assert exact.outcome()["PEAK_VRAM_MB"] == 1000 and exact.outcome()["PEAK_VRAM_SOURCE"] == "accounting"


# ---------------------------------------------------------------- the agent, end to end

@pytest.fixture
def agent(tmp_path, fake_gpus, agent_bin, gr_bin, clean_env):  # noqa: F811
    """The real agent on one fake GPU through pynvml, sampling every 5 s; a fake GPU workload routed to it."""
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding (bash .ci/deps)")
    fake_gpus.add_gpu(8000)
    base = tmp_path / "agent"
    (base / "locks").mkdir(parents=True, mode=0o770)
    os.chmod(tmp_path, 0o755)
    cfg = base / "config.toml"
    (base / "in").write_bytes(b"x" * 10)

    def start(policy="auto", backend="nvml", interval="5s"):
        cfg.write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "{backend}"
snapshot = "{base}/gpus.json"
sample_interval = "{interval}"
accounting = "{policy}"
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.fake]
binary = "{JOB}"
probe = "file-size"
threshold = 1000000
scope = "best-effort"
""")
        env = dict(fake_gpus.env if backend == "nvml" else fake_gpus.env_smi_only, GPU_ROUTER_CONFIG=str(cfg),
                   GPU_ROUTER_LOG="stderr", GPU_ROUTER_CACHE_DIR=str(base))
        p = subprocess.Popen([str(agent_bin)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not (base / "agent.sock").exists() or not (base / "gpus.json").exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.05)
        return p, env

    def run_job(env, *job_args):
        r = subprocess.run([str(gr_bin), "run", "--workload", "fake", "--", *job_args, str(base / "in")], env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        job = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")][-1]["GPU_ROUTER_JOB"]
        record = base / "jobs" / f"{job}.json"      # removed once the agent has accounted the job
        deadline = time.monotonic() + 10
        while record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not record.exists(), "job not accounted"
        return job

    def stop(p):
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        return [json.loads(x) for x in p.stderr.read().splitlines() if x.startswith("{")]

    yield base, start, run_job, stop


@root_only
@pytest.mark.parametrize("backend", ["nvml", "nvidia-smi"])
def test_a_job_shorter_than_a_sample_gets_its_exact_peak_from_the_driver(agent, fake_gpus, backend):
    """700 MiB for 0.3 s, then 350 MiB, then exit, under an agent that samples every 5 s: no sample sees it, the
    driver's accounting (turned on by the agent) does, through pynvml or nvidia-smi."""
    base, start, run_job, stop = agent
    p, env = start(backend=backend)
    job = run_job(env, "--vram", "700", "--seconds", "0.3", "--then", "350:0.1")
    events = stop(p)
    done = [e for e in events if e.get("GPU_ROUTER_EVENT") == "job-finished" and e["GPU_ROUTER_JOB"] == job]
    assert len(done) == 1, events
    e = done[0]
    assert (e["GPU_ROUTER_MODE"], e.get("GPU_ROUTER_PEAK_VRAM_MB"), e.get("GPU_ROUTER_PEAK_VRAM_SOURCE")) == (
        "GPU", "700", "accounting"), e
    said = [x for x in events if x.get("GPU_ROUTER_ACCOUNTING")]
    assert [(x["GPU_ROUTER_ACCOUNTING"], x["GPU_ROUTER_DEVICE"]) for x in said] == [("on", "0")], said
    assert "turned on" in said[0]["MESSAGE"] and fake_gpus.accounting_mode(0)


def test_without_accounting_the_peak_is_sampled_and_the_job_is_no_calibration_sample(agent, fake_gpus):
    """The driver refuses to turn accounting on: logged once, the GPU stays in use, and the job's VRAM figure is
    marked "sampled" (here no sample saw the job, so it has none)."""
    base, start, run_job, stop = agent
    fake_gpus.deny_accounting(0)
    p, env = start()
    snap = json.loads((base / "gpus.json").read_text())
    assert snap["gpus"][0]["healthy"] and snap["gpus"][0]["accounting"] == "no-permission"
    job = run_job(env, "--vram", "700", "--seconds", "0.3", "--then", "350:0.1")
    stderr_events = stop(p)
    e = next(x for x in stderr_events if x.get("GPU_ROUTER_EVENT") == "job-finished")
    assert e["GPU_ROUTER_JOB"] == job and e["GPU_ROUTER_MODE"] == "GPU"
    assert e.get("GPU_ROUTER_PEAK_VRAM_SOURCE") == "sampled" and "GPU_ROUTER_PEAK_VRAM_MB" not in e, e
    said = [x for x in stderr_events if x.get("GPU_ROUTER_ACCOUNTING")]
    assert [(x["GPU_ROUTER_ACCOUNTING"], x["PRIORITY"]) for x in said] == [("no-permission", "4")], said
    assert not (base / "state" / "samples" / "fake.jsonl").exists()


# ---------------------------------------------------------------- the unit's privileged ExecStartPre

def test_enable_accounting_turns_it_on_records_when_and_never_fails(tmp_path, fake_gpus, agent_bin):  # noqa: F811
    """`gpu-router-agent --enable-accounting` (ExecStartPre=+, full privileges: the sandboxed agent lacks the
    CAP_SYS_ADMIN the driver wants) turns the mode on per [gpu] accounting, writes when, and exits 0 even where
    the driver refuses, with a warning and no traceback."""
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding (bash .ci/deps)")
    fake_gpus.add_gpu(8000)
    fake_gpus.add_gpu(4000)
    fake_gpus.deny_accounting(1)
    cfg = tmp_path / "config.toml"
    snapshot = tmp_path / "run" / "gpus.json"

    def enable(policy):
        cfg.write_text(f'[gpu]\nbackend = "nvml"\nsnapshot = "{snapshot}"\naccounting = "{policy}"\n')
        env = dict(fake_gpus.env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_LOG="stderr",
                   GPU_ROUTER_CACHE_DIR=str(tmp_path))
        return subprocess.run([str(agent_bin), "--enable-accounting"], env=env, capture_output=True, text=True,
                              timeout=60)

    r = enable("off")
    assert r.returncode == 0 and not fake_gpus.accounting_mode(0) and "Traceback" not in r.stderr
    before = time.time()
    r = enable("auto")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = {e["GPU_ROUTER_DEVICE"]: e for e in map(json.loads, filter(None, r.stderr.splitlines()))
            if e.get("GPU_ROUTER_ACCOUNTING")}
    assert (said["1"]["GPU_ROUTER_ACCOUNTING"], said["1"]["PRIORITY"]) == ("no-permission", "4")
    if os.geteuid() != 0:
        return
    assert fake_gpus.accounting_mode(0) and not fake_gpus.accounting_mode(1)
    assert "turned on" in said["0"]["MESSAGE"]
    marker = json.loads((tmp_path / "run" / "accounting-enabled.json").read_text())
    assert list(marker) == ["0"] and before <= marker["0"] <= time.time()
    # The agent's backend takes that time as "on since": jobs adopted from before it are not covered in full.
    from gpu_router import config as gr_config
    from gpu_router.daemon import accounting_mode

    loaded = gr_config.load(str(cfg), use_cache=False)
    assert accounting_mode.read_enabled_at(loaded) == {0: marker["0"]}
    b = gpu.NvmlBackend.__new__(gpu.NvmlBackend)
    b._init_accounting("auto")
    b.enabled_at = accounting_mode.read_enabled_at(loaded)
    assert b._acct_state(0, "on")["since"] == marker["0"]
    assert not b._acct_usable(0, marker["0"] - 10) and b._acct_usable(0, marker["0"] + 1)


def test_accounting_key_is_validated_in_the_config_model(tmp_path):
    from gpu_router import config as gr_config

    path = tmp_path / "config.toml"
    path.write_text("[gpu]\n")
    assert gr_config.load(str(path), use_cache=False).gpu.accounting == "auto"
    path.write_text('[gpu]\naccounting = "off"\n')
    assert gr_config.load(str(path), use_cache=False).gpu.accounting == "off"
    path.write_text('[gpu]\naccounting = "on"\n')
    with pytest.raises(gr_config.ConfigError) as info:
        gr_config.load(str(path), use_cache=False)
    assert "gpu.accounting" in str(info.value) and "auto" in str(info.value), str(info.value)


@root_only
def test_a_job_adopted_after_an_agent_restart_still_gets_the_drivers_peak(agent, fake_gpus, gr_bin):
    """The agent restarts (a package upgrade) while a job runs: the next agent adopts it from its record and, when
    it ends, asks the driver for its peak (900 MiB, held before the restart only). Samples every 1 s here, so that
    the first agent stops within a second (it notices SIGTERM at its next wake-up)."""
    base, start, run_job, stop = agent
    p, env = start(interval="1s")
    job = subprocess.Popen([str(gr_bin), "run", "--workload", "fake", "--", "--vram", "900", "--seconds", "0.3",
                            "--then", "100:4", str(base / "in")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    records = base / "jobs"
    deadline = time.monotonic() + 10
    while not (records.is_dir() and any(records.glob("*.json"))):
        assert time.monotonic() < deadline and job.poll() is None, "no job record"
        time.sleep(0.05)
    time.sleep(1.0)                                  # past the 900 MiB phase
    stop(p)
    assert any(records.glob("*.json")), "the job ended before the restart: nothing to adopt"
    (base / "gpus.json").unlink()                    # so that start() waits for the new agent's first snapshot
    p2, _env = start(interval="1s")
    assert job.wait(30) == 0, job.stderr.read()
    deadline = time.monotonic() + 10
    while any(records.glob("*.json")):
        assert time.monotonic() < deadline, "the adopted job was not accounted"
        time.sleep(0.05)
    events = stop(p2)
    done = [e for e in events if e.get("GPU_ROUTER_EVENT") == "job-finished"]
    assert len(done) == 1, events
    assert (done[0].get("GPU_ROUTER_PEAK_VRAM_MB"), done[0].get("GPU_ROUTER_PEAK_VRAM_SOURCE")) == (
        "900", "accounting"), done[0]
