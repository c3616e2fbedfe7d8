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
from . import host, preflight
from .common import emit, load, pick_workload, worksheet


# ---- explain --------------------------------------------------------------------------------------------------

def cmd_explain(args):
    cfg = load(args)
    w = pick_workload(cfg, args.workload)
    job_args = list(args.args) if args.args else [args.file]
    path = find_input(w.input, job_args) if args.args else args.file
    values, probe_error = None, None
    viewer = _viewer(args.user)
    try:
        values = _measure_as(viewer, w, path)
    except ProbeFailed as exc:
        probe_error = {"reason": exc.reason, "message": str(exc)}
    gpus, gpu_state = host.snapshot_gpus(cfg)
    reservations = slots.live_reservations(cfg.router.lock_dir) if w.admission == "vram" else {}
    oom_entry, oom_how = _oom_before(cfg, w, path)
    after = policy.after_gpu_oom(w, oom_how, oom_entry[4] if oom_entry else None)
    plan = policy.plan(w, values, gpus, reservations, cfg.gpu.reserve_mb,
                       need_mb=oom_entry[4] if after and after[0] == "gpu" else None)
    if after and after[0] == "cpu":
        plan = policy.Plan("CPU", after[1])
    if plan.mode == "GPU" and gpus is None:
        plan.gpus = policy.assumed_gpus(cfg.host.gpus)
    free = _free_slots(cfg, w, plan)
    if probe_error and w.on_probe_error == "fail":
        mode, reason = "REFUSED", f"probe-failed ({probe_error['reason']}), on_probe_error = fail"
    elif after and after[0] == "fail":
        mode, reason = "REFUSED", f"{after[1]}, on_gpu_oom = fail"
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
    problems = preflight.problems(w, _budget(cfg, w, gpus))
    data = {
        "workload": w.name, "input": path, "probe": w.probe, "metric": values,
        "combined_metric": policy.combined_metric(w, values) if values is not None else None,
        "threshold": w.threshold, "unit": w.threshold_unit, "probe_error": probe_error,
        "gpu_state": gpu_state, "decision": mode, "reason": reason, "device": device,
        "predicted_vram_mb": plan.predicted_vram_mb, "free_gpu_slots": free["gpu"], "free_cpu_slots": free["cpu"],
        "memory_max_mb": policy.memory_max_mb(w, mode) if mode in ("GPU", "CPU") else None,
        "command": [w.binary] + (job_args if args.args else ["…", path]) + args_out,
        "probed_as": viewer, "problems": problems,
        "oom_before": None if oom_entry is None else dict(_oom_fields(oom_entry), how=oom_how),
    }
    metric = ", ".join(f"{_n(v)} {u}" for v, u in zip(policy.combined_metric(w, values), w.threshold_unit)) \
        if values is not None else f"unknown ({probe_error['message']})"
    limits = ", ".join(f"{_n(t)} {u}" for t, u in zip(w.threshold, w.threshold_unit))
    who = f"{viewer['user']} (uid {viewer['uid']})"
    text = [f"workload   {w.name} ({w.source})",
            f"input      {path if path is not None else '(none found among the arguments)'}",
            f"probed as  {who}" + ("" if args.user else "; the job probes as its caller: --user USER to see "
                                                         "the runner's view"),
            f"metric     {metric}",
            f"threshold  {limits} (GPU below, CPU at or above)", f"gpu state  {gpu_state}"]
    if plan.predicted_vram_mb is not None:
        text.append(f"vram       {plan.predicted_vram_mb} MiB predicted")
    if oom_entry is not None:
        import time

        o = data["oom_before"]
        what = "ran out of GPU memory" if oom_how == "oom" else "suspected to have run out of GPU memory"
        text.append(f"oom before {what} on GPU {o['device']} at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(o['ended']))} (job {o['job']}: "
                    f"{o['peak_mb']} MiB of {o['total_mb']}, needs more than {o['need_mb']} MiB); "
                    f"on_gpu_oom = {w.on_gpu_oom}")
    text.append(f"decision   {mode}" + (f" {device}" if mode == "GPU" else "") + f"  ({reason})")
    text.append("free slots " + _free_text(w, plan, free))
    if mode in ("GPU", "CPU"):
        text.append(f"would run  {' '.join(str(a) for a in data['command'])}")
    text += [f"  ! {p}" for p in problems]
    emit(args, data, "\n".join(text))
    return 0


def _oom_fields(entry):
    from .. import oom_memory

    return oom_memory.entry_dict(entry)


def _n(value):
    """A number as an operator writes it: 5000000, 3600, 120.032 (not 5e+06)."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}" if abs(value) >= 1e-4 else f"{value:g}"


def _free_text(w, plan, free):
    cpu = f"CPU {free['cpu']} of {w.max_cpu_jobs}"
    if plan.mode != "GPU":
        return cpu
    gpu = ", ".join(str(i) for i in free["gpu"]) if free["gpu"] else "none"
    return f"GPU {gpu} (of {w.max_gpu_jobs} per GPU); {cpu}"


def _viewer(user):
    """Whose view a probe takes: this process's, or ``--user``'s (uid, gid, name)."""
    import pwd

    if user is None:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return {"user": name, "uid": uid}
    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise _config.ConfigError(f"--user {user}: no such user") from None
    if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
        raise _config.ConfigError(f"--user {user}: probing as another user needs root")
    return {"user": entry.pw_name, "uid": entry.pw_uid, "gid": entry.pw_gid}


def _measure_as(viewer, w, path):
    """measure() as ``viewer``: in a child that drops to the user's uid, gid and groups when it is not us."""
    if viewer["uid"] == os.geteuid():
        return measure(w, path)
    import pwd

    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(pwd.getpwuid(viewer["uid"]).pw_name, viewer["gid"]))
            os.setgid(viewer["gid"])
            os.setuid(viewer["uid"])
            try:
                out = {"values": measure(w, path)}
            except ProbeFailed as exc:
                out = {"reason": exc.reason, "message": str(exc)}
            os.write(wfd, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(r, "rb") as f:
        blob = f.read()
    os.waitpid(pid, 0)
    try:
        out = json.loads(blob)
    except ValueError:
        raise ProbeFailed("probe-failed", f"could not probe as {viewer['user']}") from None
    if "values" in out:
        return out["values"]
    raise ProbeFailed(out["reason"], out["message"])


def _budget(cfg, w, gpus):
    h = host.figures(cfg, gpus)
    return policy.budget(w, h.vram_mb, h.gpus, h.ram_mb, cfg.host.other_ram_mb)


def _free_slots(cfg, w, plan):
    try:
        dir_fd = slots.open_lock_dir(cfg.router.lock_dir, create=False)
    except slots.LockDirError:
        return {"gpu": [g.index for g in plan.gpus] if w.max_gpu_jobs != 0 else [], "cpu": w.max_cpu_jobs}
    try:
        gpu = [g.index for g in plan.gpus if w.max_gpu_jobs is None  # vram mode, no slot cap: the plan's room says
               or slots.holders(dir_fd, cfg.router.lock_dir, w.name, g.key, w.max_gpu_jobs) < w.max_gpu_jobs]
        cpu = w.max_cpu_jobs - slots.holders(dir_fd, cfg.router.lock_dir, w.name, "cpu", w.max_cpu_jobs)
    finally:
        os.close(dir_fd)
    return {"gpu": gpu, "cpu": cpu}


# ---- check ------------------------------------------------------------------------------------------------------

def cmd_check(args):
    candidate = None
    if args.file:
        candidate = _candidate(args)
        main_path = _config.config_path(args.config)
        cfg = _config.build(_config.parse(main_path, candidate=candidate))
        cfg.path = main_path
    else:
        cfg = _config.build(_config.parse(_config.config_path(args.config)))  # what the next job will read
    names = [args.workload] if args.workload else sorted(cfg.workloads)
    if not names:
        sys.stderr.write(f"gpu-router: no workload profiles in {cfg.path} or its workloads.d/\n")
        return 1
    gpus, gpu_state = host.snapshot_gpus(cfg)
    h = host.figures(cfg, gpus)
    results, lines, bad = {}, [], False
    if candidate:
        lines.append(f"candidate {candidate[0]} as {candidate[1]}: the configuration with it is valid "
                     f"(nothing was activated)")
        if not _config.is_dropin(os.path.basename(candidate[1])):
            lines.append(f"  ! {candidate[1]} would be ignored: drop-ins are read only when named *.toml")
            bad = True
        lines.append("")
    for name in names:
        w = cfg.workload(name)
        b = policy.budget(w, h.vram_mb, h.gpus, h.ram_mb, cfg.host.other_ram_mb)
        b["gpu_vram_source"], b["ram_source"], b["gpus"] = h.vram_source, h.ram_source, h.gpus
        problems = policy.budget_problems(w, b)
        blocking = preflight.problems(w, b)
        problems += [p for p in blocking if p not in problems]
        gate = _predictive_gate(cfg, w)  # the runbook's gate, on the agent's recorded samples (issue 18)
        if gate:
            problems.append(gate)
        b["problems"] = problems
        b["ok"] = not blocking
        bad |= bool(blocking)
        results[name] = b
        lines += worksheet(w, b)
    lines.append("ok: every profile can run" if not bad else
                 "NOT OK: fix the lines marked ! (jobs would fail or overcommit memory)")
    data = {"gpu_state": gpu_state, "workloads": results, "ok": not bad}
    if candidate:
        data["candidate"] = {"file": candidate[0], "as": candidate[1], "valid": True}
    emit(args, data, "\n".join(lines))
    return 1 if bad else 0


def _predictive_gate(cfg, w):
    from . import calibrate

    try:
        return calibrate.predictive_gate(calibrate.read_samples(calibrate.samples_path(cfg, w.name)), w.admission)
    except OSError:
        return None


def _oom_before(cfg, w, path):
    """The OOM memory's entry for this input as the wrapper would find it: (entry, how) or (None, None)."""
    from .. import oom_memory

    _ident, entry, how = oom_memory.lookup(cfg.agent.state_dir, path) if path else (None, None, None)
    return entry, how


def _candidate(args):
    """(candidate file, the path it would replace): --as, else the main file for a file named config.toml or one
    with settings, else workloads.d/<its name>."""
    main_path = _config.config_path(args.config)
    cand = os.path.abspath(args.file)
    if args.as_path:
        return cand, os.path.abspath(args.as_path)
    raw = _config.read_toml(cand)
    if raw is None:
        raise _config.ConfigError("no such file", cand)
    if os.path.basename(cand) == os.path.basename(main_path) or set(raw) - {"workloads"}:
        return cand, main_path
    return cand, os.path.join(_config.dropin_dir(main_path), os.path.basename(cand))


# ---- wrap / unwrap ----------------------------------------------------------------------------------------------

def cmd_wrap(args):
    """Wrap BINARY, and point the profile at the real binary when it named the path being wrapped: after the wrap
    that path is gpu-router itself, and a profile still naming it would route each job, then call the router again
    (a second slot, BLOCKED, forever). Refuses before touching anything when the profile cannot be edited."""
    from . import profile_edit, wrap

    cfg = load(args)
    if args.workload not in cfg.workloads:  # wrap first, then `init` writes the profile with the real binary
        result = wrap.wrap(args.binary, args.workload)
        if isinstance(result, dict) and result.get("real"):
            result["message"] = (result.get("message", "") + f"; no profile {args.workload!r} yet: "
                                 f"gpu-router init --workload {args.workload} writes one (it proposes "
                                 f"binary = \"{result['real']}\"); until then its jobs exit 2")
        emit(args, result if isinstance(result, dict) else {"result": str(result)}, _describe(result))
        return 0
    profile = cfg.workload(args.workload)
    target = os.path.abspath(args.binary) if "/" in args.binary else None
    if target is None:
        from ..executables import USER_PATH, which

        target = which(args.binary, fallback=USER_PATH)
    same = target is not None and (profile.binary == target or (
        os.path.exists(target) and os.path.realpath(profile.binary) == os.path.realpath(target)))
    placeholder = "/gpu-router-wrap-placeholder"
    if same:
        try:
            profile_edit.plan(profile.source, profile.name, placeholder)  # refuse now, before anything is moved
        except profile_edit.EditRefused as exc:
            raise _config.ConfigError(f"profile {profile.name!r} runs {profile.binary}, the binary being wrapped, "
                                      f"and cannot be updated: {exc} (to the path `wrap` moves the real binary to: "
                                      f"{target}.distrib for a packaged file, {target}.real otherwise); nothing "
                                      f"was changed") from None
    result = wrap.wrap(args.binary, args.workload)
    if isinstance(result, dict) and result.get("real") and profile.binary != result["real"]:
        if same:
            profile_edit.apply(profile.source, profile_edit.plan(profile.source, profile.name, result["real"]))
            result["profile_updated"] = {"path": profile.source, "binary": result["real"]}
            result["message"] = (result.get("message", "") + f"; updated {profile.source}: "
                                 f"binary = \"{result['real']}\"")
        else:
            sys.stderr.write(f"gpu-router: note: profile {args.workload!r} runs {profile.binary}, but the wrapped "
                             f"binary now lives at {result['real']}: set binary = \"{result['real']}\"\n")
    emit(args, result if isinstance(result, dict) else {"result": str(result)}, _describe(result))
    return 0


def cmd_unwrap(args):
    from . import wrap

    if not args.all and not args.binary:
        raise _config.ConfigError("name a BINARY or give --all")
    result = wrap.unwrap(args.binary, all=args.all, force=args.force)
    emit(args, result if isinstance(result, dict) else {"result": str(result)}, _describe(result))
    return 0


def _describe(result):
    if isinstance(result, dict) and "message" in result:
        return result["message"]
    return str(result)


# ---- the parser ------------------------------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(prog="gpu-router", description="Route GPU jobs by predicted memory.")
    from .. import __version__

    p.add_argument("--config", help="config file (default: $GPU_ROUTER_CONFIG or /etc/gpu-router/config.toml)")
    p.add_argument("--version", action="version", version=f"gpu-router {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--json", action="store_true", help="one JSON document on stdout")
        c.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return c

    sub.add_parser("run", help="run a job: gpu-router run --workload NAME -- ARGS...")
    c = command("explain", "probe an input and show the decision, running nothing")
    c.add_argument("file", nargs="?", help="the job's input (options may come before or after it)")
    c.add_argument("--workload", "-w")
    c.add_argument("--user", "-u", help="probe as this user (the job's caller), not as whoever runs explain")
    c.epilog = "-- ARGS...: the job's full arguments; the input is found in them as the profile's `input` says"
    c.set_defaults(func=cmd_explain)
    c = command("check", "can every profile run: binary, probe tools, VRAM and RAM headroom (fails naming the fix)")
    c.add_argument("--workload", "-w")
    c.add_argument("-f", "--file", help="validate a candidate file with the configuration, activating nothing "
                                        "(like nginx -t / visudo -c -f)")
    c.add_argument("--as", dest="as_path", metavar="PATH", help="the file the candidate would replace (default: "
                                                                 "workloads.d/<its name>, or config.toml)")
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
    """Commands that live in their own modules (status, stats, jobs, drain/resume, init, calibrate, slurm-conf)."""
    from . import calibrate, drain, init, jobs, slurm, stats, status
    return [status.register, stats.register, jobs.register, drain.register, init.register, calibrate.register,
            slurm.register]


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
    job_args = None
    if argv and "explain" in argv and "--" in argv[argv.index("explain"):]:
        # explain's options go anywhere before "--"; everything after it is the job's own arguments, verbatim
        cut = argv.index("--", argv.index("explain"))
        argv, job_args = argv[:cut], argv[cut + 1:]
    args = p.parse_args(argv)
    if args.command == "explain":
        args.args = job_args
        if args.file is None and not job_args:
            p.error("explain: name the job's input FILE, or give the job's arguments after --")
    if not getattr(args, "func", None):
        if args.command == "run":
            from ..wrapper.run import main_run

            return main_run(argv[argv.index("run") + 1:])
        p.print_help()
        return 2
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
    except Exception as exc:
        wrap = sys.modules.get(__package__ + ".wrap")  # a WrapError means wrap is loaded: no import for the others
        if wrap is not None and isinstance(exc, wrap.WrapError):
            sys.stderr.write(f"gpu-router: {exc}\n")
            return getattr(exc, "exit_code", 1)
        raise
