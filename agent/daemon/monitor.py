"""The agent's GPU monitor: sample the backend, track health, tell our jobs from foreign ones, publish the snapshot.

Health of a GPU, from worst to best reason:
- what the backend says this sample ("gpu-lost", "reset-required", "init-failed", "error:<x>"): recovery is simply
  the queries succeeding again, since the backend asks afresh every sample;
- a critical Xid ("xid-<n>"): the GPU stays unhealthy for ``xid_holdoff_s`` (default 300 s) after the last one and
  comes back only if its queries succeed then; application Xids (``xid_ignore``, 13/31/43/45/68 by default, as in
  NVIDIA's Kubernetes device plugin) are a job's fault, not the GPU's, and change nothing.
A change of a GPU's health is one ``gpu-health`` journal event; so is the backend itself failing or recovering.
Another user's process that appears with at least FOREIGN_NOTE_MB of VRAM is one ``vram-foreign`` event.

A process is ours when it or an ancestor is among ``reserved_pids()`` (Agent.reserved_pids: accounted jobs, VRAM
reservations read verified, holders of real slot files; never a PID a member's record merely names, trust.py) or
its cgroup path contains "gpu-router" (our scopes). Everything else, including memory no process accounts for
(driver overhead, other containers), is foreign: not ours to give out. ``known_pids()`` (the agent's accounted
jobs, in memory) is asked first; ``reserved_pids()`` reads the ledger and /proc/locks, whose read holds the
agent's one loop for an RCU grace period (5–25 ms measured: bench/README.md), so it is read only for a process no
accounted job explains, at most once a sample (``_Ownership``).

sd_notify and the watchdog are sdglue.py's, the service's lifetime resident.py's (the Agent); ``on_sample`` is the hook it needs.
"""

import threading
import time

from . import gpu_backends as gpu_mod
from .. import confinement, journal, snapshot

FOREIGN_NOTE_MB = 256    # a smaller foreign process (a display server, a monitoring tool) is not worth a line
FOREIGN_QUIET_S = 300.0  # one vram-foreign event per GPU per 5 minutes, unless a larger process appears


class Monitor:
    """Keeps one backend open and turns its samples into published snapshots.

    backend: a backend object (gpu.NvmlBackend, ...) or a preference string for gpu.open_backend.
    snapshot_path: where to publish (None: do not write; sample_once still returns the dict).
    reserved_pids: callable -> iterable of PIDs whose process trees are our jobs (errors count as empty).
    known_pids: callable -> the part of those known without reading anything (the agent's accounted jobs).
    emit: journal.emit-compatible callable (event, message, fields). clock/monotonic: injectable for tests.
    """

    def __init__(self, backend="auto", snapshot_path=snapshot.DEFAULT_PATH, interval=2.0, reserved_pids=None,
                 xid_ignore=gpu_mod.APPLICATION_XIDS, xid_holdoff_s=300.0, call_timeout_s=5.0, emit=None,
                 on_sample=None, proc_root="/proc", clock=time.time, monotonic=time.monotonic, accounting="auto",
                 log=None, known_pids=None):
        if isinstance(backend, str):
            backend = gpu_mod.open_backend(backend, call_timeout_s=call_timeout_s, accounting=accounting)
        self.log = log  # structlog-like logger for the backend's notes (accounting mode turned on, refused, ...)
        self.backend = backend
        self.snapshot_path = snapshot_path
        self.interval = float(interval)
        self.reserved_pids = reserved_pids or (lambda: ())
        self.known_pids = known_pids or (lambda: ())
        self._recent = (None, frozenset())  # (monotonic time, PIDs) known ours at the last sample (_Ownership)
        self.xid_ignore = frozenset(int(x) for x in xid_ignore)
        self.xid_holdoff_s = float(xid_holdoff_s)
        self.emit = emit or journal.emit
        self.on_sample = on_sample
        self.proc_root = proc_root
        self.clock = clock
        self.monotonic = monotonic
        self.last = None              # the last snapshot dict
        self.write_error = None       # the last failure to publish (None once it works again)
        self.ignored_xids = []        # (index, xid) of application Xids seen, newest last (bounded)
        self._xid = {}                # gpu key -> (xid, monotonic deadline of the hold-off)
        self._health = {}             # gpu key -> (health, index) as last published
        self._backend_error = None    # the kind of the backend's error as last published
        self._foreign = {}            # gpu key -> {"pids", "last", "largest"}: other users' processes reported

    # ---------------------------------------------------------------- process ownership

    def _read(self, pid, name):
        try:
            with open(f"{self.proc_root}/{pid}/{name}", "rb") as f:
                return f.read()
        except OSError:
            return None

    def _parent(self, pid):
        stat = self._read(pid, "stat")
        if not stat:
            return None
        try:
            return int(stat[stat.rindex(b")") + 2:].split()[1])  # field 4, after the comm's last ')'
        except (ValueError, IndexError):
            return None

    def is_ours(self, pid, reserved, cache=None):
        """pid or an ancestor in `reserved`, or pid's cgroup path names gpu-router. `cache` spans one sample."""
        return self.classify(pid, reserved, cache)[0]

    def classify(self, pid, reserved, cache=None):
        """(ours, job): job is pid's nearest self-or-ancestor in `reserved` (an admitted job's pid), else None."""
        cache = {} if cache is None else cache
        chain, cur, job = [], pid, None
        for _ in range(64):  # bounded: a /proc loop or a very deep tree ends the walk
            if cur in cache:
                job = cache[cur]
                break
            chain.append(cur)
            if cur in reserved:
                job = cur
                break
            cur = self._parent(cur)
            if not cur or cur <= 1:
                break
        for p in chain:
            cache[p] = job  # caches ancestry only; the cgroup verdict below is about pid itself
        if job is not None:
            return True, job
        return any("gpu-router" in path for _c, path in confinement.read(pid, self.proc_root)), None

    def _reserved(self, source=None):
        try:
            return {int(p) for p in (source or self.reserved_pids)()}
        except Exception:  # the ledger being unreadable must not stop sampling: nothing counts as ours then
            return set()

    # ---------------------------------------------------------------- health

    @staticmethod
    def _key(g):
        return g.get("uuid") or f"index-{g['index']}"

    def _apply_xids(self, events, gpus, now):
        by_index = {g["index"]: g for g in gpus}
        for index, xid in events:
            targets = [by_index[index]] if index in by_index else list(gpus) if index is None else []
            if xid in self.xid_ignore:
                self.ignored_xids = (self.ignored_xids + [(index, xid)])[-100:]
                continue
            for g in targets:
                self._xid[self._key(g)] = (xid, now + self.xid_holdoff_s)

    def _health_of(self, g, now):
        health, reason = g["health"], g.get("reason")
        key = self._key(g)
        pending = self._xid.get(key)
        if pending:
            xid, until = pending
            if health == "ok":
                if now < until:
                    return f"xid-{xid}", (f"critical Xid {xid}; healthy again {self.xid_holdoff_s:g} s after "
                                          "the last one if queries succeed")
                del self._xid[key]
                return "ok", f"Xid {xid} hold-off of {self.xid_holdoff_s:g} s passed and queries succeed"
        return health, reason

    def _note_change(self, key, g, health, reason):
        prev = self._health.get(key, ("ok", g["index"]))[0]
        self._health[key] = (health, g["index"])
        if prev == health:
            return
        name = g.get("name") or "GPU"
        if health == "ok":
            message = f"GPU {g['index']} ({name}) is healthy again (was {prev})"
            reason = reason or "queries succeed again"
        else:
            message = f"GPU {g['index']} ({name}) is unhealthy: {health}" + (f" ({reason})" if reason else "")
        self._emit(message, {"DEVICE": g["index"], "UUID": g.get("uuid"), "HEALTH": health,
                             "REASON": reason or health, "PREVIOUS_HEALTH": prev})

    def _note_backend(self, source, error):
        kind = error.split(":", 1)[0] if error else None
        if kind == self._backend_error:
            return
        prev, self._backend_error = self._backend_error, kind
        if error:
            self._emit(f"GPU backend {source} failed: {error}", {"HEALTH": kind, "REASON": error, "SOURCE": source})
        else:
            self._emit(f"GPU backend {source} works again (was {prev})",
                       {"HEALTH": "ok", "REASON": f"{source} answers again", "SOURCE": source})

    def _note_foreign(self, key, entry, now):
        """Journal another user's process that appears with real VRAM (vram-foreign): admission by VRAM cannot
        see an allocation before it happens, so such a process can take what a job was just admitted for. Each
        process once; at most one event per GPU per FOREIGN_QUIET_S unless a larger process appears."""
        known = self._foreign.setdefault(key, {"pids": set(), "last": None, "largest": 0})
        procs = [p for p in entry["processes"] if not p["ours"] and (p["used_mb"] or 0) >= FOREIGN_NOTE_MB]
        new = [p for p in procs if p["pid"] not in known["pids"]]
        known["pids"] = {p["pid"] for p in procs}  # bounded by what runs now
        if not new:
            return
        big = max(new, key=lambda p: p["used_mb"])
        quiet = known["last"] is not None and now - known["last"] < FOREIGN_QUIET_S
        if quiet and big["used_mb"] <= known["largest"]:
            return
        known["largest"] = max(known["largest"] if quiet else 0, big["used_mb"])
        known["last"] = now
        comm = (self._read(big["pid"], "comm") or b"?").strip().decode("utf-8", "replace")
        try:
            self.emit("vram-foreign", f"GPU {entry['index']}: another process (pid {big['pid']}, {comm}) holds "
                      f"{big['used_mb']} MiB that gpu-router does not manage; if other users share this GPU "
                      f"regularly, hold that much back with [gpu] reserve_mb",
                      {"DEVICE": entry["index"], "UUID": entry.get("uuid"), "PID": big["pid"], "COMM": comm,
                       "USED_VRAM_MB": big["used_mb"], "FOREIGN_MB": entry.get("foreign_mb"),
                       "TOTAL_MB": entry.get("total_mb")})
        except Exception:  # logging never stops the monitor
            pass

    def _log_notes(self):
        drain = getattr(self.backend, "drain_notes", None)
        if drain is None:
            return
        for level, message, fields in drain():
            if self.log is None:
                continue
            try:
                getattr(self.log, level)(message, **fields)
            except Exception:  # logging never stops the monitor
                pass

    def _emit(self, message, fields):
        try:
            self.emit("gpu-health", message, fields)
        except Exception:  # logging never stops the monitor
            pass

    # ---------------------------------------------------------------- sampling

    def sample_once(self):
        """Sample, update health, publish; returns the snapshot dict (schema: HACKING.md)."""
        started = self.clock()
        ownership = _Ownership(self)  # the accounted jobs now, before the backend's sample
        raw = self.backend.sample()
        now = self.monotonic()
        gpus = raw.get("gpus") or []
        self._apply_xids(raw.get("xid_events") or (), gpus, now)
        out = []
        seen = set()
        for g in gpus:
            key = self._key(g)
            seen.add(key)
            health, reason = self._health_of(g, now)
            processes = []
            for p in g.get("processes") or ():
                ours, job = ownership.classify(p["pid"])
                processes.append({"pid": p["pid"], "used_mb": p["used_mb"], "ours": ours, "job": job})
            used = g.get("used_mb")
            if used is None:
                ours_mb = foreign_mb = None
            else:
                ours_mb = sum(p["used_mb"] or 0 for p in processes if p["ours"])
                foreign_mb = max(used - ours_mb, 0)
            entry = {
                "index": g["index"], "uuid": g.get("uuid"), "name": g.get("name"),
                "total_mb": g.get("total_mb"), "used_mb": used, "free_mb": g.get("free_mb"),
                "healthy": health == "ok", "health": health,
                "ours_mb": ours_mb, "foreign_mb": foreign_mb, "processes": processes,
            }
            if g.get("utilization") is not None:
                entry["utilization"] = g["utilization"]  # percent busy (NVML only); exported as a metric
            if g.get("accounting") is not None:
                entry["accounting"] = g["accounting"]    # the driver's per-process accounting: on, off, ...
            out.append(entry)
            self._note_change(key, g, health, reason)
            self._note_foreign(key, entry, now)
        for key in [k for k in self._health if k not in seen]:
            health, index = self._health.pop(key)
            self._emit(f"GPU {index} is no longer reported (was {health})",
                       {"DEVICE": index, "UUID": None if key.startswith("index-") else key,
                        "HEALTH": "absent", "REASON": "the backend no longer lists it", "PREVIOUS_HEALTH": health})
        self._note_backend(raw.get("source"), raw.get("error"))
        self._log_notes()
        snap = {"version": snapshot.VERSION, "time": started, "source": raw.get("source"),
                "error": raw.get("error"), "driver": raw.get("driver"), "gpus": out}
        if self.snapshot_path:
            try:
                snapshot.write(self.snapshot_path, snap)
                self.write_error = None
            except OSError as exc:
                self.write_error = f"{self.snapshot_path}: {exc.strerror or exc}"
        self.last = snap
        if self.on_sample is not None:
            self.on_sample(snap)
        return snap

    def run(self, stop_event=None):
        """Sample every `interval` seconds until stop_event is set; the backend is closed on the way out."""
        stop_event = stop_event or threading.Event()
        try:
            while not stop_event.is_set():
                started = self.monotonic()
                try:
                    self.sample_once()
                except Exception as exc:  # a bug in one sample must not end monitoring; the next may work
                    self.last_exception = exc
                stop_event.wait(max(0.0, self.interval - (self.monotonic() - started)))
        finally:
            self.close()

    def close(self):
        self.backend.close()


class _Ownership:
    """Whose GPU processes are ours, for one sample. The agent's accounted jobs (known_pids) are asked first: the
    same loop that ends their accounts runs this sample, so a job accounted when the sample began is still one
    when its processes are classified. The rest (reserved_pids: the ledger and the slot holders) costs a read of
    /proc/locks, so it is read only for a process no accounted job or scope explains, once, after the backend's
    sample. What the previous sample knew counts too when it is at most two sample intervals old: a job that ended
    since (its account closed, its reservation gone) while the backend still lists its process was ours when
    sampled."""

    def __init__(self, mon):
        self.mon = mon
        now = mon.monotonic()
        at, before = mon._recent
        known = mon._reserved(mon.known_pids)
        self.cheap = known | (before if at is not None and now - at <= 2 * mon.interval else frozenset())
        mon._recent = (now, frozenset(known))
        self.cache = {}
        self.full = None
        self.full_cache = {}

    def classify(self, pid):
        ours, job = self.mon.classify(pid, self.cheap, self.cache)
        if ours:
            return ours, job
        if self.full is None:
            fresh = self.mon._reserved()
            self.full = self.cheap | fresh
            at, known = self.mon._recent
            self.mon._recent = (at, known | fresh)
        return self.mon.classify(pid, self.full, self.full_cache)


def describe(snap):
    """One line for systemd's STATUS= and `gpu-router status`: "2 GPUs healthy", "1 of 2 GPUs healthy (GPU 1: …)"."""
    if snap is None:
        return "GPU state unknown"
    gpus = snap.get("gpus") or []
    if not gpus:
        return f"no GPU ({snap['source']}: {snap['error']})" if snap.get("error") else "no GPU"
    healthy = sum(1 for g in gpus if g.get("healthy"))
    if healthy == len(gpus):
        return f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} healthy"
    bad = ", ".join(f"GPU {g['index']}: {g['health']}" for g in gpus if not g.get("healthy"))
    return f"{healthy} of {len(gpus)} GPUs healthy ({bad})"


__all__ = ["Monitor", "describe"]
