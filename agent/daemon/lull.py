"""The lull after a burst: the work of the agent's loop that nobody waits for is put off until wrappers stop asking.

A burst of wrappers keeps the cores of a small host busy for tens of milliseconds. Every millisecond the agent's one
loop spends meanwhile on work no wrapper waits for is a millisecond before it reads the next request, and CPU taken
from the wrappers still starting. That work is:
- a CPU job's account: its event, calibration sample, record and metrics (~1–2 ms each). Nothing is lost by waiting:
  what the end itself tells (exit status, time, the cgroup's final counters) is read when it is heard, and then its
  holder is ended, so its scope goes as soon as it ever did (resident.Agent.job_exited);
- the holder pool's top-up: a posix_spawn and an exec per holder, 4–9 ms of the loop each in a burst;
- the periodic sample: 1–23 ms in the lane's container.
Measured in the lane's container (bench/README.md, "The lull"), 15 rounds of 8 jobs: 1.6–11.9 ms of job ends and
0–14.9 ms of top-up fell inside each burst; with this module, none but once (2 ends in a 50 ms gap of one burst).

The lull begins ``QUIET_S`` after the broker last accepted a connection or read a request's bytes, once no request
is pending, no scope is in flight and no PID's requests wait (the caller says ``busy``). Bounds, so that a steady
stream of requests, or a member who keeps connecting, starves nothing: a job's end waits at most ``END_WAIT_MAX_S``
(only the ends that old are taken in a busy turn, so a long burst's ends do not come in one lump), the sample
``resident.SAMPLE_DEFER_S``, and a pool under half full is topped up in any idle turn, as before.

A GPU job's end is never put off: the GPU sample right after its exit is its CUDA OOM evidence (jobend.py); nor is
an end heard by a stopping agent, and the ends put off before are accounted in its last turn, so a restart loses
none. An agent SIGKILLed with ends put off loses their exit statuses (the kernel's message was read): the next one
accounts those jobs from their records with RESULT "unknown", as any end it never heard.
"""

import time

QUIET_S = 0.05        # no broker activity this long: the burst is over
END_WAIT_MAX_S = 0.5  # a job's end waits at most this long for the lull


class Lull:
    def __init__(self, clock=time.monotonic, quiet_s=QUIET_S, end_wait_max_s=END_WAIT_MAX_S):
        self.clock = clock
        self.quiet_s = quiet_s
        self.end_wait_max_s = end_wait_max_s
        self.heard_at = float("-inf")
        self.ended = {}  # pid → (wait status or None, wall-clock time of the end, clock time it was seen): in order

    def heard(self):
        """The broker accepted a connection or read bytes of a request."""
        self.heard_at = self.clock()

    def quiet(self, busy):
        """Whether put-off work may run now; ``busy``: a request read and not served, a scope in flight, or a
        PID's later requests waiting."""
        return not busy and self.clock() - self.heard_at >= self.quiet_s

    def put_off(self, pid, status, wall):
        """A job ended (``status``: its wait status, None when unknown; ``wall``: time.time() of the end). A second
        word on the same end (the kernel's and the zombie's) keeps the first status that is known."""
        seen = self.ended.get(pid)
        if seen is None:
            self.ended[pid] = (status, wall, self.clock())
        elif seen[0] is None and status is not None:
            self.ended[pid] = (status,) + seen[1:]

    def take(self, pid):
        """The put-off end of ``pid`` as (status, wall), removed; None when there is none."""
        seen = self.ended.pop(pid, None)
        return None if seen is None else seen[:2]

    def due(self, busy, everything=False):
        """The ends to account now, as [(pid, status, wall)], removed: all of them in a lull (or ``everything``:
        the agent stops), else those that waited ``END_WAIT_MAX_S``."""
        if not self.ended:
            return []
        if everything or self.quiet(busy):
            taken, self.ended = self.ended, {}
        else:
            limit = self.clock() - self.end_wait_max_s
            taken = {pid: e for pid, e in self.ended.items() if e[2] <= limit}
            for pid in taken:
                del self.ended[pid]
        return [(pid, status, wall) for pid, (status, wall, _) in taken.items()]

    def wake(self, waiting_work):
        """When the loop must look again for put-off work (a clock time), or None: the lull's start when there is
        any (``waiting_work``: a short holder pool, a sample due; or an end put off), and the oldest end's limit;
        never a time already past. Past its start, the lull is waiting for something else (a scope in flight, a
        spawn to retry later) whose own event or deadline wakes the loop: waking for it again would spin."""
        now = self.clock()
        times = []
        if (waiting_work or self.ended) and self.heard_at + self.quiet_s > now:
            times.append(self.heard_at + self.quiet_s)
        if self.ended:
            times.append(max(now, next(iter(self.ended.values()))[2] + self.end_wait_max_s))
        return min(times) if times else None
