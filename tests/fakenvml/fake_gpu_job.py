#!/usr/bin/python3
"""A fake GPU workload: holds VRAM in the fake NVML state while it runs, fails like a CUDA OOM when it does not fit.

    fake_gpu_job.py [--device cuda|cuda:N|cpu] --vram MB --seconds S [--then MB:S ...] [--ram MB] [--log FILE]
                    [--state DIR] [INPUT...]

The GPU comes from CUDA_VISIBLE_DEVICES as gpu-router exports it (an index or a GPU UUID; the first entry is the
job's device 0; empty means no GPU; unset means every GPU, so device 0). The claim is made atomically under
``flock(STATE/lock)``: it fits when foreign + live claims + mine <= total. It is a file
``STATE/claims/<gpu>.<pid>.<starttime>`` that counts only while this process lives (the fake libnvidia-ml and
``live_claims`` check /proc/PID/stat), so it vanishes however the job ends, SIGKILL included.

``--then MB:S`` (repeatable): after the first phase, hold MB instead for S seconds (a job that frees part of its
memory before it exits, or grows). Every allocation change also updates the GPU's accounting record of this process
when the GPU's accounting mode is on (``accounting_note``): the driver's own per-process peak, kept after exit.

``--grow STEP``: allocate ``--vram`` in steps of STEP MiB (as a CUDA caching allocator grows, layer by layer,
batch by batch), keeping what it got when a step does not fit: the GPU is then full when the job fails, as it is
with a real CUDA OOM. Without it the claim is one atomic allocation (nothing is held when it does not fit).

``--fail-as torch|ctranslate2|nvenc``: how the OOM is reported, as the real programs do it: PyTorch's
``torch.OutOfMemoryError: CUDA out of memory`` and exit 1 (an uncaught Python exception), CTranslate2's
``RuntimeError: CUDA failed with error out of memory`` and exit 1 (faster-whisper / whisper-ctranslate2), ffmpeg's
``OpenEncodeSessionEx failed: out of memory (10)`` and exit 187 (ffmpeg ≥ 7 exits with the error code & 255:
AVERROR_EXTERNAL; older ffmpeg exits 1). The default is torch.

A job whose GPU is lost (``STATE/gpuN/lost``) while it runs fails at once: ``CUDA error: unspecified launch
failure``, exit 1.

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
        accounting_note(state, gpu, pid, proc_start_time(pid), mb)
        return True, free


def release(state, gpu, pid=None):
    pid = os.getpid() if pid is None else pid
    try:
        os.unlink(os.path.join(state, "claims", f"{gpu}.{pid}.{proc_start_time(pid)}"))
    except OSError:
        pass


def set_claim(state, gpu, mb, pid=None):
    """Change this process's claim on gpu to mb MiB (growth must fit, like a cudaMalloc). Returns (ok, free_mb)."""
    pid = os.getpid() if pid is None else pid
    with StateLock(state):
        total, _uuid, _name, foreign = gpu_info(state, gpu)
        others = sum(m for g, p, m in live_claims(state, prune=True) if g == gpu and p != pid)
        free = max(total - foreign - others, 0)
        if foreign + others + mb > total:
            return False, free
        start = proc_start_time(pid)
        final = os.path.join(state, "claims", f"{gpu}.{pid}.{start}")
        with open(final + ".tmp", "w") as f:
            f.write(f"{mb}\n")
        os.replace(final + ".tmp", final)
        accounting_note(state, gpu, pid, start, mb)
        return True, free


# ---------------------------------------------------------------- the driver's accounting (fakenvml.c reads it)
#
#   gpu<N>/accounting          "1": accounting mode on; "0" or absent: off (the driver's default)
#   gpu<N>/accounting_buffer   how many processes the ring keeps (default 4000, as the driver reports)
#   gpu<N>/accounting_denied   present: turning the mode on or off answers NO_PERMISSION (even for root)
#   gpu<N>/accounting_unsupported  present: every accounting call answers NOT_SUPPORTED (MIG, vGPU, old GPUs)
#   gpu<N>/accounted/<seq>.<pid>.<starttime>   "max_mb start_us last_us": one process's peak, written by the
#                              process itself at each allocation change while the mode is on; kept after it exits;
#                              the oldest beyond the buffer size are dropped (a ring, newest seq wins a PID)

ACCOUNTING_BUFFER = 4000


def accounting_on(state, gpu):
    try:
        with open(os.path.join(state, f"gpu{gpu}", "accounting")) as f:
            on = f.read().strip() == "1"
    except OSError:
        return False
    return on and not os.path.exists(os.path.join(state, f"gpu{gpu}", "accounting_unsupported"))


def _boot_time():
    with open("/proc/stat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("btime "))


def start_us(ticks):
    """Wall-clock start of a process in microseconds (what nvmlAccountingStats_t.startTime holds)."""
    return int((_boot_time() + ticks / os.sysconf("SC_CLK_TCK")) * 1e6)


def accounting_note(state, gpu, pid, start, mb):
    """Fold an allocation of mb MiB by (pid, start) into the GPU's accounting ring (caller holds StateLock).
    Never fails the allocation (a driver's bookkeeping never does): a ring it cannot write is left as it is."""
    if start is None or not accounting_on(state, gpu):
        return
    try:
        _note(state, gpu, pid, start, mb)
    except OSError:
        pass


def _note(state, gpu, pid, start, mb):
    folder = os.path.join(state, f"gpu{gpu}", "accounted")
    if not os.path.isdir(folder):
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o1777)  # jobs of every user write their own records, as into claims/ (sticky)
    records = accounted(state, gpu)
    now = int(time.time() * 1e6)
    mine = [r for r in records if r[1] == pid and r[2] == start]
    if mine:
        seq, _pid, _start, peak, began, _last = mine[-1]
        name = f"{seq}.{pid}.{start}"
    else:
        seq = (records[-1][0] + 1) if records else 1
        peak, began, name = 0, start_us(start), f"{seq}.{pid}.{start}"
    tmp = os.path.join(folder, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(f"{max(peak, mb)} {began} {now}\n")
    os.replace(tmp, os.path.join(folder, name))
    try:
        with open(os.path.join(state, f"gpu{gpu}", "accounting_buffer")) as f:
            keep = int(f.read().strip())
    except (OSError, ValueError):
        keep = ACCOUNTING_BUFFER
    for old in (records + ([] if mine else [(seq, pid, start, 0, 0, 0)]))[:-keep or None]:
        try:
            os.unlink(os.path.join(folder, f"{old[0]}.{old[1]}.{old[2]}"))
        except OSError:
            pass


def accounted(state, gpu):
    """[(seq, pid, starttime, max_mb, start_us, last_us)] of the GPU's accounting ring, oldest first."""
    folder = os.path.join(state, f"gpu{gpu}", "accounted")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    out = []
    for name in names:
        parts = name.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                peak, began, last = (int(x) for x in f.read().split()[:3])
        except (OSError, ValueError):
            continue
        out.append((int(parts[0]), int(parts[1]), int(parts[2]), peak, began, last))
    return sorted(out)


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


OOM_MESSAGES = {
    "torch": ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {mb} MiB. GPU 0 has a total capacity "
              "of {total} MiB of which {free} MiB is free.\n", 1),
    "ctranslate2": ("RuntimeError: CUDA failed with error out of memory\n", 1),
    "nvenc": ("[h264_nvenc @ 0x55d0c0a1c2c0] OpenEncodeSessionEx failed: out of memory (10): (no details)\n"
              "[vost#0:0/h264_nvenc @ 0x55d0c0a1b900] Error while opening encoder - maybe incorrect parameters such "
              "as bit_rate, rate, width or height.\n", 187),
}


def fail_oom(opts, mb, total, free):
    """Report a CUDA OOM the way the program ``--fail-as`` names does; the exit status it uses."""
    text, code = OOM_MESSAGES[opts["fail-as"]]
    sys.stderr.write(text.format(mb=mb, total=total, free=free))
    log_event(opts["log"], "oom", vram_mb=mb, free_mb=free)
    return code


def grow_claim(opts, gpu):
    """Claim ``--vram`` in ``--grow`` steps; (ok, free at the failing step, the step's size)."""
    state, step, want = opts["state"], opts["grow"], opts["vram"]
    got = 0
    while got < want:
        nxt = min(want, got + step)
        ok, free = try_claim(state, gpu, nxt) if got == 0 else set_claim(state, gpu, nxt)
        if not ok:
            return False, free if got == 0 else max(free - got, 0), nxt - got
        got = nxt
    return True, None, 0


def parse_args(argv):
    opts = {"device": "cuda", "vram": 0, "seconds": 0.0, "ram": 0, "log": None,
            "state": os.environ.get("FAKE_NVML_STATE"), "inputs": [], "then": [], "grow": 0, "fail-as": "torch"}
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if key in ("--device", "--vram", "--seconds", "--ram", "--log", "--state", "--then", "--grow", "--fail-as"):
            if not eq:
                value = next(it, None)
                if value is None:
                    sys.exit(f"fake_gpu_job: {key} needs a value")
            name = key[2:]
            if name == "then":
                mb, _, secs = value.partition(":")
                opts["then"].append((int(mb), float(secs or 0)))
                continue
            opts[name] = float(value) if name == "seconds" else int(value) if name in ("vram", "ram", "grow") \
                else value
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
        if opts["grow"] > 0:
            ok, free, mb = grow_claim(opts, gpu)
        else:
            (ok, free), mb = try_claim(state, gpu, opts["vram"]), opts["vram"]
        if not ok:
            return fail_oom(opts, mb, gpu_info(state, gpu)[0], free)  # a grown claim is held until exit
    log_event(log, "start", gpu=gpu, vram_mb=opts["vram"] if gpu is not None else 0, visible=visible,
              device=device, inputs=opts["inputs"])
    ballast = bytearray(opts["ram"] * 1024 * 1024) if opts["ram"] else None
    if ballast is not None:
        for i in range(0, len(ballast), 4096):  # touch every page: RSS, not just address space
            ballast[i] = 1
    try:
        lost = os.path.join(opts["state"], f"gpu{gpu}", "lost") if gpu is not None else None
        until = time.monotonic() + opts["seconds"]
        while time.monotonic() < until:  # a CUDA job whose GPU falls off the bus fails at its next call
            time.sleep(min(0.02, max(0.0, until - time.monotonic())))
            if lost is not None and os.path.exists(lost):
                sys.stderr.write("RuntimeError: CUDA error: unspecified launch failure\n")
                log_event(log, "gpu-lost", gpu=gpu)
                return 1
        for mb, secs in opts["then"]:
            if gpu is not None:
                ok, free = set_claim(opts["state"], gpu, mb)
                if not ok:
                    return fail_oom(opts, mb, gpu_info(opts["state"], gpu)[0], free)
            time.sleep(secs)
    finally:
        if gpu is not None:
            release(opts["state"], gpu)
    log_event(log, "finish", gpu=gpu, vram_mb=opts["vram"] if gpu is not None else 0)
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean exit path: release the claim, log nothing
    sys.exit(main(sys.argv[1:]))
