"""gpu-router under a real Slurm: Debian's slurm-wlm and munge as systemd units in a booted bookworm container.

One node, one fake 16 GiB GPU (tests/fakenvml's state, read by the agent through the fake nvidia-smi; the fake
job claims VRAM there and fails like a CUDA OOM when its claim does not fit). The site's slurm.conf has its own node
line and its own SchedulerParameters; what `gpu-router slurm-conf --print slurm.conf` / `--print gres.conf` print
is installed as it is, so Slurm accepting and honouring it is part of the test. Every job's own ledger (the fake
job's start/finish/oom lines, keyed by PID, and the batch script's "SLURM_JOB_ID PID" line) is checked against
Slurm's record (jobcomp/filetxt: one line per attempt).

(a) Slurm gates the slots (a count-only GRES per pool; (a') the same as licenses): 40 mixed jobs, seven times the
    slots → 0 exit-75 attempts, makespan within 1.25x the slots' ideal.
(r) RequeueExit alone (40 jobs submitted without --request, some with --no-requeue): many 75s, each job still
    COMPLETED exactly once.
(b) RequeueExit=75 is the backstop when something outside Slurm holds a slot: the excess exits 75, Slurm requeues
    it, and every job still COMPLETES exactly once.
(c) Slurm's admission and gpu-router's disagree: a foreign process takes VRAM mid-batch; Slurm sees a free GRES,
    gpu-router sees no room (admission = "vram") → 75 → requeue; no job OOMs, none is lost. The same start without
    VRAM admission OOMs, which is what the lane would catch.
(f) --request fails closed: with several workloads and no -w, or a missing input, `sbatch $(…)` submits nothing.

Figures (75s, requeues, makespan vs ideal) are printed and kept in tests/systemd/README-slurm.md.
"""

import json
import math
import re
import socket
import time

import pytest

import harness
import srcinstall
from harness import require_lane

SLURM_PACKAGES = harness.PACKAGES + ("munge", "slurm-wlm")   # a rootfs of its own: the other lanes' cache stays
JOB_S = 3                          # each fake job's run time ((c))
ENC_S = 10                         # enc's run time: the 40-job batches, (b) (long enough that Slurm's own
                                   # 1.5-2 s from one job's end to the next one's start stays within 1.25x)
GPU_MB, JOB_VRAM_MB, FOREIGN_MB = 16384, 6000, 8000
ENC_VRAM_MB, ENC_GPU, ENC_CPU = 3500, 4, 2
STATE = srcinstall.FAKE_STATE
LOG = "/scratch/jobs.log"          # the fake jobs' own ledger (JSON lines)
LEDGER = "/scratch/ledger"         # "SLURM_JOB_ID PID" per attempt, written by the batch script before exec
JOBCOMP = "/var/log/slurm/jobcomp.log"

CONFIG = f"""
[gpu]
backend = "nvidia-smi"
sample_interval = "0.5s"

[workloads.enc]                    # (a), (r), (b): slots admission, GPU and CPU pools
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000
gpu_vram_mb = {ENC_VRAM_MB}
max_gpu_jobs = {ENC_GPU}
max_cpu_jobs = {ENC_CPU}
gpu_args = ["--device", "cuda", "--vram", "{ENC_VRAM_MB}", "--seconds", "{ENC_S}", "--state", "{STATE}", "--log", "{LOG}"]
cpu_args = ["--device", "cpu", "--seconds", "{ENC_S}", "--log", "{LOG}"]
scope = "best-effort"

[workloads.vr]                     # (c): VRAM admission, the GPU pool only
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000
admission = "vram"
gpu_vram_mb = {JOB_VRAM_MB}
max_gpu_jobs = 2
max_cpu_jobs = 0
gpu_args = ["--device", "cuda", "--vram", "{JOB_VRAM_MB}", "--seconds", "{JOB_S}", "--state", "{STATE}", "--log", "{LOG}"]
scope = "best-effort"

[workloads.blind]                  # (c)'s control: the same job, slots admission only
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000
max_gpu_jobs = 2
max_cpu_jobs = 0
gpu_args = ["--device", "cuda", "--vram", "{JOB_VRAM_MB}", "--seconds", "1", "--state", "{STATE}", "--log", "/scratch/blind.log"]
scope = "off"
"""

# The batch script: the job's own ledger line, then exec (the wrapper keeps the PID, and so does the job).
JOB_SCRIPT = """#!/bin/sh
echo "$SLURM_JOB_ID $$ ${SLURM_RESTART_COUNT:-0}" >> /scratch/ledger
exec gpu-router run --workload "$1" -- "$2"
"""

# The site's own slurm.conf, before gpu-router: its own node line (16 CPUs declared on 2 real cores, with
# config_overrides, so CPUs never limit the batch: the site's value is kept by the merge) and its own
# SchedulerParameters (bf_interval=30, kept beside gpu-router's sched_interval=2).
SITE_CONF = """ClusterName=lane
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=30
ReturnToService=2
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def free_port():
    """The container shares the host's network namespace: ports of our own, so parallel lanes do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lane():
    require_lane()
    c = harness.Container(packages=SLURM_PACKAGES)
    c.start()
    try:
        t0 = time.monotonic()
        c.write_file("/usr/local/bin/lane-job", JOB_SCRIPT, mode=0o755)
        c.run("mkdir -p /scratch/in /scratch/out")
        srcinstall.install(c, CONFIG, GPU_MB)
        node = c.run("hostname -s").stdout.strip()
        c.run(f"echo '127.0.0.1 {node}' >> /etc/hosts")   # munge and slurmd resolve the node's name
        site = SITE_CONF.format(node=node, ctld_port=free_port(), slurmd_port=free_port(), jobcomp=JOBCOMP)
        c.write_file("/etc/slurm/slurm.conf", site)
        before = c.run(["gpu-router", "slurm-conf", "--check"], check=False)
        # As an administrator applies it: the merged files, printed, installed as they are (no edit by hand).
        c.run("gpu-router slurm-conf --print slurm.conf > /tmp/slurm.conf && "
              "gpu-router slurm-conf --print gres.conf > /tmp/gres.conf && "
              "cp /tmp/slurm.conf /tmp/gres.conf /etc/slurm/")
        after = c.run(["gpu-router", "slurm-conf", "--check"], check=False)
        gen = json.loads(c.run(["gpu-router", "slurm-conf", "--json"]).stdout)
        conf = c.run(["cat", "/etc/slurm/slurm.conf"]).stdout
        c.run(["sh", "-c", f"echo '{gen['licenses']}' >> /etc/slurm/slurm.conf"])   # (a'): printed as a comment
        c.run("mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm; "
              "chown slurm: /var/lib/slurm/slurmctld /var/log/slurm; "
              "systemctl restart munge; systemctl start slurmctld slurmd")
        try:
            c.wait_for("sinfo -h -o %T | grep -qx idle", timeout=60, interval=0.25)
        except TimeoutError:
            raise AssertionError("slurm never became idle:\n" + c.run(
                "systemctl status munge slurmctld slurmd --no-pager; tail -30 /var/log/slurm/*.log",
                check=False).stdout) from None
        c.slurm = {"node": node, "gen": gen, "conf": conf, "site": site, "before": before, "after": after,
                   "setup_s": time.monotonic() - t0}
        yield c
    finally:
        c.stop()


# ---- a batch, and what it left -------------------------------------------------------------------------------------

def inputs(c, tag, n, cpu_every=3):
    """n inputs: every cpu_every-th is over the threshold (a CPU job), the rest GPU jobs."""
    names = []
    for i in range(n):
        cpu = cpu_every and i % cpu_every == cpu_every - 1
        path = f"/scratch/in/{tag}-{i:02d}-{'cpu' if cpu else 'gpu'}.bin"
        c.write_file(path, "x" * (5000 if cpu else 100))
        names.append(path)
    return names


def submit(c, workload, path, hold=False, licenses=False):
    """sbatch with the option `gpu-router slurm-conf --request` prints for the input (--gres=… or -L …)."""
    return submit_many(c, workload, [path], hold=hold, licenses=licenses)[0]


def submit_many(c, workload, paths, hold=False, licenses=False, request=True, no_requeue=()):
    """One shell inside the container submits them all, each as the docs write it:
    ``opt=$(gpu-router slurm-conf --request INPUT -w W) && sbatch $opt …`` (the line stops when no pool is
    decided). request=False: no GRES asked (RequeueExit alone); paths in no_requeue get --no-requeue."""
    lines = ["set -e"]
    for path in paths:
        extra = ("--hold " if hold else "") + ("--no-requeue " if path in no_requeue else "")
        if request:
            ask = f"gpu-router slurm-conf --request {path} -w {workload}" + (" --licenses" if licenses else "")
            lines.append(f"opt=$({ask}) && sbatch --parsable --open-mode=append $opt {extra}"
                         f"--output=/scratch/out/%j.out --chdir=/scratch /usr/local/bin/lane-job {workload} {path}")
        else:
            lines.append(f"sbatch --parsable --open-mode=append {extra}--output=/scratch/out/%j.out "
                         f"--chdir=/scratch /usr/local/bin/lane-job {workload} {path}")
    out = c.run("\n".join(lines) + "\n", timeout=300).stdout.split()
    assert len(out) == len(paths), out
    return [int(x.split(";")[0]) for x in out]


def release(c, ids):
    c.run(["scontrol", "release", ",".join(map(str, ids))])


def wait_done(c, ids, timeout=150):
    ids = set(ids)

    def done():
        out = c.run(["squeue", "-h", "-o", "%i"]).stdout.split()
        return not ids & {int(x) for x in out}
    c.wait_for(done, timeout=timeout, interval=0.5)


def jobcomp(c, ids):
    """Slurm's record: every attempt of each job, in order ({id: [{"state", "exit", "start", "end"}]})."""
    recs = {i: [] for i in ids}
    for line in c.run(["cat", JOBCOMP]).stdout.splitlines():
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        jid = int(f.get("JobId", -1))
        if jid in recs:
            recs[jid].append({"state": f["JobState"], "exit": f.get("ExitCode"),
                              "start": f["StartTime"], "end": f["EndTime"]})
    return recs


def ledger(c, ids):
    """The job's own record: {slurm id: [fake-job events of each attempt]} via the batch script's PID line."""
    pid_of = {}
    for line in c.run(["cat", LEDGER]).stdout.splitlines():
        jid, pid, _restart = line.split()
        pid_of.setdefault(int(pid), int(jid))
    events = {i: [] for i in ids}
    for line in c.run(["cat", LOG]).stdout.splitlines():
        ev = json.loads(line)
        jid = pid_of.get(ev["pid"])
        if jid in events:
            events[jid].append(ev)
    return events


def busy(c, workload):
    return json.loads(c.run(["gpu-router", "status", "--json"]).stdout)["workloads"][workload]["gpu_busy"]["gpu0"]


def outside_intervals(c, since):
    """GPU runs of jobs started outside Slurm (their PIDs are in no batch script's ledger line) since `since`."""
    known = {int(line.split()[1]) for line in c.run(["cat", LEDGER]).stdout.splitlines()}
    starts, out = {}, []
    for line in c.run(["cat", LOG]).stdout.splitlines():
        ev = json.loads(line)
        if ev["pid"] in known or ev["t"] < since or ev.get("gpu") is None:
            continue
        if ev["event"] == "start":
            starts[ev["pid"]] = ev["t"]
        elif ev["event"] == "finish" and ev["pid"] in starts:
            out.append((starts.pop(ev["pid"]), ev["t"]))
    return out + [(t, time.time()) for t in starts.values()]


def overlap(intervals):
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1]))
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


def epoch(stamp):
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


def check_batch(c, ids, gpu_slots=ENC_GPU, cpu_slots=ENC_CPU, extra_gpu=(), job_s=ENC_S):
    """Every job COMPLETED exactly once (Slurm's record and its own), never an OOM, never beyond the slots.
    Returns the figures for the README."""
    comp, own = jobcomp(c, ids), ledger(c, ids)
    for jid in ids:
        states = [r["state"] for r in comp[jid]]
        assert states.count("COMPLETED") == 1 and states[-1] == "COMPLETED", (jid, comp[jid])
        assert all(r["state"] == "FAILED" and r["exit"] == "75:0" for r in comp[jid][:-1]), (jid, comp[jid])
        kinds = [e["event"] for e in own[jid]]
        assert kinds == ["start", "finish"], (jid, own[jid])   # ran once; a 75 never reached the job
    gpu = [(e0["t"], e1["t"]) for e0, e1 in (own[j] for j in ids) if e0["gpu"] is not None]
    cpu = [(e0["t"], e1["t"]) for e0, e1 in (own[j] for j in ids) if e0["gpu"] is None]
    assert overlap(gpu + list(extra_gpu)) <= gpu_slots and overlap(cpu) <= cpu_slots
    attempts = sum(len(v) for v in comp.values())
    first = min(epoch(r["start"]) for v in comp.values() for r in v)
    last = max(epoch(r["end"]) for v in comp.values() for r in v)
    ideal = max(math.ceil(len(gpu) / gpu_slots) if gpu else 0, math.ceil(len(cpu) / cpu_slots) if cpu else 0) * job_s
    return {"jobs": len(ids), "completed_once": len(ids), "exit_75": attempts - len(ids),
            "requeues": attempts - len(ids), "makespan_s": last - first, "ideal_s": ideal,
            "max_gpu_overlap": overlap(gpu + list(extra_gpu)), "max_cpu_overlap": overlap(cpu)}


def report(name, figures):
    print(f"\nslurm lane {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


# ---- the tests ---------------------------------------------------------------------------------------------------

def test_slurm_conf_lines_are_applied_as_printed(lane):
    """The site's slurm.conf lacks what gpu-router needs (--check says what, exit 1); the merged files, printed and
    installed as they are, start Slurm with the slots of the profiles, the site's own node line and
    SchedulerParameters kept (one line each), and --check is then content."""
    before, after = lane.slurm["before"], lane.slurm["after"]
    assert before.returncode == 1 and re.search(r"GresTypes lacks \S*gr_enc_gpu", before.stdout), before.stdout
    assert "Gres= lacks gr_enc_gpu:4" in before.stdout and "no line Name=gr_enc_gpu Count=4" in before.stdout
    assert after.returncode == 0, after.stdout
    conf = [x for x in lane.slurm["conf"].splitlines() if x and not x.startswith("#")]
    node = lane.slurm["node"]
    assert sum(x.startswith(f"NodeName={node}") for x in conf) == 1
    assert sum(x.startswith("SchedulerParameters=") for x in conf) == 1
    gres = lane.run(["sinfo", "-h", "-o", "%G"]).stdout.strip()
    assert sorted(gres.split(",")) == sorted(["gr_enc_gpu:4", "gr_enc_cpu:2", "gr_vr_gpu:2", "gr_blind_gpu:2"])
    config = lane.run(["scontrol", "show", "config"]).stdout
    sched = re.search(r"SchedulerParameters\s*=\s*(\S+)", config).group(1)
    assert "bf_interval=30" in sched and "sched_interval=2" in sched, sched   # the site's and ours
    assert re.search(r"RequeueExit\s*=\s*75", config)
    shown = lane.run(["scontrol", "show", "node", node]).stdout
    assert "CPUTot=16" in shown and f"RealMemory={lane.slurm['gen']['real_memory_mb']}" in shown, shown
    print(f"\nslurm lane setup (install, agent, munge, slurm-conf, slurmctld, slurmd): {lane.slurm['setup_s']:.1f} s")


def test_a_slurm_gates_the_slots(lane):
    """(a) 40 mixed jobs, about seven times the slots, each with its pool's GRES: Slurm never starts more than
    gpu-router admits, so not one attempt exits 75, and the batch takes about what the slots allow."""
    paths = inputs(lane, "a", 40)
    ids = submit_many(lane, "enc", paths, hold=True)
    release(lane, ids)
    wait_done(lane, ids, timeout=240)
    figures = check_batch(lane, ids)
    report("(a) GRES gates", figures)
    assert figures["exit_75"] == 0
    assert figures["makespan_s"] <= 1.25 * figures["ideal_s"], figures


def test_a_licenses_gate_the_slots_on_one_node(lane):
    """(a') The one-node alternative: the same slots as cluster-wide licenses (`sbatch -L`), no GRES asked."""
    paths = inputs(lane, "l", 12)
    ids = submit_many(lane, "enc", paths, hold=True, licenses=True)
    assert "Licenses=gr_enc_" in lane.run(["scontrol", "show", "job", str(ids[0])]).stdout
    release(lane, ids)
    wait_done(lane, ids)
    figures = check_batch(lane, ids)
    assert figures["exit_75"] == 0
    report("(a') licenses gate", figures)


def test_r_requeue_exit_alone(lane):
    """(r) 40 mixed jobs submitted without --request (no GRES: Slurm sees only 16 CPUs), every fourth with
    --no-requeue: the excess exits 75 and RequeueExit puts it back, --no-requeue or not; each job COMPLETES once
    and gpu-router never runs more than its slots."""
    paths = inputs(lane, "r", 40)
    ids = submit_many(lane, "enc", paths, hold=True, request=False, no_requeue=set(paths[::4]))
    assert "Requeue=0" in lane.run(["scontrol", "show", "job", str(ids[0])]).stdout
    release(lane, ids)
    wait_done(lane, ids, timeout=480)
    figures = check_batch(lane, ids)
    report("(r) RequeueExit alone", figures)
    assert figures["exit_75"] > 0, "16 CPUs and 6 slots: Slurm must have started jobs gpu-router refused"


def test_b_requeue_exit_is_the_backstop(lane):
    """(b) A job started outside Slurm holds a GPU slot for a while: Slurm thinks all GPU places are free,
    gpu-router says one less; the excess exits 75 and RequeueExit puts it back. Every job COMPLETES once."""
    lane.write_file("/scratch/in/outsider-gpu.bin", "x" * 100)
    t0 = time.time()
    # Someone runs the workload by hand on the node, twice in a row (20 s): one GPU slot Slurm never sees.
    outsider = lane.popen("for i in 1 2; do gpu-router run --workload enc -- /scratch/in/outsider-gpu.bin; done")
    try:
        lane.wait_for(lambda: busy(lane, "enc") == 1, timeout=15, interval=0.1)
        paths = inputs(lane, "b", 12, cpu_every=0)
        ids = submit_many(lane, "enc", paths)
        wait_done(lane, ids)
    finally:
        lane.kill(outsider)
    figures = check_batch(lane, ids, extra_gpu=outside_intervals(lane, t0))
    assert figures["exit_75"] > 0, "the outsider held a slot Slurm did not know of: some jobs must have met it"
    report("(b) RequeueExit backstop", figures)


def test_f_request_fails_closed(lane):
    """(f) Several workloads here and no -w, or an input the submit host cannot see: `sbatch $(…)` is refused by
    sbatch (nothing queued), and the docs' line stops before sbatch."""
    lane.write_file("/scratch/in/f.bin", "x" * 100)
    queued = lane.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    inline = lane.run("sbatch $(gpu-router slurm-conf --request /scratch/in/f.bin) --wrap true", check=False)
    assert inline.returncode != 0 and "gpu-router-request-failed" in inline.stderr, inline
    assert "--workload" in inline.stderr                       # the reason, from gpu-router, on stderr
    line = lane.run("opt=$(gpu-router slurm-conf --request /scratch/in/missing.bin -w enc) && "
                    "sbatch $opt --wrap true", check=False)
    assert line.returncode == 2 and "no such input" in line.stderr and "Submitted" not in line.stdout, line
    assert lane.run(["squeue", "-h", "-o", "%i"]).stdout.split() == queued
    assert lane.run(["gpu-router", "slurm-conf", "--request", "/scratch/in/f.bin", "-w", "vr"]).stdout.strip() \
        == "--gres=gr_vr_gpu:1"                                 # several workloads: -w picks one


def snapshot_foreign_mb(c):
    gpus = json.loads(c.run(["gpu-router", "status", "--json"]).stdout)["gpus"]
    return gpus[0].get("foreign_mb") or 0 if gpus else 0


def test_c_foreign_vram_mid_batch_never_ooms_never_loses_a_job(lane):
    """(c) Slurm's count and the GPU disagree: a process outside Slurm and gpu-router takes 8 GB mid-batch. Slurm
    still sees two free GRES; gpu-router (admission = "vram") sees room for one job less, exits 75 for the
    other, and Slurm requeues it. No job OOMs, none is lost. The control: the same job without VRAM admission,
    started into that GPU, dies of a CUDA OOM (what this test would see if gpu-router let a job through)."""
    paths = inputs(lane, "c", 6, cpu_every=0)
    ids = [submit(lane, "vr", p, hold=True) for p in paths]
    foreign = None
    try:
        lane.run(["scontrol", "release", str(ids[0])])
        lane.wait_for(lambda: busy(lane, "vr") == 1, timeout=30, interval=0.1)
        foreign = lane.popen(["/src/tests/fakenvml/fake_gpu_job.py", "--device", "cuda", "--vram", str(FOREIGN_MB),
                              "--seconds", "12", "--state", STATE, "--log", "/scratch/foreign.log"],
                             env={"CUDA_VISIBLE_DEVICES": "0"})
        lane.wait_for(lambda: snapshot_foreign_mb(lane) >= FOREIGN_MB, timeout=10, interval=0.1)
        blind = lane.run(["gpu-router", "run", "--workload", "blind", "--", paths[0]], check=False)
        assert blind.returncode == 1 and "CUDA out of memory" in blind.stderr, blind
        lane.run(["scontrol", "release", ",".join(map(str, ids[1:]))])
        wait_done(lane, ids)
    finally:
        if foreign is not None:
            lane.kill(foreign)
    foreign_log = [json.loads(x) for x in lane.run(["cat", "/scratch/foreign.log"]).stdout.splitlines()]
    assert [e["event"] for e in foreign_log][:1] == ["start"], "the foreign process must really have held VRAM"
    f_start = foreign_log[0]["t"]
    f_end = next((e["t"] for e in foreign_log if e["event"] == "finish"), time.time())
    figures = check_batch(lane, ids, gpu_slots=2, cpu_slots=0, job_s=JOB_S)
    own = ledger(lane, ids)
    # While the foreign 8 GB were held, at most one 6 GB job ran beside it (16 GB GPU): VRAM admission at work.
    during = [(e[0]["t"], e[1]["t"]) for e in own.values() if e[0]["t"] < f_end and e[1]["t"] > f_start]
    assert overlap(during) <= 1
    assert figures["exit_75"] > 0, "Slurm started a job gpu-router had no VRAM for: it must have exited 75"
    report("(c) foreign VRAM mid-batch", figures)
