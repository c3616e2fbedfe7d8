"""`gpu-router calibrate`: run representative inputs, measure each job's peak VRAM and RAM, fit the VRAM model.

    gpu-router calibrate --workload NAME [--gpu N | --cpu] [--timeout 1h] [--margin 0.1] [--samples FILE]
                         [--dry-run] [--json] [INPUT ...] [-- ARGS ...]

For each INPUT: measure its metric with the profile's probe (``probe.measure``), run the profile's real binary on
one GPU (``CUDA_VISIBLE_DEVICES`` as the wrapper sets it, ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) with the job's arguments
plus ``gpu_args``, and sample every ~100 ms, until it exits or its timeout: the VRAM of its process tree through the
GPU backend (per-PID use, as the agent sees it) and the RSS of the tree from /proc. Once it has ended, its peak
VRAM is the driver's per-process accounting of those PIDs (``accounted_peaks``, with ``[gpu] accounting``: as the
agent's, exact however short the run), else the largest sample. Each run becomes one sample in the agent's format
(``accounting.record_sample``), appended to ``<state_dir>/samples/NAME.jsonl``.

The job's arguments: ``ARGS`` after ``--``, once per input, with ``{input}`` replaced by the input's path (the
path is appended when no argument holds ``{input}``) and ``{metric}`` by its measured metric; without ``--``: the
input alone, or ``--opt INPUT`` when the profile's ``input`` is ``"option:--opt"``.

Then fit ``peak_vram = base + per_unit × metric`` by least squares over every usable sample of the workload — the
ones measured now and the agent's recorded ones: successful GPU runs with a known metric and a known peak VRAM —
and recommend ``vram_base_mb`` / ``vram_per_unit_mb`` with a safety margin that also covers every measured peak, and
the threshold at which the predicted VRAM reaches the per-job budget ((GPU VRAM − reserve_mb) / max_gpu_jobs).
The model goes to ``<state_dir>/calibration/NAME.toml`` (a tool's file; never the admin's conffiles), which a
profile uses with ``vram_model = "calibrated"``.

Not on the hot path: imports freely.
"""

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

from ..daemon import accounting
from .. import atomicfile
from .. import samples as _samples
from .. import config as _config
from .. import policy, procstat
from ..wrapper.probe import ProbeFailed, measure
from . import host

SAMPLE_INTERVAL_S = 0.1
DEFAULT_TIMEOUT = "1h"
DEFAULT_MARGIN = 0.10
GOOD_FIT_SAMPLES = 3   # a fit this good makes calibrate recommend (and write) admission = "vram"
GOOD_FIT_R2 = 0.9
OUTPUT_TAIL = 4000
CUDA_OOM_MARKERS = (b"CUDA out of memory", b"CUDA error: out of memory", b"CUBLAS_STATUS_ALLOC_FAILED",
                    b"cudaErrorMemoryAllocation")


class CalibrationError(Exception):
    """Something that stops calibration before any job runs (no GPU, a bad --gpu); exit 1."""


# ---- processes ------------------------------------------------------------------------------------------------

def _proc_table():
    """{pid: (ppid, session)} of every live process (zombies hold no memory and are left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = procstat.read(entry)
        if st is not None and not st.gone:
            table[int(entry)] = (st.ppid, st.session)
    return table


def process_tree(root):
    """PIDs of ``root``, its descendants, and its session's members (children it left behind stay counted)."""
    table = _proc_table()
    children = {}
    for pid, (ppid, _sid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_ppid, sid) in table.items() if sid == root}
    todo = [root] + list(found)
    if root in table:
        found.add(root)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pids):
    """Sum of the resident set sizes of ``pids``, in MiB (shared pages count once per process, as RSS does)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total / 1048576


def vram_mb(sample, pids):
    """VRAM used by ``pids`` on all GPUs of a backend sample, in MiB; None when none of them shows."""
    used, seen = 0, False
    for g in sample.get("gpus", ()):
        for proc in g.get("processes", ()):
            if proc.get("pid") in pids and proc.get("used_mb") is not None:
                used += proc["used_mb"]
                seen = True
    return used if seen else None


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_job(argv, env, timeout, backend=None, interval=SAMPLE_INTERVAL_S, device=None):
    """Run one job in its own session, sampling its tree's RAM (and VRAM through ``backend``) until it ends.

    The VRAM peak is the driver's per-process accounting of the job's PIDs on ``device`` once it has ended (as the
    agent's, HACKING.md) where the backend can vouch for it, else the largest sample.
    Returns {"result", "exit_status", "duration_s", "peak_ram_mb", "peak_vram_mb", "peak_vram_source",
    "output_tail"}; result is success | failed | cuda-oom | timeout | not-started.
    """
    out = tempfile.TemporaryFile()
    started = time.monotonic()
    wall_start = time.time()
    try:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as exc:
        out.close()
        return {"result": "not-started", "exit_status": 127 if isinstance(exc, FileNotFoundError) else 126,
                "duration_s": 0.0, "peak_ram_mb": None, "peak_vram_mb": None, "peak_vram_source": None,
                "output_tail": f"cannot run {argv[0]}: {exc.strerror}"}
    peak_ram, peak_vram, timed_out = 0.0, None, False
    gpu_pids = [proc.pid]  # the job's processes any sample saw on a GPU: whose driver-kept peaks are asked
    try:
        while True:
            tick = time.monotonic()
            pids = process_tree(proc.pid)
            peak_ram = max(peak_ram, rss_mb(pids))
            if backend is not None:
                sample = backend.sample()
                gpu_pids += [p["pid"] for g in sample.get("gpus", ()) for p in g.get("processes", ())
                             if p.get("pid") in pids and p["pid"] not in gpu_pids]
                used = vram_mb(sample, pids)
                if used is not None:
                    peak_vram = max(peak_vram or 0, used)
            if proc.poll() is not None:
                break
            if time.monotonic() - started >= timeout:
                timed_out = True
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            time.sleep(max(0.0, interval - (time.monotonic() - tick)))
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()
        raise
    duration = time.monotonic() - started
    _signal_group(proc.pid, signal.SIGTERM)  # what it left running in its group would skew the next run
    source = None
    if backend is not None:
        ask = getattr(backend, "accounted_peaks", None)
        peaks = ask(gpu_pids, device=device, job_started=wall_start, not_before=wall_start) if ask else None
        if peaks is not None:
            peak_vram, source = sum(peaks.values()), "accounting"
        else:
            source = "sampled"
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - OUTPUT_TAIL))
    tail = out.read()
    out.close()
    code = proc.returncode
    status = 128 - code if code < 0 else code
    if timed_out:
        result = "timeout"
    elif code == 0:
        result = "success"
    elif any(m in tail for m in CUDA_OOM_MARKERS):
        result = "cuda-oom"
    else:
        result = "failed"
    return {"result": result, "exit_status": status, "duration_s": round(duration, 3),
            "peak_ram_mb": round(peak_ram, 1), "peak_vram_mb": peak_vram, "peak_vram_source": source,
            "output_tail": tail.decode("utf-8", "replace")}


# ---- samples ------------------------------------------------------------------------------------------------------

def samples_path(cfg, name):
    return _samples.path(cfg.agent.state_dir, name)


def metric_value(value):
    """The first (combined) metric of a sample's ``metric`` ("1234", "3600,8294400", 1234.0), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        try:
            x = float(value.split(",")[0])
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) and x >= 0 else None


def read_samples(path):
    """Every sample line of the file that decodes to an object; a missing file is no samples."""
    return _samples.read_file(path)


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def gpu_points(samples):
    """(metric, peak VRAM MiB) of the samples the fit may use: successful GPU runs, metric and peak known, and the
    agent's "underpredicted" samples (a running job measured over its reservation: a lower bound of its peak)."""
    points = []
    for s in samples:
        if s.get("mode") != "GPU" or s.get("result") not in ("success", "underpredicted"):
            continue
        x, y = metric_value(s.get("metric")), _number(s.get("peak_vram_mb"))
        if x is not None and y is not None and y >= 0:
            points.append((x, y))
    return points


def censored_points(samples):
    """(metric, VRAM MiB) of the GPU runs that ran out of memory (result cuda-oom): censored samples, the input
    needed more than the VRAM it had (a lower bound). The fitted model must lie above them (``recommend``)."""
    points = []
    for s in samples:
        if s.get("mode") != "GPU" or s.get("result") != "cuda-oom":
            continue
        x, y = metric_value(s.get("metric")), _number(s.get("peak_vram_mb"))
        if x is not None and y is not None and y >= 0:
            points.append((x, y))
    return points


def _gate_r2(result):
    """The r² the runbook's gate reads: with the OOMs at their bound where there were any."""
    r2 = result.get("r2")
    with_ooms = result.get("r2_with_ooms")
    return with_ooms if with_ooms is not None and (r2 is None or with_ooms < r2) else r2


def predictive_gate(samples, admission):
    """The runbook's gate on the recorded samples, for ``check`` and ``stats``: a note when the metric does not
    predict VRAM (the fit over the GPU samples, OOMs included as censored points, has r² < GOOD_FIT_R2 over at
    least GOOD_FIT_SAMPLES samples) and the profile does not already try the GPU first; else None."""
    result = fit(gpu_points(samples), censored_points(samples))
    r2 = _gate_r2(result) if result is not None else None
    if result is None or result["n"] < GOOD_FIT_SAMPLES or r2 is None or r2 >= GOOD_FIT_R2:
        return None
    if admission == "gpu-first":
        return None
    ooms = f", {result['censored']} ran out of GPU memory" if result["censored"] else ""
    return (f"the metric does not predict VRAM (r² {r2:.2f} over {result['n']} GPU samples{ooms}): "
            "use admission = \"gpu-first\" (every job tries the GPU; an input that runs out of memory there goes "
            "to the CPU on its retry, on_gpu_oom = \"cpu\")")


def ram_summary(samples, mode):
    """Peak RAM of the successful runs of one mode: {"n", "max_mb", "metric_at_max"} or None."""
    best, n = None, 0
    for s in samples:
        if s.get("mode") != mode or s.get("result") != "success":
            continue
        y = _number(s.get("peak_ram_mb"))
        if y is None:
            continue
        n += 1
        if best is None or y > best[0]:
            best = (y, metric_value(s.get("metric")))
    return None if best is None else {"n": n, "max_mb": best[0], "metric_at_max": best[1]}


def _append_sample(path, fields):
    """The agent's line format, into a file of the operator's choosing (--samples)."""
    _samples.append_file(path, fields)


# ---- the fit (pure) -------------------------------------------------------------------------------------------

def fit(points, censored=()):
    """Least squares peak = base + per_unit × metric over (metric, peak) points, or the constant (max) model when
    fewer than two distinct metrics are known. None without points.

    ``censored``: (metric, VRAM it had) of runs that ran out of GPU memory: they needed more than that, so they are
    no peak to fit; ``recommend`` lifts the model above each of them. ``r2_with_ooms`` is r² with them counted at
    their bound: an input that needed far more than its metric says makes it poor, the sign that the metric does
    not predict VRAM (the runbook's gate: GPU-first, ``recommend`` / ``predictive_gate``)."""
    if not points:
        return None
    out = _least_squares(points)
    censored = list(censored)
    out.update(censored=len(censored), censored_points=censored, r2_with_ooms=None)
    if censored and out["model"] == "linear":
        out["r2_with_ooms"] = _least_squares(list(points) + censored)["r2"]
    return out


def _least_squares(points):
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    n, distinct = len(points), len(set(xs))
    out = {"n": n, "distinct_metrics": distinct, "metric_min": min(xs), "metric_max": max(xs),
           "peak_min_mb": min(ys), "peak_max_mb": max(ys)}
    if distinct < 2:
        out.update(model="constant", base_mb=max(ys), per_unit_mb=0.0, r2=None,
                   max_residual_mb=max(ys) - min(ys))
        return out
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    base = my - slope * mx
    residuals = [y - (base + slope * x) for x, y in zip(xs, ys)]
    ss_res = sum(r * r for r in residuals)
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    out.update(model="linear", base_mb=base, per_unit_mb=slope, r2=r2,
               max_residual_mb=max(abs(r) for r in residuals))
    return out


def _ceil_sig(value, digits=6):
    """Round up to ``digits`` significant digits (a per-unit slope can be tiny: MiB per byte)."""
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale - 1e-9) / scale


def _floor_sig(value, digits=6):
    if value <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(value)))
    return math.floor(value * scale + 1e-9) / scale


def recommend(result, points, margin, budget_mb=None, threshold=None):
    """The model to use and the threshold it implies (pure).

    vram_base_mb / vram_per_unit_mb are the fit scaled by (1 + margin), raised where needed so that the model
    covers every measured peak; a negative intercept counts as 0 (the line then only over-predicts), a slope that
    is not positive gives the constant model (the largest peak). ``budget_mb``: VRAM one GPU job may use; the
    recommended threshold is the metric at which the prediction reaches it. ``threshold``: the profile's current
    (first) threshold, to say what a job just under it needs.
    """
    if result is None:
        return None
    notes = []
    if result["model"] == "linear" and result["per_unit_mb"] > 0:
        base, per = max(result["base_mb"], 0.0), result["per_unit_mb"]
        if result["base_mb"] < 0:
            notes.append(f"the fitted base is negative ({result['base_mb']:.1f} MiB): counted as 0")
    else:
        base, per = result["peak_max_mb"], 0.0
        if result["model"] == "linear":
            notes.append("peak VRAM does not grow with the metric here: constant model (the largest peak)")
    rec_base = base * (1 + margin)
    rec_per = _ceil_sig(per * (1 + margin)) if per > 0 else 0.0
    shortfall = max((y - (rec_base + rec_per * x) for x, y in points), default=0.0)
    if shortfall > 0:
        rec_base += shortfall
        notes.append(f"base raised by {shortfall:.1f} MiB so that the model covers every measured peak")
    censored = result.get("censored_points") or ()
    above = max((y + 1 - (rec_base + rec_per * x) for x, y in censored), default=0.0)  # strictly above: it needed more
    if above > 0:
        rec_base += above
        notes.append(f"base raised by {above:.1f} MiB above {len(censored)} run(s) that ran out of GPU memory "
                     "(censored: they needed more than they had)")
    rec_base = float(math.ceil(rec_base - 1e-9))
    model = "linear" if rec_per > 0 else "constant"
    # A good fit (enough samples, the line explains them) lets VRAM decide: admission = "vram" routes every job
    # whose predicted VRAM fits a GPU's room there, whatever its size; a threshold stays an optional extra cap.
    good = result["n"] >= GOOD_FIT_SAMPLES and (_gate_r2(result) is None or _gate_r2(result) >= GOOD_FIT_R2)
    # The runbook's gate: without a measurable property that predicts VRAM, use another strategy — try the GPU
    # first and fall back on OOM (admission = "gpu-first", on_gpu_oom = "cpu").
    r2 = _gate_r2(result)
    unpredictive = result["n"] >= GOOD_FIT_SAMPLES and r2 is not None and r2 < GOOD_FIT_R2
    if unpredictive:
        notes.append(f"the metric does not predict VRAM (r² {r2:.2f} < {GOOD_FIT_R2}): use "
                     "admission = \"gpu-first\" (every job tries the GPU; an input that runs out of memory there "
                     "goes to the CPU on its retry)")
    rec = {"model": model, "margin": margin, "vram_base_mb": rec_base, "vram_per_unit_mb": rec_per,
           "admission": "vram" if good else None,
           "strategy": "gpu-first" if unpredictive else None,  # the runbook's gate: admission = "gpu-first"
           "budget_mb": budget_mb, "threshold": None, "threshold_extrapolated": False,
           "vram_at_threshold_mb": None, "notes": notes}
    if threshold is not None:
        rec["vram_at_threshold_mb"] = int(math.ceil(rec_base + rec_per * threshold - 1e-9))
    if budget_mb is None:
        notes.append("per-job VRAM budget unknown (set [host] gpu_vram_mb, or calibrate on a GPU): no threshold")
    elif rec_base >= budget_mb:
        notes.append(f"even the smallest job ({rec_base:.0f} MiB) does not fit the per-job budget of {budget_mb} "
                     "MiB: lower max_gpu_jobs")
    elif rec_per > 0:
        rec["threshold"] = _floor_sig((budget_mb - rec_base) / rec_per)
        if rec["threshold"] > result["metric_max"]:
            rec["threshold_extrapolated"] = True
            notes.append(f"the threshold lies beyond the largest calibrated input (metric {result['metric_max']:g}): "
                         "calibrate a larger one to confirm it")
    else:
        notes.append("VRAM does not depend on the metric: every size fits the per-job budget, so the threshold is "
                     "not bound by VRAM")
    return rec


# ---- the command ------------------------------------------------------------------------------------------------

def _options(c, suppress=False):
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    c.add_argument("--workload", "-w", default=d(None), help="the workload profile (needed with several)")
    c.add_argument("--gpu", type=int, default=d(None), metavar="N",
                   help="run on GPU N (default: the one with the most free memory)")
    c.add_argument("--cpu", action="store_true", default=d(False),
                   help="run the inputs on the CPU (cpu_args, no GPU visible): CPU RAM samples, no VRAM fit input")
    c.add_argument("--timeout", default=d(DEFAULT_TIMEOUT),
                   help=f"longest one run may take, e.g. 90s, 20m (default {DEFAULT_TIMEOUT}); then it is killed")
    c.add_argument("--margin", type=float, default=d(DEFAULT_MARGIN),
                   help=f"safety margin on the fitted model (default {DEFAULT_MARGIN:g} = 10%%)")
    c.add_argument("--samples", default=d(None), metavar="FILE",
                   help="samples file to read and append to (default: [agent] state_dir/samples/NAME.jsonl)")
    c.add_argument("--dry-run", action="store_true", default=d(False),
                   help="record nothing: no samples appended, no calibration file written")
    c.add_argument("--chart", default=d(None), metavar="FILE",
                   help="also draw the fit: metric against peak VRAM, budget, capacity, threshold (.png/.svg/.pdf; "
                        "needs python3-matplotlib)")


def register(sub, command):
    c = command("calibrate", "run representative inputs, measure peak VRAM/RAM, fit and record the VRAM model")
    _options(c)
    c.add_argument("rest", nargs=argparse.REMAINDER, metavar="INPUT ... [-- ARGS ...]",
                   help="inputs to run; after --, the job's arguments with {input} (once per input)")
    c.set_defaults(func=cmd_calibrate)


def _split(args):
    """INPUTs and ARGS from the remainder; options given after the first INPUT are parsed here too."""
    rest = list(args.rest or [])
    template = None
    if "--" in rest:
        i = rest.index("--")
        rest, template = rest[:i], rest[i + 1:] or None
    late = argparse.ArgumentParser(prog="gpu-router calibrate", add_help=False)
    _options(late, suppress=True)
    late.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    late.add_argument("--config", default=argparse.SUPPRESS)
    late.add_argument("inputs", nargs="*")
    ns = late.parse_args(rest)
    for key, value in vars(ns).items():
        setattr(args, key, value)
    return ns.inputs, template


def job_args(workload, template, path, metric=None):
    """The job's own arguments for one input (the device arguments come after them).

    In ``template`` (the ARGS after ``--``), ``{input}`` is the input's path and ``{metric}`` its measured metric
    (the first combined value; for synthetic inputs whose size is an argument); without ``{input}`` the path is
    appended. Without a template: the input alone, or ``--opt INPUT`` for a profile with input = "option:--opt".
    """
    if template is None:
        if workload.input.startswith("option:"):
            return [workload.input[len("option:"):], path]
        return [path]
    shown = "" if metric is None else (str(int(metric)) if float(metric).is_integer() else repr(float(metric)))
    out = [a.replace("{input}", path).replace("{metric}", shown) for a in template]
    if not any("{input}" in a for a in template):
        out.append(path)
    return out


def _fmt_metric(values):
    return ",".join(format(v, ".10g") for v in values)


def _pick_gpu(sample, wanted):
    gpus = [g for g in sample.get("gpus", ()) if g.get("health") == "ok" and g.get("total_mb")]
    if wanted is not None:
        for g in sample.get("gpus", ()):
            if g["index"] == wanted:
                if g.get("health") != "ok":
                    raise CalibrationError(f"GPU {wanted} is not healthy ({g.get('health')}: {g.get('reason')})")
                return g
        known = ", ".join(str(g["index"]) for g in sample.get("gpus", ())) or "none"
        raise CalibrationError(f"no GPU {wanted} (GPUs: {known})")
    if not gpus:
        why = sample.get("error") or f"backend {sample.get('source')} found none"
        raise CalibrationError(f"no usable GPU to calibrate on ({why}); --cpu runs the inputs on the CPU")
    return sorted(gpus, key=lambda g: (-(g.get("free_mb") or 0), g["index"]))[0]


def _budget(cfg, w, gpu_info, listed):
    """(per-job VRAM budget, VRAM per GPU, its source): the host's figures (ops/host.py), except that the GPU
    calibrated on, when there is one, gives the VRAM where [host] gpu_vram_mb is unset."""
    if w.max_gpu_jobs is not None and w.max_gpu_jobs <= 0:
        return None, None, "max_gpu_jobs = 0"
    h = host.figures(cfg, listed)
    if cfg.host.gpu_vram_mb is None and gpu_info and gpu_info.get("total_mb"):
        vram, source = gpu_info["total_mb"], f"GPU {gpu_info['index']}"
    elif h.vram_mb is not None:
        vram, source = h.vram_mb, h.vram_source
    else:
        return None, None, None
    # vram mode without a slot cap: one job may use the whole GPU (less the reserve); VRAM decides how many share it
    return (vram - cfg.gpu.reserve_mb) // (w.max_gpu_jobs or 1), vram, source


def _write_calibration(path, doc):
    import tomli_w

    data = ("# Written by `gpu-router calibrate`; run it again rather than editing this file.\n"
            "# A profile uses it with vram_model = \"calibrated\" (see gpu-router.toml(5)).\n\n"
            + tomli_w.dumps(doc)).encode()
    # root's own state: a folder only root can change, nothing in it followed (atomicfile.Refused otherwise)
    atomicfile.write_state(os.path.dirname(path), os.path.basename(path), data, durable=True)


def _toml_clean(value):
    """TOML has no null: drop None values (recursively)."""
    if isinstance(value, dict):
        return {k: _toml_clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_toml_clean(v) for v in value if v is not None]
    return value


def calibration_doc(w, result, rec, unit):
    return _toml_clean({
        "workload": w.name, "calibrated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": rec["model"],
        "vram_base_mb": rec["vram_base_mb"], "vram_per_unit_mb": rec["vram_per_unit_mb"], "unit": unit,
        "admission": rec.get("admission"),
        "margin": rec["margin"],
        "fit": {k: result[k] for k in ("model", "n", "distinct_metrics", "base_mb", "per_unit_mb", "r2",
                                       "max_residual_mb", "metric_min", "metric_max", "peak_min_mb", "peak_max_mb")},
        "recommendation": {"threshold": rec["threshold"], "budget_mb": rec["budget_mb"],
                           "vram_at_threshold_mb": rec["vram_at_threshold_mb"]},
    })


def cmd_calibrate(args):
    from ..daemon import gpu_backends
    from .common import emit, pick_workload


    inputs, template = _split(args)
    cfg = _load(args)
    w = pick_workload(cfg, args.workload)
    try:
        timeout = _config.parse_duration(args.timeout)
        if timeout <= 0:
            raise ValueError
    except ValueError:
        raise _config.ConfigError(f"--timeout: expected a duration such as 90s or 20m, got {args.timeout!r}") \
            from None
    if not 0 <= args.margin <= 10 or args.margin != args.margin:
        raise _config.ConfigError(f"--margin: expected a fraction from 0 to 10 (0.1 = 10%), got {args.margin}")
    mode = "CPU" if args.cpu else "GPU"
    sfile = args.samples or samples_path(cfg, w.name)
    try:
        recorded = read_samples(sfile) if args.samples else _samples.read(cfg.agent.state_dir, w.name)
    except OSError as exc:
        sys.stderr.write(f"gpu-router: calibrate: cannot read the recorded samples: {exc.strerror or exc}\n")
        return 1
    problems, runs = [], []
    backend, gpu_info, detected = None, None, []
    try:
        if inputs and mode == "GPU":
            backend = gpu_backends.open_backend(cfg.gpu.backend, cfg.gpu.call_timeout, accounting=cfg.gpu.accounting)
            first = backend.sample()
            detected = list(first.get("gpus", ()))
            gpu_info = _pick_gpu(first, args.gpu)
        elif cfg.host.gpu_vram_mb is None and w.max_gpu_jobs:
            detected = host.detect_gpus(cfg)[0]
        for n, path in enumerate(inputs):
            run = _calibrate_one(cfg, w, mode, gpu_info, backend, template, path, n, timeout)
            runs.append(run)
            if run.get("sample") and not args.dry_run:  # each as it is made: an interrupted calibration keeps it
                try:
                    if args.samples:
                        _append_sample(sfile, run["fields"])
                    else:
                        accounting.record_sample(cfg.agent.state_dir, run["fields"])
                except OSError as exc:
                    problems.append(f"cannot record the sample in {sfile}: {exc.strerror or exc}")
    except CalibrationError as exc:
        sys.stderr.write(f"gpu-router: calibrate: {exc}\n")
        return 1
    finally:
        if backend is not None:
            backend.close()
    measured = []
    for r in runs:
        if r.get("sample"):
            measured.append(r["sample"])
        if r["result"] != "success":
            problems.append(f"{r['input']}: {r['result']}" + (f" ({r['detail']})" if r.get("detail") else ""))
        elif mode == "GPU" and r.get("peak_vram_mb") is None:
            problems.append(f"{r['input']}: its processes never showed on the GPU in {r['duration_s']:.1f}s (too "
                            "brief to sample, or in a container: NVML reports host PIDs, so run calibrate on the "
                            "host); not fitted")
    recorded_points, measured_points = gpu_points(recorded), gpu_points(measured)
    points = recorded_points + measured_points
    result = fit(points, censored_points(recorded + measured))
    budget, vram, vram_source = _budget(cfg, w, gpu_info, detected)
    combined_unit = w.threshold_unit[0]
    rec = recommend(result, points, args.margin, budget, w.threshold[0] if w.max_gpu_jobs else None)
    all_samples = recorded + measured
    ram = {"cpu": ram_summary(all_samples, "CPU"), "gpu": ram_summary(all_samples, "GPU")}
    for key in ("cpu", "gpu"):
        limit_key = "gpu_ram_mb" if key == "gpu" and w.gpu_ram_mb is not None else "cpu_ram_mb"
        limit = getattr(w, limit_key)
        ram[f"{key}_limit"] = {"key": limit_key, "mb": limit or None}
        if ram[key] and limit and ram[key]["max_mb"] > limit:
            problems.append(f"{key.upper()} jobs peaked at {ram[key]['max_mb']:.0f} MiB of RAM, over {limit_key} = "
                            f"{limit}: raise it (the scope's MemoryMax follows it)")
    cal_path = _config.calibration_path(cfg.agent.state_dir, w.name)
    written = False
    if result is None:
        problems.append("no usable GPU sample to fit (successful GPU runs with a known metric and peak VRAM)")
    elif not args.dry_run:
        try:
            _write_calibration(cal_path, calibration_doc(w, result, rec, combined_unit))
            written = True
        except OSError as exc:
            problems.append(f"cannot write {cal_path}: {exc.strerror or exc}")
    data = {
        "workload": w.name, "profile": w.source, "unit": combined_unit, "mode": mode,
        "gpu": None if gpu_info is None else {k: gpu_info.get(k) for k in ("index", "uuid", "name", "total_mb",
                                                                             "free_mb")},
        "runs": [{k: v for k, v in r.items() if k not in ("sample", "fields")} for r in runs],
        "samples_file": sfile,
        "samples": {"recorded": len(recorded), "recorded_usable": len(recorded_points),
                    "measured": len(measured), "measured_usable": len(measured_points)},
        "fit": result, "recommendation": rec,
        "budget": {"per_job_mb": budget, "gpu_vram_mb": vram, "source": vram_source,
                   "reserve_mb": cfg.gpu.reserve_mb, "max_gpu_jobs": w.max_gpu_jobs},
        "current": {"vram_model": "calibrated" if w.vram_calibration else w.vram_model,
                    "admission": w.admission, "threshold": w.threshold, "gpu_vram_mb": w.gpu_vram_mb,
                    "vram_base_mb": w.vram_base_mb, "vram_per_unit_mb": w.vram_per_unit_mb},
        "ram": ram, "calibration_file": cal_path, "written": written, "dry_run": bool(args.dry_run),
        "problems": problems,
    }
    chart_failed = False
    if getattr(args, "chart", None):
        from . import charts

        try:
            data["chart"] = charts.calibration(args.chart, w.name, combined_unit, points, result, rec, budget,
                                               vram, w.threshold[0] if w.max_gpu_jobs else None)
        except charts.ChartError as exc:
            sys.stderr.write(f"gpu-router: calibrate: no chart: {exc}\n")
            data["chart"], chart_failed = None, True
    emit(args, data, render(data, w) + (f"\nchart: {data['chart']}" if data.get("chart") else ""))
    return 1 if problems or chart_failed else 0


def _load(args):
    """The config; a calibrated profile whose calibration is missing or broken is loaded without its model (the
    wrapper refuses such a config, and calibrate is how it gets repaired)."""
    try:
        return _config.load(args.config)
    except _config.ConfigError as exc:
        try:
            cfg = _config.build(_config.parse(_config.config_path(args.config),
                                              lambda path: _config.SKIP_CALIBRATION))
        except _config.ConfigError:
            raise exc from None
        sys.stderr.write(f"gpu-router: calibrate: note: {exc}\n")
        return cfg


def _calibrate_one(cfg, w, mode, gpu_info, backend, template, path, n, timeout):
    run = {"input": path, "metric": None, "result": None, "exit_status": None, "duration_s": None,
           "peak_vram_mb": None, "peak_ram_mb": None, "detail": None, "argv": None}
    try:
        values = measure(w, path)
    except ProbeFailed as exc:
        run.update(result="probe-failed", detail=f"{exc.reason}: {exc}")
        return run
    combined = policy.combined_metric(w, values)
    run["metric"] = combined[0] if len(combined) == 1 else combined
    argv = [w.binary] + job_args(w, template, path, combined[0]) + (w.gpu_args if mode == "GPU" else w.cpu_args)
    run["argv"] = argv
    env = dict(os.environ)
    env.update(w.env)
    env["GPU_ROUTER_MODE"] = mode
    env["GPU_ROUTER_JOB"] = f"{w.name}-calibrate-{os.getpid()}-{n}"
    if mode == "GPU":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        use_uuid = cfg.gpu.visible_devices == "uuid" and gpu_info.get("uuid")
        env["CUDA_VISIBLE_DEVICES"] = gpu_info["uuid"] if use_uuid else str(gpu_info["index"])
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    got = run_job(argv, env, timeout, backend if mode == "GPU" else None,
                  device=gpu_info.get("index") if mode == "GPU" and gpu_info else None)
    run.update({k: got[k] for k in ("result", "exit_status", "duration_s", "peak_ram_mb", "peak_vram_mb",
                                    "peak_vram_source")})
    if got["result"] == "timeout":
        run["detail"] = f"killed after {timeout:g}s (--timeout)"
    elif got["result"] != "success":
        lines = [line for line in got["output_tail"].splitlines() if line.strip()]
        run["detail"] = f"exit {got['exit_status']}" + (f": {lines[-1][:200]}" if lines else "")
    predicted = policy.predict_vram_mb(w, values) if mode == "GPU" and w.vram_model != "calibrated" else None
    run["fields"] = {"WORKLOAD": w.name, "MODE": mode, "METRIC": _fmt_metric(combined), "RESULT": got["result"],
                     "PEAK_RAM_MB": got["peak_ram_mb"], "PEAK_VRAM_MB": got["peak_vram_mb"],
                     "PEAK_VRAM_SOURCE": got["peak_vram_source"], "DURATION_S": got["duration_s"],
                     "PREDICTED_VRAM_MB": predicted}
    if got["result"] != "not-started":
        run["sample"] = {"mode": mode, "metric": run["fields"]["METRIC"], "result": got["result"],
                         "peak_ram_mb": got["peak_ram_mb"], "peak_vram_mb": got["peak_vram_mb"],
                         "peak_vram_source": got["peak_vram_source"], "duration_s": got["duration_s"],
                         "predicted_vram_mb": predicted}
    return run


# ---- the report -------------------------------------------------------------------------------------------------

def _mb(v):
    return "unknown" if v is None else f"{v:.0f} MiB"


def render(d, w):
    unit = d["unit"]
    lines = [f"calibrate {d['workload']} ({d['profile']})"]
    if d["gpu"]:
        g = d["gpu"]
        lines.append(f"on GPU {g['index']} {g.get('name') or ''} ({g.get('total_mb')} MiB, {g.get('free_mb')} free)")
    if d["runs"]:
        lines.append(f"runs ({d['mode']}):")
        for r in d["runs"]:
            metric = "unknown" if r["metric"] is None else (
                f"{r['metric']:g} {unit}" if not isinstance(r["metric"], list) else
                ",".join(f"{m:g}" for m in r["metric"]))
            text = f"  {os.path.basename(r['input'])}: metric {metric}, {r['result']}"
            if r["duration_s"] is not None:
                text += f" in {r['duration_s']:.1f}s"
            if r["result"] not in ("probe-failed", "not-started"):
                text += f", peak VRAM {_mb(r['peak_vram_mb'])}, peak RAM {_mb(r['peak_ram_mb'])}"
            if r.get("detail"):
                text += f" ({r['detail']})"
            lines.append(text)
    s = d["samples"]
    lines.append(f"samples: {s['measured_usable']} usable of {s['measured']} measured now, "
                 f"{s['recorded_usable']} usable of {s['recorded']} recorded ({d['samples_file']})")
    f = d["fit"]
    if f is None:
        lines.append("fit: nothing to fit")
    elif f["model"] == "constant":
        lines.append(f"fit: constant model from {f['n']} sample(s) with {f['distinct_metrics']} distinct metric: "
                     f"peak VRAM up to {f['base_mb']:.0f} MiB (calibrate inputs of different sizes for a line)")
    else:
        lines.append(f"fit: peak_vram = {f['base_mb']:.1f} + {f['per_unit_mb']:.6g} × metric ({unit})   "
                     f"n {f['n']}, r² {f['r2']:.4f}, max residual {f['max_residual_mb']:.1f} MiB, "
                     f"metric {f['metric_min']:g}..{f['metric_max']:g}")
    if f and f.get("censored"):
        lines.append(f"  {f['censored']} of these ran out of GPU memory (cuda-oom): censored, they needed more than "
                     "they had; the model lies above them")
    rec = d["recommendation"]
    if rec:
        b = d["budget"]
        lines.append(f"recommend (margin {rec['margin'] * 100:g}%):")
        lines.append(f"  vram_base_mb = {rec['vram_base_mb']:g}, vram_per_unit_mb = {rec['vram_per_unit_mb']:.6g}"
                     f"  ({rec['model']})")
        if b["per_job_mb"] is not None:
            lines.append(f"  per-job VRAM budget {b['per_job_mb']} MiB = ({b['gpu_vram_mb']} MiB [{b['source']}] − "
                         f"reserve {b['reserve_mb']}) / max_gpu_jobs {b['max_gpu_jobs']}")
        if rec["threshold"] is not None:
            current = ", ".join(f"{t:g}" for t in d["current"]["threshold"])
            lines.append(f"  threshold = {rec['threshold']:g} ({unit}; now {current}): where the predicted VRAM "
                         "reaches the budget")
        if rec["vram_at_threshold_mb"] is not None:
            lines.append(f"  a job just under the current threshold needs up to {rec['vram_at_threshold_mb']} MiB "
                         f"(gpu_vram_mb is {d['current']['gpu_vram_mb']})")
        if rec.get("admission") == "vram":
            lines.append("  admission = \"vram\": the fit is good, so VRAM decides (a profile with vram_model = "
                         "\"calibrated\" and no admission key takes it from the calibration file); the threshold "
                         "is then only an optional cap")
        lines += [f"  note: {n}" for n in rec["notes"]]
    ram = d["ram"]
    for key in ("cpu", "gpu"):
        r, limit = ram[key], ram[f"{key}_limit"]
        if r:
            lines.append(f"RAM of {key.upper()} jobs: peak {r['max_mb']:.0f} MiB over {r['n']} run(s)"
                         + (f" ({limit['key']} {limit['mb']}: {'ok' if r['max_mb'] <= limit['mb'] else 'OVER'})"
                            if limit["mb"] else ""))
    if d["written"]:
        lines.append(f"wrote {d['calibration_file']}")
        if d["current"]["vram_model"] != "calibrated":
            lines.append(f"  use it: vram_model = \"calibrated\" (with admission = \"vram\") in [workloads.{w.name}]"
                         f" of {w.source}; or set threshold/gpu_vram_mb from the numbers above")
    elif d["dry_run"] and f is not None:
        lines.append(f"dry run: nothing written (would write {d['calibration_file']})")
    lines += [f"! {p}" for p in d["problems"]]
    return "\n".join(lines)
