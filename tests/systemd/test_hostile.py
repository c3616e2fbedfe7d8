"""A hostile member on the installed .deb (issue 17): every record a member can write or name is untrusted input to
the root agent. Two members (alice, umask 077; bob, umask 027), an outsider and root share one booted Debian 12
with one fake 16 GiB GPU (tests/fakenvml's nvidia-smi: a process's VRAM is a claim file keyed by its PID); alice
attacks with tests/systemd/hostile_member.py (plain os calls, as a member would), bob is the bystander whose jobs
must be served. Each test performs one attack of the issue (and its variants) and asserts the safe outcome; each
fails on 939dc14. One container for the module; the agent must not be restarted by any attack (``watched``), except
in the last test, which restarts it on purpose.
"""

import json
import re
import select
import shlex
import subprocess
import time

import pytest

import harness
import srcinstall
from harness import require_lane
from test_deb import APT

INTERVAL = 0.5  # [gpu] sample_interval below
CONFIG = f"""
[gpu]
backend = "nvidia-smi"
sample_interval = "{INTERVAL}s"

[agent]
metrics_dir = "/var/lib/prometheus/node-exporter"

[workloads.shared]
binary = "/src/tests/fakenvml/fake_gpu_job.py"
probe = "file-size"
threshold = 1000000           # the small inputs here: GPU
admission = "vram"
gpu_vram_mb = 2000
max_gpu_jobs = 2
max_cpu_jobs = 2
wait = "3s"
scope = "required"
gpu_args = ["--device", "cuda"]
cpu_args = ["--device", "cpu"]
"""

UMASK = {"alice": "077", "bob": "027", "outsider": "022"}
LOCKS = "/run/gpu-router/locks"
STATE = "/var/lib/gpu-router"
PROM = "/var/lib/prometheus/node-exporter/gpu_router.prom"
FAKEJOB = ["--state", srcinstall.FAKE_STATE]  # fake_gpu_job's own arguments, before the job's

# Root's watcher: every path it is given, each inode seen there over `seconds` kept open, then read whole: a line
# appended to a file the agent replaces every sample (gpus.marshal) is still found.
WATCH = r"""
import json, os, sys, time
paths, marker, seconds = json.loads(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
fds, seen = {p: [] for p in paths}, {p: set() for p in paths}
end = time.monotonic() + seconds
while time.monotonic() < end:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        ino = os.fstat(fd).st_ino
        if ino in seen[p]:
            os.close(fd)
        else:
            seen[p].add(ino); fds[p].append(fd)
    time.sleep(0.01)
out = {}
for p in paths:
    data = b""
    for fd in fds[p]:
        os.lseek(fd, 0, 0)
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    out[p] = {"marked": marker in data, "exists": os.path.lexists(p)}
print(json.dumps(out))
"""

# A member's forgeries in the journal, through gpu-router's own journal module (MESSAGE_ID, SYSLOG_IDENTIFIER and
# all): argv[1] is a JSON list of [event, fields], or "labels N" for N routed events of N made-up workloads.
FORGE = r"""
import json, sys
from gpu_router import journal
if sys.argv[1] == "labels":
    for i in range(int(sys.argv[2])):
        journal.emit("routed", "forged", {"WORKLOAD": f"forged{i}", "MODE": "GPU", "REASON": f"why{i}",
                                          "JOB": f"forged{i}-1-1", "METRIC": 1, "DEVICE": 0})
else:
    for event, fields in json.loads(sys.argv[1]):
        journal.emit(event, "forged by a member", fields)
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    require_lane()
    deb = harness.build_deb(tmp_path_factory.mktemp("hostile-deb"))
    c = harness.Container(packages=harness.PACKAGES_WITH_METRICS)
    c.start()
    try:
        c.copy_in(deb, "/scratch/")
        c.run([*APT, "install", f"/scratch/{deb.name}"], timeout=300)
        c.write_file("/etc/gpu-router/config.toml", CONFIG)
        c.write_file("/usr/local/bin/nvidia-smi", srcinstall.fake_smi(), mode=0o755)
        c.copy_in(harness.REPO / "tests/systemd/hostile_member.py", "/srv/hostile_member.py", mode=0o755)
        c.write_file("/srv/watch.py", WATCH)
        c.write_file("/srv/forge.py", FORGE)
        c.write_file("/srv/input", "x" * 100)
        c.run('mkdir -p "$STATE/gpu0" "$STATE/claims"; chmod 1777 "$STATE/claims"; '
              "printf '16384\\nGPU-00000000-fake-lane\\nFake GPU\\n' > \"$STATE/gpu0/info\"; "
              'touch "$STATE/lock"; chmod 666 "$STATE/lock"; '
              # what a host that has wrapped and calibrated before, and exports metrics, has
              f"mkdir -p {STATE}/calibration {STATE}/wrapped {STATE}/samples /var/lib/prometheus/node-exporter "
              "/run/gpu-router/jobs", env={"STATE": srcinstall.FAKE_STATE})
        for user in ("alice", "bob"):
            c.add_user(user, groups=["gpu-router"])
        c.add_user("outsider")
        c.run("systemctl restart gpu-router-agent.service")
        c.wait_for("gpu-router status --json | grep -q '\"total_mb\": 16384'", timeout=60)
        r = job(c, "bob", 50, 0.2)  # makes the ledger's folder, as every vram-mode job does
        assert r.returncode == 0, r
        yield c
    finally:
        c.stop()


def member_argv(user, argv):
    return ["sh", "-c", f'umask {UMASK[user]}; exec "$@"', "sh", *argv]


def as_member(box, user, argv, **kw):
    kw.setdefault("check", False)
    return box.run(member_argv(user, argv), user=user, **kw)


def job(box, user, vram, seconds, input="/srv/input", **kw):
    """A member's job through the wrapper (scope required: it runs only when the agent granted its scope)."""
    return as_member(box, user, ["gpu-router", "run", "--workload", "shared", "--", *FAKEJOB, "--vram", str(vram),
                                 "--seconds", str(seconds), input], timeout=kw.pop("timeout", 60), **kw)


class Held:
    """A hostile_member.py command running as a member; ``info`` is what its ready line said."""

    def __init__(self, box, user, *args, hold=90):
        self.box = box
        self.p = box.popen(member_argv(user, ["python3", "/srv/hostile_member.py", *map(str, args),
                                              "--hold", str(hold)]),
                           user=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.p.stdout], [], [], 120)
        line = self.p.stdout.readline() if ready else ""
        if not line.startswith("ready "):
            box.kill(self.p)
            raise AssertionError(f"{args}: no ready line: {line!r} {self.p.stderr.read()}")
        self.info = json.loads(line[6:])
        self.pid = self.info["pid"]

    def end(self):
        self.box.kill(self.p)


def snapshot(box):
    return json.loads(box.run(["cat", "/run/gpu-router/gpus.json"]).stdout)


def gpu_process(box, pid):
    for p in snapshot(box)["gpus"][0]["processes"]:
        if p["pid"] == pid:
            return p
    return None


def wait_sampled(box, *pids, samples=4):
    """Until the snapshot lists each pid's VRAM, then `samples` more samples: the agent had its chance to act."""
    box.wait_for(lambda: all(gpu_process(box, p) for p in pids), timeout=30, interval=0.2)
    time.sleep(samples * INTERVAL)


def agent(box):
    show = box.run(["systemctl", "show", "gpu-router-agent.service", "-p", "MainPID,NRestarts,ActiveState"]).stdout
    return dict(line.split("=", 1) for line in show.splitlines() if "=" in line)


@pytest.fixture
def watched(box):
    """The agent before a test; after it: same process, never restarted, active."""
    before = agent(box)
    yield before
    after = agent(box)
    assert after == before, f"the agent did not stay up through the attack: {before} -> {after}"


def uid(box, user):
    return box.run(["id", "-u", user]).stdout.strip()


def last_routed(box, user, since):
    found = box.journal("GPU_ROUTER_EVENT=routed", f"_UID={uid(box, user)}", args=[f"--since=@{since}"])
    assert found, f"no routed event from {user}"
    return found[-1]


# ---- 1. path traversal through the ledger's WORKLOAD word, and symlinks planted in the lock dir ------------------

TARGETS = {  # what root must never write for a member: each a symlink h-<key>.jsonl in the lock dir points at it
    "drain": f"{STATE}/drain",                                     # every member's GPU jobs to the CPU
    "calibration": f"{STATE}/calibration/shared.toml",             # a model every job of the workload reads
    "wrap-record": f"{STATE}/wrapped/ls.toml",                     # what unwrap restores from, as root
    "job-record": "/run/gpu-router/jobs/shared-1-forged.json",     # what a restarted agent adopts
    "marshal": "/run/gpu-router/gpus.marshal",                     # the snapshot every wrapper reads
    "textfile": "/var/lib/prometheus/node-exporter/forged.prom",   # what node_exporter exports
}
TRAVERSAL = "../../../../run/gpu-router/locks/"  # from <state_dir>/samples


def test_ledger_workload_path_traversal_writes_nothing_for_a_member(box, watched):
    plain = f"{LOCKS}/plain.jsonl"  # the traversal alone, no symlink: root would create this file
    links = " ".join(f"ln -s {shlex.quote(t)} {LOCKS}/h-{k}.jsonl;" for k, t in TARGETS.items())
    as_member(box, "alice", ["sh", "-c", links], check=True)
    before = {t: box.run(["sha256sum", t], check=False).stdout for t in TARGETS.values()}
    watcher = box.popen(["python3", "/srv/watch.py", json.dumps([*TARGETS.values(), plain]), "pwnMARK", "8"],
                        stdout=subprocess.PIPE, text=True)
    held = []
    try:
        for key in [*TARGETS, "plain"]:
            name = "plain" if key == "plain" else f"h-{key}"
            held.append(Held(box, "alice", "entry", "--workload", TRAVERSAL + name, "--metric", "pwnMARK",
                             "--reserve", 1, "--use", 64))
        wait_sampled(box, *(h.pid for h in held))
        seen = json.loads(watcher.communicate(timeout=30)[0])
        after = {t: box.run(["sha256sum", t], check=False).stdout for t in TARGETS.values()}
        for h in held:  # bob's job comes after the attack: what root wrote (a drain file) would still act on it
            h.end()
        since = time.time()
        r = job(box, "bob", 50, 0.2)
        routed = box.journal("GPU_ROUTER_EVENT=routed", f"_UID={uid(box, 'bob')}", args=[f"--since=@{since}"])
    finally:
        for h in held:
            h.end()
        if watcher.poll() is None:
            box.kill(watcher)
        box.run(f"rm -f {LOCKS}/h-*.jsonl {plain} " + " ".join(t for k, t in TARGETS.items() if k != "marshal"))
    written = {p: s for p, s in seen.items() if s["marked"]}
    created = [t for k, t in TARGETS.items() if k != "marshal" and not before[t] and after[t]]
    assert not written and not created and not seen[plain]["exists"], \
        f"root wrote for a member: marked {sorted(written)}, created {created}, plain {seen[plain]}"
    assert r.returncode == 0 and routed and routed[-1].get("GPU_ROUTER_MODE") == "GPU", \
        (r.returncode, r.stderr[-600:], [(e.get("GPU_ROUTER_MODE"), e.get("GPU_ROUTER_REASON")) for e in routed])


# A wrap record in the member's words: padding comments (the trim keeps the newest lines, and the file must be
# over its size), the record, and an open ''' string that the sample line root appends closes with the metric.
RECORD = (("#" + "x" * 998 + "\n") * 2100 + 'version = 1\nname = "apt"\npath = "/usr/local/sbin/apt"\n'
          'workload = "shared"\nmethod = "rename"\nreal = "/home/alice/apt"\nzz = \'\'\'\n')


def test_a_member_cannot_plant_a_wrap_record_through_the_samples_trim(box, watched):
    """The chain of the issue: the trim's fixed PATH.tmp follows a symlink → root writes the member's record →
    `apt-get remove gpu-router` (its prerm: `python3 -m gpu_router.ops.wrap unwrap --all`) renames the member's
    script to /usr/local/sbin/apt, first on root's PATH. The prerm's own command is run here, as it would run."""
    box.write_file("/scratch/record", RECORD)
    as_member(box, "alice", ["sh", "-c", f"""
        printf '#!/bin/sh\\nid > /tmp/pwned\\n' > /home/alice/apt && chmod 755 /home/alice/apt
        cat /scratch/record > {LOCKS}/alice-big
        ln -s {LOCKS}/alice-big {LOCKS}/h-trim.jsonl
        ln -s {STATE}/wrapped/apt.toml {LOCKS}/h-trim.jsonl.tmp"""], check=True)
    h = Held(box, "alice", "entry", "--workload", TRAVERSAL + "h-trim", "--metric", "'''#", "--reserve", 1,
             "--use", 64)
    try:
        wait_sampled(box, h.pid)
        record = box.run(["test", "-e", f"{STATE}/wrapped/apt.toml"], check=False).returncode == 0
        unwrap = box.run(["python3", "-I", "-B", "-m", "gpu_router.ops.wrap", "--root", "/", "unwrap", "--all"],
                         check=False)
        moved = box.run(["test", "-e", "/usr/local/sbin/apt"], check=False).returncode == 0
    finally:
        h.end()
        box.run(f"rm -f {LOCKS}/h-trim.jsonl {LOCKS}/h-trim.jsonl.tmp {LOCKS}/alice-big {STATE}/wrapped/apt.toml "
                "/usr/local/sbin/apt")
    assert not record and not moved, f"record written: {record}; unwrap moved the member's script: {moved}\n" \
                                     f"{unwrap.stdout}{unwrap.stderr}"


def test_unwrap_restores_only_what_wrap_made(box, watched):
    """The chain's last link alone: a root-owned record (however it got there) naming a member's file as `real`,
    with no launcher symlink at `path` and no diversion, must not make root rename that file anywhere."""
    as_member(box, "alice", ["sh", "-c", "printf '#!/bin/sh\\nid\\n' > /home/alice/apt2; chmod 755 /home/alice/apt2"],
              check=True)
    box.write_file(f"{STATE}/wrapped/apt.toml", 'version = 1\nname = "apt"\npath = "/usr/local/sbin/apt"\n'
                   'workload = "shared"\nmethod = "rename"\nreal = "/home/alice/apt2"\n')
    try:
        r = box.run(["python3", "-I", "-B", "-m", "gpu_router.ops.wrap", "--root", "/", "unwrap", "--all"],
                    check=False)
        moved = box.run(["test", "-e", "/usr/local/sbin/apt"], check=False).returncode == 0
        kept = box.run(["test", "-e", "/home/alice/apt2"], check=False).returncode == 0
    finally:
        box.run(f"rm -f {STATE}/wrapped/apt.toml {STATE}/wrapped/apt.workload /usr/local/sbin/apt")
    assert not moved and kept and "Traceback" not in r.stderr, (r.returncode, r.stdout, r.stderr)


# ---- 2. an entry naming another member's PID, a metric that is not a number -------------------------------------

def bob_job(box, mb):
    """bob's job using `mb` MiB (each size once at a time here), and its PID once the snapshot shows it."""
    p = box.popen(member_argv("bob", ["gpu-router", "run", "--workload", "shared", "--", *FAKEJOB,
                                      "--vram", str(mb), "--seconds", "30", "/srv/input"]), user="bob")
    pid = box.wait_for(lambda: p.poll() is not None or next(
        (x["pid"] for x in snapshot(box)["gpus"][0]["processes"] if x["used_mb"] == mb), None),
        timeout=30, interval=0.2)
    assert p.poll() is None, f"bob's {mb} MiB job ended: {p.returncode}"
    return p, pid


def test_an_entry_naming_another_members_job_blames_and_poisons_nothing(box, watched):
    since = time.time()
    held, victim, control = [], None, None
    try:
        victim, vpid = bob_job(box, 1500)   # within its 2000 MiB reservation
        control, cpid = bob_job(box, 2500)  # over it: the agent must still say so (the check is not just off)
        held.append(Held(box, "alice", "entry", "--workload", "shared", "--metric", "987654", "--reserve", 1,
                         "--name-pid", vpid))
        held.append(Held(box, "alice", "entry", "--workload", "shared", "--metric", "nan", "--reserve", 1,
                         "--use", 300))
        wait_sampled(box, vpid, cpid, held[1].pid)
        blamed = box.journal("GPU_ROUTER_EVENT=vram-underpredicted", f"GPU_ROUTER_PID={vpid}",
                             args=[f"--since=@{since}"])
        noted = box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=vram-underpredicted", f"GPU_ROUTER_PID={cpid}",
                                                 args=[f"--since=@{since}"]), timeout=10, interval=0.3)
        samples = box.run(f"cat {STATE}/samples/*.jsonl 2>/dev/null || true").stdout
    finally:
        for h in held:
            h.end()
        for p in (victim, control):
            if p is not None:
                box.kill(p)
    poisoned = [line for line in samples.splitlines() if '"987654"' in line or '"nan"' in line]
    assert not blamed and not poisoned, (blamed, poisoned)
    assert noted[-1].get("GPU_ROUTER_METRIC") == "100", noted[-1]  # bob's own job, in bob's words


# ---- 8. hide as ours: a member's flock on its own file in the lock dir -------------------------------------------

def test_a_members_own_flock_in_the_lock_dir_does_not_make_its_vram_ours(box, watched):
    since = time.time()
    h = Held(box, "alice", "hide", 3000)
    try:
        wait_sampled(box, h.pid)
        proc = gpu_process(box, h.pid)
        box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=vram-foreign", f"GPU_ROUTER_PID={h.pid}",
                                         args=[f"--since=@{since}"]) or proc["ours"], timeout=10, interval=0.3)
        noted = box.journal("GPU_ROUTER_EVENT=vram-foreign", f"GPU_ROUTER_PID={h.pid}", args=[f"--since=@{since}"])
    finally:
        h.end()
        box.run(f"rm -f {LOCKS}/mine.*")
    assert proc["ours"] is False and proc["job"] is None and noted, (proc, len(noted))


# ---- 7. terminal and parser: control characters in member-chosen text --------------------------------------------

ESC_NAME = "/tmp/in\x1b]2;PWNED\x07\x1b[31m.wav"


def test_control_characters_never_reach_roots_terminal(box, watched):
    as_member(box, "bob", ["python3", "-c", "import sys; open(sys.argv[1], 'w').write('x' * 100)", ESC_NAME],
              check=True)
    since = time.time()
    running = box.popen(member_argv("bob", ["gpu-router", "run", "--workload", "shared", "--", *FAKEJOB,
                                            "--vram", "50", "--seconds", "4", ESC_NAME]), user="bob")
    try:
        last_job = box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=routed", f"_UID={uid(box, 'bob')}",
                                                    args=[f"--since=@{since}"]), timeout=30, interval=0.2)
        job_id = last_job[-1]["GPU_ROUTER_JOB"]
        status = box.run(["gpu-router", "status"], check=False)
        watch = box.run(["script", "-qec", "gpu-router status --watch 0.5 --count 2", "/dev/null"], check=False)
    finally:
        running.wait(timeout=60)
    box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=job-finished", f"GPU_ROUTER_JOB={job_id}"), timeout=30,
                 interval=0.3)
    jobs = box.run(["gpu-router", "jobs"], check=False)
    one = box.run(["gpu-router", "jobs", job_id], check=False)
    jobs_json = box.run(["gpu-router", "jobs", "--json"], check=False)
    # a foreign process whose name holds an escape sequence: stats names the largest such process (COMM)
    h = Held(box, "alice", "foreign", 3500, "\x1b[31mevil\x07")
    try:
        box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=vram-foreign", f"GPU_ROUTER_PID={h.pid}"), timeout=20,
                     interval=0.3)
        stats = box.run(["gpu-router", "stats"], check=False)
    finally:
        h.end()
    problems = []
    for name, r in (("status", status), ("jobs", jobs), ("jobs JOB", one), ("jobs --json", jobs_json),
                    ("stats", stats)):
        if r.returncode != 0 or "Traceback" in r.stderr:
            problems.append(f"{name} exited {r.returncode}: {r.stderr[-600:]}")
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", r.stdout + r.stderr):
            problems.append(f"{name} printed a control character: {(r.stdout + r.stderr)[-600:]!r}")
    if any(s in watch.stdout for s in ("\x1b]", "\x07", "\x1b[31m")):
        problems.append(f"status --watch printed the member's escape sequence: {watch.stdout[-600:]!r}")
    if "[27," in stats.stdout or "evil" not in stats.stdout:
        problems.append(f"stats does not print COMM as text: {stats.stdout[-800:]!r}")
    assert not problems, "\n".join(problems)


# ---- 3. a stall: hard links of one unlocked ledger entry ----------------------------------------------------------

LINKS = 100_000
STALE_LIMIT = 4 * INTERVAL + 1.0  # the snapshot's own age: a few sample intervals, never the seconds of a stall


def test_hard_links_of_one_entry_do_not_stall_the_agent(box, watched):
    h = Held(box, "alice", "links", LINKS, hold=180)
    try:
        ages = []
        end = time.monotonic() + 8
        while time.monotonic() < end:
            ages.append(time.time() - snapshot(box)["time"])
            time.sleep(0.2)
        try:
            r = job(box, "bob", 50, 0.2)
        except subprocess.TimeoutExpired as exc:
            r = subprocess.CompletedProcess(exc.cmd, "timeout", exc.stdout or "", exc.stderr or "")
    finally:
        # (the agent may be removing them too: a name gone under find is fine)
        box.run(f"find {LOCKS}/vram -name 'gpu0.{h.pid}~*' -delete", timeout=300, check=False)
        h.end()
    print(f"{LINKS} links made in {h.info['seconds']} s; snapshot age max {max(ages):.2f} s")
    assert max(ages) < STALE_LIMIT and r.returncode == 0, \
        f"snapshot age up to {max(ages):.1f} s (limit {STALE_LIMIT}); bob's job: {r.returncode} {r.stderr[-400:]}"


# ---- 4. a forged queue ticket at the head of the queue ------------------------------------------------------------

def test_a_forged_queue_ticket_does_not_block_the_workload(box, watched):
    outsider = as_member(box, "outsider", ["python3", "/srv/hostile_member.py", "ticket", "shared", "gpu",
                                           "--hold", "0"])
    assert outsider.returncode != 0 and "ready" not in outsider.stdout, outsider  # not in the group: no ticket
    h = Held(box, "alice", "ticket", "shared", "gpu")
    try:
        r = job(box, "bob", 50, 0.2)
    finally:
        h.end()
    assert r.returncode == 0, (r.returncode, r.stderr[-400:])


# ---- 5. forged history: journal entries with the agent's fields ---------------------------------------------------

def oom_count(text):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("gpu_router_jobs_finished_total{") and 'result="oom-kill"' in line)


def test_forged_journal_entries_are_not_history(box, watched):
    since = time.time()
    r = job(box, "bob", 100, 0.5)
    assert r.returncode == 0, r
    job_id = last_routed(box, "bob", since)["GPU_ROUTER_JOB"]
    box.wait_for(lambda: box.journal("GPU_ROUTER_EVENT=job-finished", f"GPU_ROUTER_JOB={job_id}"), timeout=30,
                 interval=0.3)
    ooms_before = oom_count(box.run(["cat", PROM]).stdout)
    forged = [
        ["job-finished", {"JOB": job_id, "WORKLOAD": "shared", "MODE": "GPU", "RESULT": "oom-kill",
                          "EXIT_STATUS": 137, "PEAK_VRAM_MB": 15000, "DURATION_S": 1.5}],
        ["job-finished", {"JOB": "shared-1-forged", "WORKLOAD": "shared", "MODE": "GPU", "RESULT": "oom-kill",
                          "EXIT_STATUS": 137}],
        ["vram-foreign", {"DEVICE": 0, "PID": 4242, "COMM": "forged", "USED_VRAM_MB": 70000, "FOREIGN_MB": 70000,
                          "TOTAL_MB": 81920}],
    ]
    as_member(box, "alice", ["python3", "/srv/forge.py", json.dumps(forged)], check=True)
    # the same through another client: logger(1)'s native journald fields, read from stdin
    mid = box.run(["python3", "-c", "from gpu_router import journal; print(journal.MESSAGE_IDS['job-finished'])"])
    as_member(box, "bob", ["logger", "--journald"], check=True, input=(
        f"MESSAGE=forged by logger\nMESSAGE_ID={mid.stdout.strip()}\nSYSLOG_IDENTIFIER=gpu-router\n"
        f"GPU_ROUTER_EVENT=job-finished\nGPU_ROUTER_JOB=shared-2-forged\nGPU_ROUTER_WORKLOAD=shared\n"
        f"GPU_ROUTER_MODE=GPU\nGPU_ROUTER_RESULT=oom-kill\nGPU_ROUTER_EXIT_STATUS=137\n"))
    box.run(["journalctl", "--sync"])
    time.sleep(6 * INTERVAL)  # the agent follows the journal every sample
    shown = box.run(["gpu-router", "jobs", "--json", job_id], check=False)
    stats = box.run(["gpu-router", "stats"], check=False)
    stats_json = box.run(["gpu-router", "stats", "--json"], check=False)
    ooms_after = oom_count(box.run(["cat", PROM]).stdout)
    assert shown.returncode == 0, shown
    assert "oom-kill" not in shown.stdout and "15000" not in shown.stdout, shown.stdout
    assert "70000" not in stats.stdout + stats_json.stdout, stats.stdout
    assert ooms_after == ooms_before, (ooms_before, ooms_after)


# ---- 6. unbounded labels ------------------------------------------------------------------------------------------

def test_made_up_workloads_do_not_grow_the_metrics(box, watched):
    def sizes():
        out = box.run(["stat", "-c", "%s", PROM, f"{STATE}/metrics.json"]).stdout.split()
        return [int(x) for x in out]

    before = sizes()
    as_member(box, "alice", ["python3", "/srv/forge.py", "labels", "3000"], check=True, timeout=120)
    box.run(["journalctl", "--sync"])
    time.sleep(10 * INTERVAL)
    after = sizes()
    grown = [a - b for a, b in zip(after, before)]
    print(f"gpu_router.prom {before[0]} -> {after[0]} B, metrics.json {before[1]} -> {after[1]} B")
    assert max(grown) < 20_000, f"3000 made-up workloads grew the metrics by {grown} bytes"


# ---- suspected: bare-scope adoption trusts the PID inside a member-chosen JOB id (restarts the agent: last) ------

def test_bare_scope_adoption_does_not_take_another_members_pid(box):
    bob = Held(box, "bob", "foreign", 400, "bobvram")
    alice = None
    try:
        wait_sampled(box, bob.pid, samples=1)
        assert gpu_process(box, bob.pid)["ours"] is False
        job_id = f"shared-{bob.pid}-forged"
        alice = Held(box, "alice", "scope", job_id)
        if alice.info["reply"].get("OK") != "1":  # refused at the door (a JOB id naming another PID): safe
            assert "Traceback" not in json.dumps(alice.info), alice.info
            return
        # The agent killed between StartTransientUnit and the job's record: the scope is bare.
        box.run(["rm", "-f", f"/run/gpu-router/jobs/{job_id}.json"])
        old = agent(box)["MainPID"]
        box.run(["systemctl", "kill", "--signal=SIGKILL", "gpu-router-agent.service"])
        box.wait_for(lambda: agent(box)["ActiveState"] == "active" and agent(box)["MainPID"] not in ("0", old),
                     timeout=60, interval=0.3)
        restarted = time.time()
        box.wait_for(lambda: snapshot(box)["time"] > restarted + 2 * INTERVAL, timeout=30, interval=0.2)
        box.run(["systemctl", "is-active", "--quiet", f"gpu-router-{job_id}.scope"])
        proc = gpu_process(box, bob.pid)
    finally:
        bob.end()
        if alice is not None:
            alice.end()
    assert proc["ours"] is False and proc["job"] is None, proc
