#!/usr/bin/python3 -S
"""The trace's fake workload (bench/trace.py): a transcription-like job whose VRAM grows with its input and whose
speed drops when GPU jobs share the GPU.

    trace_job.py --vram MB --work SECONDS [--device cuda|cpu] [--cpu-factor 6] [--grow STEP] [--log FILE] INPUT

On the GPU (``--device cuda`` and a visible device, as gpu-router or the runbook script exports it) it claims its
VRAM in the fake NVML state (tests/fakenvml: the claim is atomic and vanishes with the process) and fails like a
CUDA OOM when the claim does not fit; then it does ``--work`` seconds of GPU work, progressing at 1/n speed while n
GPU jobs hold claims on that GPU (the GPU's throughput is shared, not multiplied), and fails like a CUDA error the
moment the GPU is lost (``STATE/gpuN/lost``). On the CPU it takes ``--work`` × ``--cpu-factor`` seconds.
One JSON line per start / finish / oom / gpu-lost to ``--log`` (O_APPEND), with the input.
``--grow STEP`` (trace *oversize*): the claim grows in STEP MiB steps, 10 ms apart, as a CUDA allocator grows layer
by layer; a step that does not fit fails like a CUDA OOM while the job still holds what it got (the GPU is full).
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fakenvml"))
import fake_gpu_job as fake  # noqa: E402  (the state format: one place)

TICK_S = 0.02


def main(argv):
    opts = {"vram": 0, "work": 0.0, "device": "cuda", "cpu-factor": 6.0, "log": None, "grow": 0.0}
    inputs = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or not argv[i - 1].startswith("--"))]
    it = iter(argv)
    for arg in it:
        if arg.startswith("--") and arg[2:] in opts:
            value = next(it)
            key = arg[2:]
            opts[key] = value if key in ("device", "log") else float(value)
        elif arg.startswith("--"):
            next(it, None)
    log, state = opts["log"], os.environ.get("FAKE_NVML_STATE")
    if inputs:
        _log = fake.log_event
        fake.log_event = lambda path, event, **kw: _log(path, event, input=inputs[-1], **kw)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    started = time.time()
    if opts["device"] == "cpu" or visible == "" or not state:
        fake.log_event(log, "start", mode="cpu", t0=started)
        time.sleep(opts["work"] * opts["cpu-factor"])
        fake.log_event(log, "finish", mode="cpu", t0=started)
        return 0
    gpu = fake.resolve_device(state, visible, 0)
    lost = os.path.join(state, f"gpu{gpu}", "lost") if gpu is not None else None
    if gpu is None or os.path.exists(lost):
        sys.stderr.write("RuntimeError: CUDA error: no CUDA-capable device is detected\n")
        fake.log_event(log, "gpu-lost", mode="gpu", t0=started)
        return 1
    if opts["grow"] > 0:
        want, step, got = int(opts["vram"]), int(opts["grow"]), 0
        ok = True
        while ok and got < want:
            nxt = min(want, got + step)
            ok, free = fake.try_claim(state, gpu, nxt) if got == 0 else fake.set_claim(state, gpu, nxt)
            if ok:
                got = nxt
                time.sleep(0.01)
    else:
        ok, free = fake.try_claim(state, gpu, int(opts["vram"]))
    if not ok:
        sys.stderr.write(f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {int(opts['vram'])} MiB "
                         f"({free} MiB free)\n")
        fake.log_event(log, "oom", mode="gpu", gpu=gpu, vram_mb=int(opts["vram"]), free_mb=free, t0=started)
        return 1
    fake.log_event(log, "start", mode="gpu", gpu=gpu, vram_mb=int(opts["vram"]), t0=started)
    done, last = 0.0, time.monotonic()
    try:
        while done < opts["work"]:
            time.sleep(TICK_S)
            now = time.monotonic()
            if os.path.exists(lost):
                sys.stderr.write("RuntimeError: CUDA error: unspecified launch failure (GPU lost)\n")
                fake.log_event(log, "gpu-lost", mode="gpu", gpu=gpu, t0=started)
                return 1
            sharing = max(1, sum(1 for g, _p, _m in fake.live_claims(state) if g == gpu))
            done += (now - last) / sharing
            last = now
    finally:
        fake.release(state, gpu)
    fake.log_event(log, "finish", mode="gpu", gpu=gpu, t0=started)
    return 0


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main(sys.argv[1:]))
