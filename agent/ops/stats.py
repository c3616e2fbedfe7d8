"""`gpu-router stats`: GPU / CPU / BLOCKED counts and job outcomes from the journal, with advice.

Reads our events through ``journal_read`` (decoded, bounded, each from an author that may write it); the advice
is the runbook's tuning step made explicit. Text output goes through ``termtext`` (names are member-chosen).
"""

import os

from ..termtext import field as _t


STATS_EVENTS = ("routed", "blocked", "job-finished", "probe-failed", "vram-underpredicted", "vram-foreign")


def read_events(since, journal_dir=None, events=STATS_EVENTS, until=None, matches=()):
    """Our events, decoded and checked for their authors (``journal_read``): (entries, how many were ignored as
    not written by their author). RuntimeError with what to do when the journal cannot be read."""
    from .. import journal_read

    try:
        return journal_read.read(since, journal_dir, events=events, until=until, matches=matches)
    except ImportError as exc:
        raise RuntimeError(f"python3-systemd is missing ({exc})") from None
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None


MODES = ("GPU", "CPU", "BLOCKED")


def ignored_note(ignored):
    """The line saying that entries were left out, or None."""
    if not ignored:
        return None
    return (f"{ignored} journal entr{'y' if ignored == 1 else 'ies'} ignored: written with the router's fields by "
            f"a process that may not write them (another member's job, or the agent's events not from the agent)")


JOURNAL_GROUPS = ("systemd-journal", "adm", "wheel")


def visibility():
    """None when this user reads every user's journal entries; else why not and what to do. journald gives a
    user outside these groups only their own entries, silently: counts would be short without saying so."""
    if os.geteuid() == 0:
        return None
    import grp

    have = set()
    for gid in set(os.getgroups()) | {os.getegid()}:
        try:
            have.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    if have & set(JOURNAL_GROUPS):
        return None
    return ("partial view: this user sees only its own journal entries, not the jobs of other users; run as "
            "root or as a member of group systemd-journal (adduser USER systemd-journal)")


def summarize(events):
    """Counts per workload: decisions by mode and reason, outcomes by result, plus advice (pure)."""
    per = {}
    for e in events:
        if e.get("GPU_ROUTER_EVENT") == "vram-foreign":
            continue  # the GPU's, not a workload's: foreign()
        name = e.get("GPU_ROUTER_WORKLOAD", "?")
        w = per.setdefault(name, {"GPU": 0, "CPU": 0, "BLOCKED": 0, "reasons": {}, "results": {},
                                  "probe_failed": 0, "underpredicted": 0, "underpredicted_max_ratio": None,
                                  "cuda_oom": {}, "after_oom": {}})
        kind = e.get("GPU_ROUTER_EVENT")
        if kind in ("routed", "blocked"):
            mode = e.get("GPU_ROUTER_MODE", "?")
            if mode in MODES:  # a member's own event may name anything: it never becomes a key of w
                w[mode] += 1
            reason = f"{mode}:{e.get('GPU_ROUTER_REASON', '?')}"
            w["reasons"][reason] = w["reasons"].get(reason, 0) + 1
            if str(e.get("GPU_ROUTER_REASON", "")).startswith("cuda-oom"):  # what the fallback did (issue 18)
                w["after_oom"][reason] = w["after_oom"].get(reason, 0) + 1
        elif kind == "job-finished":
            result = e.get("GPU_ROUTER_RESULT", "?")
            w["results"][result] = w["results"].get(result, 0) + 1
            if result == "cuda-oom":
                cause = e.get("GPU_ROUTER_OOM_CAUSE", "?")
                w["cuda_oom"][cause] = w["cuda_oom"].get(cause, 0) + 1
        elif kind == "probe-failed":
            w["probe_failed"] += 1
        elif kind == "vram-underpredicted":
            w["underpredicted"] += 1
            try:
                ratio = float(e["GPU_ROUTER_MEASURED_VRAM_MB"]) / float(e["GPU_ROUTER_PREDICTED_VRAM_MB"])
            except (KeyError, ValueError, ZeroDivisionError, TypeError, OverflowError):
                ratio = None
            if ratio is not None and not 0 <= ratio < float("inf"):
                ratio = None
            if ratio is not None and (w["underpredicted_max_ratio"] is None or ratio > w["underpredicted_max_ratio"]):
                w["underpredicted_max_ratio"] = round(ratio, 3)
    for name, w in per.items():
        w["advice"] = advice(w)
    return per


def foreign(events, reserve_mb=None):
    """Per GPU, other users' processes the agent saw take VRAM (vram-foreign): how often, the largest, and advice
    when the configured reserve_mb would not hold that much back (pure)."""
    per = {}
    for e in events:
        if e.get("GPU_ROUTER_EVENT") != "vram-foreign":
            continue
        try:
            used = int(float(e.get("GPU_ROUTER_USED_VRAM_MB", "")))
        except (ValueError, TypeError, OverflowError):
            continue
        g = per.setdefault(str(e.get("GPU_ROUTER_DEVICE", "?")), {"events": 0, "largest_mb": 0, "largest_comm": None})
        g["events"] += 1
        if used > g["largest_mb"]:
            g["largest_mb"], g["largest_comm"] = used, e.get("GPU_ROUTER_COMM")
    for g in per.values():
        g["advice"] = []
        if reserve_mb is not None and g["largest_mb"] > reserve_mb:
            g["advice"].append(
                f"other processes took up to {g['largest_mb']} MiB on this GPU ({g['largest_comm'] or '?'}); one "
                f"that allocates just after a job's admission can make that job fail with a CUDA OOM: if they "
                f"are regular, set [gpu] reserve_mb = {g['largest_mb']} (now {reserve_mb})")
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
    if w.get("underpredicted"):
        worst = w.get("underpredicted_max_ratio")
        tips.append(f"WARNING: {w['underpredicted']} job(s) used more VRAM than predicted"
                    + (f" (up to {worst:.2f}x)" if worst else "") + ": the model under-predicts and jobs risk CUDA "
                    "OOM; run `gpu-router calibrate --workload NAME` to widen it from the recorded samples")
    if w.get("cuda_oom"):
        n = sum(w["cuda_oom"].values())
        causes = ", ".join(f"{k} {v}" for k, v in sorted(w["cuda_oom"].items()))
        tips.append(f"{n} GPU job(s) ran out of GPU memory ({causes}): their inputs go where on_gpu_oom says on "
                    "a retry; run `gpu-router calibrate --workload NAME` to raise the model above them")
    if w["probe_failed"]:
        tips.append(f"{w['probe_failed']} probe failure(s): `gpu-router explain FILE` on such an input")
    if cpu and gpu and cpu > gpu * 3:
        tips.append("most jobs go to the CPU: check the threshold against `gpu-router calibrate` samples")
    return tips


def cmd_stats(args):
    from .common import emit

    import sys

    try:
        events, ignored = read_events(args.since, args.directory)
    except (OSError, RuntimeError) as exc:
        sys.stderr.write(f"gpu-router: cannot read the journal: {_t(exc)}\n")
        return 1
    per = summarize(events)
    partial = visibility()
    lines = [f"since {_t(args.since)}: {len(events)} events"]
    if partial:
        lines.insert(0, f"note: {partial}")
        sys.stderr.write(f"gpu-router: {partial}\n")
    note = ignored_note(ignored)
    if note:
        lines.append(f"note: {note}")
    try:
        from .. import config as _config

        reserve_mb = _config.load(getattr(args, "config", None)).gpu.reserve_mb
    except Exception:  # noqa: BLE001 - stats read the journal; a config it cannot load only costs that advice
        reserve_mb = None
    gpus = foreign(events, reserve_mb)
    for name, w in sorted(per.items()):
        lines.append(f"{_t(name)}: GPU {w['GPU']}, CPU {w['CPU']}, BLOCKED {w['BLOCKED']}, probe failures "
                     f"{w['probe_failed']}" + (f", VRAM under-predicted {w['underpredicted']}"
                                               if w["underpredicted"] else ""))
        if w["results"]:
            lines.append("  outcomes: " + ", ".join(f"{_t(k)} {v}" for k, v in sorted(w["results"].items())))
        if w["reasons"]:
            lines.append("  reasons:  " + ", ".join(f"{_t(k)} {v}" for k, v in sorted(w["reasons"].items())))
        if w["cuda_oom"] or w["after_oom"]:
            lines.append(f"  GPU OOMs: {sum(w['cuda_oom'].values())} ("
                         + ", ".join(f"{_t(k)} {v}" for k, v in sorted(w["cuda_oom"].items())) + "); their retries: "
                         + (", ".join(f"{_t(k)} {v}" for k, v in sorted(w["after_oom"].items())) or "none yet"))
        gate = _gate(getattr(args, "config", None), name)
        if gate:
            w["advice"].append(gate)
        lines += [f"  advice:   {_t(t)}" for t in w["advice"]]
    for index, g in sorted(gpus.items()):
        lines.append(f"GPU {_t(index)}: other users' processes took VRAM {g['events']} time(s), the largest "
                     f"{g['largest_mb']} MiB ({_t(g['largest_comm'] or '?')})")
        lines += [f"  advice:   {_t(t)}" for t in g["advice"]]
    data = {"since": args.since, "events": len(events), "workloads": per, "foreign": gpus,
            "partial": partial is not None, "note": partial, "ignored": ignored}
    code = 0
    if args.chart:
        from . import charts

        try:
            data["chart"] = charts.distribution(args.chart, metrics_by_mode(events))
            lines.append(f"chart: {args.chart}")
        except charts.ChartError as exc:
            sys.stderr.write(f"gpu-router: stats: no chart: {exc}\n")
            data["chart"], code = None, 1
    emit(args, data, "\n".join(lines))
    return code


def _gate(config_file, name):
    """calibrate.predictive_gate on the workload's recorded samples, or None (no config, no such profile)."""
    try:
        from .. import config as _config
        from . import calibrate

        cfg = _config.load(config_file)
        w = cfg.workload(name)
        return calibrate.predictive_gate(calibrate.read_samples(calibrate.samples_path(cfg, name)), w.admission)
    except Exception:  # noqa: BLE001 - advice only: stats read the journal whatever the config says
        return None


def metrics_by_mode(events):
    """{workload: {"unit", "threshold", "GPU": [metric…], "CPU": […], "BLOCKED": […]}} from decision events (the
    first value of each; unknown metrics are left out)."""
    out = {}
    for e in events:
        if e.get("GPU_ROUTER_EVENT") not in ("routed", "blocked"):
            continue
        w = out.setdefault(e.get("GPU_ROUTER_WORKLOAD", "?"), {"unit": None, "threshold": None, "GPU": [],
                                                                "CPU": [], "BLOCKED": []})
        mode = e.get("GPU_ROUTER_MODE")
        try:
            value = float(str(e.get("GPU_ROUTER_METRIC", "")).split(",")[0])
        except ValueError:
            continue
        if mode not in MODES or not -float("inf") < value < float("inf"):
            continue
        w["unit"] = str(e.get("GPU_ROUTER_UNIT") or "").split(",")[0] or w["unit"]
        try:
            threshold = float(str(e.get("GPU_ROUTER_THRESHOLD", "")).split(",")[0])
            if -float("inf") < threshold < float("inf"):
                w["threshold"] = threshold
        except ValueError:
            pass
        w[mode].append(value)
    return out


def register(sub, command):
    c = command("stats", "GPU/CPU/BLOCKED counts and outcomes from the journal, with advice")
    c.add_argument("--since", default="-1d", help="from when, as journalctl --since takes it: --since=-1h, --since=today, '2026-01-31 08:00' "
                                                  "(default: -1d)")
    c.add_argument("--directory", "-D", help="read journal files from this directory")
    c.add_argument("--chart", metavar="FILE", help="also draw the jobs' metrics by decision against the threshold "
                                                    "(.png/.svg/.pdf; needs python3-matplotlib)")
    from . import listing

    listing.add_output_options(c, header=False)
    c.set_defaults(func=cmd_stats)
