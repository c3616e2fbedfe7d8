"""CUDA OOMs end to end (issue 18): the real agent on a fake GPU (pynvml over the fake libnvidia-ml), the real
wrapper, and fake CUDA jobs that fail the way real ones do (PyTorch, CTranslate2, ffmpeg NVENC: their message on
stderr, their exit status). The agent tells the OOM from the GPU's own figures (never from the job's stderr, which
stays the caller's), remembers the input, and its retry goes to the CPU; a failure without such evidence stays
``failed`` and its retry goes to the GPU again. With the exit status unknown (the agent in another network
namespace: no proc connector, as inside a container) a retry right after the attempt is what confirms it.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from fakenvml import JOB, fake_gpus, have_pynvml  # noqa: F401  (fake_gpus is a fixture)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the driver's accounting is turned on by root")


@pytest.fixture
def rig(tmp_path, fake_gpus, agent_bin, gr_bin, clean_env):  # noqa: F811
    """The agent on one 8000 MiB fake GPU (1 s samples), profile ``fake`` (slots, threshold out of reach)."""
    if not have_pynvml():
        pytest.skip("no pynvml binding (bash .ci/deps)")
    fake_gpus.add_gpu(8000)
    base = tmp_path / "agent"
    (base / "locks").mkdir(parents=True, mode=0o770)
    os.chmod(tmp_path, 0o755)
    cfg = base / "config.toml"
    media = tmp_path / "media"
    media.mkdir()
    procs = []

    class Rig:
        pass

    r = Rig()
    r.base, r.media, r.fake, r.gr = base, media, fake_gpus, str(gr_bin)

    def start(extra="", netns=False, scope="best-effort"):
        cfg.write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "nvml"
snapshot = "{base}/gpus.json"
sample_interval = "1s"
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.fake]
binary = "{JOB}"
probe = "file-size"
threshold = 1000000
scope = "{scope}"
cpu_args = ["--device", "cpu"]
{extra}
""")
        env = dict(fake_gpus.env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_LOG="stderr",
                   GPU_ROUTER_CACHE_DIR=str(base))
        argv = (["unshare", "-n"] if netns else []) + [str(agent_bin)]
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        deadline = time.monotonic() + 20
        while not (base / "agent.sock").exists() or not (base / "gpus.json").exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "agent did not come up"
            time.sleep(0.05)
        r.agent, r.env = p, env

    def run(path, *job_args):
        """One attempt through the wrapper: (exit status, stderr, the routed event's fields), once accounted."""
        p = subprocess.run([str(gr_bin), "run", "--workload", "fake", "--", *job_args, str(path)], env=r.env,
                           capture_output=True, text=True, timeout=60)
        events = [json.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
        routed = next(e for e in events if e.get("GPU_ROUTER_EVENT") == "routed")
        record = base / "jobs" / f"{routed['GPU_ROUTER_JOB']}.json"
        deadline = time.monotonic() + 15
        while record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not record.exists(), "job not accounted"
        return p.returncode, p.stderr, routed

    def run_unwaited(path, *job_args):
        """One attempt whose exit status nobody can learn: the caller ignores SIGCHLD, so the kernel reaps the job
        the moment it exits (no zombie for the agent to read) — and the agent has no proc connector (netns)."""
        out = base / f"unwaited.{time.monotonic_ns()}"
        argv = [str(gr_bin), "run", "--workload", "fake", "--", *job_args, str(path)]
        old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            pid = os.posix_spawn(argv[0], argv, r.env, setsigdef=(signal.SIGCHLD,), file_actions=[
                (os.POSIX_SPAWN_OPEN, 2, str(out), os.O_WRONLY | os.O_CREAT, 0o644),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            signal.signal(signal.SIGCHLD, old)
        text = out.read_text()
        routed = next(e for e in (json.loads(x) for x in text.splitlines() if x.startswith("{"))
                      if e.get("GPU_ROUTER_EVENT") == "routed")
        record = base / "jobs" / f"{routed['GPU_ROUTER_JOB']}.json"
        deadline = time.monotonic() + 15
        while record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not record.exists(), "job not accounted"
        return text, routed

    def stop():
        r.agent.send_signal(signal.SIGTERM)
        assert r.agent.wait(10) == 0
        return [json.loads(x) for x in r.agent.stderr.read().splitlines() if x.startswith("{")]

    def finished(events, job):
        done = [e for e in events if e.get("GPU_ROUTER_EVENT") == "job-finished" and e["GPU_ROUTER_JOB"] == job]
        assert len(done) == 1, events
        return done[0]

    def new_input(name, size=1000):
        path = media / name
        path.write_bytes(b"x" * size)
        return path

    r.start, r.run, r.run_unwaited, r.stop, r.finished, r.new_input = start, run, run_unwaited, stop, finished, \
        new_input
    yield r
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@root_only
@pytest.mark.parametrize("style,code,message", [
    ("torch", 1, "torch.OutOfMemoryError: CUDA out of memory"),
    ("ctranslate2", 1, "RuntimeError: CUDA failed with error out of memory"),
    ("nvenc", 187, "OpenEncodeSessionEx failed: out of memory"),
])
def test_a_cuda_oom_is_known_remembered_and_its_retry_runs_on_the_cpu(rig, style, code, message):
    """The job grows past the 8000 MiB GPU in 1000 MiB steps (as allocators do) and fails the way its program
    does: the agent says cuda-oom (its driver-accounted peak filled the GPU), the input is remembered, and the
    retry (renamed in between: the identity is the file's, not its name) runs on the CPU, REASON cuda-oom-before."""
    rig.start()
    path = rig.new_input("talk.wav")
    rc, err, routed = rig.run(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.2", "--fail-as", style)
    assert rc == code and message in err                       # the caller's stderr and status, exactly as before
    assert routed["GPU_ROUTER_MODE"] == "GPU"
    moved = path.with_name("renamed.wav")
    os.rename(path, moved)
    rc2, err2, routed2 = rig.run(moved, "--vram", "12000", "--grow", "1000", "--seconds", "0.2",
                                 "--fail-as", style)
    events = rig.stop()
    first = rig.finished(events, routed["GPU_ROUTER_JOB"])
    assert first["GPU_ROUTER_RESULT"] == "cuda-oom", first
    assert (first["GPU_ROUTER_PEAK_VRAM_MB"], first["GPU_ROUTER_PEAK_VRAM_SOURCE"]) == ("8000", "accounting")
    assert first["GPU_ROUTER_OOM_CAUSE"] == "outgrew" and first["GPU_ROUTER_OOM_MEMORY"] == "oom"
    assert rc2 == 0, err2
    assert (routed2["GPU_ROUTER_MODE"], routed2["GPU_ROUTER_REASON"]) == ("CPU", "cuda-oom-before"), routed2
    assert routed2["GPU_ROUTER_OOM_PEAK_VRAM_MB"] == "8000" and routed2["GPU_ROUTER_OOM_JOB"] == \
        routed["GPU_ROUTER_JOB"]
    memory = json.loads((rig.base / "state" / "oom" / "inputs.json").read_text())
    assert [e["kind"] for e in memory["entries"]] == ["oom"]
    assert os.stat(rig.base / "state" / "oom" / "inputs.json").st_mode & 0o777 == 0o600


@root_only
def test_a_failure_without_a_full_gpu_stays_failed_and_an_edited_input_is_a_new_one(rig):
    """One atomic 12000 MiB allocation fails with the GPU empty (nothing was ever held): the agent cannot tell
    an OOM from that, so it says failed and remembers nothing; the retry goes to the GPU. An OOM'd input that is
    then edited (new size) is a new input: the GPU again."""
    rig.start()
    path = rig.new_input("atomic.wav")
    rc, err, routed = rig.run(path, "--vram", "12000", "--seconds", "0.2")
    assert rc == 1 and "CUDA out of memory" in err
    rc, _err, again = rig.run(path, "--vram", "100", "--seconds", "0.2")
    assert rc == 0 and again["GPU_ROUTER_MODE"] == "GPU"
    grown = rig.new_input("grown.wav")
    _rc, _err, grown_first = rig.run(grown, "--vram", "12000", "--grow", "2000", "--seconds", "0.2")
    with open(grown, "ab") as f:
        f.write(b"more")
    rc, _err, edited = rig.run(grown, "--vram", "100", "--seconds", "0.2")
    events = rig.stop()
    assert rig.finished(events, routed["GPU_ROUTER_JOB"])["GPU_ROUTER_RESULT"] == "failed"
    assert rig.finished(events, grown_first["GPU_ROUTER_JOB"])["GPU_ROUTER_RESULT"] == "cuda-oom"
    assert rc == 0 and (edited["GPU_ROUTER_MODE"], edited["GPU_ROUTER_REASON"]) == ("GPU", "under-threshold")


@root_only
def test_on_gpu_oom_fail_refuses_the_retry_with_its_code(rig, gr_bin):
    rig.start('on_gpu_oom = "fail"')
    path = rig.new_input("big.wav")
    rig.run(path, "--vram", "9000", "--grow", "1000", "--seconds", "0.2")
    p = subprocess.run([str(gr_bin), "run", "--workload", "fake", "--", "--vram", "10", str(path)], env=rig.env,
                       capture_output=True, text=True, timeout=60)
    rig.stop()
    assert p.returncode == 65 and "ran out of GPU memory before" in p.stderr, p.stderr
    blocked = [json.loads(x) for x in p.stderr.splitlines() if x.startswith("{")][-1]
    assert (blocked["GPU_ROUTER_MODE"], blocked["GPU_ROUTER_REASON"]) == ("BLOCKED", "cuda-oom-before")


def _unknown_oom_then_retry(rig, name, **start):
    """An agent without the proc connector (its own network namespace): one unwaited attempt that runs out of
    GPU memory, then the caller's retry of the same input → (the first attempt's job-finished fields, the retry's
    exit code, stderr and routed event)."""
    rig.start(netns=True, **start)
    path = rig.new_input(name)
    err, routed = rig.run_unwaited(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.2")
    assert "CUDA out of memory" in err
    rc2, err2, routed2 = rig.run(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.2")
    events = rig.stop()
    first = rig.finished(events, routed["GPU_ROUTER_JOB"])
    return first, rc2, err2, routed2


@root_only
def test_status_unknown_a_quick_retry_is_the_sign_and_confirms_it(rig):
    """The agent in its own network namespace has no proc connector (as inside a container): the attempt's exit
    status is unknown, so its RESULT stays unknown — but the GPU was full, so the input is a suspect, and the
    caller's retry within the window goes to the CPU (cuda-oom-suspected) and confirms it for later retries."""
    first, rc2, err2, routed2 = _unknown_oom_then_retry(rig, "c.wav")
    assert first["GPU_ROUTER_RESULT"] == "unknown" and "GPU_ROUTER_EXIT_STATUS" not in first, first
    assert first["GPU_ROUTER_OOM_MEMORY"] == "suspect"
    assert rc2 == 0, err2
    assert (routed2["GPU_ROUTER_MODE"], routed2["GPU_ROUTER_REASON"]) == ("CPU", "cuda-oom-suspected")
    memory = json.loads((rig.base / "state" / "oom" / "inputs.json").read_text())
    assert [e["kind"] for e in memory["entries"]] == ["oom"]   # confirmed by the retry


@root_only
def test_a_job_that_fails_when_its_gpu_is_lost_is_a_gpu_fault_and_not_remembered(rig):
    """The GPU falls off the bus while the job runs (NVML answers GPU_IS_LOST; the job's next CUDA call fails):
    the agent says gpu-fault — not cuda-oom, although the job failed — and remembers nothing: its retry is the
    GPU's again once it is back."""
    rig.start()
    path = rig.new_input("lost.wav")
    p = subprocess.Popen([rig.gr, "run", "--workload", "fake", "--", "--vram", "1000", "--seconds", "6", str(path)],
                         env=rig.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rig.fake.wait_for(lambda: rig.fake.claims() != [], timeout=20)
    time.sleep(1.5)                                            # sampled while it runs
    rig.fake.lose(0)
    assert p.wait(30) == 1
    routed = [json.loads(x) for x in p.stderr.read().splitlines() if x.startswith("{")][-1]
    job = routed["GPU_ROUTER_JOB"]
    record = rig.base / "jobs" / f"{job}.json"
    rig.fake.wait_for(lambda: not record.exists(), timeout=15)
    rig.fake.lose(0, on=False)
    events = rig.stop()
    done = rig.finished(events, job)
    assert done["GPU_ROUTER_RESULT"] == "gpu-fault" and done["GPU_ROUTER_GPU_FAULT"] == "gpu-lost", done
    assert "GPU_ROUTER_OOM_MEMORY" not in done


@root_only
def test_scope_off_the_agent_still_follows_a_gpu_job_and_remembers_its_oom(rig):
    """scope = "off": no scope, but the wrapper asks the agent to follow the GPU job (OP=track), so it is accounted
    like any other: cuda-oom from the driver's figures, the input remembered, its retry on the CPU."""
    rig.start(scope="off")
    path = rig.new_input("off.wav")
    rc, err, routed = rig.run(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.2", "--fail-as", "nvenc")
    assert rc == 187 and "OpenEncodeSessionEx failed: out of memory" in err
    assert routed["GPU_ROUTER_MODE"] == "GPU" and "GPU_ROUTER_SCOPE" not in routed
    rc2, err2, routed2 = rig.run(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.2")
    events = rig.stop()
    first = rig.finished(events, routed["GPU_ROUTER_JOB"])
    assert (first["GPU_ROUTER_RESULT"], first["GPU_ROUTER_EXIT_STATUS"]) == ("cuda-oom", "187"), first
    assert first["GPU_ROUTER_OOM_MEMORY"] == "oom" and "GPU_ROUTER_SCOPE" not in first
    assert rc2 == 0, err2
    assert (routed2["GPU_ROUTER_MODE"], routed2["GPU_ROUTER_REASON"]) == ("CPU", "cuda-oom-before"), routed2
    assert not [e for e in events if e.get("GPU_ROUTER_EVENT") == "job-finished"
                and e["GPU_ROUTER_JOB"] == routed2["GPU_ROUTER_JOB"]], "a CPU job with scope off is not followed"


@root_only
def test_scope_off_status_unknown_the_retry_confirms_the_suspect(rig):
    """scope = "off" where exit statuses are unknown (no proc connector, nobody waits for the job): the GPU was
    full, so the input is a suspect and the caller's retry goes to the CPU."""
    first, rc2, err2, routed2 = _unknown_oom_then_retry(rig, "offc.wav", scope="off")
    assert first["GPU_ROUTER_RESULT"] == "unknown" and first["GPU_ROUTER_OOM_MEMORY"] == "suspect", first
    assert rc2 == 0, err2
    assert (routed2["GPU_ROUTER_MODE"], routed2["GPU_ROUTER_REASON"]) == ("CPU", "cuda-oom-suspected")


@root_only
def test_scope_off_without_an_agent_or_with_a_silent_one_the_job_runs_as_before(rig, tmp_path):
    """The agent gone, or one that never answers: the job runs all the same, its exit status unchanged, and a
    silent agent holds it up for at most the wrapper's short deadline (scope.TRACK_TIMEOUT_S). Guards the new
    request's path: on the old code no request is made at all."""
    import socket

    rig.start(scope="off")
    rig.stop()
    path = rig.new_input("alone.wav")
    sock_path = rig.base / "agent.sock"
    if sock_path.exists():
        sock_path.unlink()
    rc, err, routed = rig.run(path, "--vram", "100", "--seconds", "0.1", "--fail-as", "nvenc")
    assert routed["GPU_ROUTER_MODE"] == "GPU" and rc == 0 and "Traceback" not in err, err
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sock_path))
    silent.listen(8)                                           # takes connections, never reads nor answers
    try:
        t0 = time.monotonic()
        rc, err, routed = rig.run(path, "--vram", "12000", "--grow", "1000", "--seconds", "0.1", "--fail-as",
                                  "nvenc")
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert rc == 187 and "OpenEncodeSessionEx failed: out of memory" in err and "Traceback" not in err, err
    assert routed["GPU_ROUTER_MODE"] == "GPU"
    assert took < 10, "held up past the wrapper's deadline"


@root_only
def test_scope_off_a_restarted_agent_adopts_the_followed_job_from_its_record(rig):
    """The agent restarts while a followed job (scope = "off": no scope, no cgroup) runs: the next agent adopts it
    from its record and accounts its CUDA OOM, the input remembered as before."""
    rig.start(scope="off")
    path = rig.new_input("adopted.wav")
    p = subprocess.Popen([rig.gr, "run", "--workload", "fake", "--", "--vram", "12000", "--grow", "1000",
                          "--seconds", "0.5", str(path)], env=rig.env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    rig.fake.wait_for(lambda: list((rig.base / "jobs").glob("*.json")) != [], timeout=20)
    record = json.loads(next((rig.base / "jobs").glob("*.json")).read_text())
    assert (record["scope"], record["control_group"]) == (None, None)
    first_events = rig.stop()
    assert not [e for e in first_events if e.get("GPU_ROUTER_EVENT") == "job-finished"]
    rig.start(scope="off")
    job = record["job_id"]
    rig.fake.wait_for(lambda: not (rig.base / "jobs" / f"{job}.json").exists(), timeout=30)
    assert p.wait(30) == 1                                     # reaped after the agent read its status
    done = rig.finished(rig.stop(), job)
    assert (done["GPU_ROUTER_RESULT"], done.get("GPU_ROUTER_OOM_MEMORY")) == ("cuda-oom", "oom"), \
        json.dumps(done)
