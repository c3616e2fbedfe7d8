"""docs/runners.md's systemd recipe, run as written: a job runner as a service, its jobs in scopes bound to it.

The runner is tests/failcount_runner.py (N failures → errored, poll interval, concurrency), run by systemd as an
unprivileged user in group gpu-router, with the unit and profile of the recipe: runner concurrency = the slots, a
bounded `wait`, `scope = "required"` and `bind_to_caller = true`. Its jobs run in transient scopes made by the agent;
a scope is outside the service's cgroup, so only BindsTo= ties a job to its runner.

* a batch three times the slots: 0 errored, 0 exit-75 attempts, every job once (its own records);
* `systemctl stop` of the runner mid-batch stops every job with it and frees every slot; without
  bind_to_caller (the control) the job outlives its runner and keeps its slot, and a restarted runner would run it
  a second time.
"""

import json
import time

import pytest

import harness
import srcinstall
from harness import require_lane

STATE = srcinstall.FAKE_STATE
SLOTS = 3  # 2 GPU + 1 CPU

CONFIG = f"""
[gpu]
backend = "nvidia-smi"
sample_interval = "0.5s"

[workloads.svc]
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000
gpu_vram_mb = 4000
max_gpu_jobs = 2
max_cpu_jobs = 1
wait = "30s"                      # the recipe: >= ceil((C - S_min) / S_min) x the longest job, with margin
scope = "required"
bind_to_caller = true             # the recipe: stopping the runner stops its jobs
gpu_args = ["--device", "cuda", "--vram", "4000", "--state", "{STATE}", "--log", "/srv/run/jobs.log"]
cpu_args = ["--device", "cpu", "--log", "/srv/run/jobs.log"]

[workloads.oomy]                  # issue 18: a job that runs out of GPU memory, and its retry
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000
max_gpu_jobs = 1
max_cpu_jobs = 1
scope = "required"
gpu_args = ["--device", "cuda", "--state", "{STATE}"]
cpu_args = ["--device", "cpu"]

[workloads.loose]                 # the control: the same without bind_to_caller
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1
max_gpu_jobs = 0
max_cpu_jobs = 1
scope = "required"
cpu_args = ["--device", "cpu", "--log", "/srv/run/loose.log"]
"""

# The recipe's unit (docs/runners.md), with the runner's command line filled in.
UNIT = """[Unit]
Description=Job runner (test: failcount_runner.py)
After=gpu-router-agent.socket
Wants=gpu-router-agent.socket

[Service]
User=runner
Group=runner
SupplementaryGroups=gpu-router
ExecStart={exec_start}
# The jobs live in their own scopes (bind_to_caller = true binds each to this unit): a stop stops them too.
KillMode=mixed
TimeoutStopSec=30
"""


def runner_cmd(workload, seconds, jobs="/srv/run/jobs", summary="/srv/run/summary.json"):
    return (f"/usr/bin/python3 /src/tests/failcount_runner.py --jobs {jobs} --concurrency {SLOTS} "
            f"--max-failures 5 --poll 0.5 --summary {summary} -- "
            f"/usr/bin/gpu-router run --workload {workload} -- --seconds {seconds} {{job}}")


@pytest.fixture(scope="module")
def box():
    require_lane()
    c = harness.Container()
    c.start()
    try:
        srcinstall.install(c, CONFIG)
        c.add_user("runner", groups=["gpu-router"])
        c.run("mkdir -p /srv/run /srv/in && chown runner: /srv/run")
        yield c
    finally:
        c.stop()


def start_runner(box, unit, cmd, paths):
    box.write_file("/srv/run/jobs", "\n".join(paths) + "\n")
    box.run("rm -f /srv/run/summary.json /srv/run/*.log")
    box.write_file(f"/etc/systemd/system/{unit}", UNIT.format(exec_start=cmd))
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "start", unit])


def log_events(box, name="jobs.log"):
    out = box.run(["cat", f"/srv/run/{name}"], check=False).stdout
    return [json.loads(x) for x in out.splitlines()]


def slots_busy(box, workload):
    w = json.loads(box.run(["gpu-router", "status", "--json"]).stdout)["workloads"][workload]
    return sum(w["gpu_busy"].values()) + (w["cpu_busy"] or 0)


def test_runner_service_with_the_recipe_errors_nothing(box):
    paths = []
    for i in range(3 * SLOTS):
        cpu = i % 3 == 2
        path = f"/srv/in/job{i:02d}-{'cpu' if cpu else 'gpu'}.bin"
        box.write_file(path, "x" * (5000 if cpu else 100))
        paths.append(path)
    start_runner(box, "batch-runner.service", runner_cmd("svc", 1), paths)
    box.wait_for("test -e /srv/run/summary.json", timeout=120, interval=0.5)
    summary = json.loads(box.run(["cat", "/srv/run/summary.json"]).stdout)
    assert summary["errored"] == 0 and summary["succeeded"] == len(paths), summary
    assert summary["exit_75"] == 0 and summary["failures"] == 0
    starts = [e for e in log_events(box) if e["event"] == "start"]
    assert sorted(e["inputs"][-1] for e in starts) == sorted(paths), "every job ran exactly once"
    routed = box.journal("GPU_ROUTER_EVENT=routed", "GPU_ROUTER_WORKLOAD=svc")
    assert len(routed) >= len(paths) and all(e.get("GPU_ROUTER_SCOPE") for e in routed[-len(paths):])
    print(f"\nrunner service: {len(paths)} jobs, C={SLOTS}: makespan {summary['makespan_s']} s, 0 errored")


def test_stopping_the_runner_stops_its_jobs_and_frees_the_slots(box):
    paths = [f"/srv/in/long{i}-gpu.bin" for i in range(SLOTS)]
    for p in paths:
        box.write_file(p, "x" * 100)
    start_runner(box, "long-runner.service", runner_cmd("svc", 120), paths)
    # Two GPU jobs run (started: in their scopes, past exec), the third waits for a slot.
    box.wait_for(lambda: len([e for e in log_events(box) if e["event"] == "start"]) == 2, timeout=30, interval=0.2)
    assert slots_busy(box, "svc") == 2
    scopes = box.run("systemctl list-units --plain --no-legend 'gpu-router-svc-*.scope' | awk '{print $1}'"
                     ).stdout.split()
    assert len(scopes) == 2
    for scope in scopes:
        assert box.run(["systemctl", "show", "-p", "BindsTo", "--value", scope]).stdout.strip() == \
            "long-runner.service"
    box.run(["systemctl", "stop", "long-runner.service"], timeout=60)
    for scope in scopes:
        box.wait_for(f"! systemctl is-active --quiet {scope}", timeout=20)
    assert box.run(["pgrep", "-f", "fake_gpu_job.py"], check=False).returncode != 0, "no job outlives its runner"
    assert slots_busy(box, "svc") == 0


def test_without_bind_to_caller_a_job_outlives_its_runner(box):
    """The control: the scope is not in the service's cgroup, so a stop without BindsTo leaves the job running,
    holding its slot; the runner's next start would hand the same job out again."""
    box.write_file("/srv/in/loose.bin", "x" * 100)
    start_runner(box, "loose-runner.service", runner_cmd("loose", 120), ["/srv/in/loose.bin"])
    box.wait_for(lambda: log_events(box, "loose.log"), timeout=30, interval=0.2)   # the job started
    box.run(["systemctl", "stop", "loose-runner.service"], timeout=60)
    time.sleep(1)
    try:
        alive = box.run(["pgrep", "-f", "fake_gpu_job.py"], check=False)
        assert alive.returncode == 0, box.run("cat /srv/run/loose.log; systemctl list-units --no-legend "
                                              "'gpu-router-*'; journalctl -n 20 --no-pager", check=False).stdout
        assert slots_busy(box, "loose") == 1
    finally:
        box.run("systemctl stop 'gpu-router-loose-*.scope'", check=False)


def test_a_members_cuda_oom_is_known_and_its_retry_runs_on_the_cpu(box):
    """Issue 18, as a member under the real agent: a job that fills the 16 GiB GPU (16000 MiB for 1.2 s, sampled)
    and fails growing past it (CTranslate2's message, exit 1). In this container the proc connector is silent, so
    the agent knows the exit status only when it reads the zombie first: the verdict is cuda-oom (status known) or
    unknown with the input a suspect; either way the member's retry runs on the CPU and says why."""
    box.write_file("/srv/in/oomy.bin", "x" * 100)
    job = ["gpu-router", "run", "--workload", "oomy", "--", "--vram", "16000", "--grow", "2000", "--seconds", "1.2",
           "--then", "20000:0", "--fail-as", "ctranslate2", "/srv/in/oomy.bin"]
    first = box.run(job, user="runner", check=False, timeout=60)
    assert first.returncode == 1 and "CUDA failed with error out of memory" in first.stderr, first.stderr
    routed = box.journal("GPU_ROUTER_EVENT=routed", "GPU_ROUTER_WORKLOAD=oomy")
    job_id = routed[-1]["GPU_ROUTER_JOB"]
    done = box.wait_for(lambda: (box.journal("GPU_ROUTER_EVENT=job-finished", f"GPU_ROUTER_JOB={job_id}")
                                 or [None])[-1], timeout=20, interval=0.3)
    assert (done["GPU_ROUTER_RESULT"], done.get("GPU_ROUTER_OOM_MEMORY")) in (("cuda-oom", "oom"),
                                                                              ("unknown", "suspect")), done
    retry = box.run(job, user="runner", check=False, timeout=60)
    assert retry.returncode == 0, retry.stderr
    again = box.journal("GPU_ROUTER_EVENT=routed", "GPU_ROUTER_WORKLOAD=oomy")[-1]
    assert again["GPU_ROUTER_MODE"] == "CPU" and again["GPU_ROUTER_REASON"] in ("cuda-oom-before",
                                                                                "cuda-oom-suspected"), again
    print(f"\nmember's OOM: {done['GPU_ROUTER_RESULT']} (peak {done.get('GPU_ROUTER_PEAK_VRAM_MB')} MiB, "
          f"{done.get('GPU_ROUTER_PEAK_VRAM_SOURCE')}), retry: CPU ({again['GPU_ROUTER_REASON']})")
