"""gpu-router-agent: the resident half. GPU snapshot, scope broker, job accounting, sd_notify.

One thread, one ``selectors`` loop: the broker socket (from systemd's socket activation, or bound here when run by
hand), the kernel's process-exit events, and a timer for the GPU sample. Jobs are not children of the agent — each
is its own scope under gpu-router.slice — so restarting or stopping the agent never touches them; on start it
adopts the scopes already running.
"""

import argparse
import os
import sys
import selectors
import signal
import socket
import time

from . import accounting, broker, clients, holder, inflight, jobrecord, metrics, procevents
from .. import journal, oom_memory, procstat, scope, slots
from .. import config as _config

SD_LISTEN_FDS_START = 3
SAMPLE_DEFER_S = 1.0  # how long the periodic sample may wait for scopes being made
NEIGHBOUR_S = 0.5  # a GPU job that ended this shortly before another's exit counts in that one's OOM evidence


class Notifier:
    """sd_notify through python3-sdnotify; silent outside systemd."""

    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = None
        if self.enabled:
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def __call__(self, text):
        if self._n is not None:
            self._n.notify(text)

    def store_fd(self, fd, name):
        """FDSTORE=1: systemd keeps a copy of ``fd`` and passes it to the next start of this service (needs
        FileDescriptorStoreMax= in the unit). False outside systemd or where it cannot be sent."""
        path = os.environ.get("NOTIFY_SOCKET")
        if not path:
            return False
        if path.startswith("@"):
            path = "\0" + path[1:]
        import array

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendmsg([f"FDSTORE=1\nFDNAME={name}".encode()],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, path)
        except OSError:
            return False
        return True


_PASSED = None


def passed_fds():
    """{name: fd} systemd passed us (sd_listen_fds: the broker socket, fd-store entries), read once."""
    global _PASSED
    if _PASSED is None:
        _PASSED = {}
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            n = int(os.environ.get("LISTEN_FDS", "0") or 0)
            names = (os.environ.get("LISTEN_FDNAMES") or "").split(":")
            for i in range(n):
                name = names[i] if i < len(names) and names[i] else f"fd{i}"
                _PASSED.setdefault(name, SD_LISTEN_FDS_START + i)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return _PASSED


def watchdog_interval():
    """Half of WatchdogSec (systemd passes WATCHDOG_USEC), or None when no watchdog is armed for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def listening_socket(path, group):
    """The socket systemd passed us (LISTEN_FDS), or one bound here: 0660, group gpu-router."""
    broker_fds = [fd for name, fd in sorted(passed_fds().items(), key=lambda kv: kv[1])
                  if name != procevents.FD_NAME]
    if broker_fds:
        return socket.socket(fileno=broker_fds[0]), "systemd"
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    gid = broker.group_id(group)
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    sock.listen(64)
    return sock, "bound"


def unit_cgroup_root():
    """Where systemd's own hierarchy is mounted: v2, or the unified/name=systemd tree on a hybrid host."""
    base = accounting.CGROUP_ROOT
    if os.path.exists(os.path.join(base, "cgroup.controllers")):
        return base
    if os.path.exists(os.path.join(base, "unified", "cgroup.procs")):
        return os.path.join(base, "unified")
    return os.path.join(base, "systemd")


def running_scopes():
    """{scope name: (control group, [pids])} of gpu-router scopes alive now (for adoption after a restart)."""
    root = unit_cgroup_root()
    found = {}
    for slice_name in scope.SLICES.values():
        cg_dir = scope.slice_path(slice_name)
        try:
            names = os.listdir(root + cg_dir)
        except OSError:
            continue
        for name in names:
            if not (name.startswith("gpu-router-") and name.endswith(".scope")):
                continue
            try:
                with open(os.path.join(root + cg_dir, name, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            if pids:
                found[name] = (f"{cg_dir}/{name}", pids)
    return found


class Agent:
    def __init__(self, config_file=None, monitor=None):
        self.config_file = config_file
        self.cfg = _config.load(config_file)
        self.log = _logger()
        self.notify = Notifier()
        self.jobs = {}  # pid → JobAccount
        self.monitor = monitor if monitor is not None else _make_monitor(self.cfg, self.reserved_pids, self.log)
        self.snapshot = None
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.metrics = metrics.Metrics(self.cfg.agent.state_dir, log=self.log)
        self.proc = None
        self.clients = clients.Clients(self.selector, self._handle_request, broker.log_refusal)
        self.proc_stored = False  # a copy of self.proc is in systemd's fd store
        self.records = jobrecord.directory(self.cfg.gpu.snapshot)
        self._holders = {}  # scope name → Holder, between StartTransientUnit and the grant
        self.inflight = inflight.InFlight(self.selector, self.scope_ended, warn=self.log.warning)  # start jobs
        self._waiting = {}  # pid → [(payload, uid, answer)]: its requests that came while its scope was made
        self.outgrown = {}  # (gpu key, pid) → the MiB last reported for a job that outgrew its reservation
        self._sample_errors = set()  # (stage, exception type, where): each reported once
        self.oom = oom_memory.Memory(self.cfg.agent.state_dir, self.log)  # inputs that ran out of GPU memory
        self._gpu_exits = []  # (device, monotonic time, peak MiB) of the GPU jobs that ended in the last NEIGHBOUR_S

    # -- pieces ------------------------------------------------------------------------------------------------

    def reserved_pids(self):
        """Our jobs' PIDs for the monitor: accounted jobs, VRAM reservations, and slot holders (a slots-mode job
        without a scope is in neither of the others, and its VRAM would count as another user's)."""
        from .. import trust

        pids = set(self.jobs)
        for entries in slots.live_reservations(self.cfg.router.lock_dir, verify=True).values():
            pids.update(pid for pid, _ in entries)
        pids |= slots.slot_holder_pids(self.cfg.router.lock_dir, trust.pools_of(self.cfg))
        return pids

    def adopt(self):
        """Follow the jobs a previous agent left running: from their records (all it knew), else their scopes."""
        from .. import trust

        scopes = running_scopes()
        records = jobrecord.load_all(self.records)
        for job_id, r in records.items():
            if r["pid"] in self.jobs:
                continue
            job = accounting.JobAccount.from_record(r)
            if r.get("holder_pid"):
                job.holder = holder.Holder(r["holder_pid"], r.get("holder_start"))
            if job.scope not in scopes and not _job_alive(job):
                # Scope gone and job gone: the counters are gone too; account what the record and the queued
                # exit event (fd store) still say.
                job.control_group = None
            self.track(job, write_record=False)
        for name, (cg, pids) in scopes.items():
            job_id = name[len("gpu-router-"):-len(".scope")]
            if job_id in records:
                continue
            workload, _, rest = job_id.rpartition("-")
            workload, _, pid_text = workload.rpartition("-")
            # The JOB id is the member's word (broker.grant checks it names the caller, but a scope may predate
            # that): its PID is trusted only when the kernel lists it in the scope's cgroup, else the scope's
            # first process that is not its holder is the job.
            pid = trust.digits(pid_text)
            if pid not in pids:
                pid = next((p for p in pids if not holder.is_holder(p)), pids[0])
            if pid in self.jobs:
                continue
            mode = "GPU" if f"/{scope.SLICES['GPU']}/" in cg else "CPU"
            try:
                w = self.cfg.workload(workload)
                runtime_max = w.runtime_max
            except _config.ConfigError:
                runtime_max = None
            job = accounting.JobAccount(job_id, pid, workload, mode, None, "unknown", name, cg, runtime_max,
                                        started=procstat.start_time(pid))
            # No record: the agent that made the scope was killed before it wrote one. Its holder is in the scope
            # all the same, and must be ended once the job is accounted, or the scope stays for ever.
            job.holder = holder.find([p for p in pids if p != pid])
            self.track(job)
        if self.jobs:
            self.log.info("adopted running jobs", jobs=len(self.jobs), from_records=len(records))

    def begin_scope(self, name, props):
        """The broker's StartTransientUnit, with a holder process in the scope next to the job (holder.py); the
        job's end is awaited in the loop (inflight.py, scope_ended)."""
        h = holder.spawn()
        if h is not None:
            props = [(k, list(v) + [h.pid]) if k == "PIDs" else (k, v) for k, v in props]
        # A SIGTERM (agent restart) in the middle of the D-Bus call interrupts sd-bus's poll: the scope would be
        # refused with EINTR and the job blocked. Hold the signals until the scope exists; they arrive after.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
        try:
            self.inflight.begin(name, props)
        except BaseException:
            if h is not None:
                h.release()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        if h is not None:
            self._holders[name] = h

    def scope_ended(self, token, error):
        """A scope's start job ended: answer its wrapper (what broker.handle answers for a scope made at once),
        account for the job, then the requests its PID sent meanwhile."""
        g, answer = token
        if error is None:
            fields = {"OK": "1", "SCOPE": g.name}
        else:
            h = self._holders.pop(g.name, None)
            if h is not None:
                h.release()
            fields, g = broker.scope_failed(g, scope.ScopeError(error))
        try:
            if g is not None:
                self.on_grant(g)
        except Exception as exc:  # noqa: BLE001 - the wrapper is answered all the same
            self.log.error("accounting a new job failed", error=f"{type(exc).__name__}: {exc}")
        answer(broker.frame(fields))
        pid = token[0].pid
        for payload, uid, later in self._waiting.pop(pid, []):
            reply = self._handle_request(payload, pid, uid)
            if callable(reply):
                reply(later)
            else:
                later(reply)

    def _answer_at_end(self, g, answer):
        if not self.inflight.attach(g.name, (g, answer)):  # never expected: its job is in flight since begin
            self.scope_ended((g, answer), f"scope {g.name}: its start job was lost")

    def on_grant(self, g):
        job = accounting.JobAccount(
            g.job_id, g.pid, g.workload.name, g.mode, g.device, g.metric, g.name, g.control_group,
            g.workload.runtime_max, predicted_vram_mb=g.predicted_vram_mb, memory_max_mb=g.memory_max_mb,
            input_path=g.input, pid_start=procstat.start_ticks(g.pid))
        job.holder = self._holders.pop(g.name, None) if g.name else None
        job.input_id = self._guarded("input-id", oom_memory.verify, g.pid, g.input, getattr(g, "input_id", None))
        self._guarded("oom-retry", self._retried, job)
        self.track(job)

    def track(self, job, write_record=True):
        """Follow a job: a pidfd wakes the loop the moment it exits; its holder keeps the cgroup until then.
        One account per PID: a newer one replaces the older (whose descriptors are closed, never leaked)."""
        self._forget(job.pid)
        self.jobs[job.pid] = job
        if write_record:
            self._write_record(job)
        job.sample()
        if _job_alive(job):
            try:
                job.pidfd = os.pidfd_open(job.pid)
                self.selector.register(job.pidfd, selectors.EVENT_READ, ("exited", job.pid))
            except OSError:
                job.pidfd = None  # already gone: the next sample closes it
        if job.control_group:
            job.oomfd = accounting.watch_oom(accounting.memory_dir(job.control_group))
            if job.oomfd is not None:
                self.selector.register(job.oomfd, selectors.EVENT_READ, ("oom", job.pid))

    def _forget(self, pid):
        """Drop a job's account without an event (it is being replaced), closing its descriptors."""
        job = self.jobs.pop(pid, None)
        if job is not None:
            self._close_fds(job)

    def _close_fds(self, job):
        for attr in ("pidfd", "oomfd"):
            fd = getattr(job, attr)
            setattr(job, attr, None)
            if fd is not None:
                _drop_fd(self.selector, fd)

    def existing_scope(self, pid, grant=None):
        """The scope this PID already sits in (one the agent made for it, its process still alive), "" when it is
        followed without one, or None.
        A dead process's account is closed first: a reused PID is a new job.

        An account adopted from a bare scope (the agent that made it was killed before it wrote the job's record:
        no device, metric or input known) is completed from ``grant`` when that is the same job asking again (a
        wrapper whose agent went away unanswered asks the next one, scope.Unanswered): the same JOB id from the
        same PID, its fields checked by broker.grant. Without it the job would be accounted with metric unknown,
        no input and no device, although the wrapper has just said all of it."""
        job = self.jobs.get(pid)
        if job is None:
            return None
        if not _pidfd_alive(job.pidfd) or not _job_alive(job):
            self.finish(pid, procevents.zombie_status(pid))
            return None
        if grant is not None and grant.job_id == job.job_id and job.device is None and grant.mode == job.mode:
            job.device, job.metric, job.input = grant.device, grant.metric, grant.input
            job.predicted_vram_mb, job.memory_max_mb = grant.predicted_vram_mb, grant.memory_max_mb
            self._write_record(job)
        return job.scope or ""  # "": followed without a scope (scope = "off", OP=track; a best-effort job)

    def _write_record(self, job):
        try:
            jobrecord.write(self.records, job.to_record())
        except (OSError, ValueError) as exc:
            self.log.warning("cannot write a job record", job=job.job_id, error=str(exc))

    def finish(self, pid, wait_status=None):
        job = self.jobs.pop(pid, None)
        if job is None:
            return None
        self._close_fds(job)
        job.wait_status = wait_status
        job.final_read()  # the holder still keeps the cgroup: exact peak and OOM count
        if job.holder is not None:
            job.holder.release()
        if job.mode == "GPU":
            after = self._guarded("gpu-after-exit", self._sample_after_exit, job)  # first: the nearest the failure
            job.take_accounted(self._guarded("vram-accounting", self._accounted_peaks, job))
            if after is not None:
                self._guarded("gpu-evidence", self._gpu_evidence, job, after)
            if job.peak_vram_mb:
                self._gpu_exits.append((job.device, time.monotonic(), job.peak_vram_mb))
        fields = job.outcome()
        self._guarded("oom-memory", self._remember, job, fields)
        status = f"exit {fields['EXIT_STATUS']}" if "EXIT_STATUS" in fields else "exit status unknown"
        ram = f"{fields['PEAK_RAM_MB']} MB" if fields.get("PEAK_RAM_MB") is not None else "not measured"
        vram = ""
        if job.mode == "GPU":
            vram = f", peak VRAM {fields['PEAK_VRAM_MB']} MB" if fields.get("PEAK_VRAM_MB") is not None else \
                ", peak VRAM not measured"
            if fields.get("PREDICTED_VRAM_MB") is not None:
                vram += f" (predicted {fields['PREDICTED_VRAM_MB']} MB)"
        journal.emit("job-finished", f"{job.workload}: job {job.job_id} on {job.mode} finished: {fields['RESULT']} "
                     f"({status}, {fields['DURATION_S']:.1f}s, peak RAM {ram}{vram})", fields,
                     priority=6 if fields["RESULT"] == "success" else 4)
        try:
            accounting.record_sample(self.cfg.agent.state_dir, fields,
                                     peaks_known=job.peaks_known(gpu_sampling=self._gpu_sampling()))
        except OSError as exc:
            self.log.warning("cannot record a calibration sample", error=str(exc))
        jobrecord.remove(self.records, job.job_id)
        self.metrics.job_finished(fields)
        return fields

    # -- CUDA OOMs (HACKING.md, "CUDA OOMs"): know it, remember the input, never send its retry into it again ----

    def _sample_after_exit(self, job):
        """One GPU sample right after a GPU job failed or ended with its status unknown (its GPU entries, or None):
        what the other processes use on its GPU then is the nearest measure of what they used when it failed (a
        short job may have ended between two periodic samples)."""
        if self.monitor is None or job.device is None:
            return None
        base = accounting.classify(job.wait_status, job.oom_kills, job.runtime_max, time.time() - job.started,
                                   job.failcnt)
        if base not in ("failed", "unknown"):
            return None
        self.fresh_sample(0.0)
        return list((self.snapshot or {}).get("gpus", ()))

    def _gpu_evidence(self, job, gpus):
        """Fold the sample after the exit into the job's OOM evidence, with the GPU jobs that failed beside it."""
        now = time.monotonic()
        self._gpu_exits = [x for x in self._gpu_exits if now - x[1] <= NEIGHBOUR_S]
        # GPU jobs that ended on the same GPU just before this one's exit held their memory until they exited (CUDA
        # allocators give it back at exit; a job that failed by running out did so at its peak): gone from the
        # sample after, they were there when this one failed, at most at their peak.
        neighbours = sum(peak for device, _t, peak in self._gpu_exits if device == job.device)
        for other in list(self.jobs.values()):  # ended with it, not accounted yet (the same wake-up): their peaks
            if other.mode == "GPU" and other.device == job.device and not _job_alive(other, zombie_ok=False):
                peaks = self._guarded("vram-accounting", self._accounted_peaks, other)
                neighbours += sum(peaks.values()) if peaks else (other.peak_vram_mb or 0)
        for gpu in gpus:
            job.see_gpu(gpu, after_exit=True, also_mb=neighbours)

    def _remember(self, job, fields):
        """The input of a GPU attempt that ran out of memory goes into the OOM memory (its identity as the agent
        verified it at the grant): ``oom`` for any cuda-oom (outgrew, or squeezed: a job squeezed out early by
        another's growth may itself not fit either, and its failure says nothing of its size, so its retry goes
        where on_gpu_oom says, never blindly to the GPU again), ``suspect`` when the exit status is unknown but
        the GPU was full while it ran (a retry within oom_memory.RETRY_WINDOW_S confirms it)."""
        if job.mode != "GPU" or job.input_id is None:
            return
        result = fields["RESULT"]
        if result == "cuda-oom":
            kind = "oom"
        elif result == "unknown" and accounting.gpu_was_full(job.peak_vram_mb, job.gpu_total_mb, job.others_mb):
            kind = "suspect"
        else:
            return
        self.oom.mark(job.input_id, kind, time.time(), job.workload, job.peak_vram_mb,
                      accounting.oom_need_mb(job.peak_vram_mb, job.gpu_total_mb), job.device, job.job_id,
                      job.gpu_total_mb, os.fsdecode(job.input) if job.input else None)
        fields["OOM_MEMORY"] = kind
        self.log.info("input remembered as out of GPU memory", job=job.job_id, kind=kind,
                      peak_vram_mb=job.peak_vram_mb, total_mb=job.gpu_total_mb, others_mb=job.others_mb)

    def _retried(self, job):
        """A retry of a suspect's input within the window: the sign that the GPU attempt failed. The suspect
        becomes an ``oom`` (the wrapper already routed this retry as after an OOM)."""
        entry = self.oom.get(job.input_id) if job.input_id is not None else None
        if entry is None or oom_memory.applies(entry, time.time()) != "suspect":
            return
        self.oom.mark(job.input_id, "oom", entry[1], *entry[2:], input_name=self.oom.inputs.get(job.input_id))
        self.log.info("a suspected CUDA OOM confirmed by the caller's retry", job=job.job_id,
                      retried_after_s=round(time.time() - entry[1], 1))

    def _accounted_peaks(self, job):
        """The driver's per-process peaks of the job's PIDs on its GPU ({pid: MiB}), or None where the backend's
        accounting cannot vouch for them (then the samples' maximum stands)."""
        ask = getattr(getattr(self.monitor, "backend", None), "accounted_peaks", None)
        if ask is None or self.cfg.gpu.accounting == "off":
            return None
        device = int(job.device) if isinstance(job.device, str) and job.device.isdigit() else None
        return ask(job.accounting_pids(), device=device, job_started=job.started, not_before=job.first_start())

    def _gpu_sampling(self):
        """Whether GPU samples list processes here (a GPU backend that sees GPUs): VRAM peaks are then expected."""
        snap = self.snapshot or {}
        return bool(snap.get("gpus")) and not snap.get("error")

    def fresh_sample(self, min_age_s=0.05):
        """A snapshot no older than ``min_age_s`` (a wrapper about to admit by VRAM asks for it): sample now unless
        one was just taken; returns the snapshot's time. A burst of wrappers shares one sample."""
        if self.monitor is None:
            return None
        if self.snapshot is None or time.time() - self.snapshot.get("time", 0) > min_age_s:
            self.snapshot = self.monitor.sample_once()
            self.check_predictions()
            for job in list(self.jobs.values()):  # every sample is OOM evidence for the GPU jobs running now
                if job.mode == "GPU" and _job_alive(job):
                    for gpu in self.snapshot.get("gpus", ()):
                        self._guarded("job-gpu", job.see_gpu, gpu)
        return self.snapshot.get("time")

    def check_predictions(self):
        """Jobs whose measured VRAM (their process tree's, as the snapshot attributes it) exceeds their reservation:
        one ``vram-underpredicted`` event and one calibration sample per job and GPU (again only if it grows by
        another 10 %). Room already counts such a job at its measured use from this snapshot on (policy.room_mb).

        The ledger is a member's writing: it is read verified (the entry held by the PID it names, that PID one
        of the entry owner's), its workload must be one the config has (else no workload and no sample: the word
        would name a file) and its metric a finite number as the broker takes one (trust.py)."""
        from .. import trust

        try:
            live = slots.live_reservations(self.cfg.router.lock_dir, detail=True, verify=True,
                                           workloads=self.cfg.workloads)
        except OSError:
            return
        seen = set()
        for gpu in (self.snapshot or {}).get("gpus", ()):
            key = f"gpu{gpu['index']}"
            measured = {}
            for proc in gpu.get("processes", ()):
                if proc.get("job") is not None:
                    measured[proc["job"]] = measured.get(proc["job"], 0) + (proc.get("used_mb") or 0)
            for pid, mb, workload, metric in live.get(key, ()):
                seen.add((key, pid))
                used = measured.get(pid, 0)
                last = self.outgrown.get((key, pid))
                if used <= mb or (last is not None and used <= last * 1.1):
                    continue
                self.outgrown[(key, pid)] = used
                workload = trust.workload(workload, self.cfg.workloads)  # again here: this joins a path below
                fields = {"WORKLOAD": workload, "PID": pid, "DEVICE": gpu["index"], "METRIC": metric,
                          "PREDICTED_VRAM_MB": mb, "MEASURED_VRAM_MB": used, "MODE": "GPU"}
                advice = f"recalibrate with `gpu-router calibrate --workload {workload}`" if workload else \
                    "its entry names no configured workload"
                journal.emit("vram-underpredicted",
                             f"{workload or 'a'} job {pid} on GPU {gpu['index']} uses {used} MiB of VRAM, over its "
                             f"{mb} MiB reservation (metric {metric or 'unknown'}): admission counts {used} MiB "
                             f"from now on; {advice}", fields)
                if workload and metric:
                    try:
                        accounting.record_sample(self.cfg.agent.state_dir, dict(
                            fields, RESULT="underpredicted", PEAK_VRAM_MB=used, PEAK_VRAM_SOURCE="sampled"))
                    except OSError as exc:
                        self.log.warning("cannot record a calibration sample", error=str(exc))
        for k in [k for k in self.outgrown if k not in seen]:
            del self.outgrown[k]

    def _vram_by_job(self):
        """{job pid: {pid: MiB}} of the processes the last GPU sample attributes to each job (the job's own PID and
        its descendants, by the monitor's `job`), summed over GPUs; None when it listed no processes (no GPU, a
        failed backend)."""
        if not self._gpu_sampling():
            return None
        out = {}
        for gpu in self.snapshot.get("gpus", ()):
            for proc in gpu.get("processes", ()):
                owner = proc.get("job") if proc.get("job") is not None else proc["pid"]
                mine = out.setdefault(owner, {})
                mine[proc["pid"]] = mine.get(proc["pid"], 0) + (proc.get("used_mb") or 0)  # null: NVML did not say
        return out

    def sample(self):
        """Reload the config if it changed, publish a GPU snapshot, fold job peaks, close vanished jobs."""
        try:
            self.cfg = _config.load(self.config_file)
        except _config.ConfigError as exc:
            self.log.error("config error; keeping the last good config", error=str(exc))
        if os.geteuid() == 0:
            self._guarded("tidy", slots.tidy, self.cfg.router.lock_dir, broker.group_id(self.cfg.agent.group))
        alive_before = {pid for pid, job in self.jobs.items() if _job_alive(job)}
        if self.monitor is not None:
            snapshot = self._guarded("gpu-sample", self.monitor.sample_once)
            if snapshot is not None:
                self.snapshot = snapshot
            self._guarded("predictions", self.check_predictions)
        vram = self._guarded("vram-by-job", self._vram_by_job)
        for pid, job in list(self.jobs.items()):
            # Only jobs alive before the GPU sample: a VRAM sample of a job that was already gone says nothing.
            mine = None if vram is None or pid not in alive_before else vram.get(pid, {})
            if self._guarded("job-sample", job.sample, mine):
                self._guarded("job-record", self._write_record, job)
            if pid in alive_before and job.mode == "GPU":
                for gpu in (self.snapshot or {}).get("gpus", ()):
                    self._guarded("job-gpu", job.see_gpu, gpu)
        self._guarded("close-vanished", self.close_vanished)
        self._guarded("metrics", self.metrics.publish, self.cfg, self.snapshot, self.jobs.values())

    def _guarded(self, stage, fn, *args):
        """One stage of the periodic sample. A bug in one stage (metrics, a job's counters, the backend) is logged
        once per kind and the agent goes on serving: dying here would take scopes, the snapshot and accounting
        down with it, and systemd would restart it into the same bug every second."""
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            tb = exc.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
            key = (stage, type(exc).__name__, where)
            if key not in self._sample_errors:
                self._sample_errors.add(key)
                self.log.error("a sampling stage failed; the agent goes on (reported once per kind)",
                               stage=stage, error=f"{type(exc).__name__}: {str(exc)[:300]}", where=where)
            return None
        return result

    def close_vanished(self):
        """Close jobs that ended without their pidfd waking us (gone before we followed them, or adopted dead).

        The kernel's exit message may be waiting in the proc connector (it is, whenever a job ended during a
        slow GPU sample): drain it first, so the sampling path never closes a job without its exit status.
        """
        dead = [pid for pid, job in self.jobs.items() if not _job_alive(job)]
        if not dead:
            return
        if self.proc is not None:
            self._drain_exits()
        for pid in dead:
            if pid in self.jobs:
                job = self.jobs[pid]
                self.finish(pid, procevents.zombie_status(pid) if _job_alive(job, zombie_ok=True) else None)

    def status_line(self):
        gpus = (self.snapshot or {}).get("gpus", [])
        healthy = sum(1 for g in gpus if g.get("healthy"))
        running = len(self.jobs)
        gpu_part = f"{healthy}/{len(gpus)} GPUs healthy" if gpus else "no GPU"
        return f"{gpu_part}, {running} job{'s' if running != 1 else ''} running"

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self, listener=None):
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, lambda *_: None)  # the next sample reloads the config anyway
        # Python retries an interrupted select() (PEP 475): without a wake-up fd a SIGTERM would wait for the next
        # sample (up to sample_interval) before the loop sees it.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.selector.register(wake_r, selectors.EVENT_READ, "wakeup")
        if listener is None:
            listener, how = listening_socket(self.cfg.agent.socket, self.cfg.agent.group)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "broker")
        self.open_exits()
        self.adopt()
        self.sample()
        self.notify("READY=1")
        self.notify(f"STATUS={self.status_line()}")
        journal.emit("agent", f"gpu-router-agent ready: {self.status_line()}",
                     {"STATE": "ready", "EXIT_STATUSES": "proc-connector" if self.proc else "unavailable"})
        interval = self.cfg.gpu.sample_interval
        dog = watchdog_interval()
        next_sample = time.monotonic() + interval
        next_dog = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if dog and now >= next_dog:
                self.notify("WATCHDOG=1")
                next_dog = now + dog
            # A sample holds the loop (nvidia-smi: hundreds of ms): not while scopes are being made, whose wrappers
            # wait for their job's end, unless it is already SAMPLE_DEFER_S late.
            sample_due = next_sample + (SAMPLE_DEFER_S if self.inflight.jobs else 0.0)
            if now >= sample_due:
                self.sample()
                self.notify(f"STATUS={self.status_line()}")
                next_sample = now + interval
                sample_due = next_sample
            self.clients.expire()
            self.inflight.expire()
            wake = min(sample_due, next_dog if dog else sample_due, self.clients.next_deadline() or sample_due,
                       self.inflight.next_deadline() or sample_due)
            timeout = max(0.0, wake - time.monotonic())
            # New connections last: the requests already accepted are read (and their scopes begun) first, so a
            # burst is not refused for connections of its own that merely wait to be read.
            for key, events in sorted(self.selector.select(timeout), key=lambda ke: ke[0].data == "broker"):
                try:
                    self._dispatch(key, events, listener)
                except Exception as exc:  # noqa: BLE001 - one job's or client's trouble never stops the agent
                    self.log.error("event handling failed", error=f"{type(exc).__name__}: {exc}")
                    if isinstance(key.data, tuple) and key.data[0] == "client":
                        self.clients.drop(key.data[1])
                    elif key.data not in ("broker", "exits", "wakeup", "dbus"):
                        _drop_fd(self.selector, key.fd)  # never again: a readable fd left behind would spin
        self._answer_accepted(listener)
        self.clients.close_all()
        if self.proc is not None:
            procevents.close_listener(self.proc, unsubscribe=not self.proc_stored)
        self.notify("STOPPING=1")
        self.metrics.stop(self.cfg)
        journal.emit("agent", f"gpu-router-agent stopping; {len(self.jobs)} job(s) keep running in their scopes",
                     {"STATE": "stopping"})
        return 0

    def _dispatch(self, key, events, listener):
        try:  # an earlier event of the same batch may have closed this fd, and its number may be in use again
            if self.selector.get_key(key.fileobj) is not key:
                return
        except (KeyError, ValueError):
            return
        data = key.data
        if data == "broker":
            self.clients.accept(listener)
        elif data == "wakeup":
            try:
                while os.read(key.fd, 4096):
                    pass
            except OSError:
                pass  # drained (EAGAIN): the signal's handler already ran
        elif data == "exits":
            self._drain_exits()
        elif data == "dbus":
            self.inflight.ready()
        elif isinstance(data, tuple) and data[0] == "client":
            self.clients.ready(data[1], events)
        elif isinstance(data, tuple) and data[0] in ("oom", "exited"):
            job = self.jobs.get(data[1])
            if job is None or key.fd not in (job.pidfd, job.oomfd):
                _drop_fd(self.selector, key.fd)  # an account's leftover: never leave a readable fd registered
            elif data[0] == "oom":
                self._on_oom(job)
            else:
                pid = data[1]
                status = procevents.zombie_status(pid)  # wins when the caller has not reaped it yet
                if self.proc is not None:
                    self._drain_exits()  # the kernel's word, if it came with the same wake-up
                if pid in self.jobs:
                    self.finish(pid, status)
        else:
            _drop_fd(self.selector, key.fd)

    def _on_oom(self, job):
        """v1: the eventfd's count is the number of OOMs; v2: memory.events changed, so read its counters now."""
        if job.oomfd is None:
            return
        try:
            data = os.read(job.oomfd, 4096)
        except OSError:
            data = b""
        job.sample()
        if len(data) == 8:  # an eventfd counter (inotify events are longer)
            job.oom_kills = max(job.oom_kills, int.from_bytes(data, sys.byteorder))

    def open_exits(self):
        """The proc connector: the socket a previous agent left in systemd's fd store (exits that happened
        since are queued in it), else a new subscription, which is then stored for the next agent."""
        fd = passed_fds().get(procevents.FD_NAME)
        try:
            if fd is not None:
                self.proc = procevents.from_fd(fd)
                self.proc_stored = True
            else:
                self.proc = procevents.open_listener()
                self.proc_stored = self.notify.store_fd(self.proc.fileno(), procevents.FD_NAME)
        except procevents.Unavailable as exc:
            self.log.warning("exact job exit statuses unavailable: the kernel's process-event connector cannot be "
                             "heard here (it only reaches the initial PID namespace, not a container); a job's "
                             "exit status is then read from its zombie when the agent gets there first, else "
                             "RESULT is \"unknown\" unless the cgroup shows an OOM kill or a timeout",
                             reason=str(exc))
            self.proc = None
            return
        self.selector.register(self.proc, selectors.EVENT_READ, "exits")

    def _drain_exits(self):
        for pid, status in procevents.drain(self.proc):
            if pid in self.jobs:
                self.finish(pid, status)

    def _handle_request(self, payload, pid, uid):
        """One complete scope request from clients.py → the reply frame, or ``later(answer)`` while its scope's
        start job runs (clients.py serves everyone else meanwhile). Never raises."""
        if pid in self._waiting:
            # Its scope is being made: answered after it, as the same PID's second request always was (REUSED).
            return lambda answer: self._waiting[pid].append((payload, uid, answer))
        try:  # a profile added a moment ago must be known to the very next request (a cache hit costs ~1 ms)
            self.cfg = _config.load(self.config_file)
        except _config.ConfigError as exc:
            self.log.error("config error; keeping the last good config", error=str(exc))
        begun = []
        fields, g = broker.handle(payload, pid, uid, self.cfg, broker.group_id(self.cfg.agent.group),
                                  existing=self.existing_scope,
                                  start_scope=lambda name, props: begun.append(self.begin_scope(name, props)),
                                  fresh_sample=self.fresh_sample)
        if begun and g is not None and fields.get("OK") == "1":
            self._waiting[pid] = []
            return lambda answer: self._answer_at_end(g, answer)
        if g is not None:
            self.on_grant(g)
        return broker.frame(fields)

    def _stop(self, *_):
        self.stopping = True

    def _answer_accepted(self, listener):
        """Stopping (an upgrade, a restart): answer the wrappers already accepted before leaving. Closing them
        unanswered made their jobs exit 75 ("closed the connection without an answer"); new connections are no
        longer taken and wait in the socket's queue for the next agent (socket activation keeps the socket).
        Bounded by the clients' own deadline, so a silent client cannot hold a stop up either."""
        try:
            self.selector.unregister(listener)
        except (KeyError, ValueError):
            pass
        end = max([time.monotonic() + self.clients.deadline_s] + [c.deadline for c in self.clients.conns.values()
                                                                   if c.waiting])  # a scope being made
        while self.clients.conns and time.monotonic() < end:
            self.clients.expire()
            self.inflight.expire()
            for key, events in self.selector.select(max(0.0, min(end, self.clients.next_deadline() or end,
                                                                 self.inflight.next_deadline() or end)
                                                        - time.monotonic())):
                try:
                    self._dispatch(key, events, listener)
                except Exception as exc:  # noqa: BLE001 - as in the loop: one client's trouble stops nothing
                    self.log.error("event handling failed", error=f"{type(exc).__name__}: {exc}")
                    if isinstance(key.data, tuple) and key.data[0] == "client":
                        self.clients.drop(key.data[1])


def _drop_fd(selector, fd):
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def _pidfd_alive(pidfd):
    """False once a pidfd is readable (its process has exited); True when there is no pidfd to ask."""
    if pidfd is None:
        return True
    import select

    try:
        return not select.select([pidfd], [], [], 0)[0]
    except (OSError, ValueError):
        return True


def _job_alive(job, zombie_ok=False):
    """The job's process (same PID and start time: a PID may be reused) exists and, unless ``zombie_ok``, runs."""
    try:
        with open(f"/proc/{job.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    try:
        if job.pid_start is not None and int(fields[19]) != job.pid_start:
            return False
    except (IndexError, ValueError):
        return False
    return zombie_ok or fields[0] not in (b"Z", b"X")


def _logger():
    from . import log

    return log.setup()


def _make_monitor(cfg, reserved_pids, log=None):
    from . import monitor

    g = cfg.gpu
    mon = monitor.Monitor(backend=g.backend, snapshot_path=g.snapshot, interval=g.sample_interval,
                          reserved_pids=reserved_pids, xid_ignore=g.ignored_xids, xid_holdoff_s=g.xid_holdoff,
                          call_timeout_s=g.call_timeout, accounting=g.accounting, log=log)
    if hasattr(mon.backend, "enabled_at"):
        mon.backend.enabled_at = _read_enabled_at(cfg)
    return mon


def _enabled_at_path(cfg):
    return os.path.join(os.path.dirname(cfg.gpu.snapshot), "accounting-enabled.json")


def _read_enabled_at(cfg):
    """{GPU index: when --enable-accounting turned its accounting mode on}, from this boot (/run)."""
    import json

    from .. import atomicfile

    try:  # root's own state only (atomicfile: a folder and file no other account could have planted)
        data = json.loads(atomicfile.read_state(*os.path.split(_enabled_at_path(cfg)), 1 << 16) or "{}")
        return {int(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def enable_accounting(config_file=None):
    """`gpu-router-agent --enable-accounting`, the unit's ExecStartPre=+: turn on the GPUs' per-process accounting
    mode with full privileges. The driver lets only CAP_SYS_ADMIN change it, and the agent's own sandbox does not
    have that capability (nor should it, for this one call). Honours [gpu] accounting and backend; records when it
    turned a GPU's mode on (the agent then knows which already-running jobs the driver did not see from their
    start). Logs what it did or why it could not; always exits 0: a GPU without accounting still works."""
    log = _logger()
    try:
        cfg = _config.load(config_file)
    except _config.ConfigError as exc:
        log.warning("accounting mode not changed: config error", error=str(exc))
        return 0
    if cfg.gpu.accounting == "off" or cfg.gpu.backend == "none":
        return 0
    try:
        from . import gpu_backends

        backend = gpu_backends.open_backend(cfg.gpu.backend, call_timeout_s=cfg.gpu.call_timeout,
                                            accounting="auto")
        try:
            backend.sample()
            notes = backend.drain_notes()
            enabled = backend.enabled_here()
        finally:
            backend.close()
        for level, message, fields in notes:
            getattr(log, level)(message, **fields)
        if enabled:
            import json

            from .. import atomicfile

            known = _read_enabled_at(cfg)
            known.update(enabled)
            atomicfile.write_state(*os.path.split(_enabled_at_path(cfg)),
                                   json.dumps({str(k): v for k, v in known.items()}) + "\n", mode=0o644)
    except Exception as exc:  # noqa: BLE001 - never a traceback, never a failed start over this
        log.warning("accounting mode not changed", error=f"{type(exc).__name__}: {exc}")
    return 0


def main(argv=None):
    from .. import __version__

    p = argparse.ArgumentParser(prog="gpu-router-agent", description="gpu-router's resident agent")
    p.add_argument("--version", action="version", version=f"gpu-router-agent {__version__}")
    p.add_argument("--config", help="config file (default: $GPU_ROUTER_CONFIG or /etc/gpu-router/config.toml)")
    p.add_argument("--once", action="store_true", help="publish one GPU snapshot and exit")
    p.add_argument("--enable-accounting", action="store_true",
                   help="turn on the GPUs' per-process accounting mode ([gpu] accounting = \"auto\") and exit; "
                        "the unit's privileged ExecStartPre")
    args = p.parse_args(argv)
    if args.enable_accounting:
        return enable_accounting(args.config)
    try:
        agent = Agent(args.config)
    except _config.ConfigError as exc:
        import sys

        sys.stderr.write(f"gpu-router-agent: config error: {exc}\n")
        return 2
    if args.once:
        agent.sample()
        return 0
    return agent.run()
