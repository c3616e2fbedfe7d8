"""`gpu-router status`: the GPUs as the agent last saw them, each workload's slots, and the jobs running now."""

import os
import time

from .. import config as _config
from .. import drainstate, slots


def collect(cfg):
    from .. import scope, snapshot

    snap, why = snapshot.read(cfg.gpu.snapshot, cfg.gpu.snapshot_max_age)
    data = {"snapshot": {"state": "ok" if snap else why,
                         "age_s": round(time.time() - snap["time"], 1) if snap else None,
                         "source": snap.get("source") if snap else None,
                         "error": snap.get("error") if snap else None},
            "gpus": snap.get("gpus", []) if snap else [], "workloads": {}, "scopes": []}
    drain = drainstate.read(cfg.agent.state_dir)
    data["drain"] = None if drain is None else {
        "action": drain.get("action"), "by": drain.get("by"), "reason": drain.get("reason") or None,
        "since": float(drain["since"]) if drain.get("since", "").replace(".", "", 1).isdigit() else None,
        "file": drainstate.path(cfg.agent.state_dir)}
    try:
        dir_fd = slots.open_lock_dir(cfg.router.lock_dir, create=False)
    except slots.LockDirError as exc:
        dir_fd, data["lock_dir_error"] = None, str(exc)
    reservations = slots.live_reservations(cfg.router.lock_dir)
    gpu_keys = [f"gpu{g['index']}" for g in data["gpus"]] or [f"gpu{i}" for i in range(cfg.host.gpus or 1)]
    for name, w in sorted(cfg.workloads.items()):
        entry = {"admission": w.admission, "max_gpu_jobs": w.max_gpu_jobs, "max_cpu_jobs": w.max_cpu_jobs,
                 "gpu_busy": {}, "cpu_busy": None}
        if dir_fd is not None:
            for key in gpu_keys:
                entry["gpu_busy"][key] = (len(reservations.get(key, ())) if w.max_gpu_jobs is None else
                                          slots.holders(dir_fd, cfg.router.lock_dir, name, key, w.max_gpu_jobs))
            entry["cpu_busy"] = slots.holders(dir_fd, cfg.router.lock_dir, name, "cpu", w.max_cpu_jobs)
        data["workloads"][name] = entry
    if dir_fd is not None:
        os.close(dir_fd)
    data["reservations"] = {k: [{"pid": p, "mb": mb} for p, mb in v] for k, v in reservations.items()}
    for unit, (cg, pids) in sorted(scope.running_scopes().items()):
        data["scopes"].append({"scope": unit, "cgroup": cg, "pids": pids})
    from . import live

    data["jobs"], data["waiting"] = live.running(cfg, data["gpus"], reservations)
    return data


def render(data, header=True):
    """The text of `status`; member-chosen names escaped (``termtext``); ``header``: the jobs table's header row."""
    from ..termtext import field as _t

    lines = []
    drain = data.get("drain")
    if drain:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(drain["since"])) if drain["since"] else "?"
        what = "run on the CPU" if drain["action"] == "cpu" else "exit with the retry code"
        lines.append(f"GPU admission: DRAINED since {since} by {_t(drain['by'])}" + (
            f" ({_t(drain['reason'])})" if drain["reason"] else "") + f": new GPU jobs {what}; gpu-router resume")
    snap = data["snapshot"]
    lines.append(f"GPU snapshot: {snap['state']}" + (f" ({snap['source']}, {snap['age_s']}s old)"
                                                     if snap["age_s"] is not None else ""))
    for g in data["gpus"]:
        health = "healthy" if g.get("healthy") else f"UNHEALTHY ({g.get('health')})"
        lines.append(f"  GPU {g['index']} {_t(g.get('name'))}: {g.get('used_mb', '?')}/{g.get('total_mb', '?')} MiB used "
                     f"(ours {g.get('ours_mb', 0)}, foreign {g.get('foreign_mb', 0)}), {health}")
    if "lock_dir_error" in data:
        lines.append(f"slots: {data['lock_dir_error']}")
    for name, w in data["workloads"].items():
        gpu = ", ".join(f"{k} {v}/{w['max_gpu_jobs'] if w['max_gpu_jobs'] is not None else 'vram'}"
                        for k, v in w["gpu_busy"].items()) or "-"
        cpu = "?" if w["cpu_busy"] is None else w["cpu_busy"]
        lines.append(f"{name} [{w['admission']}]: GPU slots {gpu}; CPU slots {cpu}/{w['max_cpu_jobs']} busy")
    for key, entries in data["reservations"].items():
        lines.append(f"  VRAM reserved on {key}: " + ", ".join(f"pid {e['pid']} {e['mb']} MiB" for e in entries))
    from . import live

    lines.append(live.render(data.get("jobs", []), data.get("waiting", []), header))
    lines.append(f"running scopes: {len(data['scopes'])}")
    for s in data["scopes"]:
        lines.append(f"  {s['scope']} pids {' '.join(map(str, s['pids']))}")
    return "\n".join(lines)


def cmd_status(args):
    import json
    import sys

    from ..termtext import block
    from .common import emit

    cfg = _config.load(args.config)
    if not args.watch:
        data = collect(cfg)
        emit(args, data, render(data, not args.no_header))
        return 0
    shown = 0
    tty = sys.stdout.isatty()
    try:
        while True:
            data = collect(cfg)
            if args.json:  # one JSON document a line, like `journalctl -o json`
                sys.stdout.write(json.dumps(data, sort_keys=True, default=str, ensure_ascii=False) + "\n")
            else:
                head = "" if args.no_header else \
                    f"every {args.watch:g}s: gpu-router status    {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
                sys.stdout.write(("\033[H\033[2J" if tty else "") + head + block(render(data, not args.no_header))
                                 + "\n" + ("" if tty else "\n"))
            sys.stdout.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def register(sub, command):
    c = command("status", "GPUs, drain state, slots, running jobs and the waiting queue now (like squeue)")
    c.add_argument("--watch", "-W", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C; with --json one document a line")
    c.add_argument("--count", "-n", type=int, default=0, help="with --watch: stop after this many refreshes")
    from . import listing

    listing.add_output_options(c)
    c.set_defaults(func=cmd_status)
