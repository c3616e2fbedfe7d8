#!/usr/bin/python3
"""What the wrapper pays to learn the GPU state: the agent's snapshot vs asking NVML itself, per job.

    /usr/bin/python3 bench/bench_snapshot.py [--rounds 40] [--gpus 2]

Side by side, interleaved round by round so drift hits all of them alike, each a fresh process as a job gets:
  (a) snapshot: `python3 -IS`, import gpu_router.snapshot, read() the marshal twin, pick a GPU with room;
  (b) per-job NVML: `python3 -IS`, import pynvml, nvmlInit, memory of every GPU, pick one, nvmlShutdown;
  (0) baseline: `python3 -IS -c pass` (interpreter start, paid either way).
(b) runs against the fake libnvidia-ml.so.1 from tests/fakenvml, whose init is instant: on a real host nvmlInit
adds tens of ms with persistence mode and can take seconds without it, so (b) here is a lower bound.
"""

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
sys.path.insert(0, str(REPO / "tests"))


def package_dir():
    """A folder holding `gpu_router` (a symlink to agent/), as the installed package would be."""
    lib = REPO / ".build" / "bench" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    link = lib / "gpu_router"
    if not link.is_symlink():
        link.symlink_to(REPO / "agent")
    return lib


def pynvml_dir(env):
    out = subprocess.run([PYTHON, "-c", "import os, pynvml; print(os.path.dirname(pynvml.__file__))"], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit("bench_snapshot: no pynvml for /usr/bin/python3 (pip install --break-system-packages nvidia-ml-py)")
    return out.stdout.strip()


SNAPSHOT_CODE = """
import sys
sys.path.append({lib!r})
from gpu_router import snapshot
snap, why = snapshot.read({path!r}, 5.0)
need = 3700
device = None
if snap is not None:
    for g in snap["gpus"]:
        if g["healthy"] and g["free_mb"] >= need:
            device = g["index"]
            break
"""

NVML_CODE = """
import sys
sys.path.append({pynvml_dir!r})
import pynvml
pynvml.nvmlInit()
need = 3700
device = None
for i in range(pynvml.nvmlDeviceGetCount()):
    mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
    if device is None and mem.free // 1048576 >= need:
        device = i
pynvml.nvmlShutdown()
"""


def timed(argv, env):
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1000.0


def summary(samples):
    s = sorted(samples)
    return statistics.median(s), s[int(len(s) * 0.9) - 1] if len(s) >= 10 else s[-1]


def main(argv):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--gpus", type=int, default=2)
    args = p.parse_args(argv)

    import fakenvml

    lib = package_dir()
    sys.path.insert(0, str(lib))
    from gpu_router.daemon import gpu_backends as gpu, monitor

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-snapshot-"))
    fake = fakenvml.FakeGpus(work / "state")
    for i in range(args.gpus):
        fake.add_gpu(16384 if i % 2 == 0 else 8192, name=f"NVIDIA Fake {16 if i % 2 == 0 else 8}GB")
    fake.set_foreign(0, 13000)  # GPU 0 too full for the job: the decision has to look further
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(fake.lib_dir), "FAKE_NVML_STATE": str(fake.state)}
    path = str(work / "gpus.json")

    fake.preload()  # the publishing side: the real monitor over the fake library, in this process
    mon = monitor.Monitor(gpu.NvmlBackend().open(), snapshot_path=path, emit=lambda *a: None)
    mon.sample_once()

    cases = {
        "baseline": [PYTHON, "-IS", "-c", "pass"],
        "snapshot": [PYTHON, "-IS", "-c", SNAPSHOT_CODE.format(lib=str(lib), path=path)],
        "nvml": [PYTHON, "-IS", "-c", NVML_CODE.format(pynvml_dir=pynvml_dir(env))],
    }
    # correctness first: both ways pick the same GPU
    check = "\nprint(device)"
    picks = {name: subprocess.run(argv[:-1] + [argv[-1] + check], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip() for name, argv in cases.items() if name != "baseline"}
    assert picks["snapshot"] == picks["nvml"] == "1", picks
    for argv in cases.values():  # warm the page cache
        timed(argv, env)

    times = {name: [] for name in cases}
    order = list(cases)
    for r in range(args.rounds):
        mon.sample_once()  # keep the snapshot fresh, outside the timed part
        for name in order[r % 3:] + order[:r % 3]:
            times[name].append(timed(cases[name], env))
    mon.close()
    import shutil

    shutil.rmtree(work, ignore_errors=True)

    med = {name: summary(ts) for name, ts in times.items()}
    base = med["baseline"][0]
    print(f"{args.rounds} rounds, {args.gpus} fake GPUs, {os.cpu_count()} CPUs, {sys.version.split()[0]}")
    print(f"{'case':<10} {'median ms':>10} {'p90 ms':>8} {'over baseline':>14}")
    for name in ("baseline", "snapshot", "nvml"):
        m, p90 = med[name]
        print(f"{name:<10} {m:>10.2f} {p90:>8.2f} {m - base:>14.2f}")
    ratio = med["nvml"][0] / med["snapshot"][0]
    net = (med["nvml"][0] - base) / max(med["snapshot"][0] - base, 1e-6)
    print(f"per-job NVML / snapshot: {ratio:.1f}x whole process, {net:.1f}x above interpreter start")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
