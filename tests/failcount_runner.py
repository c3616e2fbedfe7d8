#!/usr/bin/python3
"""A job runner that counts failures, as the callers gpu-router sits under do.

PeerTube's runner (and Celery with max_retries, Sidekiq, GitLab's retry:) share three rules, and this runner keeps
exactly them, nothing more:

* **N failures → errored**: a job whose command exits non-zero goes back to the queue; at its N-th failure it is
  marked errored and never tried again (PeerTube: 5);
* **poll interval**: an idle worker asks the queue for work every ``poll`` seconds (PeerTube: ~2.5 s), so a job put
  back after a failure is picked up at a worker's next poll, not at once;
* **concurrency C**: at most C jobs run at once.

It knows nothing about gpu-router: exit 75 is a failure like any other, which is the point. Used by
tests/test_runners.py on the host and, as a systemd service, by tests/systemd/test_runner_service.py.

    failcount_runner.py --jobs FILE --concurrency C --max-failures N --poll S --summary OUT -- CMD...

FILE holds one job per line (its argument, substituted for ``{job}`` in CMD). OUT gets one JSON document:
{"jobs": {job: {"attempts", "failures", "state", "exit_codes"}}, "errored", "succeeded", "makespan_s", ...}.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


class Runner:
    def __init__(self, jobs, command, concurrency, max_failures=5, poll=2.5, env=None):
        self.command = command
        self.concurrency = concurrency
        self.max_failures = max_failures
        self.poll = poll
        self.env = env
        self.lock = threading.Lock()
        self.pending = list(jobs)              # arrival order; a failed job goes to the back
        self.state = {j: {"attempts": 0, "failures": 0, "state": "pending", "exit_codes": []} for j in jobs}
        self.running = 0
        self.max_running = 0

    def _take(self):
        with self.lock:
            if not self.pending:
                return None
            job = self.pending.pop(0)
            self.state[job]["state"] = "running"
            self.state[job]["attempts"] += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            return job

    def _done(self, job, rc):
        with self.lock:
            self.running -= 1
            s = self.state[job]
            s["exit_codes"].append(rc)
            if rc == 0:
                s["state"] = "succeeded"
            else:
                s["failures"] += 1
                if s["failures"] >= self.max_failures:
                    s["state"] = "errored"
                else:
                    s["state"] = "pending"
                    self.pending.append(job)

    def _unfinished(self):
        with self.lock:
            return any(s["state"] in ("pending", "running") for s in self.state.values())

    def _worker(self):
        while self._unfinished():
            job = self._take()
            if job is None:
                time.sleep(self.poll)           # idle: poll again later, as the real runners do
                continue
            argv = [a.replace("{job}", job) for a in self.command]
            rc = subprocess.run(argv, env=self.env, stdin=subprocess.DEVNULL).returncode
            self._done(job, rc)
            if rc != 0:
                time.sleep(self.poll)           # a failed job is reported; the worker polls for the next one

    def run(self):
        t0 = time.monotonic()
        workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.concurrency)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return self.summary(time.monotonic() - t0)

    def summary(self, makespan):
        states = [s["state"] for s in self.state.values()]
        return {"jobs": self.state, "errored": states.count("errored"), "succeeded": states.count("succeeded"),
                "failures": sum(s["failures"] for s in self.state.values()),
                "exit_75": sum(s["exit_codes"].count(75) for s in self.state.values()),
                "max_running": self.max_running, "makespan_s": round(makespan, 3),
                "concurrency": self.concurrency, "max_failures": self.max_failures, "poll_s": self.poll}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--max-failures", type=int, default=5)
    ap.add_argument("--poll", type=float, default=2.5)
    ap.add_argument("--summary", required=True)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with open(args.jobs) as f:
        jobs = [line.strip() for line in f if line.strip()]
    result = Runner(jobs, command, args.concurrency, args.max_failures, args.poll).run()
    tmp = args.summary + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.summary)
    return 0 if result["errored"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
