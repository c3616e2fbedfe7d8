"""`gpu-router jobs`: job history like sacct, from the journal, each job's events joined by GPU_ROUTER_JOB.

One row per job: when it was decided, workload, input, the caller (its systemd unit and uid, as journald recorded
them for the wrapper's own event), mode and device, how long it waited for a place, how long it ran, the result
and exit status, peak RAM / VRAM against the predicted VRAM. A BLOCKED job is a row too (result "blocked", exit
the retry code). ``gpu-router jobs JOB`` shows one job with all its events.
"""

import os
import sys
import time

from .. import confinement
from ..termtext import field as _t
from . import stats

EVENTS = ("routed", "blocked", "probe-failed", "job-finished", "scope-failed")
RESULTS = ("success", "failed", "oom-kill", "cuda-oom", "gpu-fault", "timeout", "unknown", "blocked", "running",
           "refused",
           "no-outcome", "untracked")


def _ts(e):
    try:
        return int(e.get("__REALTIME_TIMESTAMP", 0)) / 1e6
    except (TypeError, ValueError):
        return 0.0


def _num(value):
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not -1e15 < number < 1e15:
        return None  # inf, nan, or beyond any figure a job has
    return int(number) if number.is_integer() else number


def join(events):
    """Events (decoded, their authors checked: ``journal_read``) → jobs, oldest first (pure)."""
    jobs, order = {}, []
    for e in sorted(events, key=_ts):
        job_id = e.get("GPU_ROUTER_JOB")
        kind = e.get("GPU_ROUTER_EVENT")
        if not job_id or kind not in EVENTS:
            continue
        j = jobs.get(job_id)
        if j is None:
            j = jobs[job_id] = {"job": job_id, "time": None, "workload": e.get("GPU_ROUTER_WORKLOAD"),
                                "input": None, "caller_unit": None, "uid": None, "pid": None, "mode": None,
                                "device": None, "slot": None, "scope": None, "reason": None, "metric": None,
                                "unit": None, "threshold": None, "waited_s": None, "duration_s": None,
                                "result": None, "exit_status": None, "peak_ram_mb": None, "peak_vram_mb": None,
                                "peak_vram_source": None, "predicted_vram_mb": None, "probe_error": None,
                                "events": []}
            order.append(job_id)
            j.update(oom_cause=None, oom_memory=None, after_oom_of=None)  # issue 18: an OOM, and a retry after one
        j["events"].append({"time": _ts(e), "event": kind, "message": e.get("MESSAGE")})
        if kind in ("routed", "blocked"):
            j["time"] = _ts(e)
            j["mode"] = e.get("GPU_ROUTER_MODE")
            own = e.get("_SYSTEMD_UNIT") or e.get("_SYSTEMD_USER_UNIT")
            if own and own.startswith("gpu-router-") and own.endswith(".scope"):
                own = None  # sent from inside the job's own scope: the wrapper recorded its caller's unit
            j["caller_unit"] = e.get("GPU_ROUTER_CALLER_UNIT") or own
            j["uid"] = _num(e.get("_UID"))
            j["pid"] = _num(e.get("GPU_ROUTER_PID") or e.get("_PID"))
            for key in ("input", "device", "slot", "scope", "reason", "metric", "unit", "threshold"):
                j[key] = e.get("GPU_ROUTER_" + key.upper()) or j[key]
            j["predicted_vram_mb"] = _num(e.get("GPU_ROUTER_PREDICTED_VRAM_MB"))
            j["waited_s"] = _num(e.get("GPU_ROUTER_WAITED_S")) or 0
            j["after_oom_of"] = e.get("GPU_ROUTER_OOM_JOB") or j["after_oom_of"]
            if kind == "blocked":
                j["result"] = "blocked"
            elif j["result"] is None:
                j["result"] = "running"
        elif kind == "job-finished":
            j["result"] = e.get("GPU_ROUTER_RESULT") or "unknown"
            j["exit_status"] = _num(e.get("GPU_ROUTER_EXIT_STATUS"))
            j["duration_s"] = _num(e.get("GPU_ROUTER_DURATION_S"))
            j["peak_ram_mb"] = _num(e.get("GPU_ROUTER_PEAK_RAM_MB"))
            j["peak_vram_mb"] = _num(e.get("GPU_ROUTER_PEAK_VRAM_MB"))
            j["peak_vram_source"] = e.get("GPU_ROUTER_PEAK_VRAM_SOURCE")  # accounting | sampled
            j["oom_cause"], j["oom_memory"] = e.get("GPU_ROUTER_OOM_CAUSE"), e.get("GPU_ROUTER_OOM_MEMORY")
            j["predicted_vram_mb"] = j["predicted_vram_mb"] or _num(e.get("GPU_ROUTER_PREDICTED_VRAM_MB"))
            j["mode"] = j["mode"] or e.get("GPU_ROUTER_MODE")
            j["device"] = j["device"] or e.get("GPU_ROUTER_DEVICE")
            j["scope"] = j["scope"] or e.get("GPU_ROUTER_SCOPE")
            if j["time"] is None:
                j["time"] = _ts(e) - (j["duration_s"] or 0)
        elif kind == "probe-failed":
            j["probe_error"] = e.get("GPU_ROUTER_REASON")
            j["input"] = j["input"] or e.get("GPU_ROUTER_INPUT")
            if e.get("GPU_ROUTER_ON_PROBE_ERROR") == "fail":
                j["result"], j["time"], j["mode"] = "refused", _ts(e), "REFUSED"
        if j["time"] is None:
            j["time"] = _ts(e)
    return [jobs[k] for k in order]


def still_running(j):
    """A job the journal shows without an outcome: is it really still running here? Its PID must be alive and in
    its scope (or, without a scope, be the job's own process). Else its end was never reported ("no-outcome":
    the agent was down, lost track of it, or is about to write it; "untracked": no scope, so no agent followed
    it)."""
    pid = j.get("pid")
    if not pid:
        return False
    try:
        lines = confinement.read(int(pid))
    except ValueError:
        return False
    if not lines:   # gone
        return False
    return not j.get("scope") or any(j["scope"] in path for _c, path in lines)


def settle(jobs):
    """Jobs the journal shows as running but whose process is gone: "no-outcome", or "untracked" without a scope
    (scope = "off", or best-effort without one: no agent follows such a job, no outcome will come)."""
    for j in jobs:
        if j["result"] == "running" and not still_running(j):
            j["result"] = "no-outcome" if j["scope"] else "untracked"
    return jobs


def select(jobs, workload=None, result=None, mode=None, unit=None):
    out = []
    for j in jobs:
        if workload and j["workload"] != workload:
            continue
        if result and j["result"] != result:
            continue
        if mode and (j["mode"] or "").upper() != mode.upper():
            continue
        if unit and j["caller_unit"] != unit:
            continue
        out.append(j)
    return out


def read(since, until=None, directory=None, job=None):
    """(events, how many were ignored as not written by their author)."""
    matches = [f"GPU_ROUTER_JOB={job}"] if job else ()
    return stats.read_events(since, directory, events=EVENTS, until=until, matches=matches)


# ---- text ------------------------------------------------------------------------------------------------------

def _dur(seconds):
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _v(value, suffix=""):
    return "-" if value is None else f"{value:g}{suffix}" if isinstance(value, (int, float)) else _t(value)


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _caller(j):
    who = _t(j["caller_unit"]) or "-"
    return who + (f"/{j['uid']}" if j["uid"] is not None else "")


COLUMNS = ("START", "JOB", "WORKLOAD", "CALLER/UID", "MODE", "DEV", "WAITED", "ELAPSED", "RESULT", "EXIT",
           "RAM_MB", "VRAM_MB/PRED", "INPUT")


def table(jobs, now=None, header=True):
    now = now or time.time()
    rows = [COLUMNS]
    for j in jobs:
        elapsed = j["duration_s"] if j["duration_s"] is not None else (
            now - j["time"] if j["result"] == "running" and j["time"] else None)
        vram = _v(j["peak_vram_mb"]) + "/" + _v(j["predicted_vram_mb"]) if j["mode"] == "GPU" else "-"
        mode = (_t(j["mode"]) or "-") + ("(after-oom)" if j.get("after_oom_of") else "")
        result = (_t(j["result"]) or "-") + (f":{_t(j['oom_cause'])}" if j.get("oom_cause") else "")
        rows.append((_when(j["time"]), _t(j["job"]), _t(j["workload"]) or "-", _caller(j), mode,
                     _t(j["device"]) or "-", _dur(j["waited_s"]) if j["waited_s"] else "-", _dur(elapsed),
                     result, _v(j["exit_status"]), _v(j["peak_ram_mb"]), vram,
                     _t(os.path.basename(j["input"])) if j["input"] else "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows[0 if header else 1:])


def one(j):
    j = {k: _t(v) if isinstance(v, str) else v for k, v in j.items()}  # member-chosen text, escaped
    lines = [f"job           {j['job']}",
             f"workload      {j['workload']}",
             f"input         {j['input'] or '-'}",
             f"caller        unit {j['caller_unit'] or '-'}, uid {_v(j['uid'])}, pid {_v(j['pid'])}",
             f"decided       {_when(j['time'])}: {j['mode'] or '-'}" + (f" {j['device']}" if j["mode"] == "GPU"
                                                                      else "") + f" ({j['reason'] or '-'})",
             f"metric        {j['metric'] or '-'} {j['unit'] or ''} (threshold {j['threshold'] or '-'})".rstrip(),
             f"waited        {_dur(j['waited_s'] or 0)}",
             f"scope         {j['scope'] or '-'}",
             f"result        {j['result'] or '-'} (exit {_v(j['exit_status'])}) after {_dur(j['duration_s'])}",
             f"peak RAM      {_v(j['peak_ram_mb'], ' MB')}",
             f"peak VRAM     {_v(j['peak_vram_mb'], ' MB')}"
             + (f" {j['peak_vram_source']}" if j["peak_vram_source"] else "")
             + f" (predicted {_v(j['predicted_vram_mb'], ' MB')})"]
    if j["probe_error"]:
        lines.append(f"probe error   {j['probe_error']}")
    if j.get("oom_cause"):
        lines.append(f"cuda oom      {j['oom_cause']}" + (f", input remembered ({j['oom_memory']})"
                                                           if j.get("oom_memory") else ", input not remembered"))
    if j.get("after_oom_of"):
        lines.append(f"after oom     its input ran out of GPU memory in job {j['after_oom_of']} ({j['reason']})")
    lines.append("events:")
    lines += [f"  {_when(e['time'])}  {_t(e['event']):<13} {_t(e['message'])}" for e in j["events"]]
    lines.append(f"journal:      journalctl GPU_ROUTER_JOB={j['job']}")
    return "\n".join(lines)


def cmd_jobs(args):
    from .common import emit

    try:
        events, ignored = read(args.since if not args.job else "-1y" if args.since == "-1d" else args.since,
                               args.until, args.directory, job=args.job)
    except (OSError, RuntimeError) as exc:
        sys.stderr.write(f"gpu-router: cannot read the journal: {_t(exc)}\n")
        return 1
    partial = stats.visibility()
    if partial:
        sys.stderr.write(f"gpu-router: {partial}\n")
    note = stats.ignored_note(ignored)
    if note:
        sys.stderr.write(f"gpu-router: note: {note}\n")
    jobs = join(events)
    settle(jobs)
    if args.job:
        found = [j for j in jobs if j["job"] == args.job]
        if not found:
            sys.stderr.write(f"gpu-router: no job {_t(args.job)} in the journal"
                             + (" visible to this user" if partial else "") + "\n")
            return 1
        emit(args, found[0], one(found[0]))
        return 0
    jobs = select(jobs, args.workload, args.result, args.mode, args.caller)
    if args.json:
        emit(args, {"since": args.since, "until": args.until, "jobs": jobs, "partial": partial is not None,
                     "note": partial, "ignored": ignored}, "")
        return 0
    header = not args.no_header
    text = table(jobs, header=header) if jobs else f"no jobs since {_t(args.since)}" + (" matching the filters" if (
        args.workload or args.result or args.mode or args.caller) else "")
    emit(args, None, text)
    return 0


def register(sub, command):
    c = command("jobs", "job history from the journal, like sacct (JOB: one job with all its events)")
    c.add_argument("job", nargs="?", help="a job id (GPU_ROUTER_JOB, as in the table): show that one job")
    c.add_argument("--since", "-S", default="-1d", help="from when, as journalctl --since takes it (default: -1d), e.g. -1h, today")
    c.add_argument("--until", "-U", help="until when, as journalctl --until takes it")
    c.add_argument("--workload", "-w", help="only this workload")
    c.add_argument("--result", "-r", choices=RESULTS, help="only jobs with this result")
    c.add_argument("--mode", "-m", choices=("GPU", "CPU", "BLOCKED", "REFUSED", "gpu", "cpu", "blocked"),
                   help="only jobs decided so")
    c.add_argument("--caller", help="only jobs started by this systemd unit (e.g. runner.service)")
    c.add_argument("--directory", "-D", help="read journal files from this directory")
    from . import listing

    listing.add_output_options(c)
    c.set_defaults(func=cmd_jobs)
