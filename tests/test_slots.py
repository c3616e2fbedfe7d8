"""flock slots, the arrival-order queue and the VRAM ledger, with real processes and real SIGKILLs."""

import fcntl
import os
import signal
import subprocess
import time

import pytest

import helpers
from gpu_router import procstat, slots

HOLDER = r"""
import os, sys, time
sys.path.insert(0, %r)
from gpu_router import slots
lock_dir, what = sys.argv[1], sys.argv[2]
d = slots.open_lock_dir(lock_dir)
if what == "slot":
    got = slots.try_slot(d, lock_dir, "w", "gpu0", int(sys.argv[3]))
    print("slot", got and got[1], flush=True)
elif what == "reserve":
    with slots.Ledger(d, lock_dir) as ledger:
        fd = ledger.reserve(sys.argv[3], int(sys.argv[4]))
    print("reserved", flush=True)
elif what == "ledger-guard":
    ledger = slots.Ledger(d, lock_dir).__enter__()
    print("guarding", flush=True)
elif what == "queue":
    q = slots.Queue(d, lock_dir, "w", "gpu")
    print("queued", q.name, flush=True)
    if len(sys.argv) > 3:  # wait to be head, report, leave
        while not q.is_head():
            time.sleep(0.01)
        with open(sys.argv[3], "a") as f:
            f.write(sys.argv[4] + "\n")
        q.leave()
        sys.exit(0)
time.sleep(120)
""" % str(helpers.LIB)


class Holder:
    def __init__(self, *args):
        self.p = subprocess.Popen([helpers.PYTHON, "-IS", "-c", HOLDER] + [str(a) for a in args],
                                  stdout=subprocess.PIPE, text=True)
        self.line = self.p.stdout.readline().strip()

    def kill(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.kill()


@pytest.fixture
def lock_dir(tmp_path):
    return str(tmp_path / "locks")


@pytest.fixture
def dir_fd(lock_dir):
    fd = slots.open_lock_dir(lock_dir)
    yield fd
    os.close(fd)


# ---- the lock directory --------------------------------------------------------------------------------------

def test_lock_dir_is_created_not_world_writable(lock_dir):
    old = os.umask(0)
    try:
        fd = slots.open_lock_dir(lock_dir)
    finally:
        os.umask(old)
    os.close(fd)
    assert os.stat(lock_dir).st_mode & 0o777 == 0o770


def test_lock_dir_not_created_when_asked_not_to(lock_dir):
    with pytest.raises(slots.LockDirError, match="does not exist"):
        slots.open_lock_dir(lock_dir, create=False)


def test_group_writable_setgid_lock_dir_is_accepted(lock_dir):
    os.mkdir(lock_dir)
    os.chmod(lock_dir, 0o2770)
    os.close(slots.open_lock_dir(lock_dir))


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o2773])
def test_world_writable_lock_dir_is_refused(lock_dir, mode):
    os.mkdir(lock_dir)
    os.chmod(lock_dir, mode)
    with pytest.raises(slots.LockDirError, match=r"writable by others \(mode %04o\).*chmod o-w" % mode):
        slots.open_lock_dir(lock_dir)


def test_symlinked_lock_dir_is_refused_even_to_a_good_dir(tmp_path, lock_dir):
    (tmp_path / "real").mkdir(mode=0o770)
    os.symlink(tmp_path / "real", lock_dir)
    with pytest.raises(slots.LockDirError, match="is a symlink; refusing it"):
        slots.open_lock_dir(lock_dir)


def test_lock_dir_that_is_a_file_is_refused(lock_dir):
    open(lock_dir, "w").close()
    with pytest.raises(slots.LockDirError, match="not a directory"):
        slots.open_lock_dir(lock_dir)


def test_lock_dir_that_cannot_be_created(tmp_path):
    with pytest.raises(slots.LockDirError, match="cannot create lock directory .*tmpfiles"):
        slots.open_lock_dir(str(tmp_path / "missing" / "locks"))


# ---- slots ----------------------------------------------------------------------------------------------------

def test_slots_fill_in_order_and_free_on_close(dir_fd, lock_dir):
    a = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2)
    b = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2)
    assert (a[1], b[1]) == (0, 1)
    assert slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2) is None
    assert slots.holders(dir_fd, lock_dir, "w", "gpu0", 2) == 2
    assert slots.try_slot(dir_fd, lock_dir, "w", "cpu", 1)[1] == 0  # another pool is independent
    assert slots.try_slot(dir_fd, lock_dir, "other", "gpu0", 1)[1] == 0  # so is another workload
    os.close(a[0])
    assert slots.holders(dir_fd, lock_dir, "w", "gpu0", 2) == 1
    c = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2)
    assert c[1] == 0
    assert sorted(os.listdir(lock_dir)) == ["other.gpu0.0", "w.cpu.0", "w.gpu0.0", "w.gpu0.1"]


def test_slot_fds_are_cloexec_until_inherited(dir_fd, lock_dir):
    fd, _ = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    assert not os.get_inheritable(fd)
    slots.inherit(fd, None)
    assert os.get_inheritable(fd)
    os.close(fd)


def test_zero_slots_is_always_full(dir_fd, lock_dir):
    assert slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 0) is None


def test_slot_held_by_another_process_until_sigkill(lock_dir):
    with Holder(lock_dir, "slot", 1) as h:
        assert h.line == "slot 0"
        fd = slots.open_lock_dir(lock_dir)
        assert slots.try_slot(fd, lock_dir, "w", "gpu0", 1) is None
        h.kill()
        got = slots.try_slot(fd, lock_dir, "w", "gpu0", 1)  # at once: the kernel dropped the lock
        assert got is not None and got[1] == 0
        os.close(fd)


def test_slot_survives_exec_only_when_inherited(dir_fd, lock_dir):
    fd, _ = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    p = subprocess.Popen(["sleep", "30"], close_fds=False)  # not inherited: O_CLOEXEC drops it at exec
    os.close(fd)
    try:
        assert slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1) is not None
    finally:
        p.kill()
        p.wait()


def test_inherited_slot_is_held_by_the_execd_job(dir_fd, lock_dir):
    fd, _ = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    slots.inherit(fd)
    p = subprocess.Popen(["sleep", "30"], close_fds=False)
    os.close(fd)  # only the job holds it now
    try:
        assert slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1) is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1) is not None
    finally:
        if p.poll() is None:
            p.kill()


def test_planted_symlink_lock_file_is_refused(dir_fd, lock_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, os.path.join(lock_dir, "w.gpu0.0"))
    with pytest.raises(slots.LockDirError, match=r"lock file .*w\.gpu0\.0 is a symlink; refusing it"):
        slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    assert victim.read_text() == "keep"


def test_planted_dangling_symlink_lock_file_is_refused_and_not_created(dir_fd, lock_dir, tmp_path):
    os.symlink(tmp_path / "created-through-link", os.path.join(lock_dir, "w.gpu0.0"))
    with pytest.raises(slots.LockDirError, match="symlink"):
        slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    assert not (tmp_path / "created-through-link").exists()


@pytest.mark.parametrize("plant", ["world-writable", "directory", "fifo"])
def test_planted_odd_lock_file_is_refused(dir_fd, lock_dir, plant):
    path = os.path.join(lock_dir, "w.gpu0.0")
    if plant == "world-writable":
        open(path, "w").close()
        os.chmod(path, 0o666)
    elif plant == "directory":
        os.mkdir(path)
    else:
        os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(slots.LockDirError):
        slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 1)
    assert time.monotonic() - started < 1  # a FIFO must not block the open


# ---- the queue -------------------------------------------------------------------------------------------------

def test_queue_is_arrival_order_and_leave_passes_the_head(dir_fd, lock_dir):
    q1 = slots.Queue(dir_fd, lock_dir, "w", "gpu")
    q2 = slots.Queue(dir_fd, lock_dir, "w", "gpu")
    q3 = slots.Queue(dir_fd, lock_dir, "w", "gpu")
    assert (q1.is_head(), q2.is_head(), q3.is_head()) == (True, False, False)
    q1.leave()
    assert (q2.is_head(), q3.is_head()) == (True, False)
    other = slots.Queue(dir_fd, lock_dir, "w", "cpu")  # the CPU pool has its own queue
    assert other.is_head()
    q2.leave()
    q3.leave()
    other.leave()
    assert [n for n in os.listdir(os.path.join(lock_dir, "w.gpu.queue"))] == []


def test_dead_waiter_does_not_hold_the_queue(lock_dir, dir_fd):
    with Holder(lock_dir, "queue") as h:
        assert h.line.startswith("queued")
        q = slots.Queue(dir_fd, lock_dir, "w", "gpu")
        assert not q.is_head()
        h.kill()
        assert q.is_head()
        assert os.listdir(os.path.join(lock_dir, "w.gpu.queue")) == [q.name]  # the dead ticket was removed
        q.leave()


def test_queue_order_across_processes(lock_dir, dir_fd, tmp_path):
    """Waiters that arrive one after another get to the head in that order, even while a blocker stays."""
    order = tmp_path / "order"
    blocker = slots.Queue(dir_fd, lock_dir, "w", "gpu")
    waiters = []
    try:
        for i in range(5):
            h = Holder(lock_dir, "queue", order, i)
            assert h.line.startswith("queued")
            waiters.append(h)
        time.sleep(0.2)
        assert not order.exists()  # nobody passed the blocker
        blocker.leave()
        for h in waiters:
            assert h.p.wait(10) == 0
        assert order.read_text().split() == ["0", "1", "2", "3", "4"]
    finally:
        for h in waiters:
            h.__exit__()


def test_queue_dir_writable_by_others_is_refused(dir_fd, lock_dir):
    os.mkdir(os.path.join(lock_dir, "w.gpu.queue"))
    os.chmod(os.path.join(lock_dir, "w.gpu.queue"), 0o777)
    with pytest.raises(slots.LockDirError, match="writable by others"):
        slots.Queue(dir_fd, lock_dir, "w", "gpu")


def test_queue_dir_symlink_is_refused(dir_fd, lock_dir, tmp_path):
    (tmp_path / "q").mkdir()
    os.symlink(tmp_path / "q", os.path.join(lock_dir, "w.gpu.queue"))
    with pytest.raises(slots.LockDirError, match="not a usable directory"):
        slots.Queue(dir_fd, lock_dir, "w", "gpu")


# ---- the VRAM ledger ---------------------------------------------------------------------------------------------

def test_ledger_reservation_lives_exactly_as_long_as_its_holder(lock_dir, dir_fd):
    with Holder(lock_dir, "reserve", "gpu0", 3700) as a, Holder(lock_dir, "reserve", "gpu1", 1200) as b:
        assert a.line == b.line == "reserved"
        live = slots.live_reservations(lock_dir)
        assert live == {"gpu0": [(a.p.pid, 3700)], "gpu1": [(b.p.pid, 1200)]}
        with slots.Ledger(dir_fd, lock_dir) as ledger:
            assert ledger.live() == live
        a.kill()
        assert slots.live_reservations(lock_dir) == {"gpu1": [(b.p.pid, 1200)]}
        assert sorted(os.listdir(os.path.join(lock_dir, "vram"))) == [f"gpu1.{b.p.pid}"]  # dead entry removed
    assert slots.live_reservations(lock_dir) == {}


def test_ledger_entry_is_locked_from_birth(lock_dir, dir_fd):
    with slots.Ledger(dir_fd, lock_dir) as ledger:
        fd = ledger.reserve("gpu0", 100)
        assert ledger.live() == {"gpu0": [(os.getpid(), 100)]}
    name = os.path.join(lock_dir, "vram", f"gpu0.{os.getpid()}")
    other = os.open(name, os.O_RDONLY)
    with pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    assert [n for n in os.listdir(os.path.join(lock_dir, "vram")) if n.startswith(".tmp")] == []
    os.close(fd)
    # Unlocked, but its process (this one) runs: its VRAM may still be in use, so it still counts.
    assert slots.live_reservations(lock_dir) == {"gpu0": [(os.getpid(), 100)]}
    entry = open(name).read().split()
    assert entry == ["100", "-", "-", str(procstat.start_ticks())]


def test_an_unlocked_entry_counts_only_for_the_process_that_made_it(lock_dir, dir_fd):
    """A start time that is not the PID's (a reused PID, another namespace's PID) or no start time at all (an
    older wrapper's entry): the lock alone decides, as before."""
    folder = os.path.join(lock_dir, "vram")
    with slots.Ledger(dir_fd, lock_dir):
        pass
    me, start = os.getpid(), procstat.start_ticks()
    for name, text in ((f"gpu0.{me}", f"100 w 5 {start + 1}\n"), (f"gpu1.{me}", "200 w 5\n"),
                       (f"gpu2.{me}", f"300 w 5 {start}\n")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    assert slots.live_reservations(lock_dir) == {"gpu2": [(me, 300)]}
    assert sorted(os.listdir(folder)) == [f"gpu2.{me}"]    # the others were a dead owner's: removed


def test_a_member_cannot_pin_a_reservation_on_another_accounts_process(lock_dir, dir_fd):
    """An unlocked entry counts only for the process that made it: one naming PID 1 with PID 1's real start time,
    but owned by another account (a member planting it), counts for nothing and is removed."""
    folder = os.path.join(lock_dir, "vram")
    with slots.Ledger(dir_fd, lock_dir):
        pass
    planted = os.path.join(folder, "gpu0.1")
    with open(planted, "w") as f:
        f.write(f"16000 w 5 {procstat.start_ticks(1)}\n")
    os.chown(planted, 65534, -1)
    assert procstat.is_process(1, procstat.start_ticks(1))   # PID 1 runs, with that very start time
    assert slots.live_reservations(lock_dir) == {} and not os.path.exists(planted)


def test_the_agent_takes_only_entries_held_by_the_pid_they_name(lock_dir, dir_fd):
    """A locked entry named after PID 1 but held by another process would make PID 1's whole tree "ours" in the
    agent's view; with verify (the agent's read) /proc/locks decides who holds it."""
    folder = os.path.join(lock_dir, "vram")
    with slots.Ledger(dir_fd, lock_dir) as ledger:
        mine = ledger.reserve("gpu0", 100)
    fd = os.open(os.path.join(folder, "gpu1.1"), os.O_RDWR | os.O_CREAT, 0o640)
    os.write(fd, b"200 w 5\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert slots.live_reservations(lock_dir) == {"gpu0": [(os.getpid(), 100)], "gpu1": [(1, 200)]}
        assert slots.live_reservations(lock_dir, verify=True) == {"gpu0": [(os.getpid(), 100)]}
    finally:
        os.close(fd)
        os.close(mine)


def test_ledger_admission_is_serialised(lock_dir, dir_fd):
    with Holder(lock_dir, "ledger-guard") as h:
        assert h.line == "guarding"
        guard = os.open(os.path.join(lock_dir, "vram.lock"), os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        h.kill()
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)  # freed by the kernel with its holder
        os.close(guard)


def test_live_reservations_without_a_ledger(tmp_path):
    assert slots.live_reservations(str(tmp_path / "nothing")) == {}


def test_unreadable_or_garbled_ledger_entries_are_skipped(lock_dir, dir_fd):
    with slots.Ledger(dir_fd, lock_dir) as ledger:
        keep = ledger.reserve("gpu0", 500)
    with open(os.path.join(lock_dir, "vram", "gpu0.999999"), "w") as f:
        f.write("not a number")
    assert slots.live_reservations(lock_dir) == {"gpu0": [(os.getpid(), 500)]}
    os.close(keep)


def test_holders_does_not_hang_on_a_planted_fifo(dir_fd, lock_dir):
    os.mkfifo(os.path.join(lock_dir, "w.gpu0.0"))
    started = time.monotonic()
    slots.holders(dir_fd, lock_dir, "w", "gpu0", 2)
    assert time.monotonic() - started < 1


def test_holders_only_looks_never_takes_the_lock(dir_fd, lock_dir):
    """`gpu-router status` counting slots must never make a wrapper's LOCK_EX|LOCK_NB fail (it used a trial
    LOCK_SH: a job arriving in that instant was BLOCKED). A thread counts in a tight loop while this one takes
    and frees the free slot: every take succeeds."""
    import threading

    held = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2)  # slot 0 busy, slot 1 free
    stop = threading.Event()
    counts = []

    def status():
        while not stop.is_set():
            counts.append(slots.holders(dir_fd, lock_dir, "w", "gpu0", 2))

    t = threading.Thread(target=status)
    t.start()
    failed = 0
    try:
        for _ in range(3000):
            got = slots.try_slot(dir_fd, lock_dir, "w", "gpu0", 2)
            if got is None or got[1] != 1:
                failed += 1
            if got is not None:
                os.close(got[0])
    finally:
        stop.set()
        t.join()
        os.close(held[0])
    assert failed == 0, f"{failed} of 3000 takes of the free slot failed while status counted"
    assert counts and set(counts) <= {1, 2}
