"""`gpu-router drain` / `gpu-router resume`: stop admitting new GPU jobs (before a driver update, a GPU reset)
while the running ones finish, and start again. The switch is a file (``drainstate``) the wrapper stats per job."""

import os
import pwd
import sys
import time

from .. import atomicfile, drainstate, journal
from .. import config as _config


def _who():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def gpu_jobs_running(cfg):
    """{workload: GPU slots held now} over every workload, from the slot locks (what status shows)."""
    from . import status

    data = status.collect(cfg)
    return {name: sum(w["gpu_busy"].values()) for name, w in data["workloads"].items() if sum(w["gpu_busy"].values())}


def cmd_drain(args):
    from .common import emit

    cfg = _config.load(args.config)
    path = drainstate.path(cfg.agent.state_dir)
    action = "block" if args.block else "cpu"
    before = drainstate.read(cfg.agent.state_dir)
    try:
        # root's own state: only in a folder root alone can change, nothing in it followed (atomicfile.Refused)
        atomicfile.write_state(cfg.agent.state_dir, drainstate.FILE,
                               drainstate.render(action, time.time(), _who(), args.reason or ""), mode=0o644,
                               durable=True)
    except OSError as exc:
        hint = "" if isinstance(exc, atomicfile.Refused) else " (drain needs root)"
        sys.stderr.write(f"gpu-router: cannot write {path}: {exc.strerror or exc}{hint}\n")
        return 1
    state = drainstate.read(cfg.agent.state_dir)
    what = "run on the CPU" if action == "cpu" else f"exit {cfg.router.retry_exit_code} (retry later)"
    message = f"GPUs drained by {state.get('by')}: new GPU-bound jobs {what}; running jobs finish" + (
        f" ({args.reason})" if args.reason else "")
    journal.emit("drain", message, {"REASON": "drained", "ACTION": action, "BY": state.get("by"),
                                    "DETAIL": args.reason or None})
    running = gpu_jobs_running(cfg)
    waited = None
    if args.wait:
        started = time.monotonic()
        while running and time.monotonic() - started < args.wait:
            time.sleep(0.5)
            running = gpu_jobs_running(cfg)
        waited = round(time.monotonic() - started, 1)
    data = {"drained": True, "action": action, "file": path, "state": state, "was_drained": before is not None,
            "gpu_jobs_running": running, "waited_s": waited}
    text = [message + ".", f"state: {path}"]
    if running:
        text.append("GPU jobs still running: " + ", ".join(f"{k} {v}" for k, v in sorted(running.items()))
                    + (f" (after waiting {waited:g}s)" if waited is not None else "; --wait SECONDS waits for "
                                                                                  "them"))
    else:
        text.append("no GPU job is running: safe to update the driver or reset the GPU now")
    text.append("undo with: gpu-router resume")
    emit(args, data, "\n".join(text))
    return 1 if running and args.wait else 0


def cmd_resume(args):
    from .common import emit

    cfg = _config.load(args.config)
    path = drainstate.path(cfg.agent.state_dir)
    before = drainstate.read(cfg.agent.state_dir)
    try:
        atomicfile.remove_state(cfg.agent.state_dir, drainstate.FILE)
    except OSError as exc:
        hint = "" if isinstance(exc, atomicfile.Refused) else " (resume needs root)"
        sys.stderr.write(f"gpu-router: cannot remove {path}: {exc.strerror or exc}{hint}\n")
        return 1
    if before is not None:
        journal.emit("drain", f"GPUs resumed by {_who()}: new jobs may use the GPUs again",
                     {"REASON": "resumed", "BY": _who()})
    message = "GPUs resumed: new jobs may use the GPUs again" if before else "not drained: nothing to resume"
    emit(args, {"drained": False, "was_drained": before is not None, "file": path}, message)
    return 0


def _duration(text):
    import argparse

    try:
        return _config.parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 600, 90s or 10m, got {text!r}") from None


def register(sub, command):
    c = command("drain", "stop admitting new GPU jobs (running ones finish); survives restarts until resume")
    c.add_argument("--block", action="store_true", help="GPU-bound jobs exit with the retry code instead of "
                                                        "running on the CPU")
    c.add_argument("--reason", help="why (shown in status and the journal)")
    c.add_argument("--wait", type=_duration, metavar="DURATION", help="wait up to DURATION (600, 90s, 10m) for "
                                                                      "running GPU jobs to end (exit 1 if some "
                                                                      "still run)")
    c.set_defaults(func=cmd_drain)
    c = command("resume", "admit GPU jobs again after drain")
    c.set_defaults(func=cmd_resume)
