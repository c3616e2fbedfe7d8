"""The kill storm's job runner (tests/systemd/test_kill_storm.py), run inside the container by a member of group
gpu-router: N jobs through the installed wrapper at a given concurrency, some SIGKILLed at a random moment.

    python3 storm_runner.py PLAN.json LEDGER.json

PLAN: {"concurrency": C, "wrapper": "/usr/bin/gpu-router", "job": BINARY, "log": PATH,
       "jobs": [{"input": PATH, "ms": MS, "exit": CODE, "kill": null | "wrapper" | "job", "delay": SECONDS}, …]}

A "wrapper" kill lands `delay` seconds after the start, whatever the process is doing by then (probing, waiting for
a slot, asking for its scope, or already the job); a "job" kill waits until the process has exec'd the job, then
`delay` more. Each attempt's ledger entry says what the runner saw: the exit status as a shell reports it (128+N
for a job killed by signal N), which process it killed (the wrapper, before its exec, or the job), and the
wrapper's stderr when it holds a traceback.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def main(plan_path, ledger_path):
    with open(plan_path) as f:
        plan = json.load(f)
    job_name = os.path.basename(plan["job"])[:15]
    queue = list(enumerate(plan["jobs"]))
    ledger = [None] * len(queue)
    lock = threading.Lock()

    def attempt(index, spec):
        env = dict(os.environ, STORM_EXIT=str(spec["exit"]))
        argv = [plan["wrapper"], "run", "--workload", "storm", "--", "0", str(spec["ms"]),
                plan["log"], spec["input"]]
        started = time.monotonic()
        p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        killed = seen = None
        if spec["kill"] == "wrapper":
            time.sleep(spec["delay"])
            name = comm(p.pid)
            if p.poll() is None and name is not None:
                killed = "job" if name == job_name else "wrapper"
                os.kill(p.pid, signal.SIGKILL)
        elif spec["kill"] == "job":
            while p.poll() is None and seen != job_name:
                seen = comm(p.pid)
                time.sleep(0.002)
            time.sleep(spec["delay"])
            if p.poll() is None:
                killed = "job"
                os.kill(p.pid, signal.SIGKILL)
        err = p.stderr.read().decode("utf-8", "replace")
        rc = p.wait()
        code = 128 - rc if rc < 0 else rc
        entry = {"input": spec["input"], "pid": p.pid, "code": code, "killed": killed, "seen": seen,
                 "seconds": round(time.monotonic() - started, 3), "stderr": err[-2000:]}
        with lock:
            ledger[index] = entry

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                index, spec = queue.pop(0)
            attempt(index, spec)

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(plan["concurrency"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"seconds": round(time.monotonic() - t0, 1), "attempts": ledger}
    tmp = ledger_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, ledger_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
