"""What a member writes in the lock dir is hostile input to root (issue 17, items 1-4, 8 and the bare-scope
adoption): real processes under two member accounts with different umasks, real flock, the real agent's
check_predictions and reserved_pids. Group 100 ("users") stands in for gpu-router, as in test_shared_locks.py."""

import fcntl
import os
import shutil
import subprocess
import sys
import time

import pytest

import helpers
from gpu_router import slots, trust

pytestmark = pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv")

GID = 100
A, B = (4001, "077"), (4002, "027")  # two members, different umasks

HOLD = r"""
import fcntl, os, sys, time
d, name, content, links = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
name = name.replace("PID", str(os.getpid()))
fd = os.open(os.path.join(d, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
os.write(fd, content.encode())
fcntl.flock(fd, fcntl.LOCK_EX)
for i in range(links):
    os.link(os.path.join(d, name), os.path.join(d, f"{name}~{i}"))
print(name, flush=True)
time.sleep(600)
"""


def _as(member):
    uid, umask = member
    return ["sh", "-c", f'umask {umask}; exec "$@"', "sh", "setpriv", f"--reuid={uid}", f"--regid={GID}",
            f"--groups={GID}"]


@pytest.fixture
def rig(monkeypatch):
    """An agent folder whose lock dir is as tmpfiles.d makes it (3770 root:gpu-router), and the agent on it."""
    from gpu_router.daemon import service

    root = helpers.public_tmpdir()
    base, cfg = helpers.agent_folder(root, workload='binary = "/bin/true"\nthreshold = 100\nmax_cpu_jobs = 1\n'
                                                    'max_gpu_jobs = 1\nadmission = "vram"\ngpu_vram_mb = 100\n')
    locks = base / "locks"
    os.chown(locks, 0, GID)
    os.chmod(locks, 0o3770)
    os.chmod(base, 0o755)
    dir_fd = slots.open_lock_dir(str(locks))
    os.close(slots._subdir(dir_fd, slots.LEDGER, "vram"))
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(base))
    agent = service.Agent(str(cfg))
    procs = []

    def hold(member, folder, name, content="", links=0):
        """A member's process that creates ``folder/name`` (PID in the name: its own), locks it, and sleeps."""
        p = subprocess.Popen(_as(member) + [sys.executable, "-c", HOLD, str(folder), name, content, str(links)],
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        made = p.stdout.readline().strip()
        assert made, "the member's process did not start"
        return p.pid if "PID" not in name else int(made.rsplit(".", 1)[1].partition("~")[0]), made

    def sleeper(member):
        p = subprocess.Popen(_as(member) + ["sleep", "600"])
        procs.append(p)
        return p.pid

    yield agent, base, locks, dir_fd, hold, sleeper
    for p in procs:
        p.kill()
        p.wait()
    os.close(dir_fd)
    shutil.rmtree(root)


def _gpu(pids_mb):
    return {"gpus": [{"index": 0, "processes": [{"pid": p, "used_mb": mb, "ours": True, "job": p}
                                                for p, mb in pids_mb.items()]}]}


def _files_under(path):
    return {os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs}


def test_a_workload_word_in_an_entry_never_becomes_a_path(rig):
    """Item 1's first link: the entry's WORKLOAD joined into samples/<workload>.jsonl as root."""
    agent, base, locks, _, hold, _ = rig
    before = _files_under(base)
    pid, _ = hold(A, locks / "vram", "gpu0.PID", "10 ../../locks/x 5 -")
    agent.snapshot = _gpu({pid: 5000})
    agent.check_predictions()
    written = _files_under(base) - before - {str(locks / "vram" / f"gpu0.{pid}")}
    assert written == set(), f"root wrote {written}"
    assert not (locks / "x.jsonl").exists()


def test_a_members_entry_cannot_blame_another_members_job(rig):
    """Item 2: an entry of A's naming B's PID (A's process holds its lock) makes no event and no sample."""
    agent, base, locks, _, hold, sleeper = rig
    victim = sleeper(B)
    hold(A, locks / "vram", f"gpu0.{victim}", "10 tx 7 -")
    agent.snapshot = _gpu({victim: 5000})
    agent.check_predictions()
    assert not (base / "state" / "samples" / "tx.jsonl").exists()
    assert not agent.outgrown


@pytest.mark.parametrize("metric", ["nan", "inf", "1e999", "1,nan", "x"])
def test_a_metric_that_is_no_finite_number_makes_no_sample(rig, metric):
    agent, base, locks, _, hold, _ = rig
    pid, _ = hold(A, locks / "vram", "gpu0.PID", f"10 tx {metric} -")
    agent.snapshot = _gpu({pid: 5000})
    agent.check_predictions()
    assert agent.outgrown, "the entry was not read at all"
    assert not (base / "state" / "samples" / "tx.jsonl").exists()


def test_a_valid_entry_still_makes_its_sample(rig):
    """The other side: the member's own job, outgrowing its own reservation, is recorded."""
    agent, base, locks, _, hold, _ = rig
    pid, _ = hold(B, locks / "vram", "gpu0.PID", "10 tx 7 -")
    agent.snapshot = _gpu({pid: 5000})
    agent.check_predictions()
    assert (base / "state" / "samples" / "tx.jsonl").exists()


def test_hard_links_of_one_entry_count_nothing_and_are_removed(rig):
    """Item 3: 3000 hard links of one locked entry were 3001 reservations, each read every sample."""
    agent, base, locks, _, hold, _ = rig
    pid, _ = hold(A, locks / "vram", "gpu0.PID", "10 tx 7 -", links=3000)
    opened = trust.STATS["opens"]
    live = slots.live_reservations(str(locks), verify=True)
    assert live.get("gpu0", []) == []
    assert trust.STATS["opens"] - opened <= 1, "each link of one inode was opened"
    for _ in range(4):  # the agent (root) removes what does not count, at most MAX_NAMES names a pass
        slots.live_reservations(str(locks), verify=True)
    assert os.listdir(locks / "vram") == []


def test_a_flooded_ledger_degrades_admission_to_blind_and_refuses_no_one(rig, monkeypatch):
    """Item 3, the wrapper's side: past what one pass reads (a member's 100,000 hard links), the wrapper refused
    every member's VRAM admission (exit 69) until the agent had cleared them, a second at a time; now the read
    says it is partial and the wrapper admits as with no snapshot (blind_cap), counting what it did read. The
    limits are lowered here so the flood is small; the hostile .deb lane floods with the real ones."""
    agent, base, locks, dir_fd, hold, _ = rig
    monkeypatch.setattr(trust, "MAX_SCAN", 200)
    hold(A, locks / "vram", "gpu0.PID", "10 tx 7 -", links=400)
    bob, _ = hold(B, locks / "vram", "gpu0.PID", "20 tx 7 -")
    with slots.Ledger(dir_fd, str(locks)) as ledger:
        ledger.live()  # raised LockDirError before
        assert ledger.partial
    monkeypatch.setattr(trust, "MAX_SCAN", 65536)
    with slots.Ledger(dir_fd, str(locks)) as ledger:
        live = ledger.live()
        assert not ledger.partial and [mb for _, mb in live["gpu0"]] == [20]  # a hard-linked entry counts nothing


def test_a_flock_on_a_members_own_file_does_not_make_its_process_ours(rig):
    """Item 8: any flock in the lock dir made the holder's VRAM a job's. Only a real slot counts."""
    agent, base, locks, _, hold, _ = rig
    mine, _ = hold(A, locks, "mine")
    beyond, _ = hold(A, locks, "tx.cpu.7")     # a slot number the config does not have
    real, _ = hold(B, locks, "tx.cpu.0")       # a real slot: its holder is a job
    pids = agent.reserved_pids()
    assert mine not in pids and beyond not in pids
    assert real in pids


def test_a_forged_ticket_at_the_head_does_not_block_another_members_wait(rig):
    """Item 4: "00000000000000000001.<pid>", locked by a member's process, stayed at the head for ever."""
    agent, base, locks, dir_fd, hold, _ = rig
    q = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
    q.leave()  # the folder exists now, as a first waiter makes it
    folder = locks / "tx.gpu.queue"
    hold(A, folder, "00000000000000000001.PID")
    late = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
    try:
        assert late.is_head(), "a forged ticket keeps the queue"
    finally:
        late.leave()


def test_a_real_waiter_of_another_member_is_still_ahead(rig):
    """The other side: a ticket published by a waiting wrapper of member A keeps B behind it."""
    agent, base, locks, dir_fd, hold, _ = rig
    wait = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from gpu_router import slots
fd = slots.open_lock_dir(sys.argv[2])
q = slots.Queue(fd, sys.argv[2], "tx", "gpu", wait=30)
print(q.name, flush=True)
time.sleep(600)
"""
    lib = os.path.dirname(os.path.dirname(slots.__file__))
    p = subprocess.Popen(_as(A) + [sys.executable, "-c", wait, lib, str(locks)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip()
        late = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
        try:
            assert not late.is_head()
        finally:
            late.leave()
    finally:
        p.kill()
        p.wait()


def test_a_job_id_naming_another_pid_is_refused(rig):
    from gpu_router.daemon import broker

    agent = rig[0]
    req = {b"OP": b"scope", b"WORKLOAD": b"tx", b"JOB": b"tx-1-abc", b"MODE": b"CPU"}
    with pytest.raises(broker.Refused, match="bad job id"):
        broker.grant(agent.cfg, req, os.getpid(), 0)
    assert broker.grant(agent.cfg, {**req, b"JOB": f"tx-{os.getpid()}-abc".encode()}, os.getpid(), 0)


def test_bare_scope_adoption_trusts_only_a_pid_the_scope_holds(rig, monkeypatch):
    """The suspected case: a scope named by a member's JOB id "tx-1-…" made the restarted agent follow PID 1 (and
    PID 1's whole tree became "ours"). The scope's members come from the kernel's cgroup.procs; here, with no
    systemd to make a scope, running_scopes is replaced by what it would read: the one stand-in in this file."""
    from gpu_router import scope

    agent, _, _, _, _, sleeper = rig
    member = sleeper(A)
    cg = "/gpu.slice/gpu-router.slice/gpu-router-cpu.slice/gpu-router-tx-1-abc.scope"
    monkeypatch.setattr(scope, "running_scopes", lambda: {"gpu-router-tx-1-abc.scope": (cg, [member])})
    agent.adopt()
    assert 1 not in agent.jobs and member in agent.jobs
    for job in list(agent.jobs.values()):
        agent._forget(job.pid)


def test_a_fifo_or_symlink_entry_never_blocks_or_is_followed(rig, tmp_path):
    agent, base, locks, _, _, _ = rig
    os.mkfifo(locks / "vram" / "gpu0.1")
    target = tmp_path / "secret"
    target.write_text("1 tx 1 -")
    os.symlink(target, locks / "vram" / "gpu0.2")
    started = time.monotonic()
    assert slots.live_reservations(str(locks), verify=True) == {}
    assert time.monotonic() - started < 30  # a blocked open would never return at all
    assert target.read_text() == "1 tx 1 -"


def test_fields_are_typed_or_none():
    assert trust.ledger_name("gpu0.12") == ("gpu0", 12)
    assert trust.ledger_name("gpu0.12~5") == ("gpu0", 12)
    for bad in ("gpu0.٣", "gpu0. 7", "x.12", "gpu.12", "gpu0.0", "gpu0.12~x", "gpu0.1_0", "gpu0.99999999999"):
        assert trust.ledger_name(bad) is None, bad
    assert trust.ledger_text(b"10 tx 1.5 99", {"tx"}) == (10, "tx", "1.5", 99)
    assert trust.ledger_text(b"10 ../x nan 99", {"tx"}) == (10, None, None, 99)
    assert trust.ledger_text(b"10 other 1", {"tx"}) == (10, None, "1", None)
    assert trust.ledger_text(b"-1 tx") is None and trust.ledger_text(b"") is None
    assert trust.ticket_name("00000000000000000001.5") == (1, 5)
    assert trust.ticket_name("1.5") is None and trust.ticket_name("00000000000000000001.x") is None
    pools = {"tx": (2, 1)}
    assert trust.slot_name("tx.gpu0.1", pools) == ("tx", "gpu0", 1)
    assert trust.slot_name("tx.gpu0.2", pools) is None and trust.slot_name("tx.cpu.1", pools) is None
    assert trust.slot_name("mine", pools) is None and trust.slot_name("zz.cpu.0", pools) is None
    assert trust.job_id(b"tx-5-ab", "tx", 5) == "tx-5-ab"
    assert trust.job_id(b"tx-6-ab", "tx", 5) is None and trust.job_id(b"tx-5-", "tx", 5) is None
    assert trust.workload("../x") is None and trust.workload("tx", {"tx"}) == "tx"
    assert trust.metric(b"1e999") == "unknown" and trust.metric("1,2") == "1,2"


def test_a_daemonising_jobs_reservation_still_counts_for_the_agent(rig):
    """The other side of "held by the PID it names": a job that forks and exits leaves its lock to the child that
    inherited the descriptor; the reservation is still the job's (its VRAM is still held) and is not removed."""
    agent, base, locks, _, _, _ = rig
    code = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from gpu_router import slots
fd = slots.open_lock_dir(sys.argv[2])
with slots.Ledger(fd, sys.argv[2]) as ledger:
    keep = ledger.reserve("gpu0", 300, "tx", "7")
print(os.getpid(), flush=True)
if os.fork():
    os._exit(0)
time.sleep(600)
"""
    lib = os.path.dirname(os.path.dirname(slots.__file__))
    p = subprocess.Popen(_as(A) + [sys.executable, "-c", code, lib, str(locks)], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        pid = int(p.stdout.readline())
        p.wait()
        assert slots.live_reservations(str(locks), verify=True) == {"gpu0": [(pid, 300)]}
        assert slots.live_reservations(str(locks), verify=True) == {"gpu0": [(pid, 300)]}  # and not removed
    finally:
        os.killpg(p.pid, 9)


def test_the_agents_pass_clears_forged_tickets_and_keeps_real_ones(rig):
    """Queue junk (a forged, back-dated ticket held by a member; a name of another form; a dead waiter's ticket) is
    removed by root's tidy pass every sample, so it cannot fill the folder; a waiting wrapper's ticket stays."""
    agent, base, locks, dir_fd, hold, _ = rig
    real = slots.Queue(dir_fd, str(locks), "tx", "gpu", wait=30)
    folder = locks / "tx.gpu.queue"
    try:
        hold(A, folder, "00000000000000000001.PID")
        hold(B, folder, "junk")
        (folder / "00000000000000000002.1").write_text("")  # no one holds it
        slots.tidy(str(locks), GID)
        assert sorted(os.listdir(folder)) == [real.name]
    finally:
        real.leave()
