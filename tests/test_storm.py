"""Kill storm and soak (issue 11): the real wrapper and agent, the fake NVML, thousands of real jobs.

The jobs are tests/storm_job.c (built here): the fake NVML's claim protocol in C, so a job costs a millisecond and
the wrapper's own start-up is what the run measures. Both tests run without systemd: scope = "off" (no scopes
are made, so none can leak here; the scope lane is tests/systemd). Sized for the 2-core CI machine.

- Kill storm: ≥ 1,000 jobs through the wrapper at concurrency 12; a quarter of them SIGKILLed at a random moment
  (the wrapper before its exec, or the job after it: the same pid), and the agent SIGKILLed and restarted every
  ~1.5 s. Afterwards no slot, queue ticket, reservation or VRAM claim is held, no job hit a CUDA OOM, and what the
  runner saw of each attempt (exit 0 / 75 / killed) matches the journal's routed / blocked events for it.
- Soak: 5,000 short jobs at concurrency 32 through a PeerTube-like runner (retry on failure, the 5th loses the
  job): 0 lost, 0 OOM, never more reserved than the GPU holds (a watcher reads the ledger throughout), and the
  agent's RSS at the start and the end (printed; the test fails only on a growth that is a leak, > 8 MiB).
"""

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import helpers
from fakenvml import BUILD as FAKE_BUILD, fake_gpus, have_pynvml  # noqa: F401  (fixture)
from gpu_router import slots

pytestmark = pytest.mark.skipif(not have_pynvml(), reason="nvidia-ml-py is not installed (bash .ci/deps)")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storm_job.c")


def storm_job():
    src = open(SOURCE, "rb").read()
    folder = FAKE_BUILD.parent / "storm_job" / hashlib.sha256(src).hexdigest()[:16]
    out = folder / "storm_job"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".storm_job.{os.getpid()}"
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-Wall", "-o", str(tmp), SOURCE], check=True)
        os.replace(tmp, out)
    return out


class Rig:
    def __init__(self, base, fake, gr_bin, agent_bin, gpu_mb, wait, cpu_jobs):
        self.base, self.fake, self.gr_bin, self.agent_bin = base, fake, gr_bin, agent_bin
        fake.add_gpu(gpu_mb)
        (base / "locks").mkdir(mode=0o770)
        (base / "in").mkdir()
        self.log = base / "jobs.log"
        self.journal = helpers.JournalSocket()
        (base / "config.toml").write_text(f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "nvml"
snapshot = "{base}/gpus.json"
sample_interval = "0.2s"
snapshot_max_age = "2s"
visible_devices = "index"
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
[workloads.storm]
binary = "{storm_job()}"
probe = "file-size"          # the input's size in bytes is the job's VRAM in MiB
threshold = 1000000000
threshold_unit = "bytes"
admission = "vram"
vram_model = "linear"
vram_per_unit_mb = 1.0
max_cpu_jobs = {cpu_jobs}
wait = "{wait}"
scope = "off"
""")
        self.env = dict(fake.env, GPU_ROUTER_CONFIG=str(base / "config.toml"), GPU_ROUTER_CACHE_DIR=str(base),
                        GPU_ROUTER_JOURNAL_SOCKET=self.journal.path)
        self.agent = None

    def start_agent(self):
        with open(self.base / "agent.log", "a") as log:
            self.agent = subprocess.Popen([str(self.agent_bin)], env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        return self.agent

    def wait_snapshot(self):
        deadline = time.monotonic() + 30
        while not (self.base / "gpus.json").exists():
            assert self.agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)

    def input(self, name, mb):
        path = self.base / "in" / name
        path.write_bytes(b"\0" * mb)
        return path

    def argv(self, mb, ms, path):
        return [str(self.gr_bin), "run", "--workload", "storm", "--", str(mb), str(ms), str(self.log), str(path)]

    def log_lines(self):
        return [line.split() for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def rss_kb(self):
        assert self.agent.poll() is None, f"the agent died: {(self.base / 'agent.log').read_text()[-3000:]}"
        with open(f"/proc/{self.agent.pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:"))

    def close(self):
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(10)
        self.journal.close()


@pytest.fixture
def rig(tmp_path, fake_gpus, gr_bin, agent_bin):  # noqa: F811
    made = []

    def make(**kw):
        r = Rig(tmp_path, fake_gpus, gr_bin, agent_bin, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def assert_nothing_held(r):
    """No slot, queue ticket or reservation locked by anyone, no VRAM claimed: every lock file can be taken now."""
    held = []
    for folder, _dirs, files in os.walk(r.base / "locks"):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(os.path.join(folder, name))
            finally:
                os.close(fd)
    assert held == []
    assert slots.live_reservations(str(r.base / "locks")) == {}
    assert r.fake.claims() == []


def test_kill_storm_leaves_nothing_held_and_the_runner_matches_the_journal(rig):
    r = rig(gpu_mb=8000, wait="0s", cpu_jobs=1)
    r.start_agent()
    r.wait_snapshot()
    rng = random.Random(11)
    n, concurrency = 1000, 12
    plan = [(f"job{i}", rng.randint(500, 2500), rng.randint(20, 150), rng.random() < 0.25, rng.uniform(0, 0.06))
            for i in range(n)]
    paths = {name: r.input(name, mb) for name, mb, _ms, _k, _d in plan}
    seen = {}   # input path -> exit status the runner saw (negative: killed by that signal)
    queue = list(plan)
    lock = threading.Lock()
    done = threading.Event()
    progress = threading.Condition(lock)

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                name, mb, ms, kill, delay = queue.pop()
                progress.notify_all()
            p = subprocess.Popen(r.argv(mb, ms, paths[name]), env=r.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            if kill:
                time.sleep(delay)
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            seen[str(paths[name])] = p.wait()

    def agent_killer():
        # Paced by the storm's progress, not by the clock: about every sixth of the jobs taken (± a random few),
        # so a faster wrapper (a shorter storm) is killed under just as often.
        kills = 0
        for k in range(1, 6):
            mark = n - n * k // 6 + rng.randint(-30, 30)  # jobs left in the queue at this kill
            with lock:
                progress.wait_for(lambda: len(queue) <= mark or done.is_set())
            if done.is_set():
                break
            r.agent.kill()
            r.agent.wait()
            kills += 1
            r.start_agent()
        seen["agent-kills"] = kills

    killer = threading.Thread(target=agent_killer)
    killer.start()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    with lock:
        done.set()
        progress.notify_all()
    killer.join()
    r.agent.kill()
    r.agent.wait()
    elapsed = time.monotonic() - started
    kills = seen.pop("agent-kills")
    codes = list(seen.values())
    assert len(codes) == n and set(codes) <= {0, 75, -9}, sorted(set(codes))
    # the storm exercised every path: agent restarts, jobs run, refused and killed
    assert kills >= 3 and codes.count(0) > n // 10 and codes.count(75) > 0 and codes.count(-9) > n // 10, \
        (kills, codes.count(0), codes.count(75), codes.count(-9))
    assert_nothing_held(r)
    lines = r.log_lines()
    assert [x for x in lines if x[0] == "oom"] == []                       # no over-admission
    finished = sum(1 for x in lines if x[0] == "done")
    assert codes.count(0) <= finished <= codes.count(0) + codes.count(-9)
    events = r.journal.events(settle=0.5)
    by_input = {}
    for e in events:
        if e.get("GPU_ROUTER_EVENT") in ("routed", "blocked") and e.get("GPU_ROUTER_INPUT") in seen:
            by_input.setdefault(e["GPU_ROUTER_INPUT"], []).append(e["GPU_ROUTER_EVENT"])
    mismatched = []
    for path, code in seen.items():
        got = by_input.get(path, [])
        want = {0: [["routed"]], 75: [["blocked"]], -9: [[], ["routed"], ["blocked"]]}[code]
        if got not in want:
            mismatched.append((path, code, got))
    assert mismatched == []
    sys.stderr.write(f"\nkill storm: {n} jobs in {elapsed:.0f}s, {codes.count(0)} done, {codes.count(75)} "
                     f"blocked, {codes.count(-9)} killed, agent killed {kills}x\n")


def test_soak_5000_short_jobs_at_concurrency_32(rig):
    r = rig(gpu_mb=16384, wait="120s", cpu_jobs=2)
    r.start_agent()
    r.wait_snapshot()
    rng = random.Random(5)
    sizes = [100 + 50 * k for k in range(17)]                  # 100..900 MiB: ~32 jobs share the GPU
    paths = {mb: r.input(f"size{mb}", mb) for mb in sizes}
    n, concurrency = 5000, 32
    queue = [(rng.choice(sizes), rng.randint(5, 40)) for _ in range(n)]
    lock = threading.Lock()
    results = {"done": 0, "lost": 0, "failures": 0}
    over = []
    stop = threading.Event()
    rss = {}

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                mb, ms = queue.pop()
                left = len(queue)
            if left == n - 200 and "start" not in rss:
                rss["start"] = r.rss_kb()                        # after the agent's warm-up
            failures = 0
            while True:
                rc = subprocess.run(r.argv(mb, ms, paths[mb]), env=r.env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).returncode
                if rc == 0:
                    break
                failures += 1
                if failures == 5:
                    break
                time.sleep(0.2)
            with lock:
                results["failures"] += failures
                results["done" if rc == 0 else "lost"] += 1

    def watcher():
        while not stop.wait(0.02):
            total = sum(mb for lst in slots.live_reservations(str(r.base / "locks")).values() for _p, mb in lst)
            if total > 16384:
                over.append(total)

    w = threading.Thread(target=watcher)
    w.start()
    workers = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.monotonic() - started
    stop.set()
    w.join()
    rss["end"] = r.rss_kb()
    lines = r.log_lines()
    sys.stderr.write(f"\nsoak: {n} jobs in {elapsed:.0f}s at concurrency {concurrency}: {results}, GPU runs "
                     f"{sum(1 for x in lines if x[0] == 'done' and x[2] != '0')}, agent RSS {rss['start']} kB at "
                     f"the start, {rss['end']} kB at the end\n")
    assert results == {"done": n, "lost": 0, "failures": 0} or (results["lost"] == 0 and results["done"] == n), \
        results
    assert [x for x in lines if x[0] == "oom"] == []
    assert over == []
    assert sum(1 for x in lines if x[0] == "done") == n
    assert rss["end"] - rss["start"] < 8 * 1024, rss
    assert_nothing_held(r)
