"""The requests of one loop turn are served as one batch with one read of the kernel's lock table
(broker.LockView, clients.Clients.serve): real sockets, real flock, real requesting processes.

The read is made after every request of the batch has arrived, so it is each request's own: a sender that gave its
slot up before it is refused exactly as with a read per request."""

import contextlib
import os
import subprocess

import pytest

from gpu_router import config, journal
from gpu_router.daemon import broker

from test_agent_clients import Loop, _reply  # noqa: F401 - the agent's loop in miniature

# Takes its slot, sends its request, then (argv[4] == "1") gives the slot up before the agent reads anything,
# says so, and prints the reply.
REQUESTER = r"""
import fcntl, os, socket, sys
sys.path.insert(0, sys.argv[1])
from gpu_router import journal
sock_path, slot, release = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
named = sys.argv[5] if len(sys.argv) > 5 else ""  # SLOT_FD: "slot" its slot's fd, a path: that file's, locked
fd = os.open(slot, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
pid = os.getpid()
fields = [("OP", "scope"), ("WORKLOAD", "tx"), ("JOB", f"tx-{pid}-abc"), ("MODE", "CPU"), ("DEVICE", "cpu"),
          ("PID", str(pid)), ("METRIC", "1"), ("SCOPE_POLICY", "required")]
if named == "slot":
    fields.append(("SLOT_FD", str(fd)))
elif named:
    other = os.open(named, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(other, fcntl.LOCK_EX)
    fields.append(("SLOT_FD", str(other)))
payload = journal.encode_native(fields)
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
s.sendall(len(payload).to_bytes(4, "little") + payload)
if release:
    fcntl.flock(fd, fcntl.LOCK_UN)
print("sent", flush=True)
data = s.recv(65536)
reply = journal.decode_native(data[4:4 + int.from_bytes(data[:4], "little")])
print(reply.get("OK"), reply.get("ERROR", ""), flush=True)
"""


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "locks").mkdir()
    path = tmp_path / "config.toml"
    path.write_text(f'[router]\nlock_dir = "{tmp_path}/locks"\n'
                    '[workloads.tx]\nbinary = "/bin/true"\nthreshold = 100\nmax_cpu_jobs = 4\n')
    return config.load(str(path), use_cache=False)


def _lib():
    import gpu_router

    return os.path.dirname(os.path.dirname(gpu_router.__file__))


def _serve(cfg, tmp_path, requesters):
    """Serve requesters [(slot file, release, SLOT_FD kind)] in one turn, as the agent serves a member (uid 4001;
    group 0 is the requesters' own: broker.handle with the view of the batch it is served in; no systemd here, a
    scope is only recorded); (their replies, each batch's table reads, the scopes made)."""
    views, made = [], []

    @contextlib.contextmanager
    def batch(payloads):
        views.append(broker.LockView())
        yield

    def handler(payload, pid, uid):
        fields, _ = broker.handle(payload, pid, 4001, cfg, 0, start_scope=lambda n, p: made.append(n),
                                  locks=views[-1])
        return broker.frame(fields)

    loop = Loop(handler=handler, deadline_s=5.0, batch=batch)
    procs = []
    try:
        for slot, release, named in requesters:
            p = subprocess.Popen(["/usr/bin/python3", "-I", "-c", REQUESTER, _lib(), loop.path,
                                  str(tmp_path / "locks" / slot), release, named], stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "sent"
            procs.append(p)
        while loop.clients.served < len(procs):
            loop.step(0.5)
        return [p.stdout.readline().strip() for p in procs], [v.reads for v in views], made
    finally:
        for p in procs:
            p.kill()
            p.wait()
        loop.close()


def test_one_table_read_serves_the_turn_and_a_slot_given_up_before_it_is_refused(cfg, tmp_path):
    # Both requests are in before the agent looks: one turn, one batch, one read of /proc/locks. (No SLOT_FD, as
    # an older wrapper asks: the table judges both.)
    replies, reads, made = _serve(cfg, tmp_path, [("tx.cpu.0", "0", ""), ("tx.cpu.1", "1", "")])
    keeper, releaser = replies
    assert keeper == "1", keeper
    assert releaser.startswith("0") and "holds no slot" in releaser, releaser
    assert len(made) == 1 and made[0].startswith("gpu-router-tx-")
    assert reads == [1], "one lock-table read for the whole turn"


def test_a_request_naming_its_slots_descriptor_is_checked_without_the_lock_table(cfg, tmp_path):
    """Reading /proc/locks makes the kernel wait for an RCU grace period (7-27 ms), the agent's one loop with it:
    the slot is checked from the named descriptor's own locks (/proc/PID/fdinfo) instead. Real
    requesters, real flocks: two holders are granted with no table read at all."""
    replies, reads, made = _serve(cfg, tmp_path, [("tx.cpu.0", "0", "slot"), ("tx.cpu.1", "0", "slot")])
    assert replies == ["1", "1"] and len(made) == 2
    assert reads == [0], "no read of /proc/locks for requests whose descriptor shows their slot"


@pytest.mark.parametrize("case", ["released", "own file", "no such fd"])
def test_a_descriptor_that_does_not_show_a_slot_is_judged_by_the_lock_table(cfg, tmp_path, case):
    """SLOT_FD is the member's word: a descriptor whose locks do not show the caller holding a real slot of the
    mode it asks for decides nothing, and the whole table judges the request as before (refused here)."""
    if case == "released":  # the slot given up before the agent looks
        requester = ("tx.cpu.0", "1", "slot")
    elif case == "own file":  # a lock on a file of its own, named as the slot's descriptor; no slot held
        requester = ("tx.cpu.0", "1", str(tmp_path / "mine"))
    else:
        requester = ("tx.cpu.0", "1", "")
    replies, reads, made = _serve(cfg, tmp_path, [requester])
    assert replies[0].startswith("0") and "holds no slot" in replies[0], replies
    assert reads == [1] and made == []


def test_the_descriptors_locks_are_the_lock_tables(tmp_path):
    """slots.fd_flock_table reads the same kernel record as slots.flock_table: one lock, the same key and PID."""
    import fcntl

    from gpu_router import slots

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    other = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert slots.fd_flock_table(os.getpid(), fd) == {}
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
        assert slots.fd_flock_table(os.getpid(), fd) == {key: os.getpid()}
        assert slots.flock_table()[key] == os.getpid()
        assert slots.fd_flock_table(os.getpid(), other) == {}  # only that descriptor's own locks
        assert slots.fd_flock_table(os.getpid(), 987654) is None
        assert slots.fd_flock_table(2 ** 22 + 1, fd) is None
    finally:
        os.close(fd)
        os.close(other)


def test_a_view_is_read_when_first_used_not_when_made(cfg, tmp_path):
    """The batch's view is made before its requests are handled, but reads the table only at the first check:
    a slot given up between the two is not in it (a table read before the request arrived could be stale)."""
    import fcntl

    fd = os.open(tmp_path / "locks" / "tx.cpu.0", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    view = broker.LockView()
    fcntl.flock(fd, fcntl.LOCK_UN)
    assert broker.held_slots(os.getpid(), cfg.router.lock_dir, "tx", cfg=cfg, view=view) == {}
    fcntl.flock(fd, fcntl.LOCK_EX)
    # ... and once read, it is that batch's word (the next batch gets a view of its own).
    assert broker.held_slots(os.getpid(), cfg.router.lock_dir, "tx", cfg=cfg, view=view) == {}
    assert broker.held_slots(os.getpid(), cfg.router.lock_dir, "tx", cfg=cfg) == {"CPU": {"cpu"}}
    assert view.reads == 1
    os.close(fd)


def test_a_request_whose_batch_failed_is_answered_at_its_deadline_not_left_open():
    """serve() takes the turn's requests out of ``pending`` before its batch begins: if the batch itself fails (the
    agent logs it and goes on), those connections are whole but unserved, and expire() must still answer and close
    them rather than keep them for ever (their clients would wait out their own 10 s, the agent keep the fds)."""
    @contextlib.contextmanager
    def batch(payloads):
        raise OSError("EMFILE")
        yield

    loop = Loop(deadline_s=0.3, batch=batch)
    c = loop.connect()
    try:
        c.sendall(_frame_request())
        with pytest.raises(OSError):
            loop.step(0.5)
        assert loop.clients.conns, "the request should still be open, unserved"
        import time

        time.sleep(0.4)
        loop.step(0.0)
        assert not loop.clients.conns, "an unserved request was kept past its deadline"
        c.settimeout(2)
        reply = journal.decode_native(c.recv(65536)[4:])
        assert reply["OK"] == "0" and "retry" in reply["ERROR"]
    finally:
        c.close()
        loop.close()


def _frame_request():
    payload = journal.encode_native([("OP", "scope"), ("WORKLOAD", "tx")])
    return len(payload).to_bytes(4, "little") + payload
