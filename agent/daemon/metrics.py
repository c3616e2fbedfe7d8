"""The agent's Prometheus metrics, for node_exporter's textfile collector (``<metrics_dir>/gpu_router.prom``).

Three kinds of numbers, each from the place that knows it:

* **Counters and histograms** of every decision and outcome. The wrapper's decisions (routed, BLOCKED, probe
  failures, scope failures, config errors) are read back from the journal, where the wrapper already writes them
  (``follow_journal``: ``journal_read``, python3-systemd underneath, ``SYSLOG_IDENTIFIER=gpu-router``, from a saved
  cursor), so the hot path pays nothing for them. Job outcomes come from the agent's accounting through one call,
  ``Metrics.job_finished(fields)``. Counters and the journal cursor are saved together, atomically, in
  ``<state_dir>/metrics.json``: they survive agent restarts and package upgrades, and events written while the
  agent was down are counted when it comes back. Every known label set of every configured workload is exported
  from the start at 0, so ``increase()`` sees the first event. The journal is read through ``journal_read``: an
  entry counts only from an author that may write it (a member cannot forge the agent's outcomes or health).
* **Bounded labels.** Label values come only from the configured workloads and the lists below; anything else
  (a member's own event naming a workload that is not configured, an unknown reason) is counted under ``other``,
  and a saved file's series of workloads no longer configured fold into ``other`` at the first sample.
* **Gauges** of the current state (GPU health, memory, slots, running jobs), from the last sample.
* **Staleness**: ``gpu_router_agent_up`` (0 once the agent stops), the last successful sample's timestamp, the
  backend's up gauge with its error as a separate info series.

The file is written through prometheus_client (a ``CollectorRegistry`` with one collector, ``write_to_textfile``,
which renames a finished temp file into place: the collector never reads half a file). Its path is recorded in
``<state_dir>/metrics-file`` so that package removal (debian/postrm) finds it whatever ``metrics_dir`` says.
README.md and gpu-router-agent(8) list every metric.
"""

import json
import os
import time

from .. import __version__, atomicfile, policy, slots

FILE_NAME = "gpu_router.prom"
STATE_NAME = "metrics.json"      # under [agent] state_dir: counters, histograms, journal cursor, GPUs seen
EXPORTED_NAME = "metrics-file"   # under [agent] state_dir: the path of the exported file, for debian/postrm
STATE_VERSION = 1
MiB = 1048576
GiB = 1024 * MiB

# The label values the code can produce (wrapper/run.py, policy.py, wrapper/probe.py, daemon/accounting.py).
# Each is exported at 0 for every configured workload; a value outside these lists is counted as OTHER, and so is
# a workload that is not configured: the number of series is bounded by the config, never by what members write.
OTHER = "other"
MODES = ("GPU", "CPU")
ROUTE_REASONS = {
    "GPU": ("under-threshold", "gpu-first", "cuda-oom-need"),
    "CPU": ("over-threshold", "probe-failed", "gpu-disabled", "no-gpu", "gpu-unhealthy", "vram-too-large",
            "drained", "spill:gpu-slots-full", "spill:no-vram-room", "spill:blind-cap", "cuda-oom-before",
            "cuda-oom-suspected", "cuda-oom-too-large"),
}
BLOCK_REASONS = ("gpu-slots-full", "no-vram-room", "blind-cap", "cpu-slots-full", "wait-timeout",
                 "scope-unavailable", "drained", "cuda-oom-before")
PROBE_REASONS = ("no-input", "input-missing", "input-unreadable", "input-not-regular", "input-empty",
                 "probe-not-found", "probe-not-runnable", "probe-timeout", "probe-bad-output", "probe-failed")
RESULTS = ("success", "failed", "oom-kill", "cuda-oom", "gpu-fault", "timeout", "unknown")
WAIT_OUTCOMES = ("admitted", "blocked")
# Exported at 0 per workload: success, failure, exec failures (126/127), killed (128+9), terminated (128+15);
# any status 0-255 is counted (others under OTHER).
EXIT_STATUSES = ("0", "1", "126", "127", "137", "143")
# Exported at 0 per GPU seen; xid-N and the backend's own kinds are counted when they happen.
HEALTHS = ("ok", "gpu-lost", "reset-required", "absent")
MAX_WAIT_S = 86400.0  # a wait a member's own event claims is counted at most this long (the sum stays finite)
MAX_SERIES = 100000  # series read per family from a saved file at most (seed() then folds the unconfigured)

COUNTERS = {  # name: (help, label names)
    "gpu_router_jobs_routed_total": ("Jobs admitted, by mode (GPU|CPU) and the policy's reason.",
                                     ("workload", "mode", "reason")),
    "gpu_router_jobs_blocked_total": ("Jobs refused for now (the caller got retry_exit_code), by reason.",
                                      ("workload", "reason")),
    "gpu_router_probe_failures_total": ("Probes that failed (the metric is unknown), by reason.",
                                        ("workload", "reason")),
    "gpu_router_scope_failures_total": ("Jobs run without their scope (scope = \"best-effort\") because none "
                                        "could be made.", ("workload",)),
    "gpu_router_jobs_waited_total": ("Jobs that waited for a slot (wait = ...), by how the wait ended.",
                                     ("workload", "outcome")),
    "gpu_router_jobs_finished_total": ("Jobs accounted when they ended, by mode and result.",
                                       ("workload", "mode", "result")),
    "gpu_router_job_exit_statuses_total": ("Finished jobs whose exit status is known, by status (128+N: signal "
                                           "N).", ("workload", "status")),
    "gpu_router_gpu_health_changes_total": ("Changes of a GPU's health, by the health it changed to (ok, xid-N, "
                                            "gpu-lost, absent, ...): flapping shows here even between scrapes.",
                                            ("gpu", "health")),
    "gpu_router_config_errors_total": ("Wrapper runs refused for a config error (exit 2).", ()),
    "gpu_router_broker_refusals_total": ("Scope requests the agent refused (caller not allowed, bad request).",
                                         ()),
}

HISTOGRAMS = {  # name: (help, label names, upper bounds)
    "gpu_router_job_duration_seconds": ("Run time of finished jobs.", ("workload", "mode"),
                                        (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)),
    "gpu_router_job_wait_seconds": ("Time a job waited for a slot before it was admitted or BLOCKED.",
                                    ("workload",), (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)),
    "gpu_router_job_peak_ram_bytes": ("Peak RAM of finished jobs (their scope's cgroup).", ("workload", "mode"),
                                      tuple(x * GiB for x in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256))),
    "gpu_router_job_peak_vram_bytes": ("Peak VRAM of finished GPU jobs (sampled per process).", ("workload",),
                                       tuple(x * GiB for x in (0.25, 0.5, 1, 2, 4, 8, 12, 16, 24, 32, 48, 80))),
}

GAUGES = ("gpu_router_agent_up", "gpu_router_info", "gpu_router_last_sample_timestamp_seconds",
          "gpu_router_backend_up", "gpu_router_backend_error_info", "gpu_router_gpu_healthy",
          "gpu_router_gpu_health_info", "gpu_router_gpu_memory_bytes", "gpu_router_gpu_vram_reservable_bytes",
          "gpu_router_gpu_utilization_ratio", "gpu_router_gpu_jobs", "gpu_router_jobs_running", "gpu_router_slots",
          "gpu_router_slots_busy", "gpu_router_draining")  # the documented list (README.md, gpu-router-agent(8))

# The wrapper's events this module counts from the journal (the agent's own outcomes come through job_finished).
JOURNAL_EVENTS = ("routed", "blocked", "probe-failed", "scope-failed", "config-error", "broker-refused",
                  "job-finished", "gpu-health")
JOURNAL_BATCH = 20000
# Slots held are read from /proc/locks at most this often (reading it took 15-25 ms on the CI machine's kernel);
# a saturation alert looks at minutes, not seconds.
SLOTS_REFRESH_S = 5.0
SAVE_INTERVAL_S = 5.0  # entries read per sample at most: a backlog is worked off over a few samples


def _num(value):
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _one_of(value, known):
    """A label value from a known list, else OTHER."""
    return value if value in known else OTHER


def _status(value):
    status = _num(value)
    return str(int(status)) if status is not None and status.is_integer() and 0 <= status <= 255 else OTHER


def _token(value, limit=32):
    """A short word of the agent's own (a GPU's index, a health like xid-79): else OTHER."""
    text = str(value) if value is not None else ""
    ok = 0 < len(text) <= limit and all(c.isascii() and (c.isalnum() or c in "-_:.") for c in text)
    return text if ok else OTHER


def _fold(series, index, keep, add):
    """Series whose label at ``index`` is not in ``keep`` merged into one labelled OTHER; True if any moved."""
    moved = False
    for labels in [k for k in series if k[index] not in keep and k[index] != OTHER]:
        value = series.pop(labels)
        target = labels[:index] + (OTHER,) + labels[index + 1:]
        series[target] = add(series[target], value) if target in series else value
        moved = True
    return moved


def _saved(value):
    v = _num(value)
    return int(v) if v.is_integer() and abs(v) < 2 ** 53 else v


def _row(row, width):
    """A saved series: (labels tuple, value), or (None, None) when it has other labels; ValueError when the file
    is not what this module writes (the caller warns and starts at 0)."""
    if not isinstance(row, list) or len(row) != 2 or not isinstance(row[0], list):
        raise ValueError(f"not a saved series: {str(row)[:64]}")
    if len(row[0]) != width:
        return None, None
    # A label a member once wrote (before labels were bounded) may hold anything: a control character in the
    # exported file would make the collector drop the whole file.
    return tuple(x if isinstance(x, str) and 0 < len(x) <= 128 and x.isprintable() else OTHER
                 for x in row[0]), row[1]


class Store:
    """Counters and histograms keyed by (name, label values); JSON on disk with the journal cursor."""

    def __init__(self):
        self.counters = {name: {} for name in COUNTERS}
        self.histograms = {name: {} for name in HISTOGRAMS}  # labels -> [per-bucket counts..., +Inf count, sum]
        self.cursor = None
        self.since = None  # Unix time to read the journal from while no cursor exists (the first start)
        self.gpus = {}  # str(index) -> uuid or "" : every GPU seen, so a failing backend still names them
        self.dirty = False

    def inc(self, name, labels, by=1):
        series = self.counters[name]
        series[labels] = series.get(labels, 0) + by
        self.dirty = True

    def zero(self, name, labels):
        if labels not in self.counters[name]:
            self.counters[name][labels] = 0
            self.dirty = True

    def observe(self, name, labels, value):
        bounds = HISTOGRAMS[name][2]
        h = self.histograms[name].setdefault(labels, [0] * (len(bounds) + 1) + [0.0])
        i = next((i for i, b in enumerate(bounds) if value <= b), len(bounds))
        h[i] += 1
        h[-1] += value
        self.dirty = True

    def zero_histogram(self, name, labels):
        if labels not in self.histograms[name]:
            self.histograms[name][labels] = [0] * (len(HISTOGRAMS[name][2]) + 1) + [0.0]
            self.dirty = True

    def to_json(self):
        return {"version": STATE_VERSION, "cursor": self.cursor, "since": self.since, "gpus": self.gpus,
                "counters": {n: [[list(k), v] for k, v in s.items()] for n, s in self.counters.items()},
                "histograms": {n: [[list(k), v] for k, v in s.items()] for n, s in self.histograms.items()}}

    @classmethod
    def from_json(cls, data):
        store = cls()
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return store
        store.cursor = data.get("cursor") if isinstance(data.get("cursor"), str) else None
        store.since = _num(data.get("since"))
        gpus = data.get("gpus") if isinstance(data.get("gpus"), dict) else {}
        store.gpus = {k: v[:128] if isinstance(v, str) else "" for k, v in gpus.items()
                      if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 4}
        # A file from before labels were bounded may hold thousands of series: seed() folds those of workloads
        # that are not configured into OTHER before anything is written.
        for name, rows in (data.get("counters") or {}).items():
            if name in COUNTERS:
                if not isinstance(rows, list):
                    raise ValueError(f"{name}: not a list of series")
                for row in rows[:MAX_SERIES]:
                    labels, value = _row(row, len(COUNTERS[name][1]))
                    if labels is not None and _num(value) is not None:
                        series = store.counters[name]
                        series[labels] = _saved(series.get(labels, 0) + _num(value))
        for name, rows in (data.get("histograms") or {}).items():
            if name in HISTOGRAMS:
                if not isinstance(rows, list):
                    raise ValueError(f"{name}: not a list of series")
                width = len(HISTOGRAMS[name][2]) + 2
                for row in rows[:MAX_SERIES]:
                    labels, value = _row(row, len(HISTOGRAMS[name][1]))
                    if (labels is not None and isinstance(value, list) and len(value) == width
                            and all(_num(x) is not None for x in value)):
                        series = store.histograms[name]
                        old = series.get(labels, [0] * width)
                        series[labels] = [_saved(a + _num(b)) for a, b in zip(old, value)]
        return store


class Metrics:
    """The agent's metrics: what it counts, what it saves, what it writes. One per agent."""

    def __init__(self, state_dir, log=None, clock=time.time):
        self.state_dir = state_dir
        self.log = log
        self.clock = clock
        self.store = self._load()
        self.view = {}
        self.workloads = frozenset()  # the configured workloads: the only workload labels (others: OTHER)
        self._pruned_for = None  # the workloads the saved series were last folded for
        self._authors = None    # journal_read.Authors: who may have written each entry the follower reads
        self._reader = None
        self._reader_error = None
        self._write_error = None
        self._save_error = None
        self._exported = None
        self._saved_at = None   # monotonic time of the last save
        self._slots_at = None   # monotonic time of the last look at /proc/locks
        self._slots_key = None  # what the slots depend on in the config and snapshot
        self._slots = {}

    # ---------------------------------------------------------------- state on disk

    def state_path(self):
        return os.path.join(self.state_dir, STATE_NAME)

    def _load(self):
        try:
            text = atomicfile.read_state(self.state_dir, STATE_NAME, 64 << 20)  # root's own, else Refused
            if text is None:
                return Store()
            return Store.from_json(json.loads(text))
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # unreadable or not ours: start at 0
            if self.log is not None:
                self.log.warning("cannot read the saved metrics; counters start again at 0", error=str(exc),
                                 path=self.state_path())
            return Store()

    def save(self, force=False):
        """Counters and cursor together (atomic rename, fsync'd), when something was counted: at most every
        SAVE_INTERVAL_S, so an agent busy counting does not fsync every second (nor before READY=1 while dpkg
        syncs during an upgrade); ``force`` on stop. What a crash loses since the last save is re-read from the
        journal at the saved cursor, except the agent's own job outcomes of those seconds."""
        if not self.store.dirty:
            return True
        now = time.monotonic()
        if not force and self._saved_at is not None and now - self._saved_at < SAVE_INTERVAL_S:
            return True
        self._saved_at = now
        try:
            atomicfile.write_state(self.state_dir, STATE_NAME, json.dumps(self.store.to_json(), separators=(",", ":")))
        except OSError as exc:
            self._warn_once("_save_error", "cannot save the metrics' counters", exc, path=self.state_path())
            return False
        self._clear("_save_error", "metrics' counters saved again", path=self.state_path())
        self.store.dirty = False
        return True

    # ---------------------------------------------------------------- counting

    def seed(self, cfg):
        """Every known label set of every configured workload at 0 (an existing count is kept); series of
        workloads not configured (any more) fold into OTHER."""
        names = frozenset(cfg.workloads)
        if names != self._pruned_for:
            self.workloads = self._pruned_for = names
            self._prune()
        z, zh = self.store.zero, self.store.zero_histogram
        z("gpu_router_config_errors_total", ())
        for gpu in self.store.gpus:
            for health in HEALTHS:
                z("gpu_router_gpu_health_changes_total", (_token(gpu), health))
        z("gpu_router_broker_refusals_total", ())
        for name in cfg.workloads:
            for mode, reasons in ROUTE_REASONS.items():
                for reason in reasons:
                    z("gpu_router_jobs_routed_total", (name, mode, reason))
            for reason in BLOCK_REASONS:
                z("gpu_router_jobs_blocked_total", (name, reason))
            for reason in PROBE_REASONS:
                z("gpu_router_probe_failures_total", (name, reason))
            z("gpu_router_scope_failures_total", (name,))
            for status in EXIT_STATUSES:
                z("gpu_router_job_exit_statuses_total", (name, status))
            for outcome in WAIT_OUTCOMES:
                z("gpu_router_jobs_waited_total", (name, outcome))
            zh("gpu_router_job_wait_seconds", (name,))
            zh("gpu_router_job_peak_vram_bytes", (name,))
            for mode in MODES:
                for result in RESULTS:
                    z("gpu_router_jobs_finished_total", (name, mode, result))
                zh("gpu_router_job_duration_seconds", (name, mode))
                zh("gpu_router_job_peak_ram_bytes", (name, mode))

    def _prune(self):
        """Fold the series of workloads that are not configured into OTHER (a saved file from before, a
        workload removed from the config)."""
        keep = self.workloads
        if _fold(self.store.counters["gpu_router_gpu_health_changes_total"], 0, set(self.store.gpus),
                 lambda a, b: a + b):
            self.store.dirty = True  # a GPU label no backend ever listed (a forged event, before authors)
        for name, (_, labels) in COUNTERS.items():
            if "workload" in labels and _fold(self.store.counters[name], labels.index("workload"), keep,
                                              lambda a, b: a + b):
                self.store.dirty = True
        for name, (_, labels, _) in HISTOGRAMS.items():
            if "workload" in labels and _fold(self.store.histograms[name], labels.index("workload"), keep,
                                              lambda a, b: [x + y for x, y in zip(a, b)]):
                self.store.dirty = True

    def _workload(self, value):
        return _one_of(value, self.workloads)

    def job_finished(self, fields):
        """The hook for an accounted job: the job-finished event's fields (plain names, as journal.emit takes)."""
        s = self.store
        workload, mode = self._workload(fields.get("WORKLOAD")), _one_of(fields.get("MODE"), MODES)
        s.inc("gpu_router_jobs_finished_total", (workload, mode, _one_of(fields.get("RESULT") or "unknown", RESULTS)))
        if fields.get("EXIT_STATUS") is not None:
            s.inc("gpu_router_job_exit_statuses_total", (workload, _status(fields.get("EXIT_STATUS"))))
        duration = _num(fields.get("DURATION_S"))
        if duration is not None:
            s.observe("gpu_router_job_duration_seconds", (workload, mode), max(duration, 0.0))
        ram = _num(fields.get("PEAK_RAM_MB"))
        if ram is not None:
            s.observe("gpu_router_job_peak_ram_bytes", (workload, mode), ram * MiB)
        vram = _num(fields.get("PEAK_VRAM_MB"))
        if vram is not None and mode == "GPU":
            s.observe("gpu_router_job_peak_vram_bytes", (workload,), vram * MiB)

    def count_event(self, entry):
        """One journal entry of the wrapper or the agent (GPU_ROUTER_* fields as journald stores them), whose
        author the caller has checked (``follow_journal``: ``journal_read``); True if counted."""
        event = entry.get("GPU_ROUTER_EVENT")
        if event not in JOURNAL_EVENTS:
            return False
        s = self.store
        workload = self._workload(entry.get("GPU_ROUTER_WORKLOAD"))
        reason = entry.get("GPU_ROUTER_REASON") or "unknown"
        if event == "routed":
            mode = _one_of(entry.get("GPU_ROUTER_MODE"), MODES)
            s.inc("gpu_router_jobs_routed_total", (workload, mode, _one_of(reason, ROUTE_REASONS.get(mode, ()))))
        elif event == "blocked":
            s.inc("gpu_router_jobs_blocked_total", (workload, _one_of(reason, BLOCK_REASONS)))
        elif event == "probe-failed":
            s.inc("gpu_router_probe_failures_total", (workload, _one_of(reason, PROBE_REASONS)))
        elif event == "scope-failed":
            s.inc("gpu_router_scope_failures_total", (workload,))
        elif event == "config-error":
            s.inc("gpu_router_config_errors_total", ())
        elif event == "broker-refused":
            held_back = str(entry.get("GPU_ROUTER_SUPPRESSED") or "0")  # refusals are journaled rate-limited
            s.inc("gpu_router_broker_refusals_total", (),
                  1 + (min(int(held_back), 1000000) if held_back.isascii() and held_back.isdigit() else 0))
        elif event == "gpu-health":
            if entry.get("GPU_ROUTER_DEVICE") is None:
                return False  # the backend as a whole: gpu_router_backend_up says it
            s.inc("gpu_router_gpu_health_changes_total", (_token(entry["GPU_ROUTER_DEVICE"], 8),
                                                          _token(entry.get("GPU_ROUTER_HEALTH") or "unknown")))
        elif event == "job-finished":
            # The agent's own outcomes arrive through job_finished(); the wrapper writes job-finished only when
            # exec itself failed (127/126), and that event has no duration.
            if entry.get("GPU_ROUTER_DURATION_S") is not None:
                return False
            self.job_finished({k[len("GPU_ROUTER_"):]: v for k, v in entry.items() if k.startswith("GPU_ROUTER_")})
            return True
        waited = _num(entry.get("GPU_ROUTER_WAITED_S"))
        if waited is not None and event in ("routed", "blocked"):
            s.inc("gpu_router_jobs_waited_total", (workload, "admitted" if event == "routed" else "blocked"))
            s.observe("gpu_router_job_wait_seconds", (workload,), min(max(waited, 0.0), MAX_WAIT_S))
        return True

    def follow_journal(self):
        """Count the wrapper's events written since the saved cursor; returns how many were read."""
        from .. import journal_read

        reader = self._open_reader()
        if reader is None:
            return 0
        if self._authors is None:
            self._authors = journal_read.Authors()
        n = 0
        try:
            reader.process()  # take in journal files added or rotated since the last call
            while n < JOURNAL_BATCH:
                entry = reader.get_next()
                if not entry:
                    break
                n += 1
                entry = journal_read.decode(entry)
                if self._authors.check(entry):  # the agent's events from the agent, a wrapper's for its job
                    self.count_event(entry)  # marks the store dirty when it counted something
                # The cursor moves on in memory and is saved with the next counts: entries re-read after a
                # crash are only those that counted nothing, or whose counts were lost with it.
                self.store.cursor = entry.get("__CURSOR") or self.store.cursor
        except OSError as exc:
            self._warn_once("_reader_error", "cannot read the journal; wrapper decisions are not counted", exc)
            self._close_reader()
        return n

    def _open_reader(self):
        if self._reader is not None:
            return self._reader
        try:
            from .. import journal_read

            reader = journal_read.open_reader()
            reader.add_match(SYSLOG_IDENTIFIER="gpu-router")
            # The inotify watch that process() needs: without it, a journal file created later (the first entry
            # of a user >= 1000 goes to user-UID.journal) is never seen.
            reader.fileno()
            if self.store.cursor:
                reader.seek_cursor(self.store.cursor)
                first = reader.get_next()
                if first and first.get("__CURSOR") != self.store.cursor:
                    reader.get_previous()  # the saved entry was vacuumed: start with the next one there is
            else:
                # No entry counted yet: from the first start on (kept, so a restart before the first event still
                # counts what came in between). Not seek_tail(): with no matching entry yet, the get_previous()
                # it needs leaves the reader past the next entry written.
                if self.store.since is None:
                    self.store.since = self.clock()
                    self.store.dirty = True
                reader.seek_realtime(self.store.since)
        except (ImportError, OSError) as exc:
            self._warn_once("_reader_error", "cannot read the journal; wrapper decisions are not counted", exc)
            return None
        self._reader = reader
        self._clear("_reader_error", "reading the journal again")
        return reader

    def _close_reader(self):
        if self._reader is not None:
            try:
                self._reader.close()
            except OSError:
                pass
        self._reader = None

    # ---------------------------------------------------------------- the current state

    def update(self, cfg, snapshot, jobs):
        """The gauges' view of now: config, last GPU snapshot, running jobs, slots held."""
        snap = snapshot or {}
        gpus = snap.get("gpus") or []
        for g in gpus:
            key = str(g["index"])
            if self.store.gpus.get(key) != (g.get("uuid") or ""):
                self.store.gpus[key] = g.get("uuid") or ""
                self.store.dirty = True
        ok = snapshot is not None and not snap.get("error")
        view = {"cfg": cfg, "snapshot": snap, "up": True, "backend_ok": ok, "jobs": list(jobs)}
        if ok:
            view["last_ok"] = snap.get("time")
        elif self.view.get("last_ok") is not None:
            view["last_ok"] = self.view["last_ok"]
        now = time.monotonic()
        if cfg is None:
            view["slots"] = {}
        else:
            key = (cfg.router.lock_dir, cfg.host.gpus, snapshot is None, tuple(g["index"] for g in gpus),
                   tuple((n, w.max_gpu_jobs, w.max_cpu_jobs) for n, w in sorted(cfg.workloads.items())))
            if self._slots_at is None or now - self._slots_at >= SLOTS_REFRESH_S or self._slots_key != key:
                self._slots = _slots_in_use(cfg, gpus if snapshot is not None else None)
                self._slots_at, self._slots_key = now, key
            view["slots"] = self._slots
        self.view = view

    # ---------------------------------------------------------------- exposition

    def collect(self):
        """prometheus_client's Collector interface: every family, counters first."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)
        from prometheus_client.utils import floatToGoString  # "le" as the client library writes it: "30.0", "+Inf"

        for name, (help_text, labels) in COUNTERS.items():
            fam = CounterMetricFamily(name, help_text, labels=labels)
            for values, count in sorted(self.store.counters[name].items()):
                fam.add_metric(values, count)
            yield fam
        for name, (help_text, labels, bounds) in HISTOGRAMS.items():
            fam = HistogramMetricFamily(name, help_text, labels=labels)
            for values, h in sorted(self.store.histograms[name].items()):
                cumulative, running = [], 0
                for bound, count in zip(list(bounds) + [float("inf")], h[:-1]):
                    running += count
                    cumulative.append((floatToGoString(bound), running))
                fam.add_metric(values, cumulative, h[-1])
            yield fam
        v = self.view
        cfg, snap = v.get("cfg"), v.get("snapshot") or {}

        def gauge(name, help_text, labels=(), rows=()):
            fam = GaugeMetricFamily(name, help_text, labels=labels)
            for values, value in rows:
                fam.add_metric(values, value)
            return fam

        up = bool(v.get("up"))
        yield gauge("gpu_router_agent_up", "1 while the agent runs; 0 once it stopped (the file is then frozen).",
                    rows=[((), 1 if up else 0)])
        info = InfoMetricFamily("gpu_router", "The agent's version and GPU backend.",
                                labels=("version", "backend"))
        info.add_metric((__version__, str(snap.get("source") or "unknown")), {})
        yield info
        last = v.get("last_ok")
        yield gauge("gpu_router_last_sample_timestamp_seconds",
                    "When the agent last sampled the GPUs successfully (Unix time).",
                    rows=[((), last)] if last is not None else [])
        if not up:
            return  # the rest describes a now the agent no longer watches: leave it out rather than freeze it
        error = snap.get("error")
        yield gauge("gpu_router_backend_up", "1 when the GPU backend (NVML, nvidia-smi) answered the last sample.",
                    rows=[((), 1 if v.get("backend_ok") else 0)])
        yield gauge("gpu_router_backend_error_info", "The GPU backend's error kind while it fails (value 1).",
                    ("source", "reason"),
                    [((str(snap.get("source") or "unknown"), str(error).split(":", 1)[0]), 1)] if error else [])
        yield from self._gpu_families(gauge, cfg, snap)
        yield from self._job_families(gauge, cfg, snap)

    def _gpu_families(self, gauge, cfg, snap):
        gpus = snap.get("gpus") or []
        seen = {str(g["index"]) for g in gpus}
        # A GPU seen before (or configured in [host] gpus) that the backend no longer lists counts as unhealthy,
        # so `gpu_router_gpu_healthy == 0` fires when the backend fails as a whole.
        known = dict(self.store.gpus)
        if cfg is not None and cfg.host.gpus:
            for i in range(cfg.host.gpus):
                known.setdefault(str(i), "")
        if cfg is not None and cfg.gpu.backend == "none":
            known = {}  # the operator turned GPU watching off: no GPU is unhealthy, none is exported
        missing = [(i, u) for i, u in sorted(known.items(), key=lambda kv: int(kv[0])) if i not in seen]
        absent_health = "backend-error" if snap.get("error") else "absent"
        healthy, health, memory, room, util, per_gpu = [], [], [], [], [], []
        jobs_on = {}
        for job in self.view.get("jobs", ()):
            if job.mode == "GPU" and job.device is not None:
                jobs_on[str(job.device)] = jobs_on.get(str(job.device), 0) + 1
        reservations = {}
        if cfg is not None:
            try:
                reservations = slots.live_reservations(cfg.router.lock_dir)
            except OSError:
                reservations = {}
        reserve = cfg.gpu.reserve_mb if cfg is not None else 0
        for g in gpus:
            lab = (str(g["index"]), str(g.get("uuid") or ""))
            healthy.append((lab, 1 if g.get("healthy") else 0))
            health.append((lab + (str(g.get("health") or "unknown"),), 1))
            for kind in ("total", "used", "free", "ours", "foreign"):
                value = g.get(f"{kind}_mb")
                if value is not None:
                    memory.append((lab + (kind,), value * MiB))
            gpu = policy.Gpu.from_snapshot(g)
            r = policy.room_mb(gpu, reservations.get(gpu.key, ()), reserve) if g.get("healthy") else 0
            if r is not None:
                room.append((lab, max(r, 0) * MiB))
            if g.get("utilization") is not None:
                util.append((lab, g["utilization"] / 100.0))
            per_gpu.append((lab, jobs_on.get(lab[0], 0)))
        for index, uuid in missing:
            healthy.append(((index, uuid), 0))
            health.append(((index, uuid, absent_health), 1))
            per_gpu.append(((index, uuid), jobs_on.get(index, 0)))
        gl = ("gpu", "uuid")
        yield gauge("gpu_router_gpu_healthy", "1 when the GPU takes jobs, 0 when its jobs go to the CPU.", gl, healthy)
        yield gauge("gpu_router_gpu_health_info", "Why a GPU is (un)healthy: ok, xid-N, gpu-lost, absent, "
                    "backend-error, ... (value 1).", gl + ("health",), health)
        yield gauge("gpu_router_gpu_memory_bytes", "GPU memory by kind (total, used, free, ours, foreign).",
                    gl + ("kind",), memory)
        yield gauge("gpu_router_gpu_vram_reservable_bytes", "VRAM the router can still give to jobs on the GPU "
                    "(total - reserve_mb - foreign - live reservations).", gl, room)
        yield gauge("gpu_router_gpu_utilization_ratio", "GPU busy time over the last sample period (0-1), where "
                    "the backend reports it.", gl, util)
        yield gauge("gpu_router_gpu_jobs", "Jobs of ours running on the GPU.", gl, per_gpu)

    def _job_families(self, gauge, cfg, snap):
        running = {}
        for job in self.view.get("jobs", ()):
            running[(job.workload, job.mode)] = running.get((job.workload, job.mode), 0) + 1
        for name in (cfg.workloads if cfg is not None else ()):
            for mode in MODES:
                running.setdefault((name, mode), 0)
        yield gauge("gpu_router_jobs_running", "Jobs the agent follows now.", ("workload", "mode"),
                    sorted(running.items()))
        capacity, busy = [], []
        for (name, pool), (cap, held) in sorted((self.view.get("slots") or {}).items()):
            if cap is not None:
                capacity.append(((name, pool), cap))
            if held is not None:
                busy.append(((name, pool), held))
        yield gauge("gpu_router_slots", "Slots of the pool (gpu: max_gpu_jobs on each GPU; cpu: max_cpu_jobs).",
                    ("workload", "pool"), capacity)
        yield gauge("gpu_router_slots_busy", "Slots of the pool held by running jobs now.", ("workload", "pool"),
                    busy)
        state = drain_state(cfg)
        yield gauge("gpu_router_draining", "1 while the host takes no new jobs (drain).",
                    rows=[((), 1 if state else 0)] if state is not None else [])

    def text(self):
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode()

    def write(self, metrics_dir):
        """Write ``<metrics_dir>/gpu_router.prom``; a failure is warned about once, not every sample."""
        path = os.path.join(metrics_dir, FILE_NAME)
        try:
            from prometheus_client import CollectorRegistry, generate_latest
        except ImportError as exc:  # a checkout run without the package's dependencies
            self._warn_once("_write_error", "cannot write metrics: python3-prometheus-client is missing", exc)
            return False
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            # the textfile folder: nothing in it followed, refused where others may write (atomicfile, issue 17)
            atomicfile.write_state(metrics_dir, FILE_NAME, generate_latest(registry), create=False, any_owner=True)
        except OSError as exc:
            _remove_temp(path)
            self._warn_once("_write_error", "cannot write metrics", exc, directory=metrics_dir)
            return False
        self._clear("_write_error", "writing metrics again", directory=metrics_dir)
        self._record_exported(path)
        return True

    def _record_exported(self, path):
        """Remember where the file is (debian/postrm removes it); a file left in a former metrics_dir goes."""
        if self._exported == path:
            return
        try:
            old = (atomicfile.read_state(self.state_dir, EXPORTED_NAME, 4096) or "").strip() or None
        except OSError:
            old = None
        if old and old != path and os.path.basename(old) == FILE_NAME:
            try:
                os.unlink(old)
            except OSError:
                pass
        try:
            if old != path:
                atomicfile.write_state(self.state_dir, EXPORTED_NAME, path + "\n")
            self._exported = path
        except OSError:
            pass

    def publish(self, cfg, snapshot, jobs):
        """Once per sample: count the journal's news, save, write the file (where metrics_dir is set)."""
        self.seed(cfg)
        self.follow_journal()
        self.update(cfg, snapshot, jobs)
        self.save()
        if cfg.agent.metrics_dir:
            self.write(cfg.agent.metrics_dir)

    def stop(self, cfg):
        """The agent is stopping: save, and mark the file down (agent_up 0, no gauges of a now nobody watches)."""
        self.follow_journal()
        self.save(force=True)
        self.view["up"] = False
        if cfg.agent.metrics_dir:
            self.write(cfg.agent.metrics_dir)
        self._close_reader()

    # ---------------------------------------------------------------- logging once

    def _warn_once(self, attr, message, exc, **fields):
        text = str(exc)
        if getattr(self, attr) == text:
            return
        setattr(self, attr, text)
        if self.log is not None:
            self.log.warning(message + " (said once, until it works again)", error=text, **fields)

    def _clear(self, attr, message, **fields):
        if getattr(self, attr) is not None:
            setattr(self, attr, None)
            if self.log is not None:
                self.log.info(message, **fields)


def _remove_temp(path):
    directory, base = os.path.split(path)
    try:
        for name in os.listdir(directory):
            if name.startswith(base + f".{os.getpid()}."):
                os.unlink(os.path.join(directory, name))
    except OSError:
        pass


def _locked_inodes(path="/proc/locks"):
    """Inodes that hold an flock now: looking, unlike a trial lock, never makes a wrapper's non-blocking LOCK_EX
    fail (a trial LOCK_SH every sample would BLOCK jobs that arrive in that instant)."""
    return slots.flocked_inodes(path)


def _slots_in_use(cfg, gpus, locks_path="/proc/locks"):
    """{(workload, pool): (capacity, held or None)} with pool "gpu" (all GPUs together) and "cpu".

    ``gpus``: the snapshot's GPU list, or None when there is no snapshot. Held slots are matched by inode alone
    (a slot file's device as stat sees it may differ from the one /proc/locks names, e.g. on overlayfs)."""
    out = {}
    if gpus is None:  # no snapshot: the wrapper assumes [host] gpus (or one), and so do we
        keys = [g.key for g in policy.assumed_gpus(cfg.host.gpus)]
    else:
        keys = [policy.Gpu(index=g["index"]).key for g in gpus]
    count = len(keys)
    locked = _locked_inodes(locks_path)

    def held(name, pool, n):
        if locked is None:
            return None
        busy = 0
        for i in range(n):
            try:
                st = os.lstat(os.path.join(cfg.router.lock_dir, slots.slot_name(name, pool, i)))
            except OSError:
                continue
            busy += st.st_ino in locked
        return busy

    reservations = None
    for name, w in cfg.workloads.items():
        if w.max_gpu_jobs is None:
            # vram mode without a slot cap: no slot files; the places held are the workload's live reservations,
            # and the capacity is what the VRAM holds (no fixed number: the series is left out).
            if reservations is None:
                reservations = slots.live_reservations(cfg.router.lock_dir, detail=True, verify=True,
                                                            workloads=cfg.workloads)
            out[(name, "gpu")] = (None, sum(1 for key in keys for entry in reservations.get(key, ())
                                            if entry[2] == name))
            out[(name, "cpu")] = (w.max_cpu_jobs, held(name, "cpu", w.max_cpu_jobs))
            continue
        gpu_held = [held(name, key, w.max_gpu_jobs) for key in keys]
        out[(name, "gpu")] = (w.max_gpu_jobs * count, None if None in gpu_held else sum(gpu_held))
        out[(name, "cpu")] = (w.max_cpu_jobs, held(name, "cpu", w.max_cpu_jobs))
    return out


def drain_state(cfg):
    """Whether GPU admission is drained (`gpu-router drain`): the drain file the wrapper reads, via the same reader."""
    from .. import drainstate

    if cfg is None:
        return None  # no configuration read yet: no series
    return drainstate.read(cfg.agent.state_dir) is not None
