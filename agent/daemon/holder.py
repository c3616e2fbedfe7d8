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
restarts; then it is init's.
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
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status", "rb") as f:
            blocked = next(int(line.split()[1], 16) for line in f if line.startswith(b"SigBlk:"))
    except (OSError, IndexError, ValueError, StopIteration):
        return False
    if fields[0] in (b"Z", b"X") or int(fields[3]) != pid:  # field 6: the session id
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
    path = next((p for p in SLEEP if os.access(p, os.X_OK)), None)
    if path is None:
        return None
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        # One exec, no shell; fds 0-2 on /dev/null, every other fd of the agent is close-on-exec.
        pid = os.posix_spawn(path, ["sleep", "infinity"], {"PATH": "/usr/bin:/bin"}, setsid=True,
                             setsigmask=BLOCKED, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, fd)
                                                               for fd in (0, 1, 2)])
    except OSError:
        return None
    finally:
        os.close(devnull)
    h = Holder(pid, None, child=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                head, _, tail = f.read().rpartition(b")")
            if head.endswith(b"(sleep") and tail.split()[0] == b"S":
                h.start = int(tail.split()[19])
                return h
            if tail.split()[0] in (b"Z", b"X"):
                break
        except (OSError, IndexError, ValueError):
            break
        time.sleep(0.001)
    h.release()
    return None
