#!/usr/bin/python3
"""What a hostile member of group gpu-router does by hand, as tests/systemd/test_hostile.py runs it (issue 17).

Run inside the lane's container as a member (never as root). Each command prints one line ``ready {json}`` once its
trap is set, then holds (its locks, its fake VRAM claim) until ``--hold`` seconds pass or the file ``--until``
exists, so the lane decides when an attack ends. Nothing here imports gpu-router except ``scope`` (the broker's
client, as any member may use it): the records are written with plain os calls, as an attacker would.

    entry  --workload W --metric M --reserve MB [--use MB] [--name-pid PID]  a VRAM-ledger entry, locked by us
    links  N                                            one unlocked entry of ours and N hard links to it
    ticket WORKLOAD POOL                                 a queue ticket named to stay at the head for ever
    hide   MB                                            VRAM use while holding an flock on our own file in the lock dir
    foreign MB COMM                                      plain VRAM use under a chosen process name (control chars)
    scope  JOB                                           a CPU scope asked for with a JOB id of our choosing
"""

import ctypes
import fcntl
import json
import os
import sys
import time

sys.path.insert(0, "/src/tests/fakenvml")
import fake_gpu_job as fake  # noqa: E402  (the fake GPU's state format: a claim is VRAM used by this PID)

STATE = "/var/lib/fakegpu"
LOCKS = "/run/gpu-router/locks"


def opt(args, name, default=None):
    return args[args.index(name) + 1] if name in args else default


def claim(mb):
    if mb > 0:
        ok, free = fake.try_claim(STATE, 0, mb)
        if not ok:
            sys.exit(f"hostile_member: no room for {mb} MiB on the fake GPU ({free} free)")


def publish(folder, name, content, lock=True):
    """An entry as the wrapper makes one: temp name, (locked), renamed into place; the fd keeps the lock."""
    tmp = os.path.join(folder, f".tmp.{os.getpid()}.{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    os.fchmod(fd, 0o640)
    if lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, content)
    os.rename(tmp, os.path.join(folder, name))
    return fd


def subdir(name):
    path = os.path.join(LOCKS, name)
    try:
        os.mkdir(path, 0o770)
    except FileExistsError:
        pass
    return path


def hold(args, **info):
    info.setdefault("pid", os.getpid())
    print("ready " + json.dumps(info), flush=True)
    end = time.monotonic() + float(opt(args, "--hold", 60))
    until = opt(args, "--until")
    while time.monotonic() < end and not (until and os.path.exists(until)):
        time.sleep(0.05)


def main(argv):
    cmd, args = argv[0], argv[1:]
    me = os.getpid()
    start = fake.proc_start_time(me)
    if cmd == "entry":
        claim(int(opt(args, "--use", 0)))
        named = int(opt(args, "--name-pid", me))
        text = f"{opt(args, '--reserve')} {opt(args, '--workload')} {opt(args, '--metric')} "
        text += f"{start if named == me else '-'}\n"
        # another's PID: beside its own entry, as a wrapper names an entry whose name is taken ("~unique")
        name = f"gpu0.{named}" if named == me else f"gpu0.{named}~{me}"
        fd = publish(subdir("vram"), name, text.encode())
        hold(args, entry=name, fd=fd)
    elif cmd == "links":
        n = int(args[0])
        folder = subdir("vram")
        name = f"gpu0.{me}"
        fd = publish(folder, name, f"1 - - {start}\n".encode(), lock=False)
        os.close(fd)  # unlocked: it counts only while this process lives (start time and owner match)
        t0 = time.monotonic()
        src = os.path.join(folder, name)
        for i in range(n):
            new = os.path.join(folder, f"{name}~{i}")
            try:
                os.link(src, new)
            except FileNotFoundError:  # the agent removed the name linked from (junk: more than one link)
                os.close(publish(folder, name, f"1 - - {start}\n".encode(), lock=False))
                src = os.path.join(folder, name)
                os.link(src, new)
            src = new  # link from the newest name next: the least likely to be removed already
        hold(args, entry=name, links=n, seconds=round(time.monotonic() - t0, 2))
    elif cmd == "ticket":
        folder = subdir(f"{args[0]}.{args[1]}.queue")
        name = f"{1:020d}.{me}"
        fd = publish(folder, name, b"")
        hold(args, ticket=name, fd=fd)
    elif cmd == "hide":
        claim(int(args[0]))
        fd = os.open(os.path.join(LOCKS, f"mine.{me}"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        hold(args, file=f"mine.{me}")
    elif cmd == "foreign":
        ctypes.CDLL(None).prctl(15, os.fsencode(args[1])[:15], 0, 0, 0)  # PR_SET_NAME: what /proc/PID/comm says
        claim(int(args[0]))
        hold(args)
    elif cmd == "scope":
        from gpu_router import scope

        fd = os.open(os.path.join(LOCKS, "shared.cpu.0"), os.O_RDONLY | os.O_CREAT, 0o660)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a CPU slot of the workload, as the broker asks of a member's request
        reply = scope.ask_agent("/run/gpu-router/agent.sock", [
            ("OP", "scope"), ("WORKLOAD", "shared"), ("JOB", args[0]), ("MODE", "CPU"), ("DEVICE", "cpu"),
            ("PID", str(me)), ("SCOPE_POLICY", "required"), ("METRIC", "1"), ("INPUT", "/srv/input")])
        hold(args, reply={k: (v.decode() if isinstance(v, bytes) else v) for k, v in dict(reply).items()})
    else:
        sys.exit(f"hostile_member: unknown command {cmd!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
