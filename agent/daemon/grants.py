"""The broker's grant path of the Agent: a scope request in (clients.py), its scope begun (holder, inflight.py),
the wrapper answered at the start job's end, the job accounted from then on (Agent.track). A mixin of resident.Agent:
its state (jobs, _holders, _waiting, inflight) is the Agent's."""

import contextlib
import signal

from . import accounting, broker, liveness, procevents
from .. import config as _config
from .. import oom_memory, procstat, scope


class Grants:
    def begin_scope(self, name, props):
        """The broker's StartTransientUnit, with a holder process in the scope next to the job (holder.py); the
        job's end is awaited in the loop (inflight.py, scope_ended)."""
        h = self.holder_pool.take()
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
            g.job_id, g.pid, g.workload.name, g.mode, g.device, g.metric, g.name or g.confined, g.control_group,
            g.workload.runtime_max, predicted_vram_mb=g.predicted_vram_mb, memory_max_mb=g.memory_max_mb,
            input_path=g.input, pid_start=procstat.start_ticks(g.pid))
        job.holder = self._holders.pop(g.name, None) if g.name else None
        job.input_id = self._guarded("input-id", oom_memory.verify, g.pid, g.input, getattr(g, "input_id", None))
        self._guarded("oom-retry", self._retried, job)
        self.track(job)

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
        if not liveness.pidfd_alive(job.pidfd) or not liveness.job_alive(job):
            self.finish(pid, procevents.zombie_status(pid))
            return None
        if grant is not None and grant.job_id == job.job_id and job.device is None and grant.mode == job.mode:
            job.device, job.metric, job.input = grant.device, grant.metric, grant.input
            job.predicted_vram_mb, job.memory_max_mb = grant.predicted_vram_mb, grant.memory_max_mb
            self._write_record(job)
        return job.scope or ""  # "": followed without a scope (scope = "off", OP=track; a best-effort job)

    @contextlib.contextmanager
    def request_batch(self, payloads=()):
        """The requests of one loop turn (clients.Clients.serve): what every one of them reads the same is read
        once — the config (reloaded), the group's id, and the kernel's lock table (broker.LockView, whose
        docstring says why one read after the batch arrived is each request's own) — and the holders missing
        from the pool for those that ask for a scope are started together (holder.Pool); those not taken stay
        in the pool for the next requests."""
        self._batch = self._new_batch()
        # A hint only (the request is checked later): a holder too many stays in the pool, one too few is spawned.
        self.holder_pool.fill(sum(1 for p in payloads if b"OP=scope\n" in p))
        try:
            yield
        finally:
            self._batch = None

    def _new_batch(self):
        try:  # a profile added a moment ago must be known to the very next request (a cache hit costs ~1 ms)
            self.cfg = _config.load(self.config_file)
        except _config.ConfigError as exc:
            self.log.error("config error; keeping the last good config", error=str(exc))
        return broker.group_id(self.cfg.agent.group), broker.LockView()

    def _handle_request(self, payload, pid, uid):
        """One complete scope request from clients.py → the reply frame, or ``later(answer)`` while its scope's
        start job runs (clients.py serves everyone else meanwhile). Never raises."""
        if pid in self._waiting:
            # Its scope is being made: answered after it, as the same PID's second request always was (REUSED).
            return lambda answer: self._waiting[pid].append((payload, uid, answer))
        batch = self._batch
        if batch is None:
            batch = self._new_batch()
        begun = []
        fields, g = broker.handle(payload, pid, uid, self.cfg, batch[0],
                                  existing=self.existing_scope,
                                  start_scope=lambda name, props: begun.append(self.begin_scope(name, props)),
                                  fresh_sample=self.fresh_sample, locks=batch[1])
        if begun and g is not None and fields.get("OK") == "1":
            self._waiting[pid] = []
            return lambda answer: self._answer_at_end(g, answer)
        if g is not None:
            self.on_grant(g)
        return broker.frame(fields)
