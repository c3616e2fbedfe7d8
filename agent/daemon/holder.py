"""A tiny process put in each job's scope, so the scope's cgroup outlives the job until the agent has read it.

On cgroup v2 the kernel takes an exiting task out of its cgroup before the task's pidfd wakes anyone, and systemd
removes an emptied scope's cgroup at once: memory.peak and memory.events (the OOM kill count) are often gone by
the time the agent looks (DESIGN.md §5). With a second process in the scope the cgroup is not empty when the job
ends; the agent reads the final counters, then ends the holder, and only then does systemd remove the scope.

The holder is ``sleep infinity`` (no Python: its few pages are touched before it joins the scope, so it adds
nothing measurable to the job's peak), spawned with SIGTERM, SIGINT and SIGHUP blocked (a blocked signal stays
pending and is never delivered; SIGKILL cannot be blocked): when systemd stops the scope
(RuntimeMaxSec=, BindsTo=, OOMPolicy=stop after an OOM kill) the job ends but the holder stays until the agent
has read the counters. If the agent is not running then, systemd's own TimeoutStopSec ends it with SIGKILL; a
restarted agent ends holders of jobs it finds dead. The holder is the agent's child (reaped by it) until the agent
restarts; then it is init's. Until a scope takes it, a holder sleeps in the agent's own cgroup (``Pool``).
"""

import os
import signal
import time

from .. import procstat

SLEEP = ("/usr/bin/sleep", "/bin/sleep")
BLOCKED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READY_TIMEOUT_S = 2.0


class Holder:
    __slots__ = ("pid", "start", "child")

    def __init__(self, pid, start, child=False):
        self.pid = pid
        self.start = start
        self.child = child  # ours to reap (spawned by this agent, not adopted)

    def end(self):
        """SIGKILL it now; release() reaps it later. Its scope's cgroup empties at once, so systemd removes the
        scope, and the agent's loop does not wait for the holder to die (release() does)."""
        if self.child or procstat.is_process(self.pid, self.start):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass

    def release(self):
        """End the holder (SIGKILL: the polite signals are blocked) and reap it when it is our child."""
        if self.child:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            except OSError:
                pass
            self.child = False
            return
        if procstat.is_process(self.pid, self.start):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass


def is_holder(pid):
    """Whether ``pid`` is a holder as spawn() makes them: ``sleep infinity``, leader of its own session, with the
    polite signals blocked. What a restarted agent goes by when a scope has no job record (the agent that made it
    was killed before writing one): a job's own ``sleep infinity`` child is none of these."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read() != b"sleep\0infinity\0":
                return False
        with open(f"/proc/{pid}/status", "rb") as f:
            blocked = next(int(line.split()[1], 16) for line in f if line.startswith(b"SigBlk:"))
    except (OSError, IndexError, ValueError, StopIteration):
        return False
    st = procstat.read(pid)
    if st is None or st.gone or st.session != pid:  # the leader of its own session (setsid)
        return False
    return all(blocked >> (int(sig) - 1) & 1 for sig in BLOCKED)


def find(pids):
    """The holder among a scope's ``pids`` (is_holder), as a Holder that is not ours to reap; None if none is."""
    for pid in pids:
        if is_holder(pid):
            return Holder(pid, procstat.start_ticks(pid))
    return None


def spawn():
    """Start a holder and wait until it sleeps (every page it needs touched); None if that fails."""
    h = _start()
    if h is not None and not _await(h, time.monotonic() + READY_TIMEOUT_S):
        h = None
    return h


def _start():
    """posix_spawn a holder, without waiting for it (a Holder whose ``start`` is None until it is seen asleep)."""
    path = next((p for p in SLEEP if os.access(p, os.X_OK)), None)
    if path is None:
        return None
    try:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # out of descriptors: no holder now (the request is answered all the same)
        return None
    try:
        # One exec, no shell; fds 0-2 on /dev/null, every other fd of the agent is close-on-exec.
        pid = os.posix_spawn(path, ["sleep", "infinity"], {"PATH": "/usr/bin:/bin"}, setsid=True,
                             setsigmask=BLOCKED, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, fd)
                                                               for fd in (0, 1, 2)])
    except OSError:
        return None
    finally:
        os.close(devnull)
    return Holder(pid, None, child=True)


def _look(h):
    """One look at a started holder: True once it sleeps (``start`` then set), False when it died or is not what
    was started, None while it is still on its way."""
    st = procstat.read(h.pid)
    if st is None or st.gone:
        return False
    if st.comm == b"sleep" and st.state == b"S":
        h.start = st.start
        return True
    return None


def _await(h, deadline):
    """Wait (1 ms steps) until ``h`` sleeps; False (and ``h`` released) when it died or ``deadline`` passed."""
    while time.monotonic() < deadline:
        seen = _look(h)
        if seen:
            return True
        if seen is False:
            break
        time.sleep(0.001)
    h.release()
    return False


POOL_SIZE = 16
TOP_UP_PER_TURN = 4    # holders started in one idle loop turn: a request that arrives meanwhile waits for few
TOP_UP_RETRY_S = 5.0   # after a failed spawn (no sleep binary, out of processes), before the next attempt


class Pool:
    """Holders kept asleep in the agent for the scope requests to come, so that a burst's requests take one each
    instead of waiting for their own: a spawn is posix_spawn, then exec, ld.so and libc, measured at 4–9 ms of the
    agent's one loop per holder when a burst of wrappers keeps both cores busy (bench/README.md, "Holders kept
    ready"), and the holders' own start competed with the burst for the cores.

    ``top_up()`` (the loop calls it when it has nothing else to do: no request pending, no scope in flight) starts
    a few holders at a time until ``size`` are asleep or on their way; ``fill(n)`` starts, for a batch of ``n``
    requests, those missing; neither waits for a holder to sleep. ``take()`` hands out one seen asleep — the same
    holder spawn() makes, is_holder() true — else waits for the oldest one starting, else spawns one the old way.
    ``close()`` (the agent's stop) ends and reaps every one not taken. Every holder stays the agent's child, reaped
    when it dies or is ended.

    An idle holder blocks SIGTERM like any holder. What keeps one from holding up the agent's restart after a crash
    (systemd's SIGTERM to the whole cgroup, then TimeoutStopSec) is the unit's KillMode=mixed: SIGTERM to the agent
    alone, SIGKILL to whatever is left in its cgroup once it has exited (tests/systemd/test_scopes.py kills an agent
    with a full pool and sees it back at once, its old holders gone)."""

    def __init__(self, size=POOL_SIZE):
        self.size = size
        self.ready = []     # asleep: ready to be put in a scope
        self.starting = []  # spawned, not yet seen asleep
        self.failed = 0     # spawns that failed (no sleep binary, out of processes)
        self.retry_at = 0.0  # top_up() starts nothing before this (monotonic): a failed spawn is not retried at once

    def _sort(self):
        waiting = []
        for h in self.starting:
            seen = _look(h)
            if seen:
                self.ready.append(h)
            elif seen is False:
                h.release()
            else:
                waiting.append(h)
        self.starting = waiting

    def take(self):
        """A holder asleep now (None if none can be had); it is the caller's from here on."""
        self._sort()
        while self.ready:
            h = self.ready.pop(0)
            if _look(h):  # still asleep (nothing but root could have ended it; looked at all the same)
                return h
            h.release()
        while self.starting:
            h = self.starting.pop(0)
            if _await(h, time.monotonic() + READY_TIMEOUT_S):
                return h
        return spawn()

    def _grow(self, target, limit=None):
        """Start holders until ``target`` are asleep or on their way, at most ``limit`` now; never waits for them
        to sleep (posix_spawn itself returns once the child has exec'd). False when a spawn failed (it ends the
        growing)."""
        started = 0
        while len(self.ready) + len(self.starting) < target and (limit is None or started < limit):
            h = _start()
            if h is None:
                self.failed += 1
                return False
            self.starting.append(h)
            started += 1
        return True

    def fill(self, n):
        """Start holders until ``min(n, size)`` are asleep or on their way. A failed spawn ends the filling (take()
        then tries once more the old way)."""
        self._grow(min(n, self.size))

    def top_up(self, limit=TOP_UP_PER_TURN, now=None):
        """Start up to ``limit`` holders towards ``size``; True while more are missing (call again soon), False
        when the pool is full or a spawn just failed (retried TOP_UP_RETRY_S later)."""
        now = time.monotonic() if now is None else now
        if now < self.retry_at:
            return False
        self._sort()
        if not self._grow(self.size, limit):
            self.retry_at = now + TOP_UP_RETRY_S
            return False
        return self.short()

    def short(self):
        return len(self.ready) + len(self.starting) < self.size

    def under_half(self):
        """Under half full: topped up in any idle turn, not only in a lull (resident.Agent._top_up_holders)."""
        return len(self.ready) + len(self.starting) < self.size // 2

    def pids(self):
        return [h.pid for h in self.ready + self.starting]

    def close(self):
        """End and reap every holder not taken (the agent stops)."""
        for h in self.ready + self.starting:
            h.release()
        self.ready, self.starting = [], []
