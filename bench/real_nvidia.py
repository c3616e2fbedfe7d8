#!/usr/bin/python3
"""On a real NVIDIA GPU: the NVML backend next to nvidia-smi, then vram admission admitting and refusing torch jobs.

    /usr/bin/python3 bench/real_nvidia.py [--gpu 0] [--hold-mb 2048] [--job-mb 0] [--jobs 0]

No systemd needed: everything runs in a temporary folder, the agent in the foreground (`gpu-router-agent` from
.build/bin, as the tests build it), the wrapper with scope = "off". Needs /usr/bin/python3 with pynvml
(nvidia-ml-py or python3-pynvml) and torch with CUDA.

1. A torch process allocates --hold-mb MiB on --gpu and holds it. The NVML backend's sample (the agent's code path)
   and `nvidia-smi --query-gpu / --query-compute-apps` are printed side by side: total/used/free per GPU and the
   holder's per-process use, which must agree within the driver's rounding.
1b. Per-process accounting (issue 9): the same backend turns the GPU's accounting mode on (as root; it says so
   when it cannot), then a short torch job allocates --short-mb MiB for 0.3 s, frees half and exits. Printed side by
   side: the backend's accounted_peaks() (the agent's finish path) and `nvidia-smi --query-accounted-apps` for the
   short job (both must say --short-mb plus its CUDA context, not the half it ended with) and for the holder, which
   started before the mode came on (does the driver account a process it did not see start? record the answer).
2. The agent starts in the foreground (NVML, 0.5 s samples); the torch holder stays (foreign use). Then --jobs torch
   jobs (default: as many as would fit twice over) are started through the wrapper at once, each predicted at
   --job-mb (default: a quarter of what is free) by a constant vram model: admission = "vram", no slot cap,
   wait = "0s". Printed: how many were admitted (exit 0) and refused (exit 75, no-vram-room), whether any hit a
   CUDA OOM (must be none), and the peak the GPU reached.
3. A real CUDA OOM (issue 18), with the agent accounting the jobs (scope = "best-effort"): a torch job that
   allocates in 256 MiB steps past the GPU's size (PyTorch's own uncaught torch.OutOfMemoryError: exit 1, the GPU
   full when it fails), then the same input again, then a job that asks for more than the GPU in one allocation
   (nothing shows on the GPU: the agent cannot tell, so it must say failed). Printed: each attempt's exit status,
   the agent's RESULT with the figures it rests on (PEAK_VRAM_MB, GPU_OTHERS_MB, GPU_TOTAL_MB, OOM_CAUSE,
   OOM_MEMORY) and where the retry went (must be the CPU, REASON=cuda-oom-before).
Has not run on hardware in this project's CI (no GPU there); record what it prints in bench/README.md.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import conftest  # noqa: E402,F401  (builds .build/bin and .build/lib/gpu_router)

sys.path.insert(0, str(REPO / ".build" / "lib"))
from gpu_router.daemon import gpu_backends  # noqa: E402

HOLDER = """
import sys, time, torch
x = torch.empty(int(sys.argv[1]) * 1024 * 1024, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""

SHORT = """
import sys, time, torch
x = torch.empty(int(sys.argv[1]) * 1024 * 1024, dtype=torch.uint8, device="cuda")
x.fill_(1)
torch.cuda.synchronize()
time.sleep(0.3)
del x
torch.cuda.empty_cache()
y = torch.empty(int(sys.argv[1]) * 512 * 1024, dtype=torch.uint8, device="cuda")
y.fill_(1)
torch.cuda.synchronize()
time.sleep(0.1)
"""

JOB = """#!/usr/bin/python3
# A torch job: allocates the MiB its input file's size says, holds them, exits 0; a CUDA OOM exits 3.
import os, sys, time
import torch
mb = os.path.getsize(sys.argv[1])
try:
    x = torch.empty(mb * 1024 * 1024, dtype=torch.uint8, device="cuda")
    x.fill_(1)
    torch.cuda.synchronize()
except torch.cuda.OutOfMemoryError as exc:
    sys.stderr.write(f"CUDA OOM: {exc}\\n")
    sys.exit(3)
time.sleep(float(sys.argv[2]))
"""


GROWER = """#!/usr/bin/python3
# A torch job that grows like a model loading layer by layer: 256 MiB at a time up to MiB = the input's size x 16
# (or one allocation of that size with --at-once). On the CPU (--device cpu) it does nothing and exits 0.
# A CUDA OOM is PyTorch's own: an uncaught torch.OutOfMemoryError, exit 1, its message on stderr.
import os, sys
if "cpu" in sys.argv:
    sys.exit(0)
import torch
want = os.path.getsize(sys.argv[1]) * 16
if "--at-once" in sys.argv:
    x = torch.empty(want * 1024 * 1024, dtype=torch.uint8, device="cuda")
    sys.exit(0)
held = []
for _ in range(0, want, 256):
    held.append(torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda"))
    held[-1].fill_(1)
torch.cuda.synchronize()
"""


def oom_check(args, total_mb):
    """Section 3: a real CUDA OOM through the wrapper and the agent, and the retry of its input."""
    with tempfile.TemporaryDirectory(prefix="gpu-router-oom-") as tmp:
        base = pathlib.Path(tmp)
        (base / "locks").mkdir(mode=0o770)
        job = base / "grower.py"
        job.write_text(GROWER)
        job.chmod(0o755)
        (base / "config.toml").write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "nvml"
snapshot = "{base}/gpus.json"
sample_interval = "0.5s"
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.grower]
binary = "{job}"
probe = "file-size"
threshold = 1000000000000
admission = "gpu-first"
max_gpu_jobs = 1
max_cpu_jobs = 1
cpu_args = ["--device", "cpu"]
scope = "best-effort"
""")
        big = base / "big.bin"
        big.write_bytes(b"\0" * (total_mb // 16 + 64))      # needs about 1 GiB more than the GPU has
        once = base / "once.bin"
        once.write_bytes(b"\0" * (total_mb // 16 + 128))
        genv = dict(os.environ, GPU_ROUTER_CONFIG=str(base / "config.toml"), GPU_ROUTER_CACHE_DIR=str(base),
                    GPU_ROUTER_LOG="stderr", CUDA_DEVICE_ORDER="PCI_BUS_ID")
        genv.pop("CUDA_VISIBLE_DEVICES", None)
        log = open(base / "agent.log", "w")
        agent = subprocess.Popen([str(REPO / ".build" / "bin" / "gpu-router-agent")], env=genv, stderr=log)
        try:
            while not (base / "gpus.json").exists():
                assert agent.poll() is None, (base / "agent.log").read_text()
                time.sleep(0.1)
            print(f"\n== 3. a real CUDA OOM on GPU {args.gpu} ({total_mb} MiB), classified by the agent")
            for label, path, extra in (("grows past the GPU", big, []), ("the same input again", big, []),
                                       ("one allocation past the GPU", once, ["--at-once"])):
                r = subprocess.run([str(REPO / ".build" / "bin" / "gpu-router"), "run", "--workload", "grower",
                                    "--", str(path), *extra], env=genv, capture_output=True, text=True, timeout=300)
                events = [json.loads(x) for x in r.stderr.splitlines() if x.startswith("{")]
                routed = next((e for e in events if e.get("GPU_ROUTER_EVENT") == "routed"), {})
                said = [x for x in r.stderr.splitlines() if "OutOfMemoryError" in x or "out of memory" in x]
                job_id = routed.get("GPU_ROUTER_JOB")
                done = None
                for _ in range(100):  # the agent's outcome arrives once it has accounted the job
                    log.flush()
                    for line in (base / "agent.log").read_text().splitlines():
                        e = json.loads(line) if line.startswith("{") else {}
                        if e.get("GPU_ROUTER_EVENT") == "job-finished" and e.get("GPU_ROUTER_JOB") == job_id:
                            done = e
                    if done:
                        break
                    time.sleep(0.1)
                keys = ("RESULT", "EXIT_STATUS", "PEAK_VRAM_MB", "PEAK_VRAM_SOURCE", "GPU_OTHERS_MB", "GPU_TOTAL_MB",
                        "OOM_CAUSE", "OOM_MEMORY")
                print(f"  {label}: exit {r.returncode}, routed {routed.get('GPU_ROUTER_MODE')} "
                      f"({routed.get('GPU_ROUTER_REASON')}){'; stderr: ' + said[-1][:120] if said else ''}")
                print("    agent: " + (", ".join(f"{k}={done.get('GPU_ROUTER_' + k)}" for k in keys
                                                  if done.get("GPU_ROUTER_" + k) is not None) if done else
                                       "no job-finished event"))
        finally:
            agent.terminate()
            agent.wait(10)


def smi(gpu):
    q = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-gpu=index,memory.total,memory.used,memory.free",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    apps = subprocess.run(["nvidia-smi", f"--id={gpu}", "--query-compute-apps=pid,used_memory",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
    index, total, used, free = [int(x) for x in q.split(",")]
    procs = {int(p): int(m) for p, m in (line.split(",") for line in apps.strip().splitlines() if line.strip())}
    return {"index": index, "total_mb": total, "used_mb": used, "free_mb": free, "processes": procs}


def accounted_apps():
    """{pid: MiB} of `nvidia-smi --query-accounted-apps` (every GPU), and the raw lines."""
    out = subprocess.run(["nvidia-smi", "--query-accounted-apps=gpu_uuid,pid,max_memory_usage",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    rows = {}
    for line in lines:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 3 and parts[1].isdigit():
            rows[int(parts[1])] = parts[2]
    return rows, lines, out.returncode, out.stderr.strip()


def accounting_check(args, env, holder):
    backend = gpu_backends.open_backend("nvml")
    try:
        mine = next(g for g in backend.sample()["gpus"] if g["index"] == args.gpu)
        print(f"\n== 1b. per-process accounting on GPU {args.gpu}: mode {mine.get('accounting')!r}")
        for level, message, fields in backend.drain_notes():
            print(f"  [{level}] {message} {fields}")
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-c", SHORT, str(args.short_mb)], env=env, stderr=subprocess.PIPE,
                                text=True)
        pid = proc.pid
        err_text = proc.communicate()[1]
        print(f"  short job (pid {pid}, {args.short_mb} MiB for 0.3 s, then half): exit {proc.returncode}"
              + (f" {err_text.strip()[-200:]}" if proc.returncode else ""))
        mine = backend.accounted_peaks([pid], device=args.gpu, job_started=t0)
        rows, lines, rc, err = accounted_apps()
        print(f"  accounted_peaks (NVML)    {mine}")
        print(f"  nvidia-smi accounted-apps {rows.get(pid)!s} MiB   (exit {rc}{', ' + err if err else ''})")
        holder_nvml = backend.accounted_peaks([holder.pid], device=args.gpu, job_started=None)
        print(f"  holder pid {holder.pid} (started before the mode came on): NVML {holder_nvml}   "
              f"nvidia-smi {rows.get(holder.pid)!s}")
        print("  raw accounted-apps lines (last 5):")
        for line in lines[-5:]:
            print(f"    {line}")
    finally:
        backend.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--hold-mb", type=int, default=2048)
    p.add_argument("--job-mb", type=int, default=0)
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--short-mb", type=int, default=1024)
    args = p.parse_args()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(args.gpu), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.hold_mb), "600"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", "the torch holder did not start"
        time.sleep(1)
        backend = gpu_backends.open_backend("nvml")
        sample = backend.sample()
        backend.close()
        mine = next(g for g in sample["gpus"] if g["index"] == args.gpu)
        ref = smi(args.gpu)
        print(f"== 1. NVML backend vs nvidia-smi on GPU {args.gpu} (torch holder pid {holder.pid}, "
              f"{args.hold_mb} MiB)")
        for key in ("total_mb", "used_mb", "free_mb"):
            print(f"  {key:10} backend {mine.get(key)!s:>8}   nvidia-smi {ref[key]!s:>8}")
        got = {q["pid"]: q["used_mb"] for q in mine.get("processes") or ()}
        print(f"  holder     backend {got.get(holder.pid)!s:>8}   nvidia-smi {ref['processes'].get(holder.pid)!s:>8}"
              f"   (allocation {args.hold_mb} + the CUDA context)")
        accounting_check(args, env, holder)
        with tempfile.TemporaryDirectory(prefix="gpu-router-real-") as tmp:
            base = pathlib.Path(tmp)
            (base / "locks").mkdir(mode=0o770)
            job = base / "job.py"
            job.write_text(JOB)
            job.chmod(0o755)
            free = ref["free_mb"]
            job_mb = args.job_mb or max(256, free // 4 - 600)  # leave room for each job's CUDA context
            jobs = args.jobs or max(2, 2 * free // (job_mb + 600))
            predicted = job_mb + 600  # the allocation plus a CUDA context's usual few hundred MiB
            (base / "config.toml").write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "nvml"
snapshot = "{base}/gpus.json"
sample_interval = "0.5s"
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.torchjob]
binary = "{job}"
probe = "file-size"
threshold = 1000000000000
threshold_unit = "bytes"
admission = "vram"
gpu_vram_mb = {predicted}
max_cpu_jobs = 0
wait = "0s"
scope = "off"
""")
            size = base / "input"
            size.write_bytes(b"\0" * job_mb)
            genv = dict(os.environ, GPU_ROUTER_CONFIG=str(base / "config.toml"), GPU_ROUTER_CACHE_DIR=str(base),
                        GPU_ROUTER_LOG="stderr")
            genv.pop("CUDA_VISIBLE_DEVICES", None)
            agent = subprocess.Popen([str(REPO / ".build" / "bin" / "gpu-router-agent")], env=genv,
                                     stderr=open(base / "agent.log", "w"))
            while not (base / "gpus.json").exists():
                assert agent.poll() is None, (base / "agent.log").read_text()
                time.sleep(0.1)
            time.sleep(1)
            print(f"\n== 2. {jobs} torch jobs of {job_mb} MiB (predicted {predicted} MiB) through the wrapper at once")
            procs = [subprocess.Popen([str(REPO / ".build" / "bin" / "gpu-router"), "run", "--workload", "torchjob",
                                       "--", str(size), "20"], env=genv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True) for _ in range(jobs)]
            peak = 0
            while any(pr.poll() is None for pr in procs):
                peak = max(peak, smi(args.gpu)["used_mb"])
                time.sleep(0.5)
            codes = [pr.returncode for pr in procs]
            reasons = [json.loads(x).get("GPU_ROUTER_REASON") for pr in procs for x in pr.stderr.read().splitlines()
                       if x.startswith("{") and '"blocked"' in x]
            agent.terminate()
            agent.wait(10)
            print(f"  admitted (exit 0): {codes.count(0)}   refused (exit 75): {codes.count(75)} {sorted(set(reasons))}"
                  f"   CUDA OOM (exit 3): {codes.count(3)}   other: {[c for c in codes if c not in (0, 3, 75)]}")
            print(f"  GPU peak used {peak} of {ref['total_mb']} MiB (foreign holder {args.hold_mb} MiB)")
        holder.kill()
        holder.wait()
        oom_check(args, ref["total_mb"])
        return 0 if codes.count(3) == 0 else 1
    finally:
        holder.kill()
        holder.wait()


if __name__ == "__main__":
    sys.exit(main())
