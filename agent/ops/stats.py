"""`gpu-router stats`: GPU / CPU / BLOCKED counts and job outcomes from the journal, with advice.

Reads ``journalctl -o json`` for our MESSAGE_IDs; the advice is the runbook's tuning step made explicit.
"""

import json
import subprocess

from ..journal import MESSAGE_IDS


def read_events(since, journal_dir=None, unit_files=None):
    argv = ["journalctl", "-o", "json", "--no-pager", "--since", since]
    if journal_dir:
        argv += ["-D", journal_dir]
    matches = [f"MESSAGE_ID={MESSAGE_IDS[e]}" for e in ("routed", "blocked", "job-finished", "probe-failed")]
    argv += [x for m in matches for x in (m, "+")][:-1]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if out.returncode != 0 and not out.stdout:
        raise RuntimeError(out.stderr.strip() or f"journalctl exited {out.returncode}")
    events = []
    for line in out.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def summarize(events):
    """Counts per workload: decisions by mode and reason, outcomes by result, plus advice (pure)."""
    per = {}
    for e in events:
        name = e.get("GPU_ROUTER_WORKLOAD", "?")
        w = per.setdefault(name, {"GPU": 0, "CPU": 0, "BLOCKED": 0, "reasons": {}, "results": {},
                                  "probe_failed": 0})
        kind = e.get("GPU_ROUTER_EVENT")
        if kind in ("routed", "blocked"):
            mode = e.get("GPU_ROUTER_MODE", "?")
            w[mode] = w.get(mode, 0) + 1
            reason = f"{mode}:{e.get('GPU_ROUTER_REASON', '?')}"
            w["reasons"][reason] = w["reasons"].get(reason, 0) + 1
        elif kind == "job-finished":
            result = e.get("GPU_ROUTER_RESULT", "?")
            w["results"][result] = w["results"].get(result, 0) + 1
        elif kind == "probe-failed":
            w["probe_failed"] += 1
    for name, w in per.items():
        w["advice"] = advice(w)
    return per


def advice(w):
    tips = []
    cpu, gpu = w["CPU"], w["GPU"]
    cpu_blocked = sum(n for r, n in w["reasons"].items() if r.startswith("BLOCKED:cpu"))
    gpu_blocked = sum(n for r, n in w["reasons"].items() if r.startswith(("BLOCKED:gpu", "BLOCKED:no-vram")))
    if cpu_blocked > max(cpu, 1):
        tips.append("many jobs BLOCKED on CPU slots: raise the threshold (more jobs to the GPU) or max_cpu_jobs "
                    "if RAM allows (gpu-router check)")
    if gpu_blocked > max(gpu // 10, 1):
        tips.append("jobs BLOCKED on the GPU: the runner's concurrency exceeds max_gpu_jobs; match them, or set "
                    "wait = \"30s\" so jobs queue briefly instead of failing")
    if w["results"].get("oom-kill"):
        tips.append("jobs were OOM-killed: raise cpu_ram_mb / MemoryMax, or lower the threshold")
    if w["probe_failed"]:
        tips.append(f"{w['probe_failed']} probe failure(s): `gpu-router explain FILE` on such an input")
    if cpu and gpu and cpu > gpu * 3:
        tips.append("most jobs go to the CPU: check the threshold against `gpu-router calibrate` samples")
    return tips


def cmd_stats(args):
    from .cli import _emit

    try:
        events = read_events(args.since, args.directory)
    except (OSError, RuntimeError) as exc:
        import sys

        sys.stderr.write(f"gpu-router: cannot read the journal: {exc}\n")
        return 1
    per = summarize(events)
    lines = [f"since {args.since}: {len(events)} events"]
    for name, w in sorted(per.items()):
        lines.append(f"{name}: GPU {w['GPU']}, CPU {w['CPU']}, BLOCKED {w['BLOCKED']}, probe failures "
                     f"{w['probe_failed']}")
        if w["results"]:
            lines.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(w["results"].items())))
        if w["reasons"]:
            lines.append("  reasons:  " + ", ".join(f"{k} {v}" for k, v in sorted(w["reasons"].items())))
        lines += [f"  advice:   {t}" for t in w["advice"]]
    _emit(args, {"since": args.since, "events": len(events), "workloads": per}, "\n".join(lines))
    return 0


def register(sub, command):
    c = command("stats", "GPU/CPU/BLOCKED counts and outcomes from the journal, with advice")
    c.add_argument("--since", default="-1d", help="journalctl --since, e.g. --since=-1h or --since=today "
                                                  "(default: -1d)")
    c.add_argument("--directory", "-D", help="read journal files from this directory")
    c.set_defaults(func=cmd_stats)
