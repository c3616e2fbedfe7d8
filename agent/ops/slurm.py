"""`gpu-router slurm-conf`: the slurm.conf / gres.conf settings that make Slurm count this host's slots.

Slurm decides which host runs a job; gpu-router decides, on that host, GPU or CPU and whether there is room. If
Slurm starts more jobs on a host than gpu-router has slots, the excess exits with the retry code and Slurm's
``RequeueExit`` puts it back (6–9 s per retry with ``AuthInfo=cred_expire=5``, 2–3 minutes with stock settings).
So Slurm should count the same slots: one count-only GRES per pool and workload (no device files needed, unlike
``gpu``/``shard``), sized from the figures ``gpu-router check`` uses, and ``RequeueExit`` for what Slurm cannot
see (a job started outside Slurm, VRAM taken by a foreign process). See docs/fleet.md.

What is printed is applied as it is: the node line carries CPUs and RealMemory (nproc, /proc/meminfo) and
replaces the site's own; the settings are merged with the live slurm.conf's values (``slurmconf``);
``--print slurm.conf|gres.conf`` writes the whole merged file; ``--check`` says what the live files lack.

``--request FILE`` prints the option a submitter passes for one input (``--gres=gr_NAME_gpu:1`` or ``_cpu``):
the routing decision by threshold or predicted VRAM, without looking at free slots. It fails closed: when it
cannot decide it prints ``REFUSED``, an option sbatch rejects, and exits non-zero with the reason on stderr.
"""

import os
import re
import socket
import sys

from .. import config as _config
from .. import policy
from . import host, slurmconf

REFUSED = "--gpu-router-request-failed"   # sbatch stops on an unknown option: `sbatch $(…)` submits nothing
SCHED = "sched_interval=2"
AUTH = "cred_expire=5"


def gres_name(workload, pool):
    """A GRES / license name Slurm accepts (letters, digits, underscores): gr_<workload>_<gpu|cpu>."""
    return "gr_" + re.sub(r"[^A-Za-z0-9]+", "_", workload).strip("_").lower() + "_" + pool


def host_figures(cfg):
    """(gpus, gpu_vram_mb, ram_mb, gpu_state): what `gpu-router check` counts with (ops/host.py)."""
    gpus, gpu_state = host.snapshot_gpus(cfg)
    h = host.figures(cfg, gpus)
    return h.gpus, h.vram_mb, h.ram_mb, gpu_state


def node_figures():
    """(CPUs, RealMemory MiB) as slurmd itself finds them: every CPU of the host, MemTotal."""
    return host.cpu_figures()


def conf(cfg, names, node=None, live=None):
    """Everything slurm-conf prints, as data; merged with the live slurm.conf at `live` when it can be read."""
    count, vram, ram, gpu_state = host_figures(cfg)
    cpus, memory_mb = node_figures()
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
    gres = [f"{p['gres']}:{p['count']}" for p in pools]
    wanted = {"GresTypes": ",".join(p["gres"] for p in pools), "RequeueExit": ",".join(map(str, sorted(codes))),
              "AuthInfo": AUTH, "SchedulerParameters": SCHED}
    values, node_line, live_error = dict(wanted), None, None
    live = live or slurmconf.conf_path()
    try:
        entries = slurmconf.read(live)
        values = slurmconf.merged_settings(entries, wanted)
        lines = slurmconf.node_lines(entries, node)
        if len(lines) == 1:
            node_line = slurmconf.merged_node_line(lines[0], node, cpus, memory_mb, gres, entries)
    except slurmconf.SlurmConfError as exc:
        live_error = str(exc)
    node_line = node_line or slurmconf.merged_node_line(None, node, cpus, memory_mb, gres, [])
    slurm_conf = [node_line] + [f"{k}={v}" for k, v in values.items()]
    gres_conf = [f"NodeName={node} Name={p['gres']} Count={p['count']}" for p in pools]
    return {"node": node, "gpus": count, "gpu_vram_mb": vram, "ram_mb": ram, "gpu_state": gpu_state,
            "cpus": cpus, "real_memory_mb": memory_mb, "pools": pools, "gres": gres, "wanted": wanted,
            "slurm_conf": slurm_conf, "gres_conf": gres_conf, "live": live, "live_error": live_error,
            "licenses": f"Licenses={','.join(gres)}", "requeue_exit": sorted(codes), "problems": problems}


def render(data):
    merged = data["live_error"] is None
    lines = [f"# gpu-router slurm-conf for {data['node']}: {data['cpus']} CPUs (nproc), {data['real_memory_mb']} "
             f"MiB RAM (/proc/meminfo), {data['gpus']} GPU(s) of "
             f"{data['gpu_vram_mb'] if data['gpu_vram_mb'] is not None else 'unknown'} MiB "
             f"(GPU state {data['gpu_state']}), from `gpu-router check`.",
             "# Apply as it is: `gpu-router slurm-conf --print slurm.conf > FILE` (and `--print gres.conf`) "
             "write the live files with all this merged in;",
             "# then restart slurmctld and every slurmd (a new GRES needs both); `--check` says what is missing.",
             "",
             "# slurm.conf, this node's line. It REPLACES the node's own NodeName line (a second one stops "
             "slurmctld: Duplicated NodeHostName):",
             data["slurm_conf"][0],
             ("# slurm.conf, settings merged with the site's own values in " + data["live"]
              + " (replace those lines: Slurm keeps only the last of a repeated key):") if merged else
             (f"# slurm.conf, settings ({data['live_error']}): MERGE them into the site's own lines of the same "
              "keys, never add a second line (Slurm keeps only the last):")]
    lines += data["slurm_conf"][1:]
    lines += ["", "# gres.conf on this node (count-only GRES: no device files):"] + data["gres_conf"]
    lines += ["", "# One-node cluster? Licenses count the same slots without gres.conf (cluster-wide):",
              f"# {data['licenses']}", "",
              "# Submit each job with its pool's GRES; the line stops when no pool can be decided:",
              "#   opt=$(gpu-router slurm-conf --request INPUT -w WORKLOAD) && sbatch $opt --open-mode=append ..."]
    for p in data["pools"]:
        lines.append(f"#   --gres={p['gres']}:1   ({p['workload']}, {p['pool']} pool)")
    lines += [f"! {p}" for p in data["problems"]]
    return "\n".join(lines)


# ---- --request ---------------------------------------------------------------------------------------------------

class Undecided(Exception):
    """--request cannot name a pool; the message says what the submit host lacks."""


def pick_workload(cfg, name, command):
    """-w NAME, else the profile whose binary (or wrapped name) is `command`, else the only profile."""
    if name:
        return cfg.workload(name)
    if command:
        base = os.path.basename(command)
        found = [w for w in cfg.workloads.values()
                 if base in (w.name, os.path.basename(w.binary),
                             re.sub(r"\.(distrib|real)$", "", os.path.basename(w.binary)))]
        if len(found) == 1:
            return found[0]
        raise Undecided(f"{len(found) or 'no'} workload profiles run {base!r}"
                        + (f" ({', '.join(sorted(w.name for w in found))})" if found else "")
                        + ": name one with --workload")
    if len(cfg.workloads) == 1:
        return next(iter(cfg.workloads.values()))
    raise Undecided(f"{len(cfg.workloads) or 'no'} workload profiles here ("
                    f"{', '.join(sorted(cfg.workloads)) or 'none'}): name one with --workload or --command")


def request(cfg, workload, path):
    """The GRES a job with this input takes: the pool gpu-router will route it to (slots not looked at).
    The input must be readable here: a probe that fails here is not a CPU job, it is no decision."""
    from ..wrapper.probe import ProbeFailed, measure
    w = cfg.workload(workload)
    if not os.path.exists(path):
        raise Undecided(f"{path}: no such input on this host (the submit host must see the job's input)")
    try:
        values = measure(w, path)
    except ProbeFailed as exc:
        raise Undecided(f"{path}: the {w.name} probe cannot measure it here ({exc}); the submit host needs the "
                        f"input readable and the probe's tools") from None
    gpus, _state = host.snapshot_gpus(cfg)
    plan = policy.plan(w, values, gpus, None, cfg.gpu.reserve_mb)
    pool = "gpu" if plan.mode == "GPU" and w.max_gpu_jobs else "cpu"
    return {"workload": w.name, "input": path, "pool": pool, "reason": plan.reason, "gres": gres_name(w.name, pool),
            "sbatch": f"--gres={gres_name(w.name, pool)}:1", "license": f"-L {gres_name(w.name, pool)}:1"}


def cmd_request(args):
    """Print the option; when undecided print REFUSED (sbatch stops on it) and exit 2, the reason on stderr."""
    from .common import emit

    try:
        cfg = _config.load(args.config)
        w = pick_workload(cfg, args.workload, args.command)
        data = request(cfg, w.name, args.request)
    except (Undecided, _config.ConfigError, OSError) as exc:
        reason = f"config error: {exc}" if isinstance(exc, _config.ConfigError) else str(exc)
        sys.stderr.write(f"gpu-router slurm-conf --request: {reason}; printed {REFUSED} so that sbatch "
                         f"submits nothing\n")
        emit(args, {"error": reason, "sbatch": REFUSED, "license": REFUSED}, REFUSED)
        return 2
    emit(args, data, data["license"] if args.licenses else data["sbatch"])
    return 0


# ---- the command ----------------------------------------------------------------------------------------------

def cmd_slurm_conf(args):
    from .common import emit

    if args.request:
        return cmd_request(args)
    cfg = _config.load(args.config)
    names = [args.workload] if args.workload else sorted(cfg.workloads)
    if not names:
        raise _config.ConfigError("no workload profiles configured", cfg.path)
    data = conf(cfg, names, args.node, args.slurm_conf)
    bad = any("negative" in p for p in data["problems"])
    if args.print:
        try:
            if args.print == "slurm.conf":
                text = slurmconf.merged_conf(data["live"], data["node"], data["cpus"], data["real_memory_mb"],
                                             data["gres"], data["wanted"])
            else:
                text = slurmconf.merged_gres_conf(slurmconf.gres_conf_path(data["live"]), data["node"],
                                                  data["gres_conf"])
        except (slurmconf.SlurmConfError, OSError) as exc:
            sys.stderr.write(f"gpu-router slurm-conf: {exc}\n")
            return 1
        sys.stdout.write(text)
        for problem in data["problems"] if bad else ():
            sys.stderr.write(f"gpu-router slurm-conf: {problem} (exit 1, as check)\n")
        return 1 if bad else 0
    if args.check:
        return check(args, data)
    emit(args, data, render(data))
    return 1 if bad else 0


def check(args, data):
    """--check: the live files against this host's figures; exit 1 when something is wrong."""
    from .common import emit

    try:
        problems, notes = slurmconf.check(data["live"], data["node"], data["cpus"], data["gres"], data["wanted"])
    except slurmconf.SlurmConfError as exc:
        problems, notes = [str(exc)], []
    problems = data["problems"] + problems
    result = {"slurm_conf": data["live"], "node": data["node"], "problems": problems, "notes": notes,
              "ok": not problems}
    text = [f"{data['live']} for {data['node']}: " + ("ok" if not problems else f"{len(problems)} problem(s)")]
    text += [f"! {p}" for p in problems] + [f"  note: {n}" for n in notes]
    if problems:
        text.append("  `gpu-router slurm-conf --print slurm.conf` (and gres.conf) prints the files merged")
    emit(args, result, "\n".join(text))
    return 1 if problems else 0


def register(sub, command):
    c = command("slurm-conf", "slurm.conf / gres.conf settings that make Slurm count this host's slots")
    c.add_argument("--workload", "-w")
    c.add_argument("--node", help="the NodeName (or host list, for alike nodes) to print (default: this host)")
    c.add_argument("--slurm-conf", metavar="FILE", help="the live slurm.conf (default: $SLURM_CONF, else "
                   "/etc/slurm/slurm.conf)")
    c.add_argument("--print", choices=("slurm.conf", "gres.conf"),
                   help="print the whole live file with gpu-router's settings merged in")
    c.add_argument("--check", action="store_true", help="say what the live slurm.conf/gres.conf lack or "
                   "repeat; exit 1 when something is wrong")
    c.add_argument("--request", metavar="INPUT", help="print the sbatch option for one job's input instead")
    c.add_argument("--command", metavar="NAME", help="with --request: the workload whose binary this is")
    c.add_argument("--licenses", action="store_true", help="with --request: the -L form (one-node clusters)")
    c.set_defaults(func=cmd_slurm_conf)
