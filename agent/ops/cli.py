"""The operator's commands: explain, check, status, stats, wrap, unwrap. Not on the hot path.

Each command prints for a person by default and one JSON document with ``--json``; exit status 0 means "fine",
1 "a finding the operator must act on" (negative headroom), 2 a usage or config error.
"""

import argparse
import json
import os
import sys

from .. import config as _config
from .. import policy, slots
from ..wrapper.probe import ProbeFailed, find_input, measure


def _load(args):
    return _config.load(args.config)


def _pick_workload(cfg, name):
    if name:
        return cfg.workload(name)
    if len(cfg.workloads) == 1:
        return next(iter(cfg.workloads.values()))
    known = ", ".join(sorted(cfg.workloads)) or "none configured"
    raise _config.ConfigError(f"name a workload with --workload ({known})", cfg.path)


def _emit(args, data, text):
    if args.json:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")


def _gpus(cfg):
    from ..wrapper.run import read_gpus

    return read_gpus(cfg)


# ---- explain --------------------------------------------------------------------------------------------------

def cmd_explain(args):
    cfg = _load(args)
    w = _pick_workload(cfg, args.workload)
    job_args = list(args.args) if args.args else [args.file]
    path = find_input(w.input, job_args) if args.args else args.file
    values, probe_error = None, None
    try:
        values = measure(w, path)
    except ProbeFailed as exc:
        probe_error = {"reason": exc.reason, "message": str(exc)}
    gpus, gpu_state = _gpus(cfg)
    reservations = slots.live_reservations(cfg.router.lock_dir) if w.admission == "vram" else {}
    plan = policy.plan(w, values, gpus, reservations, cfg.gpu.reserve_mb)
    if plan.mode == "GPU" and gpus is None:
        plan.gpus = policy.assumed_gpus(cfg.host.gpus)
    free = _free_slots(cfg, w, plan)
    if probe_error and w.on_probe_error == "fail":
        mode, reason = "REFUSED", f"probe-failed ({probe_error['reason']}), on_probe_error = fail"
    elif plan.mode == "GPU" and not free["gpu"]:
        full = plan.full_reason or "gpu-slots-full"
        if plan.spill and free["cpu"]:
            mode, reason = "CPU", f"spill:{full}"
        else:
            mode, reason = "BLOCKED", full
    elif plan.mode == "CPU" and not free["cpu"]:
        mode, reason = "BLOCKED", "cpu-slots-full"
    else:
        mode, reason = plan.mode, plan.reason
    device = free["gpu"][0] if mode == "GPU" else ("cpu" if mode == "CPU" else None)
    args_out = (w.gpu_args if mode == "GPU" else w.cpu_args) if mode in ("GPU", "CPU") else []
    data = {
        "workload": w.name, "input": path, "probe": w.probe, "metric": values,
        "combined_metric": policy.combined_metric(w, values) if values is not None else None,
        "threshold": w.threshold, "unit": w.threshold_unit, "probe_error": probe_error,
        "gpu_state": gpu_state, "decision": mode, "reason": reason, "device": device,
        "predicted_vram_mb": plan.predicted_vram_mb, "free_gpu_slots": free["gpu"], "free_cpu_slots": free["cpu"],
        "memory_max_mb": policy.memory_max_mb(w, mode) if mode in ("GPU", "CPU") else None,
        "command": [w.binary] + (job_args if args.args else ["…", path]) + args_out,
    }
    metric = ", ".join(f"{v:g} {u}" for v, u in zip(policy.combined_metric(w, values), w.threshold_unit)) \
        if values is not None else f"unknown ({probe_error['message']})"
    limits = ", ".join(f"{t:g} {u}" for t, u in zip(w.threshold, w.threshold_unit))
    text = [f"workload   {w.name} ({w.source})", f"input      {path}", f"metric     {metric}",
            f"threshold  {limits} (GPU below, CPU at or above)", f"gpu state  {gpu_state}"]
    if plan.predicted_vram_mb is not None:
        text.append(f"vram       {plan.predicted_vram_mb} MiB predicted")
    text.append(f"decision   {mode}" + (f" {device}" if mode == "GPU" else "") + f"  ({reason})")
    text.append(f"free slots GPU {free['gpu'] or 'none'}, CPU {free['cpu']}")
    if mode in ("GPU", "CPU"):
        text.append(f"would run  {' '.join(data['command'])}")
    _emit(args, data, "\n".join(text))
    return 0


def _free_slots(cfg, w, plan):
    try:
        dir_fd = slots.open_lock_dir(cfg.router.lock_dir, create=False)
    except slots.LockDirError:
        return {"gpu": [g.index for g in plan.gpus] if w.max_gpu_jobs else [], "cpu": w.max_cpu_jobs}
    try:
        gpu = [g.index for g in plan.gpus
               if slots.holders(dir_fd, cfg.router.lock_dir, w.name, g.key, w.max_gpu_jobs) < w.max_gpu_jobs]
        cpu = w.max_cpu_jobs - slots.holders(dir_fd, cfg.router.lock_dir, w.name, "cpu", w.max_cpu_jobs)
    finally:
        os.close(dir_fd)
    return {"gpu": gpu, "cpu": cpu}


# ---- check ------------------------------------------------------------------------------------------------------

def system_ram_mb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def cmd_check(args):
    cfg = _load(args)
    names = [args.workload] if args.workload else sorted(cfg.workloads)
    if not names:
        sys.stderr.write(f"gpu-router: no workload profiles in {cfg.path} or its workloads.d/\n")
        return 1
    gpus, gpu_state = _gpus(cfg)
    vram = cfg.host.gpu_vram_mb
    vram_source = "config [host] gpu_vram_mb" if vram is not None else None
    if vram is None and gpus:
        totals = [g.total_mb for g in gpus if g.total_mb]
        if totals:
            vram, vram_source = min(totals), "detected (smallest GPU)"
    ram = cfg.host.ram_mb
    ram_source = "config [host] ram_mb" if ram is not None else "detected (/proc/meminfo)"
    if ram is None:
        ram = system_ram_mb()
    count = cfg.host.gpus if cfg.host.gpus is not None else (len(gpus) if gpus is not None else 1)
    results, lines, bad = {}, [], False
    for name in names:
        w = cfg.workload(name)
        b = policy.budget(w, vram, count, ram, cfg.host.other_ram_mb)
        b["gpu_vram_source"], b["ram_source"], b["gpus"] = vram_source, ram_source, count
        problems = policy.budget_problems(w, b)
        b["problems"] = problems
        bad |= any("negative" in p for p in problems)
        results[name] = b
        lines += _worksheet(w, b)
    _emit(args, {"gpu_state": gpu_state, "workloads": results, "ok": not bad}, "\n".join(lines))
    return 1 if bad else 0


def _mb(v):
    return "unknown" if v is None else f"{v} MB"


def _worksheet(w, b):
    out = [f"== {w.name} ({w.source})", "GPU path:",
           f"  VRAM per job:     {_mb(b['vram_per_job_mb'])}" + ("" if b["vram_per_job_mb"] is not None
                                                                  else " (vram_model = linear: see calibrate)"),
           f"  Max GPU jobs:     {b['max_gpu_jobs']} per GPU",
           f"  GPU VRAM:         {_mb(b['gpu_vram_mb'])}" + (f" [{b['gpu_vram_source']}]" if b["gpu_vram_source"]
                                                             else ""),
           f"  Headroom:         {_mb(b['vram_headroom_mb'])}" + _verdict(b["vram_headroom_mb"]),
           "CPU path:",
           f"  RAM per job:      {_mb(b['ram_per_job_mb'])}",
           f"  Max CPU jobs:     {b['max_cpu_jobs']}",
           f"  System RAM:       {_mb(b['ram_mb'])} [{b['ram_source']}]",
           f"  Other processes:  {_mb(b['other_ram_mb'])}",
           f"  Headroom:         {_mb(b['ram_headroom_mb'])}" + _verdict(b["ram_headroom_mb"]),
           f"systemd MemoryMax:  {_mb(b['suggested_memory_max_mb'])} suggested (max(GPU peak, CPU peak) + 20%)"]
    out += [f"  ! {p}" for p in b["problems"]]
    return out + [""]


def _verdict(headroom):
    if headroom is None:
        return ""
    return "  ok" if headroom >= 0 else "  NEGATIVE"


# ---- wrap / unwrap ----------------------------------------------------------------------------------------------

def cmd_wrap(args):
    from . import wrap

    cfg = _load(args)
    profile = cfg.workload(args.workload)
    result = wrap.wrap(args.binary, args.workload)
    if isinstance(result, dict) and result.get("real") and profile.binary != result["real"]:
        sys.stderr.write(f"gpu-router: note: profile {args.workload!r} runs {profile.binary}, but the wrapped "
                         f"binary now lives at {result['real']}: set binary = \"{result['real']}\"\n")
    _emit(args, result if isinstance(result, dict) else {"result": str(result)}, _describe(result))
    return 0


def cmd_unwrap(args):
    from . import wrap

    if not args.all and not args.binary:
        raise _config.ConfigError("name a BINARY or give --all")
    result = wrap.unwrap(args.binary, all=args.all, force=args.force)
    _emit(args, result if isinstance(result, dict) else {"result": str(result)}, _describe(result))
    return 0


def _describe(result):
    if isinstance(result, dict) and "message" in result:
        return result["message"]
    return str(result)


# ---- the parser ------------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(prog="gpu-router", description="Route GPU jobs by predicted memory.")
    p.add_argument("--config", help="config file (default: $GPU_ROUTER_CONFIG or /etc/gpu-router/config.toml)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--json", action="store_true", help="one JSON document on stdout")
        c.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return c

    sub.add_parser("run", help="run a job: gpu-router run --workload NAME -- ARGS...")
    c = command("explain", "probe an input and show the decision, running nothing")
    c.add_argument("file", help="the job's input")
    c.add_argument("--workload", "-w")
    c.add_argument("args", nargs=argparse.REMAINDER, help="-- the job's full arguments (the input is found in "
                                                          "them as the profile's `input` says)")
    c.set_defaults(func=cmd_explain)
    c = command("check", "the memory budget worksheet (VRAM and RAM headroom)")
    c.add_argument("--workload", "-w")
    c.set_defaults(func=cmd_check)
    c = command("wrap", "put gpu-router in place of a workload binary (dpkg-divert for packaged files)")
    c.add_argument("binary")
    c.add_argument("--workload", "-w", required=True)
    c.set_defaults(func=cmd_wrap)
    c = command("unwrap", "restore a wrapped binary exactly as it was")
    c.add_argument("binary", nargs="?")
    c.add_argument("--all", action="store_true", help="every binary gpu-router wrapped (used on purge)")
    c.add_argument("--force", action="store_true", help="restore even where the wrapped path was changed since")
    c.set_defaults(func=cmd_unwrap)
    for extra in _extra_commands():
        extra(sub, command)
    return p


def _extra_commands():
    """Commands that live in their own modules (status, stats, init, calibrate, slurm-conf)."""
    from . import calibrate, init, slurm, stats, status
    return [status.register, stats.register, init.register, calibrate.register, slurm.register]


def enable_site():
    """Give operator commands the system's site directories back (pynvml from pip in /usr/local, …).

    The launcher starts Python with -IS because the wrapper shares it (-S saves 2.5 ms per job); the operator's
    commands are not on that path. -I still keeps the user site and PYTHON* variables out.
    """
    if sys.flags.no_site:
        import site

        site.main()


def main(argv):
    enable_site()
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        if args.command == "run":
            from ..wrapper.run import main_run

            return main_run(argv[argv.index("run") + 1:])
        p.print_help()
        return 2
    if args.command == "explain" and args.args and args.args[0] == "--":
        args.args = args.args[1:]
    try:
        return args.func(args)
    except _config.ConfigError as exc:
        sys.stderr.write(f"gpu-router: config error: {exc}\n")
        return 2
    except slots.LockDirError as exc:
        sys.stderr.write(f"gpu-router: {exc}\n")
        return 69
    except BrokenPipeError:
        return 0
    except Exception as exc:  # wrap.WrapError without importing wrap for every command
        if type(exc).__name__ in ("WrapError", "UnwrapIncomplete"):
            sys.stderr.write(f"gpu-router: {exc}\n")
            return getattr(exc, "exit_code", 1)
        raise
