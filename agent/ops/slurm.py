"""`gpu-router slurm-conf`: the slurm.conf / gres.conf lines that make Slurm count this host's slots.

Slurm decides which host runs a job; gpu-router decides, on that host, GPU or CPU and whether there is room. If
Slurm starts more jobs on a host than gpu-router has slots, the excess exits with the retry code and Slurm's
``RequeueExit`` puts it back (6–9 s per retry with ``AuthInfo=cred_expire=5``, 2–3 minutes with stock settings).
So Slurm should count the same slots: one count-only GRES per pool and workload (no device files needed, unlike
``gpu``/``shard``), sized from the figures ``gpu-router check`` uses, and ``RequeueExit`` for what Slurm cannot
see (a job started outside Slurm, VRAM taken by a foreign process). See docs/fleet.md.

``--request FILE`` prints the option a submitter passes for one input (``--gres=gr_NAME_gpu:1`` or ``_cpu``):
the routing decision by threshold or predicted VRAM, without looking at free slots.
"""

import re
import socket

from .. import config as _config
from .. import policy


def gres_name(workload, pool):
    """A GRES / license name Slurm accepts (letters, digits, underscores): gr_<workload>_<gpu|cpu>."""
    return "gr_" + re.sub(r"[^A-Za-z0-9]+", "_", workload).strip("_").lower() + "_" + pool


def host_figures(cfg):
    """(gpus, gpu_vram_mb, ram_mb, gpu_state): what `gpu-router check` counts with."""
    from . import cli

    gpus, gpu_state = cli._gpus(cfg)
    return (*cli.host_figures(cfg, gpus), gpu_state)


def conf(cfg, names, node=None):
    """Everything slurm-conf prints, as data."""
    count, vram, ram, gpu_state = host_figures(cfg)
    node = node or socket.gethostname().split(".")[0]
    pools, problems, codes = [], [], set()
    for name in names:
        w = cfg.workload(name)
        b = policy.budget(w, vram, count, ram, cfg.host.other_ram_mb)
        problems += [f"{name}: {p}" for p in policy.budget_problems(w, b)]
        codes.add(w.retry_exit_code)
        if w.max_gpu_jobs and count:
            pools.append({"workload": name, "pool": "gpu", "gres": gres_name(name, "gpu"),
                          "count": w.max_gpu_jobs * count, "per_gpu": w.max_gpu_jobs})
        if w.max_cpu_jobs:
            pools.append({"workload": name, "pool": "cpu", "gres": gres_name(name, "cpu"),
                          "count": w.max_cpu_jobs})
    gres = ",".join(f"{p['gres']}:{p['count']}" for p in pools)
    requeue = ",".join(str(c) for c in sorted(codes))
    slurm_conf = [f"GresTypes={','.join(p['gres'] for p in pools)}",
                  f"NodeName={node} Gres={gres}",
                  f"RequeueExit={requeue}",
                  "AuthInfo=cred_expire=5",
                  "SchedulerParameters=sched_interval=2"]
    gres_conf = [f"NodeName={node} Name={p['gres']} Count={p['count']}" for p in pools]
    return {"node": node, "gpus": count, "gpu_vram_mb": vram, "ram_mb": ram, "gpu_state": gpu_state,
            "pools": pools, "slurm_conf": slurm_conf, "gres_conf": gres_conf,
            "licenses": f"Licenses={gres}", "requeue_exit": sorted(codes), "problems": problems}


def request(cfg, workload, path):
    """The GRES a job with this input takes: the pool gpu-router will route it to (slots not looked at)."""
    from ..wrapper.probe import ProbeFailed, measure
    from .cli import _gpus

    w = cfg.workload(workload)
    try:
        values = measure(w, path)
    except ProbeFailed:
        values = None
    gpus, _state = _gpus(cfg)
    plan = policy.plan(w, values, gpus, None, cfg.gpu.reserve_mb)
    pool = "gpu" if plan.mode == "GPU" and w.max_gpu_jobs else "cpu"
    return {"workload": w.name, "input": path, "pool": pool, "reason": plan.reason, "gres": gres_name(w.name, pool),
            "sbatch": f"--gres={gres_name(w.name, pool)}:1", "license": f"-L {gres_name(w.name, pool)}:1"}


def render(data):
    lines = [f"# From `gpu-router check` on {data['node']}: {data['gpus']} GPU(s), "
             f"{data['gpu_vram_mb'] if data['gpu_vram_mb'] is not None else 'unknown'} MiB VRAM each "
             f"(GPU state {data['gpu_state']}).",
             "# slurm.conf (controller and every node; merge Gres= into this node's NodeName line):"]
    lines += data["slurm_conf"]
    lines += ["", "# gres.conf on this node (count-only GRES: no device files):"] + data["gres_conf"]
    lines += ["", "# One-node cluster? Licenses count the same slots without gres.conf (cluster-wide):",
              f"# {data['licenses']}", "",
              "# Submit each job with its pool's GRES (`gpu-router slurm-conf --request INPUT` prints it):"]
    for p in data["pools"]:
        lines.append(f"#   sbatch --gres={p['gres']}:1 --open-mode=append ...   ({p['workload']}, {p['pool']} pool)")
    lines += [f"! {p}" for p in data["problems"]]
    return "\n".join(lines)


def cmd_slurm_conf(args):
    from .cli import _emit, _pick_workload

    cfg = _config.load(args.config)
    if args.request:
        w = _pick_workload(cfg, args.workload)
        data = request(cfg, w.name, args.request)
        _emit(args, data, data["license"] if args.licenses else data["sbatch"])
        return 0
    names = [args.workload] if args.workload else sorted(cfg.workloads)
    if not names:
        raise _config.ConfigError("no workload profiles configured", cfg.path)
    data = conf(cfg, names, args.node)
    _emit(args, data, render(data))
    return 1 if any("negative" in p for p in data["problems"]) else 0


def register(sub, command):
    c = command("slurm-conf", "slurm.conf / gres.conf lines that make Slurm count this host's slots")
    c.add_argument("--workload", "-w")
    c.add_argument("--node", help="the NodeName to print (default: this host's short name)")
    c.add_argument("--request", metavar="INPUT", help="print the sbatch option for one job's input instead")
    c.add_argument("--licenses", action="store_true", help="with --request: the -L form (one-node clusters)")
    c.set_defaults(func=cmd_slurm_conf)

