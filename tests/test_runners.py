"""Callers that count failures, and task-spooler: the recipe of docs/runners.md, run for real.

A runner that marks a job errored after N failures (tests/failcount_runner.py: PeerTube's rules) and Debian's
task-spooler each run a batch three times the slots through the real launcher, real flock and real processes. With
the recipe (runner concurrency = the slots, a bounded `wait` sized from the longest job) no try is burned: 0 exit-75
attempts, 0 errored, every job ran exactly once by its own records, never more at once than the slots. The same
batch without the recipe (concurrency twice the slots, no wait) burns tries and errors jobs: that is what the recipe
prevents, and why these tests can fail.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
from collections import Counter

import pytest

import helpers
from failcount_runner import Runner

GPU_SLOTS, CPU_SLOTS = 2, 1
SLOTS = GPU_SLOTS + CPU_SLOTS
JOB_S = 0.5                       # how long each fake job runs
SMALL, BIG = 100, 5000            # bytes: under / over the threshold (GPU / CPU)
PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": GPU_SLOTS, "max_cpu_jobs": CPU_SLOTS}


def recipe_wait(concurrency, longest_job_s):
    """docs/runners.md: with C jobs in flight and a pool of S slots, a waiting job has at most C − S jobs ahead of
    it in that pool, which frees S places per longest job: wait ≥ ceil((C − S_min) / S_min) × longest job."""
    smallest = min(GPU_SLOTS, CPU_SLOTS)
    return math.ceil(max(concurrency - smallest, 0) / smallest) * longest_job_s


def batch(tmp_path):
    """3 × slots jobs, GPU- and CPU-bound mixed, each with an input file of its own (the job's name)."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    jobs = []
    for i in range(3 * SLOTS):
        size = BIG if i % 3 == 2 else SMALL
        path = folder / f"job{i:02d}-{'cpu' if size == BIG else 'gpu'}.bin"
        path.write_bytes(b"x" * size)
        jobs.append(str(path))
    return jobs


def rig(tmp_path, gr_bin, clean_env, wait):
    r = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE, wait=wait)})
    r.env["JOB_SLEEP"] = str(JOB_S)
    warm = tmp_path / "warm.bin"
    warm.write_bytes(b"x")
    r.warm("w", warm, env={"JOB_SLEEP": "0"})
    for f in r.log.iterdir():
        f.unlink()
    return r


def check_exactly_once_within_slots(r, jobs):
    records = r.records()
    ran = Counter(rec["argv"][1] for rec in records)
    assert ran == Counter(jobs), "every job runs exactly once (by the job's own records)"
    for rec in records:
        assert rec["mode"] == ("CPU" if rec["argv"][1].endswith("-cpu.bin") else "GPU")
    gpu = [(rec["start"], rec["end"]) for rec in records if rec["mode"] == "GPU"]
    cpu = [(rec["start"], rec["end"]) for rec in records if rec["mode"] == "CPU"]
    assert helpers.max_overlap(gpu) <= GPU_SLOTS and helpers.max_overlap(cpu) <= CPU_SLOTS


# ---- a runner that counts failures -----------------------------------------------------------------------------

def test_failure_counting_runner_with_the_recipe_errors_nothing(tmp_path, gr_bin, clean_env):
    concurrency = SLOTS                                     # the recipe: runner concurrency = the slots
    wait = recipe_wait(concurrency, JOB_S) + 5              # + margin for the wrapper's own start-up
    r = rig(tmp_path, gr_bin, clean_env, f"{wait}s")
    jobs = batch(tmp_path)
    runner = Runner(jobs, r.argv("w", "{job}"), concurrency, max_failures=5, poll=0.1, env=r.env)
    result = runner.run()
    assert result["errored"] == 0 and result["succeeded"] == len(jobs), result
    assert result["exit_75"] == 0 and result["failures"] == 0, "no try burned"
    assert all(s["attempts"] == 1 for s in result["jobs"].values())
    check_exactly_once_within_slots(r, jobs)
    cpu_jobs = sum(j.endswith("-cpu.bin") for j in jobs)
    ideal = max(math.ceil((len(jobs) - cpu_jobs) / GPU_SLOTS), math.ceil(cpu_jobs / CPU_SLOTS)) * JOB_S
    print(f"\nrecipe: C={concurrency} wait={wait}s: makespan {result['makespan_s']} s "
          f"(ideal >= {ideal:.1f} s), 0 errored, 0 exit-75")


def test_failure_counting_runner_without_the_recipe_burns_tries(tmp_path, gr_bin, clean_env):
    """Concurrency twice the slots and no wait: the excess jobs exit 75 at once, the runner counts each as a
    failure, re-polls faster than a slot frees, and errors jobs that never ran."""
    r = rig(tmp_path, gr_bin, clean_env, "0s")
    r.env["JOB_SLEEP"] = "1.5"
    jobs = batch(tmp_path)
    runner = Runner(jobs, r.argv("w", "{job}"), 2 * SLOTS, max_failures=5, poll=0.05, env=r.env)
    result = runner.run()
    assert result["exit_75"] > 0
    assert result["errored"] > 0, result
    errored = {j for j, s in result["jobs"].items() if s["state"] == "errored"}
    ran = {rec["argv"][1] for rec in r.records()}
    assert not errored & ran, "an errored job is one that never ran: gpu-router refused it each time"


def test_runner_cli_writes_its_summary(tmp_path, gr_bin, clean_env):
    """The runner as a program (the systemd lane runs it as a service): same rules, summary as JSON."""
    r = rig(tmp_path, gr_bin, clean_env, "10s")
    jobs = batch(tmp_path)[:SLOTS]
    (tmp_path / "jobs").write_text("\n".join(jobs) + "\n")
    out = tmp_path / "summary.json"
    p = subprocess.run([helpers.PYTHON, str(pathlib.Path(__file__).with_name("failcount_runner.py")),
                        "--jobs", str(tmp_path / "jobs"), "--concurrency", str(SLOTS), "--poll", "0.1",
                        "--summary", str(out), "--", *r.argv("w", "{job}")], env=r.env, timeout=60)
    assert p.returncode == 0
    summary = json.loads(out.read_text())
    assert summary["succeeded"] == len(jobs) and summary["errored"] == 0


# ---- task-spooler ------------------------------------------------------------------------------------------------

TSP = shutil.which("tsp", path=helpers.SAFE_PATH)


@pytest.fixture
def tsp_server(tmp_path):
    if TSP is None:
        if os.environ.get("CI"):
            pytest.fail("task-spooler is not installed (bash .ci/deps)")
        pytest.skip("task-spooler is not installed (apt install task-spooler)")
    env = {"PATH": helpers.SAFE_PATH, "TS_SOCKET": str(tmp_path / "tsp.socket"), "TMPDIR": str(tmp_path),
           "TS_MAXFINISHED": "1000", "LANG": "C.UTF-8"}
    yield env
    subprocess.run([TSP, "-K"], env=env, capture_output=True, timeout=10)


def tsp(env, *args):
    return subprocess.run([TSP, *args], env=env, capture_output=True, text=True, timeout=60)


def run_under_tsp(env, r, jobs, slots):
    """Set the server's slots (tsp -S), queue every job as `env … gpu-router run …`, wait for all, and return each
    job's exit code as task-spooler records it (`tsp -i`: "Exit status: died with exit code N")."""
    assert tsp(env, "-S", str(slots)).returncode == 0
    job_env = [f"{k}={v}" for k, v in sorted(r.env.items()) if k.startswith(("GPU_ROUTER_", "JOB_"))]
    ids = []
    for job in jobs:
        p = tsp(env, "env", *job_env, *r.argv("w", job))
        assert p.returncode == 0, p.stderr
        ids.append(p.stdout.strip())
    for i in ids:
        tsp(env, "-w", i)
    codes = {}
    for job, i in zip(jobs, ids):
        info = tsp(env, "-i", i).stdout
        line = next(l for l in info.splitlines() if l.startswith("Exit status"))
        codes[job] = int(line.rsplit(" ", 1)[1])
    return codes


def test_task_spooler_with_the_recipe_runs_every_job_once(tmp_path, gr_bin, clean_env, tsp_server):
    """The recipe: `tsp -S <slots>` and a bounded wait. task-spooler does not retry: a 75 would be a lost job."""
    wait = recipe_wait(SLOTS, JOB_S) + 5
    r = rig(tmp_path, gr_bin, clean_env, f"{wait}s")
    jobs = batch(tmp_path)
    codes = run_under_tsp(tsp_server, r, jobs, SLOTS)
    assert set(codes.values()) == {0}, codes
    check_exactly_once_within_slots(r, jobs)


def test_task_spooler_without_the_recipe_loses_jobs(tmp_path, gr_bin, clean_env, tsp_server):
    r = rig(tmp_path, gr_bin, clean_env, "0s")
    jobs = batch(tmp_path)
    codes = run_under_tsp(tsp_server, r, jobs, 2 * SLOTS)
    assert 75 in codes.values(), "twice the slots and no wait: some jobs are refused, and tsp never retries"
