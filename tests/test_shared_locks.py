"""One lock directory, several accounts (issue 8, points 4-6): whatever a member's umask, what it creates is usable
by every other member; no member can delete or replace another's held file; a malformed ledger entry is skipped.

Real processes under real uids (setpriv), real flock, the real wrapper. Group 100 ("users") stands in for
gpu-router so the test edits no /etc file.
"""

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

import helpers
from gpu_router import slots

pytestmark = pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv")

GID = 100
MEMBERS = [(0, "022"), (4001, "077"), (4002, "077"), (4001, "027")]


def _tmpfiles_mode():
    conf = helpers.REPO / "packaging" / "tmpfiles.d" / "gpu-router.conf"
    for line in conf.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "d" and parts[1] == "/run/gpu-router/locks":
            return int(parts[2], 8)
    raise AssertionError("no entry for /run/gpu-router/locks in " + str(conf))


TMPFILES_MODE = _tmpfiles_mode()


def _as(uid, umask):
    """argv prefix: this uid (member of GID) with this umask."""
    prefix = ["sh", "-c", f'umask {umask}; exec "$@"', "sh"]
    if uid == 0:
        return prefix
    return prefix + ["setpriv", f"--reuid={uid}", f"--regid={GID}", f"--groups={GID}"]


@pytest.fixture
def shared(gr_bin, clean_env):
    root = helpers.public_tmpdir()
    rig = helpers.Rig(root, gr_bin, clean_env,
                      {"w": {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 1, "max_cpu_jobs": 1,
                             "admission": "vram", "gpu_vram_mb": 1000, "wait": "3s"}},
                      gpu={"snapshot_max_age": "1h"})
    rig.lock_dir.mkdir()
    os.chown(rig.lock_dir, 0, GID)
    rig.lock_dir.chmod(TMPFILES_MODE)  # as the package's tmpfiles.d entry makes it
    rig.write_snapshot([helpers.gpu_entry(0)])
    os.chmod(rig.snapshot, 0o644)
    from gpu_router import snapshot

    os.chmod(snapshot.twin_path(str(rig.snapshot)), 0o644)
    for mode in ("GPU", "CPU"):  # the fake job's own counter, shared by every uid here
        (rig.log / f"count.{mode}").write_text("0")
        (rig.log / f"count.{mode}").chmod(0o666)
    small = root / "small.bin"
    small.write_bytes(b"x" * 100)
    small.chmod(0o644)
    yield rig, small
    shutil.rmtree(root)


def _run(rig, uid, umask, *args, env=None):
    e = dict(rig.env, **(env or {}))
    p = subprocess.run(_as(uid, umask) + rig.argv("w", *args), env=e, capture_output=True, timeout=60)
    return helpers.Result(p.returncode, p.stdout, p.stderr, rig)


def test_members_with_any_umask_share_queue_ledger_and_slots(shared):
    rig, small = shared
    for round_ in range(2):
        for uid, umask in MEMBERS:
            res = _run(rig, uid, umask, small)
            assert res.rc in (0, 75), (uid, umask, res)
            assert "Traceback" not in res.err, res
    # concurrently, too: everyone waits in one queue; each job exits 0 or 75, never 1 or 69
    procs = [subprocess.Popen(_as(uid, umask) + rig.argv("w", small), env=dict(rig.env, JOB_SLEEP="0.2"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for uid, umask in MEMBERS * 2]
    for p in procs:
        err = p.communicate(timeout=60)[1].decode("utf-8", "replace")
        assert p.returncode in (0, 75) and "Traceback" not in err, err
    for dirpath, dirnames, filenames in os.walk(rig.lock_dir):
        st = os.lstat(dirpath)
        assert st.st_gid == GID and stat.S_IMODE(st.st_mode) == 0o3770, (dirpath, oct(st.st_mode))
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_gid == GID and stat.S_IMODE(st.st_mode) in (0o660, 0o640), (name, oct(st.st_mode))


def test_a_member_cannot_delete_a_slot_another_member_holds(shared):
    rig, small = shared
    job = subprocess.Popen(_as(4001, "077") + rig.argv("w", small), env=dict(rig.env, JOB_SLEEP="30"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not rig.starts():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = [n for n in os.listdir(rig.lock_dir) if n.startswith("w.gpu0.")]
        assert held
        rm = subprocess.run(_as(4002, "022") + ["rm", "-f"] + [str(rig.lock_dir / n) for n in held],
                            capture_output=True, text=True)
        assert rm.returncode != 0 and "Operation not permitted" in rm.stderr
        res = _run(rig, 4002, "022", small)
        # the one GPU slot is still held: the second job goes to the CPU (or waits and is blocked), never the GPU
        assert res.rc in (0, 75), res
        assert not [r for r in rig.starts() if r.get("mode") == "GPU" and r["pid"] != job.pid]
    finally:
        job.kill()
        job.wait()


def test_ledger_entry_without_a_numeric_pid_is_skipped(shared):
    rig, small = shared
    _run(rig, 0, "022", small)  # makes the ledger
    vram = rig.lock_dir / "vram"
    for name in ("gpu0.abc", "gpu0.", "gpu0.12a", "noddot", "gpu0.\u0663\u0663"):
        fd = os.open(vram / name, os.O_CREAT | os.O_WRONLY, 0o640)
        os.write(fd, b"500\n")
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked: it looks alive
        try:
            assert slots.live_reservations(str(rig.lock_dir)) == {}
            res = _run(rig, 4001, "077", small)
            assert res.rc == 0 and "Traceback" not in res.err, res
        finally:
            os.close(fd)
            os.unlink(vram / name)


FORGE = r"""
import fcntl, os, sys, time
name = os.path.join(sys.argv[1], f"00000000000000000001.{os.getpid()}")
fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o640)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_forged_queue_ticket_does_not_block_another_members_job(shared):
    """Issue 17, item 4: a ticket "00000000000000000001.<pid>" held locked by a member's own process stayed at the
    head of the queue for ever: every other member's job waited out its wait and exited 75."""
    rig, small = shared
    _run(rig, 0, "022", small)  # a first run makes the folders
    queue = rig.lock_dir / "w.gpu.queue"
    if not queue.exists():  # the first run took a slot at once: make the queue as a first waiter would
        fd = slots.open_lock_dir(str(rig.lock_dir))
        slots.Queue(fd, str(rig.lock_dir), "w", "gpu").leave()
        os.close(fd)
    forger = subprocess.Popen(_as(4001, "077") + [sys.executable, "-c", FORGE, str(queue)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert forger.stdout.readline().strip() == "ready"
        res = _run(rig, 4002, "027", small)
        assert res.rc == 0 and "Traceback" not in res.err, res
        assert "queued behind" not in res.err, res
    finally:
        forger.kill()
        forger.wait()


def test_the_agent_puts_folders_made_with_a_bad_umask_right(tmp_path):
    """Folders an older release (or anyone) made with a narrow umask are given 3770 and the group by root's tidy
    pass (the agent runs it every sample)."""
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    (lock_dir / "w.gpu.queue").mkdir(mode=0o700)
    os.chown(lock_dir / "w.gpu.queue", 4001, 4001)
    (lock_dir / "vram").mkdir(mode=0o750)
    (lock_dir / "w.gpu0.0").write_text("")
    os.symlink("/etc", lock_dir / "link")
    assert slots.tidy(str(lock_dir), GID) > 0
    for d in (lock_dir, lock_dir / "w.gpu.queue", lock_dir / "vram"):
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o3770 and st.st_gid == GID
    assert stat.S_IMODE(os.stat("/etc").st_mode) == 0o755  # never through a symlink
    assert slots.tidy(str(lock_dir), GID) == 0


def test_an_unforeseen_error_is_exit_70_with_one_line_and_an_event(monkeypatch, capfd):
    """The wrapper's last line of defence: whatever a bug raises is one line, one event, exit 70, no traceback."""
    from gpu_router.wrapper import run

    def boom(*args, **kw):
        raise KeyError("gpus")

    monkeypatch.setattr(run, "_run", boom)
    monkeypatch.setenv("GPU_ROUTER_LOG", "stderr")
    assert run.run("w", []) == 70
    err = capfd.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith("gpu-router: internal error") and "KeyError" in lines[0]
    assert '"GPU_ROUTER_REASON": "internal-error"' in lines[1]


PLANTS = {
    "slot-is-dir": lambda d: (d / "w.gpu0.0").mkdir(),
    "slot-is-fifo": lambda d: os.mkfifo(d / "w.gpu0.0"),
    "slot-is-symlink": lambda d: (d / "w.gpu0.0").symlink_to("/etc/passwd"),
    "vram-is-file": lambda d: (d / "vram").write_text("x"),
    "vram-is-symlink": lambda d: (d / "vram").symlink_to("/tmp"),
    "vram-lock-is-dir": lambda d: (d / "vram.lock").mkdir(),
    "queue-is-file": lambda d: (d / "w.gpu.queue").write_text("x"),
    "queue-is-fifo": lambda d: os.mkfifo(d / "w.gpu.queue"),
    "ledger-entry-is-dir": lambda d: ((d / "vram").mkdir(), (d / "vram" / "gpu0.123").mkdir()),
    "ledger-entry-is-fifo": lambda d: ((d / "vram").mkdir(), os.mkfifo(d / "vram" / "gpu0.123")),
    "ledger-entry-garbage": lambda d: ((d / "vram").mkdir(), (d / "vram" / "gpu0.123").write_bytes(b"\xff" * 99)),
    "ledger-entry-huge-mb": lambda d: ((d / "vram").mkdir(), (d / "vram" / "gpu0.123").write_text("9" * 400)),
    "ledger-entry-negative": lambda d: ((d / "vram").mkdir(), (d / "vram" / "gpu0.5").write_text("-99999")),
    "ledger-names": lambda d: ((d / "vram").mkdir(), *[(d / "vram" / n).write_text("1") for n in
                                                      ("gpu0.abc", "gpu0.", "..x", "gpu0.\u0663", "x" * 200)]),
    "queue-ticket-dir": lambda d: ((d / "w.gpu.queue").mkdir(), (d / "w.gpu.queue" / ("0" * 20)).mkdir()),
    "queue-garbage-names": lambda d: ((d / "w.gpu.queue").mkdir(), *[(d / "w.gpu.queue" / n).write_text("") for n in
                                                                    ("zzz", "\udcff", "1.2.3")]),
    "world-writable-sub": lambda d: ((d / "vram").mkdir(), os.chmod(d / "vram", 0o777)),
    "unreadable-sub": lambda d: ((d / "vram").mkdir(), os.chmod(d / "vram", 0o000)),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
@pytest.mark.parametrize("uid", [0, 4001])
def test_no_lock_dir_state_makes_the_wrapper_raise(shared, plant, uid):
    """Whatever is planted in the lock dir, the wrapper exits with a documented code (0, 69 or 75) and one line,
    never a traceback or exit 1."""
    rig, small = shared
    PLANTS[plant](rig.lock_dir)
    res = _run(rig, uid, "077", small)
    assert res.rc in (0, 69, 75), res
    assert "Traceback" not in res.err, res


def test_a_lock_dir_error_during_admission_is_69_with_an_event(shared):
    """A folder inside the lock dir the caller cannot use (here: the queue, made unusable by root) is exit 69,
    one line and a config-error event, as the lock dir itself is."""
    rig, small = shared
    (rig.lock_dir / "w.gpu.queue").mkdir(mode=0o700)
    os.chmod(rig.lock_dir / "w.gpu.queue", 0o700)
    res = _run(rig, 4001, "077", small)
    assert res.rc == 69 and "Traceback" not in res.err, res
    assert res.event("config-error")["GPU_ROUTER_WORKLOAD"] == "w"
