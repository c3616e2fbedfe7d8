"""Scopes being made: the agent's one D-Bus connection, the start jobs in flight, and how each ended.

``begin`` is StartTransientUnit (a round trip of a millisecond or so; systemd queues the job and answers); the
job's end comes later as a JobRemoved signal, read when the bus's descriptor is readable in the agent's loop.
Each request is answered at its own job's end, so a slow scope holds up nobody else. A job whose signal never
came (the connection was lost, systemd re-executed) is settled at its deadline by asking the unit's state.
"""

import selectors
import time

from .. import scope, scopebus


class _Job:
    __slots__ = ("name", "deadline", "token", "error", "ended")

    def __init__(self, name, deadline):
        self.name, self.deadline = name, deadline
        self.token = None   # the caller's, given by attach(); the end is reported once it is there
        self.error = None   # None: active; else why not
        self.ended = False


class InFlight:
    def __init__(self, selector, done, timeout=scope.ACTIVE_TIMEOUT_S, clock=time.monotonic, bus=None, warn=None):
        """``done(token, error)`` is called once per job: error None when the scope is active, else the reason;
        ``warn(message, **fields)`` hears of a job settled at its deadline (its end never heard)."""
        self.selector, self.done, self.timeout, self.clock = selector, done, timeout, clock
        self.warn = warn or (lambda message, **fields: None)
        self.bus = bus if bus is not None else scopebus.ScopeBus()
        self.jobs = {}    # job path → _Job
        self.names = {}   # unit name → job path
        self._fd = None   # the descriptor registered in the selector
        self._conn = None  # (connection, descriptor) it belongs to

    def begin(self, name, props):
        """Queue the scope's start job; ScopeError when systemd refused it (or cannot be reached)."""
        path = self.bus.start(name, props)
        self._watch()
        self.jobs[path] = _Job(name, self.clock() + self.timeout)
        self.names[name] = path
        return path

    def connect(self):
        """Open the connection now (the agent's start) instead of at the first ``begin``; ScopeError when systemd
        cannot be reached (``begin`` tries again then)."""
        if self.bus.bus is None:
            self.bus.open()
        self._watch()

    def connected(self):
        """Whether the connection to systemd is open (opened at the start or by a scope, not lost since)."""
        return self.bus.bus is not None

    def attach(self, name, token):
        """The caller's token for the job of ``name``; its end is reported from now on (at once if it came)."""
        job = self.jobs.get(self.names.get(name))
        if job is None:
            return False
        job.token = token
        self.ready()
        return True

    def ready(self):
        """The bus is readable (or a call left messages queued): take the ends of our jobs."""
        if self.bus.bus is not None:
            try:
                ended = self.bus.drain()
            except scope.ScopeError:
                self._lost()
                ended = []
            for path, result in ended:
                job = self.jobs.get(path)
                if job is not None and not job.ended:
                    job.ended = True
                    if result != "done":
                        job.error = f"scope {job.name} did not become active (job {result})"
        self._report()

    def next_deadline(self):
        return min((j.deadline for j in self.jobs.values() if not j.ended), default=None)

    def expire(self, now=None):
        """Jobs past their deadline: the unit's state decides (its signal may have been lost)."""
        now = self.clock() if now is None else now
        late = [j for j in self.jobs.values() if not j.ended and j.deadline <= now]
        for job in late:
            try:
                state = self.bus.active_state(job.name)
            except scope.ScopeError as exc:
                state = f"unknown: {exc}"
            job.ended = True
            if state != "active":
                job.error = f"scope {job.name} did not become active (state {state})"
            self.warn("no JobRemoved for a scope's start job in time; settled by the unit's state", unit=job.name,
                      state=state, timeout_s=self.timeout)
        if late:
            self._watch()
            self._report()
        return len(late)

    def _report(self):
        ended = [(path, job) for path, job in self.jobs.items() if job.ended and job.token is not None]
        for path, job in ended:  # all taken out first: done() may begin (and report) other scopes
            del self.jobs[path]
            self.names.pop(job.name, None)
        for _, job in ended:
            self.done(job.token, job.error)

    def _watch(self):
        """The selector follows the bus's current descriptor (a reconnect makes a new one)."""
        fd = self.bus.fileno()
        if (self.bus.bus, fd) == self._conn:
            return  # the same connection (a new one may reuse the number of a closed one: compare both)
        self._unwatch()
        if fd is not None and fd >= 0:
            self.selector.register(fd, selectors.EVENT_READ, "dbus")
            self._fd, self._conn = fd, (self.bus.bus, fd)

    def _unwatch(self):
        if self._fd is not None:
            try:
                self.selector.unregister(self._fd)
            except (KeyError, ValueError):
                pass
            self._fd = self._conn = None

    def _lost(self):
        """The connection failed: drop it (the next begin reconnects); the jobs it was waiting for are settled
        at their deadlines by their units' state."""
        self._unwatch()
        self.bus.close()

    def close(self):
        self._unwatch()
        self.bus.close()
