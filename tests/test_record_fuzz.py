"""The record fuzz (issue 17): generated ledger entries and queue tickets, planted by a member in the real lock dir
(names and contents of every kind, hard links, symlinks to the agent's state, FIFOs, folders, entries held by a
member's live process), then read the way root reads them: the agent's check_predictions and reserved_pids, and
a waiter's queue. Zero tracebacks, zero writes outside the state dir, and a bounded read: the names looked at and
the entries opened per pass never exceed trust.MAX_NAMES, whatever the member planted (counted, not timed).

Seeded (random.Random(seed)), so a failure names the seed that reproduces it. The planting runs as member 4001
(umask 077, group 100 standing in for gpu-router), the reading as root, as in production."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

import helpers
from gpu_router import slots, trust

pytestmark = pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv")

GID = 100
OPENS = {"on": False, "n": 0}  # files opened while counting, of any reader (the audit hook sees every os.open)


def _count(event, args):
    if OPENS["on"] and event == "open":
        OPENS["n"] += 1


sys.addaudithook(_count)
PER_ROUND = 260  # ledger entries and queue tickets planted per round; two rounds: >= 500 records

WORDS = ["tx", "../../locks/x", "..", ".", "/etc/passwd", "tx/../../x", "a" * 300, "\x1b[2J", "tx\n", "-", "",
         "nan", "inf", "-inf", "1e999", "1,nan", "0x10", "١٢", "12", "1.5", "-3", "9" * 30, "\xff", "tx tx"]


def _name(rng, kind):
    pid = rng.choice([1, 2, 4001, 99999999, 0, rng.randrange(1, 1 << 22)])
    if kind == "ledger":
        return rng.choice([f"gpu0.{pid}", f"gpu{rng.randrange(9999)}.{pid}", f"gpu0.{pid}~{rng.randrange(9)}",
                           f"gpu0.{rng.choice(WORDS)}", f"{rng.choice(WORDS)}.{pid}", "gpu0.", ".tmp.1.2",
                           f"gpu0.{pid}~x", f"gpu0.٣{pid}", f"gpu0.{pid}.{pid}"])
    ns = rng.choice([1, 0, 10 ** 19, rng.randrange(1 << 62)])
    return rng.choice([f"{ns:020d}.{pid}", f"{ns}.{pid}", f"{ns:020d}.{rng.choice(WORDS)}",
                       f"{ns:020d}.{pid}~{rng.randrange(9)}", f"{rng.choice(WORDS)}"])


def _content(rng):
    return rng.choice([
        " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6))),
        f"{rng.choice(['10', '0', '999999999', '9' * 12, '-1', 'x'])} {rng.choice(WORDS)} {rng.choice(WORDS)} "
        f"{rng.choice(['-', '123', 'x', '9' * 25])}",
        "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(400))),
        "1 tx 1 -" + " " * rng.randrange(1000),
    ])


PLANT = r"""
import fcntl, json, os, sys, time
plan = json.load(open(sys.argv[1]))
held = []
for p in plan:
    path = p["path"].replace("SELF", str(os.getpid()))
    try:
        if p["type"] == "file":
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            os.write(fd, p["content"].encode("utf-8", "surrogateescape"))
            if p["lock"]:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a name planted twice is locked once
                except OSError:
                    pass
                held.append(fd)
            else:
                os.close(fd)
        elif p["type"] == "link":
            os.link(p["target"].replace("SELF", str(os.getpid())), path)
        elif p["type"] == "symlink":
            os.symlink(p["target"], path)
        elif p["type"] == "fifo":
            os.mkfifo(path)
        elif p["type"] == "dir":
            os.mkdir(path)
    except OSError:
        pass
print("ready", flush=True)
time.sleep(600)
"""


def _plan(rng, ledger, queue, state):
    plan = []
    for i in range(PER_ROUND):
        kind = "ledger" if i % 2 == 0 else "queue"
        folder = ledger if kind == "ledger" else queue
        name = _name(rng, kind)
        if rng.random() < 0.3:
            name = name.rsplit(".", 1)[0] + ".SELF"  # the member's own live, locking process
        path = os.path.join(folder, name)
        t = rng.choices(["file", "link", "symlink", "fifo", "dir"], [70, 10, 10, 5, 5])[0]
        entry = {"path": path, "type": t, "content": _content(rng) if kind == "ledger" else "",
                 "lock": rng.random() < 0.6}
        if t == "link":
            entry["target"] = plan[-1]["path"] if plan else path
        if t == "symlink":
            entry["target"] = rng.choice([os.path.join(state, "samples", "tx.jsonl"), "/etc/shadow", state,
                                          os.path.join(state, "drain")])
        plan.append(entry)
    # and many hard links of one locked entry (item 3), beyond what one pass reads
    plan.append({"path": os.path.join(ledger, "gpu0.SELF"), "type": "file", "content": "10 tx 7 -", "lock": True})
    for i in range(3 * trust.MAX_NAMES):
        plan.append({"path": os.path.join(ledger, f"gpu0.SELF~{i}"), "type": "link",
                     "target": os.path.join(ledger, "gpu0.SELF")})
    return plan


def _tree(path):
    """{file: (size, mtime)} of everything under ``path`` (symlinks as such)."""
    out = {}
    for d, dirs, files in os.walk(path):
        for f in files + dirs:
            p = os.path.join(d, f)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("seed", [17, 1717])
def test_hostile_ledger_and_queue_records(seed, monkeypatch):
    from gpu_router.daemon import service

    rng = random.Random(seed)
    root = helpers.public_tmpdir()
    try:
        base, cfg = helpers.agent_folder(root, workload='binary = "/bin/true"\nthreshold = 100\n'
                                                        'max_cpu_jobs = 1\nadmission = "vram"\ngpu_vram_mb = 100\n')
        locks = base / "locks"
        os.chown(locks, 0, GID)
        os.chmod(locks, 0o3770)
        os.chmod(base, 0o755)
        dir_fd = slots.open_lock_dir(str(locks))
        os.close(slots._subdir(dir_fd, slots.LEDGER, "vram"))
        first = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
        first.leave()
        state = base / "state"
        (state / "samples").mkdir(parents=True)
        (state / "samples" / "tx.jsonl").write_text("")
        planfile = root / "plan.json"
        plan = _plan(rng, str(locks / "vram"), str(locks / "tx.gpu.queue"), str(state))
        planfile.write_text(json.dumps(plan))
        os.chmod(planfile, 0o644)
        member = subprocess.Popen(["sh", "-c", 'umask 077; exec "$@"', "sh", "setpriv", "--reuid=4001",
                                   f"--regid={GID}", f"--groups={GID}", sys.executable, "-c", PLANT, str(planfile)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert member.stdout.readline().strip() == "ready"
            planted = len(os.listdir(locks / "vram")) + len(os.listdir(locks / "tx.gpu.queue"))
            assert planted >= PER_ROUND // 2, "the member planted too little for a fuzz"
            monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(base))
            agent = service.Agent(str(cfg))
            outside = {p: v for p, v in _tree(root).items() if not p.startswith(str(state))}
            watched = {p: os.lstat(p).st_mtime_ns for p in ("/etc/shadow", "/etc/passwd")}
            for _ in range(3):  # three samples: the agent also removes what does not count, bounded per pass
                names = trust.STATS["names"]
                OPENS.update(on=True, n=0)
                pids = agent.reserved_pids()
                agent.snapshot = {"gpus": [{"index": i, "processes": [{"pid": p, "used_mb": 10 ** 6, "ours": True,
                                                                       "job": p} for p in pids | {member.pid}]}
                                           for i in range(2)]}
                agent.check_predictions()
                OPENS["on"] = False
                # reserved_pids (ledger, slots) + check_predictions (ledger): two ledger passes of at most MAX_SCAN
                # names listed (getdents alone) and a slot pass of MAX_NAMES; at most MAX_NAMES opened per pass.
                # The planted records number over 3 * MAX_NAMES, so a reader that opens each name fails here.
                assert trust.STATS["names"] - names <= 2 * trust.MAX_SCAN + trust.MAX_NAMES
                assert OPENS["n"] <= 3 * trust.MAX_NAMES, f"{OPENS['n']} files opened in one sample"
                waiter = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
                names = trust.STATS["names"]
                OPENS.update(on=True, n=0)
                waiter.is_head()  # no traceback; forged tickets do not count (test_trust.py checks which)
                OPENS["on"] = False
                assert trust.STATS["names"] - names <= trust.MAX_NAMES
                assert OPENS["n"] <= trust.MAX_NAMES
                waiter.leave()
            after = {p: v for p, v in _tree(root).items() if not p.startswith(str(state))}
            grown = {p for p in after if p not in outside or after[p] != outside[p]}
            # what the agent may change outside its state dir: nothing but removing planted entries
            assert not grown - {str(locks / "vram"), str(locks / "tx.gpu.queue")}, sorted(grown)[:5]
            assert {p: os.lstat(p).st_mtime_ns for p in watched} == watched
            assert (state / "samples" / "tx.jsonl").read_text() == ""  # no member's entry made a sample
            for p in _tree(state):
                assert os.path.realpath(p).startswith(str(state)), p
        finally:
            member.kill()
            member.wait()
            os.close(dir_fd)
    finally:
        shutil.rmtree(root)
