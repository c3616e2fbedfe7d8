"""What the operator's commands share: loading the config, picking the workload, printing (text or --json), the
budget worksheet. Its own module so that no command imports the command registry (cli.py) back (issue 20)."""

import json
import sys

from .. import config as _config


def load(args):
    return _config.load(args.config)


def pick_workload(cfg, name):
    if name:
        return cfg.workload(name)
    if len(cfg.workloads) == 1:
        return next(iter(cfg.workloads.values()))
    known = ", ".join(sorted(cfg.workloads)) or "none configured"
    raise _config.ConfigError(f"name a workload with --workload ({known})", cfg.path)


def emit(args, data, text):
    """One JSON document with --json (when there is data), else the text, made safe for a terminal."""
    if args.json and data is not None:
        json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str, ensure_ascii=False)
        sys.stdout.write("\n")
    else:  # names in it are member-chosen (inputs, journal fields): no control character reaches the terminal
        from ..termtext import block

        sys.stdout.write(block(text.rstrip("\n")) + "\n")


def _mb(v):
    return "unknown" if v is None else f"{v} MB"


def worksheet(w, b):
    """The lines `check` and `init` print for a budget (policy.budget plus its sources and problems)."""
    out = [f"== {w.name} ({w.source})", "GPU path:",
           f"  VRAM per job:     {_mb(b['vram_per_job_mb'])}" + ("" if b["vram_per_job_mb"] is not None
                                                                  else " (vram_model = linear: see calibrate)"),
           "  Max GPU jobs:     " + (f"{b['max_gpu_jobs']} per GPU" if b["max_gpu_jobs"] is not None
                                       else "no slot cap (admission = vram: as many as fit the VRAM)"),
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
