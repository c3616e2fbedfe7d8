"""GPU backends: NVML (pynvml), nvidia-smi, none -> typed per-GPU states. Agent only; never on the wrapper's path.

A backend's ``sample()`` never raises. It returns::

    {"source": "nvml" | "nvidia-smi" | "none", "error": None | "kind: detail", "driver": str | None,
     "gpus": [{"index", "uuid", "name", "total_mb", "used_mb", "free_mb", "health", "reason",
               "processes": [{"pid", "used_mb"}]}],
     "xid_events": [(index | None, xid)]}

``health`` is "ok", "gpu-lost", "reset-required", "init-failed" or "error:<nvml-error>" (e.g. "error:timeout");
Xid health ("xid-<n>") is the monitor's business, since it needs a hold-off clock. Numbers a failing GPU could not
report are None. "No GPU" is a normal state (source "none", error None, gpus []), not an error.

Why a worker thread with a deadline for NVML calls: a GPU falling off the bus can block an NVML call in the kernel
for tens of seconds, and a ctypes call cannot be interrupted (signals only run Python handlers between bytecodes).
ctypes releases the GIL during the call, so each sample runs in its own daemon thread and the monitor waits at most
``call_timeout_s``; GPUs finished by then keep their data, the rest read "error:timeout". While a call is still
stuck, later samples answer "timeout" at once instead of piling up threads (at most one thread is ever stuck), and
sampling resumes by itself when the call returns. A subprocess per sample would be killable, but would pay the
binding's import and nvmlInit (up to seconds without persistence mode) every time, which is what the agent exists
to avoid.

Per-process accounting (the driver's own peak of each process, ``maxMemoryUsage``, kept in a ring after the process
exits): with ``accounting = "auto"`` (the agent's monitor and calibrate pass [gpu] accounting; the default "off"
keeps one-off users such as `gpu-router init` from changing the driver's mode) each backend checks every GPU's
accounting mode as it samples and turns it on where it is off (root only; NVIDIA: no performance cost; not
persistent across driver reloads, so it is checked again). Each GPU's state ("on", "off", "unsupported",
"no-permission", "error:<x>") goes into its sample as ``accounting``; a change is one note (``drain_notes``) for
the agent's log. ``accounted_peaks`` answers, once a job has ended, the peaks of its PIDs on its GPU, or None where
accounting cannot vouch for them (mode off or turned on after the job started, not supported, the call failed):
the agent then falls back to its samples.

Xid watching follows NVIDIA's Kubernetes device plugin: register ``nvmlEventTypeXidCriticalError`` (masked by
``nvmlDeviceGetSupportedEventTypes``) on an event set, and treat Xids as the GPU's fault except the application ones
(13, 31, 43, 45, 68 by default: a faulting kernel, not a faulting GPU). Events are drained with a zero timeout at each
sample, in the same worker thread, so NVML is only ever used from one thread at a time.
"""

import math
import sys
import threading
import time

APPLICATION_XIDS = (13, 31, 43, 45, 68)
XID_CRITICAL_EVENT = 0x8  # nvmlEventTypeXidCriticalError
MIB = 1024 * 1024

ACCOUNTING_POLICIES = ("auto", "off")
START_SLACK_S = 2.0  # clock granularity between /proc's start time (ticks) and the driver's (µs)
# NVML return codes are pynvml's own names (NVML_ERROR_*), read from the binding in use; the nvidia-smi path needs
# no pynvml. Codes after which the session itself is suspect: shut NVML down and initialise it again.
_REINIT_ERRORS = ("UNINITIALIZED", "DRIVER_NOT_LOADED", "OPERATING_SYSTEM", "LIB_RM_VERSION_MISMATCH", "UNKNOWN")
NVIDIA_SMI_DRIVER_NOT_LOADED = 9  # nvidia-smi exits with NVML's return code: NVML_ERROR_DRIVER_NOT_LOADED

SHIM_MESSAGE = ("refusing PyPI's deprecated 'pynvml' package (it wraps or shadows NVIDIA's binding and warns on "
                "import): remove it (pip uninstall pynvml) and install python3-pynvml or nvidia-ml-py")


def health_of_code(code, nvml=None):
    """An NVML return code -> "gpu-lost", "reset-required" or "error:<slug>", the slug made from pynvml's own name
    (NVML_ERROR_NO_PERMISSION -> no-permission); "error:nvml-<code>" for a code the binding does not name."""
    if nvml is None:
        nvml, _reason = import_pynvml()
    names = {} if nvml is None else {
        getattr(nvml, name): name[len("NVML_ERROR_"):] for name in dir(nvml)
        if name.startswith("NVML_ERROR_") and type(getattr(nvml, name)) is int}
    name = names.get(code)
    if name == "GPU_IS_LOST":
        return "gpu-lost"
    if name is None:
        return f"error:nvml-{code}"
    return "error:" + name.lower().replace("_", "-") if name != "RESET_REQUIRED" else "reset-required"


def _text(value):
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def import_pynvml():
    """(module, None) or (None, reason). Refuses PyPI's ``pynvml`` shim in both its forms.

    NVIDIA's binding (nvidia-ml-py, Debian's python3-pynvml) is one module file, ``pynvml.py``. The old PyPI
    ``pynvml`` (<12) is a package with its own, often stale, copy (``pynvml/nvml.py``) that shadows it; the new one
    installs a ``_pynvml_redirector`` import hook that warns on every import. The hook is detected before importing,
    so it never fires.
    """
    for finder in sys.meta_path:
        kind = type(finder)
        if kind.__module__ == "_pynvml_redirector" or kind.__name__ == "PynvmlFinder":
            return None, "pynvml-refused: " + SHIM_MESSAGE
    try:
        import pynvml
    except ImportError as exc:
        return None, f"pynvml-missing: {exc}"
    except Exception as exc:  # a broken binding must not take the agent down
        return None, f"pynvml-broken: {exc!r}"
    if hasattr(pynvml, "__path__") or not hasattr(pynvml, "nvmlInit"):
        return None, "pynvml-refused: " + SHIM_MESSAGE + f" (found {getattr(pynvml, '__file__', '?')})"
    return pynvml, None


def _gpu(index, static=None, health="ok", reason=None):
    static = static or {}
    return {"index": index, "uuid": static.get("uuid"), "name": static.get("name"),
            "total_mb": static.get("total_mb"), "used_mb": None, "free_mb": None,
            "health": health, "reason": reason, "processes": []}


class _Accounting:
    """Per-GPU accounting state shared by the NVML and nvidia-smi backends (see the module docstring)."""

    def _init_accounting(self, policy):
        if policy not in ACCOUNTING_POLICIES:
            raise ValueError(f"accounting must be one of {ACCOUNTING_POLICIES}, not {policy!r}")
        self.accounting = policy
        self._acct = {}       # index -> {"state": ..., "since": wall time from which it has been on}
        self._notes = []      # (level, message, fields) for the agent's log, one per change
        self.enabled_at = {}  # index -> wall time a privileged helper turned the mode on (accounting_mode.enable_accounting)

    def drain_notes(self):
        notes, self._notes = self._notes, []
        return notes

    def enabled_here(self):
        """{index: wall time} of the GPUs whose accounting mode this backend turned on."""
        return {i: e["since"] for i, e in self._acct.items() if e["state"] == "on" and e.get("enabled_by_us")}

    def _acct_state(self, index, state, detail=None, enabled_by_us=False):
        """Record a GPU's accounting state; a change (or the first sight) is one note."""
        prev = self._acct.get(index)
        if prev is not None and prev["state"] == state:
            return prev
        if state == "on":
            # On at first sight: on since before us (an admin's `nvidia-smi -am 1`, an earlier agent), or since
            # the agent's privileged start (ExecStartPre=+... --enable-accounting) turned it on (enabled_at).
            # Turned on by us or seen turning on: only jobs that start from now are covered in full.
            if prev is None and not enabled_by_us:
                since = self.enabled_at.get(index, -math.inf)
            else:
                since = time.time()
        else:
            since = None
        entry = self._acct[index] = {"state": state, "since": since, "enabled_by_us": enabled_by_us}
        fields = {"device": index, "accounting": state}
        if detail:
            fields["detail"] = detail
        if state == "on":
            msg = ("turned on the GPU's per-process accounting mode: job VRAM peaks come from the driver"
                   if enabled_by_us else "the GPU's per-process accounting mode is on: job VRAM peaks come from "
                   "the driver")
            self._notes.append(("info", msg, fields))
        elif state == "off":
            self._notes.append(("warning", "the GPU's per-process accounting mode is off ([gpu] accounting = "
                                "\"off\" or left to the admin): job VRAM peaks are sampled, and a short job's "
                                "peak can be missed", fields))
        else:
            self._notes.append(("warning", "cannot use the GPU's per-process accounting: job VRAM peaks are "
                                "sampled, and a short job's peak can be missed" + (
                                    " (the agent is not root, or the driver refused)" if state == "no-permission"
                                    else " (not supported: MIG, vGPU or an old GPU)" if state == "unsupported"
                                    else ""), fields))
        return entry

    def _acct_usable(self, index, job_started):
        """Whether GPU index's accounting covers a job that started at job_started (wall time)."""
        entry = self._acct.get(index)
        if not entry or entry["state"] != "on":
            return False
        return job_started is None or entry["since"] <= job_started


class NoGpuBackend:
    """No GPU here, or none we can query: an empty sample. `error` says why when someone asked for a GPU."""

    source = "none"

    def __init__(self, error=None, note=None):
        self.error = error
        self.note = note

    def open(self):
        return self

    def sample(self):
        return {"source": self.source, "error": self.error, "driver": None, "gpus": [], "xid_events": []}

    def accounted_peaks(self, pids, device=None, job_started=None, not_before=None):
        return None

    def drain_notes(self):
        return []

    def enabled_here(self):
        return {}

    def close(self):
        pass


class _Box:
    """One sample's results, filled by the worker as it goes, so a deadline keeps what was finished."""

    __slots__ = ("gpus", "events", "error", "abandoned", "done")

    def __init__(self):
        self.gpus = []
        self.events = []
        self.error = None
        self.abandoned = False
        self.done = threading.Event()


class NvmlBackend(_Accounting):
    """NVML through the pynvml binding, with every call under a deadline (see the module docstring)."""

    source = "nvml"

    def __init__(self, pynvml=None, call_timeout_s=5.0, reinit_after=10, watch_xid=True, accounting="off"):
        if pynvml is None:
            pynvml, reason = import_pynvml()
            if pynvml is None:
                raise ImportError(reason)
        self.nvml = pynvml
        self._reinit_codes = tuple(getattr(pynvml, "NVML_ERROR_" + name) for name in _REINIT_ERRORS)
        self.call_timeout_s = call_timeout_s
        self.reinit_after = reinit_after
        self.watch_xid = watch_xid
        self.note = None
        self._initialized = False
        self._reinit = False
        self._driver = None
        self._event_set = None
        self._registered = set()      # GPU indices whose Xid events are registered
        self._unwatchable = set()     # GPUs that do not support Xid events
        self._by_addr = {}            # handle address -> index, to place events
        self._static = {}             # index -> {"uuid", "name", "total_mb"}, kept for GPUs that stop answering
        self._count = 0
        self._bad_streak = 0
        self._stuck = None            # the worker thread still inside an NVML call, if any
        self._closed = False
        self._library_missing = False
        self.open_error = None
        self._init_accounting(accounting)

    # ---------------------------------------------------------------- running calls under a deadline

    def _run(self, job, box):
        """Run job(box) in a fresh daemon thread; True when it finished within the deadline."""
        if self._stuck is not None:
            if self._stuck.is_alive():
                return False
            self._stuck = None
        thread = threading.Thread(target=self._guarded, args=(job, box), name="gpu-router-nvml", daemon=True)
        thread.start()
        if box.done.wait(self.call_timeout_s):
            return True
        box.abandoned = True
        self._stuck = thread
        return False

    @staticmethod
    def _guarded(job, box):
        try:
            job(box)
        except Exception as exc:  # a binding bug becomes a typed state, not a dead thread
            box.error = f"error: {type(exc).__name__}: {exc}"
        finally:
            box.done.set()

    # ---------------------------------------------------------------- the work (worker thread only)

    def _init(self, box):
        n = self.nvml
        if self._initialized and self._reinit:
            self._shutdown_session()
        self._reinit = False
        if self._initialized:
            return True
        try:
            n.nvmlInit()
        except n.NVMLError as exc:
            box.error = f"init-failed: {exc}"
            box.gpus = [_gpu(i, self._static.get(i), "init-failed", str(exc)) for i in sorted(self._static)]
            self._library_missing = exc.value == n.NVML_ERROR_LIBRARY_NOT_FOUND
            return False
        self._initialized = True
        self._library_missing = False
        try:
            self._driver = _text(n.nvmlSystemGetDriverVersion())
        except n.NVMLError:
            self._driver = None
        if self.watch_xid:
            try:
                self._event_set = n.nvmlEventSetCreate()
            except n.NVMLError:
                self._event_set = None
        return True

    def _shutdown_session(self):
        n = self.nvml
        if self._event_set is not None:
            try:
                n.nvmlEventSetFree(self._event_set)
            except n.NVMLError:
                pass
        self._event_set = None
        self._registered.clear()
        self._by_addr.clear()
        try:
            n.nvmlShutdown()
        except n.NVMLError:
            pass
        self._initialized = False

    def _sample_job(self, box):
        n = self.nvml
        if not self._init(box):
            return
        try:
            count = n.nvmlDeviceGetCount()
        except n.NVMLError as exc:
            box.error = f"query-failed: {exc}"
            box.gpus = [_gpu(i, self._static.get(i), health_of_code(exc.value, n), str(exc))
                        for i in sorted(self._static)]
            self._reinit = exc.value in self._reinit_codes
            return
        self._count = count
        for index in range(count):
            if box.abandoned:
                return
            box.gpus.append(self._sample_gpu(index))
        if self._event_set is not None and not box.abandoned:
            box.events = self._drain_events()

    def _sample_gpu(self, index):
        import ctypes

        n = self.nvml
        gpu = _gpu(index, self._static.get(index))
        try:
            handle = n.nvmlDeviceGetHandleByIndex(index)
            self._by_addr[ctypes.cast(handle, ctypes.c_void_p).value] = index
            uuid = _text(n.nvmlDeviceGetUUID(handle))
            name = _text(n.nvmlDeviceGetName(handle))
            mem = n.nvmlDeviceGetMemoryInfo(handle)
        except n.NVMLError as exc:
            gpu["health"], gpu["reason"] = health_of_code(exc.value, n), str(exc)
            if exc.value in self._reinit_codes:
                self._reinit = True
            return gpu
        total_mb = mem.total // MIB
        self._static[index] = {"uuid": uuid, "name": name, "total_mb": total_mb}
        gpu.update(uuid=uuid, name=name, total_mb=total_mb, used_mb=mem.used // MIB, free_mb=mem.free // MIB)
        try:  # for metrics only; not every GPU (or driver) reports it
            gpu["utilization"] = int(n.nvmlDeviceGetUtilizationRates(handle).gpu)
        except n.NVMLError:
            pass
        try:
            procs = n.nvmlDeviceGetComputeRunningProcesses(handle)
        except n.NVMLError as exc:
            if exc.value in (n.NVML_ERROR_GPU_IS_LOST, n.NVML_ERROR_RESET_REQUIRED):
                gpu["health"], gpu["reason"] = health_of_code(exc.value, n), str(exc)
                return gpu
            procs = []  # not supported / no permission (vGPU, containers): memory totals still hold
            gpu["reason"] = f"processes: {exc}"
        for proc in procs:
            used = proc.usedGpuMemory
            gpu["processes"].append({"pid": int(proc.pid), "used_mb": None if used is None else int(used) // MIB})
        if self.accounting != "off":
            gpu["accounting"] = self._check_accounting(handle, index)
        if self._event_set is not None and index not in self._registered and index not in self._unwatchable:
            self._register(handle, index)
        return gpu

    def _check_accounting(self, handle, index):
        """The GPU's accounting mode, turned on where it is off (auto). Never raises: a GPU that refuses these
        calls stays usable, its jobs' VRAM peaks are then sampled."""
        n = self.nvml
        entry = self._acct.get(index)
        if entry is not None and entry["state"] == "unsupported":
            return "unsupported"  # asked once: it will not start supporting it
        try:
            on = n.nvmlDeviceGetAccountingMode(handle) == n.NVML_FEATURE_ENABLED
        except n.NVMLError as exc:
            state = "unsupported" if exc.value in (n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_FUNCTION_NOT_FOUND) \
                else health_of_code(exc.value, n)
            return self._acct_state(index, state, str(exc))["state"]
        except Exception as exc:  # an old binding without the function, a ctypes surprise
            return self._acct_state(index, "unsupported", f"{type(exc).__name__}: {exc}")["state"]
        if on:
            return self._acct_state(index, "on")["state"]
        if entry is not None and entry["state"] in ("no-permission", "error:no-permission"):
            return entry["state"]  # refused once; an admin may still turn it on, which the query above sees
        try:
            n.nvmlDeviceSetAccountingMode(handle, n.NVML_FEATURE_ENABLED)
        except n.NVMLError as exc:
            state = {n.NVML_ERROR_NOT_SUPPORTED: "unsupported", n.NVML_ERROR_NO_PERMISSION: "no-permission"}.get(
                exc.value, health_of_code(exc.value, n))
            return self._acct_state(index, state, str(exc))["state"]
        except Exception as exc:
            return self._acct_state(index, "unsupported", f"{type(exc).__name__}: {exc}")["state"]
        return self._acct_state(index, "on", enabled_by_us=True)["state"]

    def _accounted_job(self, box, pids, device, job_started, not_before):
        """Worker side of accounted_peaks: box.gpus = {pid: MiB}, or None where accounting cannot vouch."""
        n = self.nvml
        if not self._initialized:
            return
        indices = [device] if device is not None else sorted(self._acct)
        out, usable = {}, False
        for index in indices:
            if not self._acct_usable(index, job_started):
                return  # one GPU that cannot vouch spoils the sum: the samples answer instead
            handle = n.nvmlDeviceGetHandleByIndex(index)
            usable = True
            for pid in pids:
                try:
                    stats = n.nvmlDeviceGetAccountingStats(handle, pid)
                except n.NVMLError as exc:
                    if exc.value == n.NVML_ERROR_NOT_FOUND:
                        if self._ring_full(handle):
                            return  # the ring overflowed: its record may have been pushed out
                        continue  # no context on this GPU: the process used none of it
                    self._acct_state(index, "unsupported" if exc.value == n.NVML_ERROR_NOT_SUPPORTED
                                     else health_of_code(exc.value, n), str(exc))
                    return  # mode turned off meanwhile (that clears the ring), or the GPU failed
                if stats.maxMemoryUsage is None:
                    return  # the driver does not know per-process memory here
                if not_before is not None and stats.startTime / 1e6 < not_before - START_SLACK_S:
                    continue  # an older process that had the same PID (the ring keeps the latest)
                out[pid] = out.get(pid, 0) + int(stats.maxMemoryUsage) // MIB
        if usable:
            box.gpus = out

    def _ring_full(self, handle):
        n = self.nvml
        try:
            return len(n.nvmlDeviceGetAccountingPids(handle)) >= n.nvmlDeviceGetAccountingBufferSize(handle)
        except n.NVMLError:
            return True  # cannot tell: do not vouch

    def accounted_peaks(self, pids, device=None, job_started=None, not_before=None):
        """{pid: peak MiB} the driver kept for ``pids`` on GPU ``device`` (all GPUs when None), a PID the ring
        does not hold being one that made no context there; None where accounting cannot vouch for the job (see
        the module docstring). ``job_started``: when the job could first allocate (the mode must have been on
        since); ``not_before``: the job's first process's start (a record older than that is a reused PID's)."""
        if self._closed or self.accounting == "off":
            return None
        box = _Box()
        box.gpus = None
        if not self._run(lambda b: self._accounted_job(b, pids, device, job_started, not_before), box):
            return None
        return box.gpus if box.error is None else None

    def _register(self, handle, index):
        n = self.nvml
        try:
            mask = XID_CRITICAL_EVENT & n.nvmlDeviceGetSupportedEventTypes(handle)
            if not mask:
                self._unwatchable.add(index)
                return
            n.nvmlDeviceRegisterEvents(handle, mask, self._event_set)
            self._registered.add(index)
        except n.NVMLError as exc:
            if exc.value in (n.NVML_ERROR_NOT_SUPPORTED, n.NVML_ERROR_NO_PERMISSION):  # too old, not root: for good
                self._unwatchable.add(index)

    def _drain_events(self):
        import ctypes

        n = self.nvml
        events = []
        for _ in range(256):
            try:
                data = n.nvmlEventSetWait(self._event_set, 0)
            except n.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing pending; anything else shows in the GPU queries
            if not data.eventType & XID_CRITICAL_EVENT:
                continue
            addr = ctypes.cast(data.device, ctypes.c_void_p).value
            index = self._by_addr.get(addr) if addr else None
            if addr and index is None:
                try:
                    index = n.nvmlDeviceGetIndex(data.device)
                except n.NVMLError:
                    index = None
            events.append((index, int(data.eventData)))  # index None: the event names no GPU -> all of them
        return events

    # ---------------------------------------------------------------- public

    def open(self):
        """Initialise NVML now (under the deadline). Never raises; a failure shows in the next sample too."""
        box = _Box()
        if self._run(self._init, box):
            self.open_error = box.error
        else:
            self.open_error = "timeout"
        return self

    @property
    def library_missing(self):
        """nvmlInit said NVML_ERROR_LIBRARY_NOT_FOUND: the binding is here, libnvidia-ml.so.1 is not."""
        return self._library_missing

    def sample(self):
        box = _Box()
        if self._closed:
            return {"source": self.source, "error": "closed", "driver": self._driver, "gpus": [], "xid_events": []}
        stuck_before = self._stuck is not None and self._stuck.is_alive()
        if self._run(self._sample_job, box):
            gpus, error, events = box.gpus, box.error, box.events
        else:
            gpus = list(box.gpus)
            seen = {g["index"] for g in gpus}
            why = "an NVML call is still hung" if stuck_before else f"NVML did not answer in {self.call_timeout_s:g} s"
            for index in sorted(set(self._static) | set(range(self._count))):
                if index not in seen:
                    gpus.append(_gpu(index, self._static.get(index), "error:timeout", why))
            error, events = f"timeout: {why}", []
        if any(g["health"] != "ok" for g in gpus):
            self._bad_streak += 1
            if self.reinit_after and self._bad_streak % self.reinit_after == 0:
                self._reinit = True  # stale handles after a reset: start a fresh session now and then
        else:
            self._bad_streak = 0
        return {"source": self.source, "error": error, "driver": self._driver, "gpus": gpus, "xid_events": events}

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self._initialized:
            self._run(lambda box: self._shutdown_session(), _Box())


class SmiBackend(_Accounting):
    """``nvidia-smi`` queries with a timeout: the fallback when no NVML binding is installed. No Xid watching."""

    source = "nvidia-smi"
    GPU_QUERY = "index,uuid,name,memory.total,memory.used,memory.free"
    APP_QUERY = "pid,used_memory,gpu_uuid"
    MODE_QUERY = "index,accounting.mode"
    ACCOUNTED_QUERY = "gpu_uuid,pid,max_memory_usage"
    MODE_EVERY_S = 30.0  # the accounting mode is checked at the first sample and then this often (a process each)

    def __init__(self, path=None, call_timeout_s=5.0, accounting="off"):
        self.path = path or find_executable("nvidia-smi")
        self.call_timeout_s = call_timeout_s
        self.note = None
        self._static = {}
        self._driver = None
        self._mode_checked = None  # monotonic time of the last accounting-mode check
        self._init_accounting(accounting)

    def open(self):
        return self

    def _query(self, what, fields):
        """(rc, stdout lines, stderr) or raises TimeoutError / OSError."""
        return self._smi([f"--query-{what}={fields}", "--format=csv,noheader,nounits"])

    def _smi(self, args):
        import subprocess

        try:
            proc = subprocess.run([self.path, *args], capture_output=True, timeout=self.call_timeout_s, text=True,
                                  errors="replace", stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:  # run() kills the child before raising
            raise TimeoutError(f"nvidia-smi did not answer in {self.call_timeout_s:g} s") from exc
        return proc.returncode, [l for l in proc.stdout.splitlines() if l.strip()], proc.stderr

    def _check_accounting(self, gpus):
        """`--query-gpu=index,accounting.mode`, and `-i N -am 1` where it is Disabled (auto). Never raises."""
        try:
            _rc, lines, _err = self._query("gpu", self.MODE_QUERY)
        except (TimeoutError, OSError):
            return
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) not in gpus:
                continue
            index, mode = int(parts[0]), parts[1].lower()
            entry = self._acct.get(index)
            if mode == "enabled":
                self._acct_state(index, "on")
            elif mode != "disabled":
                self._acct_state(index, "unsupported", parts[1])  # [N/A], [Not Supported]
            elif entry is not None and entry["state"] == "no-permission":
                continue  # refused once; an admin may still turn it on, which this query sees
            else:
                try:
                    rc, out, err = self._smi(["-i", str(index), "-am", "1"])
                except (TimeoutError, OSError) as exc:
                    self._acct_state(index, "error:timeout" if isinstance(exc, TimeoutError) else "error:exec",
                                     str(exc))
                    continue
                said = " ".join(out) + " " + err
                if rc == 0 and "enabled" in said.lower():
                    self._acct_state(index, "on", enabled_by_us=True)
                elif "permission" in said.lower():
                    self._acct_state(index, "no-permission", said.strip()[:200])
                elif "not supported" in said.lower():
                    self._acct_state(index, "unsupported", said.strip()[:200])
                else:
                    self._acct_state(index, f"error:exit-{rc}", said.strip()[:200])

    def accounted_peaks(self, pids, device=None, job_started=None, not_before=None):
        """As NvmlBackend.accounted_peaks, from `--query-accounted-apps=gpu_uuid,pid,max_memory_usage`. nvidia-smi
        gives no start time, so ``not_before`` cannot be checked; and since it lists nothing for a GPU whose mode
        is off, no row for any of the PIDs means "not known" (None), never 0."""
        if self.accounting == "off":
            return None
        indices = [device] if device is not None else sorted(self._acct)
        uuids = {}
        for index in indices:
            if not self._acct_usable(index, job_started) or not (self._static.get(index) or {}).get("uuid"):
                return None
            uuids[self._static[index]["uuid"]] = index
        if not uuids:
            return None
        try:
            rc, lines, _err = self._query("accounted-apps", self.ACCOUNTED_QUERY)
        except (TimeoutError, OSError):
            return None
        return parse_accounted_apps(lines, uuids, pids)

    @staticmethod
    def _bracket_health(value):
        low = value.lower()
        if "lost" in low:
            return "gpu-lost"
        if "reset" in low:
            return "reset-required"
        slug = "".join(c if c.isalnum() else "-" for c in low.strip("[] ")).strip("-")
        return "error:" + (slug or "unknown")

    def sample(self):
        out = {"source": self.source, "error": None, "driver": self._driver, "gpus": [], "xid_events": []}
        try:
            rc, lines, err = self._query("gpu", self.GPU_QUERY)
        except (TimeoutError, OSError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "error"
            out["error"] = f"{kind}: {exc}"
            out["gpus"] = [_gpu(i, s, f"error:{kind}", str(exc)) for i, s in sorted(self._static.items())]
            return out
        text = " ".join(lines) + " " + err
        if rc == NVIDIA_SMI_DRIVER_NOT_LOADED or "NVIDIA-SMI has failed" in text or \
                "couldn't communicate with the NVIDIA driver" in text:
            out["error"] = "init-failed: " + (lines[0] if lines else err.strip() or f"nvidia-smi exited {rc}")
            out["gpus"] = [_gpu(i, s, "init-failed", out["error"]) for i, s in sorted(self._static.items())]
            return out
        gpus = {}
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 6 or not parts[0].isdigit():
                continue
            index = int(parts[0])
            uuid, name = parts[1], ", ".join(parts[2:-3])  # a name with a comma stays whole
            gpu = _gpu(index, self._static.get(index))
            gpu.update(uuid=uuid, name=name)
            numbers = parts[-3:]
            bad = next((v for v in numbers if not v.isdigit()), None)
            if bad is not None:
                gpu["health"], gpu["reason"] = self._bracket_health(bad), bad
                if numbers[0].isdigit():
                    gpu["total_mb"] = int(numbers[0])
            else:
                gpu.update(total_mb=int(numbers[0]), used_mb=int(numbers[1]), free_mb=int(numbers[2]))
                self._static[index] = {"uuid": uuid, "name": name, "total_mb": int(numbers[0])}
            gpus[index] = gpu
        # A GPU nvidia-smi no longer lists, or a gap in the indices: it printed "Unable to determine the device
        # handle for GPU<bus>: GPU is lost" instead of a row. Indices are dense, so a gap is a GPU.
        known = set(self._static) | set(range(max(gpus) + 1 if gpus else 0))
        for index in sorted(known - set(gpus)):
            lost = "lost" in err.lower()
            gpus[index] = _gpu(index, self._static.get(index), "gpu-lost" if lost else "error:missing",
                               err.strip().splitlines()[0] if err.strip() else "not listed by nvidia-smi")
        if rc not in (0, 15) and not gpus:
            out["error"] = f"error: nvidia-smi exited {rc}: {err.strip()[:200]}"
        by_uuid = {g["uuid"]: g for g in gpus.values() if g["health"] == "ok"}
        if by_uuid:
            try:
                _rc, app_lines, _err = self._query("compute-apps", self.APP_QUERY)
            except (TimeoutError, OSError) as exc:
                app_lines = []
                for g in by_uuid.values():
                    g["reason"] = f"processes: {exc}"
            for line in app_lines:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 3 or not parts[0].isdigit() or parts[2] not in by_uuid:
                    continue
                used = int(parts[1]) if parts[1].isdigit() else None
                by_uuid[parts[2]]["processes"].append({"pid": int(parts[0]), "used_mb": used})
        if self.accounting != "off" and by_uuid and (
                self._mode_checked is None or time.monotonic() - self._mode_checked >= self.MODE_EVERY_S):
            self._mode_checked = time.monotonic()
            self._check_accounting({g["index"] for g in by_uuid.values()})
        for g in gpus.values():
            if g["index"] in self._acct:
                g["accounting"] = self._acct[g["index"]]["state"]
        if self._driver is None and gpus:
            try:
                _rc, dl, _err = self._query("gpu", "driver_version")
                self._driver = dl[0].strip() if dl and dl[0].strip()[:1].isdigit() else None
            except (TimeoutError, OSError):
                pass
            out["driver"] = self._driver
        out["gpus"] = [gpus[i] for i in sorted(gpus)]
        return out

    def close(self):
        pass


def parse_accounted_apps(lines, uuids, pids):
    """{pid: MiB} from `--query-accounted-apps=gpu_uuid,pid,max_memory_usage` lines, for ``pids`` on the GPUs in
    ``uuids``; None when no row names any of them. A value that is not a number ([N/A], [Not Supported], empty)
    makes the answer None: a peak the driver does not know is not a peak of 0. A PID listed twice (a reused PID)
    counts its last row, the process that ended last."""
    wanted = set(pids)
    rows = {}
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or parts[0] not in uuids or not parts[1].isdigit() or int(parts[1]) not in wanted:
            continue
        rows[(parts[0], int(parts[1]))] = parts[2]
    if not rows:
        return None
    out = {}
    for (_uuid, pid), value in rows.items():
        value = value.removesuffix("MiB").strip()
        if not value.isdigit():
            return None
        out[pid] = out.get(pid, 0) + int(value)
    return out


def find_executable(name):
    """nvidia-smi's place on $PATH (executables.which: the one search, shared with the wrapper and ops)."""
    from ..executables import which

    return which(name)


def open_backend(prefer="auto", call_timeout_s=5.0, smi_path=None, accounting="off"):
    """The backend to use. Never raises; an unusable choice comes back as a NoGpuBackend whose samples say why.

    "auto": NVML when a (non-shim) binding imports and libnvidia-ml loads; else nvidia-smi when on PATH; else
    "none" with no error (a host without a GPU is normal). An NVML that loads but fails to initialise (driver not
    loaded, version mismatch) stays the backend: that is a GPU host in trouble, and its samples say "init-failed".
    "nvml" / "nvidia-smi": that backend or a NoGpuBackend with the reason as its error. "none": no GPU.
    """
    if prefer == "none":
        return NoGpuBackend()
    notes = []
    if prefer in ("auto", "nvml"):
        module, reason = import_pynvml()
        if module is None:
            if prefer == "nvml":
                return NoGpuBackend(error=reason)
            notes.append(reason)
        else:
            backend = NvmlBackend(module, call_timeout_s=call_timeout_s, accounting=accounting).open()
            if prefer == "nvml" or not backend.library_missing:
                return backend
            notes.append("nvml: libnvidia-ml.so.1 not found")
    if prefer in ("auto", "nvidia-smi"):
        path = smi_path or find_executable("nvidia-smi")
        if path:
            backend = SmiBackend(path, call_timeout_s=call_timeout_s, accounting=accounting)
            backend.note = "; ".join(notes) or None
            return backend
        if prefer == "nvidia-smi":
            return NoGpuBackend(error="nvidia-smi-missing: nvidia-smi not found on PATH")
        notes.append("nvidia-smi not found")
        refused = next((n for n in notes if n.startswith("pynvml-refused")), None)
        return NoGpuBackend(error=refused, note="; ".join(notes))  # a refused shim is the admin's to fix
    raise ValueError(f"gpu backend must be auto, nvml, nvidia-smi or none, not {prefer!r}")
