"""The jobs running and waiting now, for `gpu-router status` (like squeue): who holds each slot and what it uses.

A slot is a flock held by the job itself (the wrapper takes it, then execs the job, which keeps the PID), so the
kernel's lock table (/proc/locks) names each slot's holder. For each holder: the input (found in its command line
as the profile's ``input`` says), its owner, elapsed time, device and slot, reserved VRAM (the ledger) against
used VRAM (the agent's snapshot) and RAM against its scope's MemoryMax (the cgroup). Waiters are the live tickets
of the bounded-wait queues.
"""

import os
import pwd
import time

from .. import confinement, procstat, slots
from ..daemon import accounting


def _lock_table():
    """{(major, minor, inode): pid} of flock holders (waiters skipped); empty when /proc/locks cannot be read."""
    return slots.flock_table() or {}


def _proc(pid):
    info = {"pid": pid, "user": None, "uid": None, "started": None, "args": None, "cgroup": None, "job": None}
    try:
        st = os.stat(f"/proc/{pid}")
        info["uid"] = st.st_uid
        try:
            info["user"] = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            info["user"] = str(st.st_uid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            info["args"] = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")[:-1]]
        info["started"] = procstat.start_time(pid)
        info["cgroup"] = confinement.memory_path(confinement.read(pid))
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:  # root (or the job's owner) only
            for item in f.read().split(b"\0"):
                if item.startswith(b"GPU_ROUTER_JOB="):
                    info["job"] = item.split(b"=", 1)[1].decode("utf-8", "replace")
    except OSError:
        pass
    return info


def _memory(cgroup):
    """(used MB, limit MB or None) of the job's memory cgroup: the use as the accounting reads it, the limit from
    v2 memory.max or v1 memory.limit_in_bytes ("max" or v1's huge figure: none)."""
    if not cgroup:
        return None, None
    controllers, path = cgroup
    base = confinement.hierarchy_dir("") + path if controllers == "" else confinement.CGROUP_ROOT + "/memory" + path
    used = accounting.read_memory(base).get("current")
    try:
        with open(os.path.join(base, "memory.max" if controllers == "" else "memory.limit_in_bytes")) as f:
            text = f.read().strip()
    except OSError:
        text = None
    limit = (None if text is None or not text.isdigit() or int(text) >= 1 << 60 else round(int(text) / 1048576, 1))
    return (None if used is None else round(used / 1048576, 1)), limit


def running(cfg, snapshot_gpus, reservations):
    """Each job holding a slot now, with what it uses; then each waiter in the bounded-wait queues."""
    from ..wrapper.probe import find_input

    table = _lock_table()
    lock_dir = cfg.router.lock_dir
    try:
        names = os.listdir(lock_dir)
    except OSError:
        return [], []
    used_by_pid = {}
    for g in snapshot_gpus or ():
        for p in g.get("processes") or ():
            used_by_pid[p.get("pid")] = (g.get("index"), p.get("used_mb"))
    reserved_by_pid = {pid: (key, mb) for key, entries in (reservations or {}).items() for pid, mb in entries}
    jobs, waiting, now = [], [], time.time()
    for name in sorted(names):
        parts = name.rsplit(".", 2)
        if len(parts) != 3 or parts[0] not in cfg.workloads:
            continue
        workload, pool, slot = parts
        if slot == "queue":
            waiting += _waiters(os.path.join(lock_dir, name), workload, pool)
            continue
        if not slot.isdigit():
            continue
        try:
            st = os.stat(os.path.join(lock_dir, name))
        except OSError:
            continue
        pid = table.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        if pid is None:
            continue
        w = cfg.workloads[workload]
        info = _proc(pid)
        args = info["args"][1:] if info["args"] else []
        ram, ram_max = _memory(info["cgroup"])
        reserved = reserved_by_pid.get(pid)
        used = used_by_pid.get(pid)
        jobs.append({
            "workload": workload, "pid": pid, "job": info["job"], "user": info["user"], "uid": info["uid"],
            "mode": "CPU" if pool == "cpu" else "GPU", "device": "cpu" if pool == "cpu" else pool[3:],
            "slot": int(slot), "input": find_input(w.input, args) if args else None,
            "elapsed_s": round(now - info["started"], 1) if info["started"] else None,
            "vram_reserved_mb": reserved[1] if reserved else None, "vram_used_mb": used[1] if used else None,
            "ram_mb": ram, "memory_max_mb": ram_max,
            "scope": os.path.basename(info["cgroup"][1]) if info["cgroup"] and
            info["cgroup"][1].endswith(".scope") else None,
        })
    return jobs, waiting


def _waiters(folder, workload, pool):
    out = []
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:
        return out
    table = _lock_table()
    now_ns = time.monotonic_ns()
    for position, name in enumerate(names):
        stamp, _, pid = name.partition(".")
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            continue
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) not in table:
            continue  # its waiter is gone
        info = _proc(int(pid)) if pid.isdigit() else {"user": None}
        out.append({"workload": workload, "pool": pool, "pid": int(pid) if pid.isdigit() else None,
                    "user": info.get("user"), "position": len(out) + 1,
                    "waiting_s": round((now_ns - int(stamp)) / 1e9, 1) if stamp.isdigit() else None})
    return out


def _dur(s):
    if s is None:
        return "-"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def render(jobs, waiting, header=True):
    from ..termtext import field as _t

    lines = [f"running jobs: {len(jobs)}"]
    if jobs:
        rows = [("PID", "WORKLOAD", "USER", "ELAPSED", "DEV", "SLOT", "VRAM_MB used/resv", "RAM_MB used/max",
                 "INPUT")]
        for j in jobs:
            def n(v):
                return "-" if v is None else f"{v:g}"
            rows.append((str(j["pid"]), j["workload"], j["user"] or "-", _dur(j["elapsed_s"]),
                         j["device"] if j["mode"] == "GPU" else "cpu", str(j["slot"]),
                         f"{n(j['vram_used_mb'])}/{n(j['vram_reserved_mb'])}" if j["mode"] == "GPU" else "-",
                         f"{n(j['ram_mb'])}/{n(j['memory_max_mb'])}",
                         _t(os.path.basename(j["input"])) if j["input"] else "-"))  # the member's file name
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                  for r in rows[0 if header else 1:]]
    lines.append(f"waiting: {len(waiting)}")
    for w in waiting:
        lines.append(f"  #{w['position']} {w['workload']} ({w['pool']}) pid {w['pid']} {w['user'] or '-'}, "
                     f"waiting {_dur(w['waiting_s'])}")
    return "\n".join(lines)
