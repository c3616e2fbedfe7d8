"""The Agent: the resident half's state and its one loop (GPU snapshot, scope broker, job accounting).

One thread, one ``selectors`` loop: the broker socket (from systemd's socket activation, or bound here when run by
hand), the kernel's process-exit events, and a timer for the GPU sample. Jobs are not children of the agent — each
is its own scope under gpu-router.slice — so restarting or stopping the agent never touches them; on start it
adopts the scopes already running. systemd's protocol is in sdglue.py, the command line in service.py.
"""

import os
import sys
import selectors
import signal
import time

from . import accounting, accounting_mode, broker, clients, grants, holder, inflight, jobend, jobrecord, liveness, \
    lull, metrics, procevents, sdglue
from .. import journal, oom_memory, procstat, scope, slots
from .. import config as _config

SAMPLE_DEFER_S = 1.0  # how long the periodic sample may wait for the lull after a burst (lull.py)


class Agent(grants.Grants, jobend.JobEnd):
    """The agent's state, its sampling and its loop; the broker's grant path is grants.Grants, a job's end
    jobend.JobEnd (one object: every part sees the same jobs, selector and snapshot)."""

    def __init__(self, config_file=None, monitor=None):
        self.config_file = config_file
        self.cfg = _config.load(config_file)
        self.log = _logger()
        self.notify = sdglue.Notifier()
        self.jobs = {}  # pid → JobAccount
        self.monitor = monitor if monitor is not None else _make_monitor(self.cfg, self.reserved_pids, self.log,
                                                                         known_pids=self.known_pids)
        self.snapshot = None
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.metrics = metrics.Metrics(self.cfg.agent.state_dir, log=self.log)
        self.proc = None
        self._batch = None  # (group id, broker.LockView) while a turn's requests are served (Grants.request_batch)
        self.clients = clients.Clients(self.selector, self._handle_request, broker.log_refusal,
                                       batch=self.request_batch)
        self.proc_stored = False  # a copy of self.proc is in systemd's fd store
        self.records = jobrecord.directory(self.cfg.gpu.snapshot)
        self._holders = {}  # scope name → Holder, between StartTransientUnit and the grant
        self.holder_pool = holder.Pool()  # holders asleep, ready for the next scope requests (topped up when idle)
        self.inflight = inflight.InFlight(self.selector, self.scope_ended, warn=self.log.warning)  # start jobs
        self._waiting = {}  # pid → [(payload, uid, answer)]: its requests that came while its scope was made
        self.outgrown = {}  # (gpu key, pid) → the MiB last reported for a job that outgrew its reservation
        self._sample_errors = set()  # (stage, exception type, where): each reported once
        self.oom = oom_memory.Memory(self.cfg.agent.state_dir, self.log)  # inputs that ran out of GPU memory
        self._gpu_exits = []  # (device, monotonic time, peak MiB) of the GPU jobs that ended in jobend.NEIGHBOUR_S
        self.lull = lull.Lull()  # CPU jobs' ends, the pool's top-up and the sample wait for a burst's end

    # -- pieces ------------------------------------------------------------------------------------------------

    def known_pids(self):
        """The accounted jobs' PIDs: the part of reserved_pids known without reading the ledger or /proc/locks."""
        return list(self.jobs)

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

        scopes = scope.running_scopes()
        records = jobrecord.load_all(self.records)
        finishing = {job_id: r for job_id, r in records.items() if jobrecord.outcome(r) is not None}
        if finishing:
            self.recover(finishing)  # the previous agent was killed while it accounted these (jobend.py)
        for job_id, r in records.items():
            if r["pid"] in self.jobs or job_id in finishing:
                continue
            job = accounting.JobAccount.from_record(r)
            if r.get("holder_pid"):
                job.holder = holder.Holder(r["holder_pid"], r.get("holder_start"))
            if job.scope not in scopes and not liveness.job_alive(job):
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

    def track(self, job, write_record=True):
        """Follow a job: a pidfd wakes the loop the moment it exits; its holder keeps the cgroup until then.
        One account per PID: a newer one replaces the older (whose descriptors are closed, never leaked)."""
        self._forget(job.pid)
        self.jobs[job.pid] = job
        if write_record:
            self._write_record(job)
        job.sample()
        if liveness.job_alive(job):
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

    def _close_fds(self, job, which=("pidfd", "oomfd")):
        for attr in which:
            fd = getattr(job, attr)
            setattr(job, attr, None)
            if fd is not None:
                _drop_fd(self.selector, fd)

    def _write_record(self, job, outcome=None):
        """``outcome``: the job-finished event's fields about to go out (jobend.JobEnd.finish)."""
        try:
            jobrecord.write(self.records, dict(job.to_record(), outcome=outcome))
        except (OSError, ValueError, TypeError) as exc:
            self.log.warning("cannot write a job record", job=job.job_id, error=str(exc))

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
                if job.mode == "GPU" and liveness.job_alive(job):
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
        alive_before = {pid for pid, job in self.jobs.items() if liveness.job_alive(job)}
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
        dead = [pid for pid, job in self.jobs.items() if not liveness.job_alive(job)]
        if not dead:
            return
        if self.proc is not None:
            self._drain_exits()
        for pid in dead:
            if pid in self.jobs:
                job = self.jobs[pid]
                self.finish(pid, procevents.zombie_status(pid) if liveness.job_alive(job, zombie_ok=True) else None)

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
            listener, how = sdglue.listening_socket(self.cfg.agent.socket, self.cfg.agent.group)
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, "broker")
        self.open_exits()
        self.adopt()
        self.sample()
        self._connect_for_scopes()
        self.notify("READY=1")
        self.notify(f"STATUS={self.status_line()}")
        journal.emit("agent", f"gpu-router-agent ready: {self.status_line()}",
                     {"STATE": "ready", "EXIT_STATUSES": "proc-connector" if self.proc else "unavailable"})
        interval = self.cfg.gpu.sample_interval
        dog = sdglue.watchdog_interval()
        next_sample = time.monotonic() + interval
        next_dog = time.monotonic()
        topping = False  # the holder pool is still being topped up: the next turn does not sleep in select()
        while not self.stopping:
            now = time.monotonic()
            if dog and now >= next_dog:
                self.notify("WATCHDOG=1")
                next_dog = now + dog
            # A sample holds the loop (nvidia-smi: hundreds of ms): not while wrappers are asking or waiting for their
            # scopes (lull.py), unless it is already SAMPLE_DEFER_S late.
            sample_due = next_sample + (0.0 if self.lull.quiet(self._busy()) else SAMPLE_DEFER_S)
            if now >= sample_due:
                self.sample()
                self.notify(f"STATUS={self.status_line()}")
                next_sample = now + interval
                sample_due = next_sample
            self.clients.expire()
            self.inflight.expire()
            wake = min(sample_due, next_dog if dog else sample_due, self.clients.next_deadline() or sample_due,
                       self.inflight.next_deadline() or sample_due,
                       self.lull.wake(now >= next_sample or self._pool_short()) or sample_due)
            timeout = 0.0 if topping else max(0.0, wake - time.monotonic())
            # New connections last: the requests already accepted are read (and their scopes begun) first, so a
            # burst is not refused for connections of its own that merely wait to be read.
            for key, events in sorted(self.selector.select(timeout), key=lambda ke: ke[0].data == "broker"):
                self._dispatch_guarded(key, events, listener)
            self._serve()
            self._end_put_off(self.lull.due(self._busy()))
            topping = self._top_up_holders()
        self._end_put_off(self.lull.due(False, everything=True))
        self._answer_accepted(listener)
        self.clients.close_all()
        self.holder_pool.close()
        if self.proc is not None:
            procevents.close_listener(self.proc, unsubscribe=not self.proc_stored)
        self.notify("STOPPING=1")
        self.metrics.stop(self.cfg)
        journal.emit("agent", f"gpu-router-agent stopping; {len(self.jobs)} job(s) keep running in their scopes",
                     {"STATE": "stopping"})
        return 0

    def _connect_for_scopes(self):
        """An agent whose workloads may ask for scopes connects to systemd at its start, not at the first scope: the
        first burst after a start or restart then pays neither the connection nor pystemd's import, and its holders
        are asleep before it (_top_up_holders). Measured in the lane's container (bench/README.md): that burst's
        slowest job 80 ms against 60 ms for the next."""
        if all(w.scope == "off" for w in self.cfg.workloads.values()):
            return
        try:
            self.inflight.connect()
        except scope.ScopeError as exc:
            self.log.info("no connection to systemd at start; the first scope tries again", error=str(exc))

    def _top_up_holders(self):
        """Holders for the next burst are started only on an agent that makes scopes (its connection to systemd
        is open: none where every workload has had scope = "off" since the start, or no systemd runs), and only
        when nothing waits on this loop: no request read and not served, no scope in flight (its wrapper waits for
        the JobRemoved this loop reads); in the lull after a burst unless the pool is under half full (lull.py); a
        few per turn (each spawn holds the loop until the holder's exec). True while the pool is still short."""
        if not self.inflight.connected() or self._busy():
            return False
        if not self.lull.quiet(False) and not self.holder_pool.under_half():
            return False
        return bool(self._guarded("holder-pool", self.holder_pool.top_up))

    def _pool_short(self):
        return self.inflight.connected() and self.holder_pool.short()

    def _busy(self):
        """Wrappers wait on this loop: a request read and not served, a scope in flight, a PID's later requests."""
        return bool(self.clients.pending or self.inflight.jobs or self._waiting)

    def job_exited(self, pid, status):
        """A job's process ended (``status``: its wait status, None when unknown). A GPU job, any job in a lull
        and any job of a stopping agent is accounted now. A CPU job's end during a burst is read now (its status,
        time and the cgroup's final counters; then its holder is ended, so the scope goes as it always did) and
        accounted in the lull (lull.py); its pidfd leaves the selector (still open: liveness sees it ended)."""
        job = self.jobs[pid]
        if job.mode == "GPU" or self.stopping or self.lull.quiet(self._busy()):
            self.finish(pid, status)
            return
        if job.pidfd is not None:
            try:
                self.selector.unregister(job.pidfd)  # readable from now on: left in, the loop would spin
            except (KeyError, ValueError):
                pass
        self.lull.put_off(pid, status, time.time())
        job.final_read()  # the holder still keeps the cgroup: exact peak and OOM count
        # Read: the cgroup's removal must not wake the OOM watch (v1 signals its eventfd then: an OOM count).
        self._close_fds(job, ("oomfd",))
        if job.holder is not None:
            job.holder.end()  # reaped when the job is accounted (finish: release)

    def _end_put_off(self, ended):
        for pid, status, wall in ended:
            if pid not in self.jobs:
                continue
            try:
                self.finish(pid, status, wall)
            except Exception as exc:  # noqa: BLE001 - as in the loop: one job's trouble stops nothing
                self.log.error("event handling failed", error=f"{type(exc).__name__}: {exc}")

    def _dispatch_guarded(self, key, events, listener):
        try:
            self._dispatch(key, events, listener)
        except Exception as exc:  # noqa: BLE001 - one job's or client's trouble never stops the agent
            self.log.error("event handling failed", error=f"{type(exc).__name__}: {exc}")
            if isinstance(key.data, tuple) and key.data[0] == "client":
                self.clients.drop(key.data[1])
            elif key.data not in ("broker", "exits", "wakeup", "dbus"):
                _drop_fd(self.selector, key.fd)  # never again: a readable fd left behind would spin

    def _dispatch(self, key, events, listener):
        try:  # an earlier event of the same batch may have closed this fd, and its number may be in use again
            if self.selector.get_key(key.fileobj) is not key:
                return
        except (KeyError, ValueError):
            return
        data = key.data
        if data == "broker":
            self.lull.heard()
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
            self.lull.heard()
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
                    self.job_exited(pid, status)
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
        fd = sdglue.passed_fds().get(procevents.FD_NAME)
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
                self.job_exited(pid, status)

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
                self._dispatch_guarded(key, events, listener)
            self._serve()

    def _serve(self):
        """The requests this turn read, as one batch (clients.Clients.serve)."""
        try:
            self.clients.serve()
        except Exception as exc:  # noqa: BLE001 - as in the loop: one request's trouble stops nothing
            self.log.error("serving requests failed", error=f"{type(exc).__name__}: {exc}")


def _drop_fd(selector, fd):
    try:
        selector.unregister(fd)
    except (KeyError, ValueError):
        pass
    try:
        os.close(fd)
    except OSError:
        pass




def _logger():
    from . import log

    return log.setup()


def _make_monitor(cfg, reserved_pids, log=None, known_pids=None):
    from . import monitor

    g = cfg.gpu
    mon = monitor.Monitor(backend=g.backend, snapshot_path=g.snapshot, interval=g.sample_interval,
                          reserved_pids=reserved_pids, xid_ignore=g.ignored_xids, xid_holdoff_s=g.xid_holdoff,
                          call_timeout_s=g.call_timeout, accounting=g.accounting, log=log, known_pids=known_pids)
    if hasattr(mon.backend, "enabled_at"):
        mon.backend.enabled_at = accounting_mode.read_enabled_at(cfg)
    return mon
