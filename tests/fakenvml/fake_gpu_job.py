#!/usr/bin/python3
"""A fake GPU workload: holds VRAM in the fake NVML state while it runs, fails like a CUDA OOM when it does not fit.

    fake_gpu_job.py [--device cuda|cuda:N|cpu] --vram MB --seconds S [--ram MB] [--log FILE] [--state DIR] [INPUT...]

The GPU comes from CUDA_VISIBLE_DEVICES as gpu-router exports it (an index or a GPU UUID; the first entry is the
job's device 0; empty means no GPU; unset means every GPU, so device 0). The claim is made atomically under
``flock(STATE/lock)``: it fits when foreign + live claims + mine <= total. It is a file
``STATE/claims/<gpu>.<pid>.<starttime>`` that counts only while this process lives (the fake libnvidia-ml and
``live_claims`` check /proc/PID/stat), so it vanishes however the job ends, SIGKILL included.

Exit: 0 when done; 1 with ``CUDA out of memory. Tried to allocate N MiB`` on stderr when the claim does not fit (or
no CUDA device is visible). ``--log`` gets one JSON line per start / finish / oom / no-device (O_APPEND, one write
each, so concurrent jobs may share one log). Positional arguments (the workload's input) are accepted and ignored.

This file also holds the state format's Python side (``tests/fakenvml/__init__.py`` imports it): one place, so the
job, the helpers and the C library agree.
"""

import fcntl
import os
import sys
import time


# ---------------------------------------------------------------- the state format (shared with __init__.py)

def proc_start_time(pid):
    """Field 22 of /proc/PID/stat, or None when the process is gone or a zombie (its VRAM is already freed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return None
    return int(fields[19])


def gpu_dirs(state):
    n = 0
    while os.path.exists(os.path.join(state, f"gpu{n}", "info")):
        n += 1
    return [os.path.join(state, f"gpu{i}") for i in range(n)]


def gpu_info(state, gpu):
    """(total_mb, uuid, name, foreign_mb) of one fake GPU."""
    with open(os.path.join(state, f"gpu{gpu}", "info")) as f:
        total, uuid, name = (f.read().split("\n") + ["", "", ""])[:3]
    try:
        with open(os.path.join(state, f"gpu{gpu}", "foreign_mb")) as f:
            foreign = int(f.read().strip() or 0)
    except FileNotFoundError:
        foreign = 0
    return int(total), uuid, name, foreign


def live_claims(state, prune=False):
    """[(gpu, pid, mb)] of claims whose holder still runs with the recorded start time."""
    out = []
    folder = os.path.join(state, "claims")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return out
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        gpu, pid, start = (int(p) for p in parts)
        if proc_start_time(pid) != start:
            if prune:
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                out.append((gpu, pid, int(f.read().strip() or 0)))
        except (OSError, ValueError):
            continue
    return sorted(out)


class StateLock:
    """flock on STATE/lock: serialises claim checks between concurrent jobs and the helpers."""

    def __init__(self, state):
        self.path = os.path.join(state, "lock")

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def try_claim(state, gpu, mb, pid=None):
    """Claim mb MiB on gpu for pid (default: this process). Returns (ok, free_mb_before)."""
    pid = os.getpid() if pid is None else pid
    with StateLock(state):
        total, _uuid, _name, foreign = gpu_info(state, gpu)
        used = foreign + sum(m for g, _p, m in live_claims(state, prune=True) if g == gpu)
        free = max(total - used, 0)
        if used + mb > total:
            return False, free
        folder = os.path.join(state, "claims")
        os.makedirs(folder, exist_ok=True)
        final = os.path.join(folder, f"{gpu}.{pid}.{proc_start_time(pid)}")
        tmp = final + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{mb}\n")
        os.replace(tmp, final)
        return True, free


def release(state, gpu, pid=None):
    pid = os.getpid() if pid is None else pid
    try:
        os.unlink(os.path.join(state, "claims", f"{gpu}.{pid}.{proc_start_time(pid)}"))
    except OSError:
        pass


# ---------------------------------------------------------------- the job

def resolve_device(state, visible, ordinal):
    """The fake GPU index CUDA would give this job as device `ordinal`, or None (no visible device)."""
    gpus = gpu_dirs(state)
    if visible is None:
        entries = [str(i) for i in range(len(gpus))]
    else:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
    if ordinal >= len(entries):
        return None
    entry = entries[ordinal]
    if entry.isdigit():
        return int(entry) if int(entry) < len(gpus) else None
    for i in range(len(gpus)):
        uuid = gpu_info(state, i)[1]
        if entry == uuid or (entry.startswith("GPU-") and uuid.startswith(entry)):
            return i
    return None


def log_event(path, event, **fields):
    if not path:
        return
    import json

    line = json.dumps(dict(event=event, pid=os.getpid(), t=round(time.time(), 6), **fields)) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def parse_args(argv):
    opts = {"device": "cuda", "vram": 0, "seconds": 0.0, "ram": 0, "log": None,
            "state": os.environ.get("FAKE_NVML_STATE"), "inputs": []}
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if key in ("--device", "--vram", "--seconds", "--ram", "--log", "--state"):
            if not eq:
                value = next(it, None)
                if value is None:
                    sys.exit(f"fake_gpu_job: {key} needs a value")
            name = key[2:]
            opts[name] = float(value) if name == "seconds" else int(value) if name in ("vram", "ram") else value
        elif arg.startswith("--"):
            continue  # other device arguments a profile passes (--compute_type float16, ...): accepted, ignored
        else:
            opts["inputs"].append(arg)
    return opts


def main(argv):
    opts = parse_args(argv)
    log = opts["log"]
    device = opts["device"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wants_gpu = device != "cpu" and visible != "" and opts["vram"] > 0
    gpu = None
    if wants_gpu:
        state = opts["state"]
        if not state:
            sys.exit("fake_gpu_job: no fake GPU state (FAKE_NVML_STATE or --state)")
        ordinal = int(device.partition(":")[2] or 0)
        gpu = resolve_device(state, visible, ordinal)
        if gpu is None:
            sys.stderr.write("RuntimeError: CUDA error: no CUDA-capable device is detected\n")
            log_event(log, "no-device", visible=visible, vram_mb=opts["vram"])
            return 1
        ok, free = try_claim(state, gpu, opts["vram"])
        if not ok:
            total = gpu_info(state, gpu)[0]
            sys.stderr.write(
                f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {opts['vram']} MiB. "
                f"GPU {ordinal} has a total capacity of {total} MiB of which {free} MiB is free.\n")
            log_event(log, "oom", gpu=gpu, vram_mb=opts["vram"], free_mb=free)
            return 1
    log_event(log, "start", gpu=gpu, vram_mb=opts["vram"] if gpu is not None else 0, visible=visible,
              device=device, inputs=opts["inputs"])
    ballast = bytearray(opts["ram"] * 1024 * 1024) if opts["ram"] else None
    if ballast is not None:
        for i in range(0, len(ballast), 4096):  # touch every page: RSS, not just address space
            ballast[i] = 1
    try:
        time.sleep(opts["seconds"])
    finally:
        if gpu is not None:
            release(opts["state"], gpu)
    log_event(log, "finish", gpu=gpu, vram_mb=opts["vram"] if gpu is not None else 0)
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean exit path: release the claim, log nothing
    sys.exit(main(sys.argv[1:]))
