"""Root never follows what a member planted (issue 17): the agent's own state — calibration samples and their trim,
calibration files, job records, the drain switch, metrics — is written only inside folders root alone can change,
through temporary names nobody can guess, and read back only when root's alone.

Real processes under two accounts: root (this test, or the real launcher) writes; a member (uid 4001 in group 100,
which stands in for gpu-router so the test edits no /etc file) plants symlinks, FIFOs, hard links and files with
setpriv, in folders it can write: the lock directory (3770, as tmpfiles.d makes it) or a state folder someone made
group-writable. Each test fails on 939dc14 (the code before this change).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import helpers
from fakenvml import fake_gpus  # noqa: F401  (fixture)
from gpu_router import atomicfile, drainstate
from gpu_router import config as gr_config
from gpu_router import samples
from gpu_router.daemon import accounting, jobrecord, metrics

pytestmark = pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv")

MEMBER, GID = 4001, 100
PRECIOUS = "root's own file: must stay as it is\n"
LIB = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(accounting.__file__))))  # holds gpu_router


def member(*argv):
    """Run argv as the member (a real process with the member's uids)."""
    subprocess.run(["setpriv", f"--reuid={MEMBER}", f"--regid={GID}", f"--groups={GID}", *argv], check=True,
                   capture_output=True, timeout=30)


def shared_folder(path, mode=0o2770):
    """A folder root owns that group 100 (the members) may write: the lock dir, or a misconfigured state dir."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 0, GID)
    os.chmod(path, mode)
    return path


def fields(workload="w", metric="10"):
    return {"WORKLOAD": workload, "MODE": "GPU", "METRIC": metric, "RESULT": "underpredicted",
            "PEAK_VRAM_MB": 1, "PEAK_VRAM_SOURCE": "sampled"}


def record_in_child(state, workload, timeout=10):
    """accounting.record_sample as root in its own process (a FIFO would hang the old code): 'ok PATH',
    'refused ERROR' (an OSError: the agent's loop logs it and goes on) or anything else, which is a defect."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from gpu_router.daemon import accounting\n"
            "f = json.loads(sys.argv[3])\n"
            "try:\n    print('ok', accounting.record_sample(sys.argv[2], f))\n"
            "except OSError as e:\n    print('refused', e)\n")
    try:
        p = subprocess.run([sys.executable, "-I", "-c", code, LIB, str(state), json.dumps(fields(workload))],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "hung (blocked in a FIFO the member planted)"
    assert "Traceback" not in p.stderr, p.stderr
    return p.stdout.strip()


@pytest.fixture
def base():
    d = helpers.public_tmpdir()
    victim = d / "victim"
    victim.write_text(PRECIOUS)
    yield d
    shutil.rmtree(d)


def untouched(base):
    assert (base / "victim").read_text() == PRECIOUS


# ---- samples ------------------------------------------------------------------------------------------------------

def test_a_workload_name_from_a_ledger_entry_never_leads_the_sample_out_of_its_folder(base):
    """The reproduced attack: WORKLOAD "../../locks/x" from a member's ledger entry, and x.jsonl in the lock dir a
    symlink to the drain switch; root's append created /var/lib/gpu-router/drain (every GPU job to the CPU)."""
    state = base / "state"
    state.mkdir(mode=0o755)
    locks = shared_folder(base / "locks", 0o3770)
    member("ln", "-s", str(state / "drain"), str(locks / "x.jsonl"))
    member("ln", "-s", str(base / "victim"), str(locks / "y.jsonl"))
    with pytest.raises(OSError, match="not a workload name"):
        accounting.record_sample(str(state), fields("../../locks/x"))
    with pytest.raises(OSError):
        accounting.record_sample(str(state), fields("../../locks/y"))
    assert drainstate.read(str(state)) is None and not os.path.lexists(state / "drain")
    untouched(base)
    assert sorted(os.listdir(locks)) == ["x.jsonl", "y.jsonl"]


PLANTS = ("symlink", "fifo", "hardlink", "member-file", "trim-temp")


def _plant(kind, folder, base):
    target = folder / "w.jsonl"
    if kind == "symlink":
        member("ln", "-s", str(base / "victim"), str(target))
    elif kind == "fifo":
        member("mkfifo", str(target))
        # a reader that keeps the FIFO open, so that a writer gets through open() and then blocks when it is full
        return subprocess.Popen(["setpriv", f"--reuid={MEMBER}", f"--regid={GID}", f"--groups={GID}", "sh", "-c",
                                 f"exec 3<'{target}'; sleep 30"])
    elif kind == "hardlink":
        member("sh", "-c", f"echo mine > '{folder}/own' && ln '{folder}/own' '{target}'")
    elif kind == "member-file":
        member("sh", "-c", f"echo mine > '{target}'")
    elif kind == "trim-temp":
        target.write_text("x" * (samples.TRIM_BYTES + 1) + "\n")  # root's own file, due for a trim
        os.chmod(target, 0o644)
        member("ln", "-s", str(base / "victim"), str(target) + ".tmp")
        for pid in range(os.getpid(), os.getpid() + 200):  # the old trim's name, and pid-named guesses
            member("ln", "-sf", str(base / "victim"), f"{folder}/.w.jsonl.{pid}.tmp")
    return None


@pytest.mark.parametrize("fixed", [False, True], ids=["member-writable", "fixed-since"])
@pytest.mark.parametrize("kind", PLANTS)
def test_a_sample_is_never_written_through_what_a_member_planted(base, kind, fixed):
    """The samples folder was group-writable (a member planted something there); ``fixed``: the admin has since
    made it root's 0755 again, and what was planted stays. Root appends nowhere else, never blocks, and says so."""
    state = base / "state"
    state.mkdir(mode=0o755)
    folder = shared_folder(state / "samples")
    reader = _plant(kind, folder, base)
    if fixed:
        os.chown(folder, 0, 0)
        os.chmod(folder, 0o755)
    try:
        out = record_in_child(state, "w")
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
    untouched(base)
    if kind in ("hardlink", "member-file"):
        assert (folder / "w.jsonl").read_text() == "mine\n"
    if kind == "trim-temp" and fixed:
        # root's own file in root's folder: the trim works, through a name nobody could plant
        assert out.startswith("ok"), out
        lines = (folder / "w.jsonl").read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[-1])["metric"] == "10"
        assert os.stat(folder / "w.jsonl").st_uid == 0
    else:
        assert out.startswith("refused") and "refusing" in out, out


def test_samples_folder_a_member_replaced_by_a_symlink_is_refused(base):
    state = shared_folder(base / "state")     # a state folder someone made group-writable
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    member("ln", "-s", str(elsewhere), str(state / "samples"))
    out = record_in_child(state, "w")
    assert out.startswith("refused") and "others can write" in out, out
    assert os.listdir(elsewhere) == []


# ---- the generic writer: temporary names --------------------------------------------------------------------------

@pytest.mark.parametrize("plant", ["own-file", "symlink"])
def test_a_temporary_name_cannot_be_planted(base, plant):
    """atomicfile.write in a folder a member can write (where an operator points `init --output`, say): the old
    temporary name was `.NAME.<pid>.tmp`. A member who plants its own file there keeps an open descriptor on what
    becomes the target; one who plants a symlink makes the write fail. Now the name is unguessable."""
    folder = shared_folder(base / "out")
    target = folder / "f.toml"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer: waits until the member has planted, then writes as root
        os.close(w)
        os.read(r, 1)
        try:
            atomicfile.write(str(target), "ours\n", mode=0o644)
            os._exit(0)
        except BaseException:
            os._exit(3)
    os.close(r)
    planted = folder / f".f.toml.{pid}.tmp"
    if plant == "own-file":
        member("sh", "-c", f"echo planted > '{planted}'; chmod 666 '{planted}'")
    else:
        member("ln", "-s", str(base / "victim"), str(planted))
    os.write(w, b"g")
    os.close(w)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    st = os.lstat(target)
    assert st.st_uid == 0 and target.read_text() == "ours\n" and st.st_mode & 0o777 == 0o644
    assert os.lstat(planted).st_uid == MEMBER  # the member's file is its own, untouched
    untouched(base)


# ---- the drain switch, job records, calibration, metrics ------------------------------------------------------

def test_drain_refuses_a_state_folder_a_member_can_write(base, gr_bin, clean_env):
    state = shared_folder(base / "state")
    config = base / "config.toml"
    helpers.write_toml(config, {"agent": {"state_dir": str(state)}, "router": {"lock_dir": str(base / "locks")},
                                "workloads": {"w": {"binary": "/bin/true", "threshold": 100, "scope": "off"}}})
    env = dict(clean_env, GPU_ROUTER_CONFIG=str(config), GPU_ROUTER_CACHE_DIR=str(base / "cache"))
    p = subprocess.run([str(gr_bin), "drain"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "refusing" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.lexists(state / "drain")


def test_job_records_only_in_and_from_roots_folder(base):
    """A forged record would be adopted (a PID and scope of the member's choosing); a symlinked folder would have
    been narrowed to 0700 and written into."""
    parent = shared_folder(base / "run")
    victim_dir = base / "victimdir"
    victim_dir.mkdir(mode=0o755)
    os.chmod(victim_dir, 0o755)
    member("ln", "-s", str(victim_dir), str(parent / "jobs"))
    with pytest.raises(OSError):
        jobrecord.write(str(parent / "jobs"), {"job_id": "w-1-a", "pid": 1})
    assert os.listdir(victim_dir) == [] and victim_dir.stat().st_mode & 0o777 == 0o755
    assert jobrecord.load_all(str(parent / "jobs")) == {}
    jobrecord.remove(str(parent / "jobs"), "w-1-a")  # contained: no exception

    jobs = shared_folder(base / "jobs")  # group-writable once: the member planted a record, then it was fixed
    forged = {"version": 1, "job_id": "w-2-b", "pid": 1, "scope": "init.scope"}
    member("sh", "-c", f"echo '{json.dumps(forged)}' > '{jobs}/w-2-b.json'")
    member("ln", "-s", str(base / "victim"), str(jobs / "w-3-c.json"))
    os.chown(jobs, 0, 0)
    os.chmod(jobs, 0o700)
    jobrecord.write(str(jobs), {"job_id": "w-4-d", "pid": 4})
    assert list(jobrecord.load_all(str(jobs))) == ["w-4-d"]


def _calibrated_config(state):
    return gr_config.validate(
        {"agent": {"state_dir": str(state)},
         "workloads": {"w": {"binary": "/bin/true", "threshold": 100, "scope": "off", "admission": "vram",
                             "vram_model": "calibrated"}}}, "/test/config.toml", [])


def test_calibration_is_read_only_when_roots_and_written_only_in_roots_folder(base):
    from gpu_router.ops import calibrate

    state = base / "state"
    state.mkdir(mode=0o755)
    cal = shared_folder(state / "calibration")
    (base / "mine.toml").write_text('workload = "w"\nvram_base_mb = 1\nvram_per_unit_mb = 0\n')
    os.chown(base / "mine.toml", MEMBER, GID)
    member("ln", "-s", str(base / "mine.toml"), str(cal / "w.toml"))
    os.chown(cal, 0, 0)
    os.chmod(cal, 0o755)  # fixed since; the member's symlink stayed
    with pytest.raises(gr_config.ConfigError, match="not root's own calibration"):
        _calibrated_config(state)

    state2 = shared_folder(base / "state2")
    victim_dir = base / "victimdir"
    victim_dir.mkdir(mode=0o755)
    member("ln", "-s", str(victim_dir), str(state2 / "calibration"))
    with pytest.raises(OSError, match="refusing"):
        calibrate._write_calibration(gr_config.calibration_path(str(state2), "w"), {"workload": "w"})
    assert os.listdir(victim_dir) == []


def test_metrics_never_follow_a_name_planted_in_the_textfile_folder(base):
    """node_exporter's textfile folder, made group-writable: prometheus_client wrote `gpu_router.prom.<pid>.<tid>`
    with open(), following a member's symlink. Now: refused and logged once, the agent goes on."""
    textfile = shared_folder(base / "textfile")
    pid, tid = os.getpid(), threading.current_thread().ident
    member("ln", "-s", str(base / "victim"), str(textfile / f"{metrics.FILE_NAME}.{pid}.{tid}"))

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, message, **kw):
            self.lines.append((message, kw))

        info = warning

    log = Log()
    m = metrics.Metrics(str(base / "state"), log=log)
    assert m.write(str(textfile)) is False
    untouched(base)
    assert not os.path.exists(textfile / metrics.FILE_NAME)
    assert any("refusing" in kw.get("error", "") for _message, kw in log.lines), log.lines


# ---- end to end: the reproduced attack against the real agent ---------------------------------------------------

def test_the_agent_never_follows_a_ledger_entrys_workload_out_of_the_samples_folder(fake_gpus, agent_bin):  # noqa: F811
    """Issue 17, item 1, against the real agent on a fake GPU: a member's own ledger entry names WORKLOAD
    "../../locks/x", its process uses more VRAM than it reserved, and x.jsonl in the lock dir is the member's
    symlink to the drain switch. The old agent appended its sample through it (root created `drain`: every GPU job
    went to the CPU). Now the sample is refused and logged, and the agent keeps sampling."""
    from fakenvml import have_pynvml

    if not have_pynvml():
        pytest.skip("nvidia-ml-py is not installed (bash .ci/deps)")
    base = helpers.public_tmpdir()
    holder = agent = None
    try:
        fake_gpus.add_gpu(8000, name="Fake A")
        locks = shared_folder(base / "locks", 0o3770)
        shared_folder(locks / "vram", 0o3770)
        (base / "state").mkdir(mode=0o755)
        cfg = base / "config.toml"
        cfg.write_text(f'[router]\nlock_dir = "{locks}"\n[gpu]\nbackend = "nvml"\nsnapshot = "{base}/gpus.json"\n'
                       f'sample_interval = "0.2s"\n[agent]\nsocket = "{base}/agent.sock"\n'
                       f'state_dir = "{base}/state"\n[workloads.w]\nbinary = "/bin/true"\nthreshold = 100\n'
                       'scope = "off"\n')
        member("ln", "-s", str(base / "state" / "drain"), str(locks / "x.jsonl"))
        code = ("import fcntl, os, time\n"
                f"fd = os.open('{locks}/vram/gpu0.%d' % os.getpid(), os.O_RDWR | os.O_CREAT, 0o640)\n"
                "os.write(fd, b'100 ../../locks/x 10 -\\n'); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True); time.sleep(60)\n")
        holder = subprocess.Popen(["setpriv", f"--reuid={MEMBER}", f"--regid={GID}", f"--groups={GID}",
                                   "/usr/bin/python3", "-c", code], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        assert fake_gpus.claim(0, 500, pid=holder.pid)          # 500 MiB used against 100 reserved
        env = dict(fake_gpus.env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_CACHE_DIR=str(base),
                   GPU_ROUTER_LOG="stderr")
        log = base / "agent.log"
        with open(log, "w") as f:
            agent = subprocess.Popen([str(agent_bin)], env=env, stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.monotonic() + 20
        while "vram-underpredicted" not in log.read_text():
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(1.0)                                          # several more samples
        text = log.read_text()
        assert agent.poll() is None and "Traceback" not in text, text
        assert drainstate.read(str(base / "state")) is None and not os.path.lexists(base / "state" / "drain")
        # Stopped at the first layer (check_predictions takes workloads only from the config: trust.read_ledger);
        # samples.record would refuse the name too (the test above).
        assert "names no configured workload" in text, text
        assert not os.path.lexists(locks / "x.jsonl.tmp") and os.path.islink(locks / "x.jsonl")
        assert not os.path.lexists(base / "state" / "samples" / "x.jsonl")
    finally:
        for p in (agent, holder):
            if p is not None:
                p.kill()
                p.wait(10)
        shutil.rmtree(base)


def test_a_new_samples_file_is_roots_alone_whatever_the_umask(tmp_path):
    """Under umask 002 the old append made the file 0664 (group-writable: a member of its group could edit what
    calibration fits); now it is 0644, and the next append, which refuses what others may write, still works."""
    old = os.umask(0o002)
    try:
        accounting.record_sample(str(tmp_path), fields("w", "1"))
        accounting.record_sample(str(tmp_path), fields("w", "2"))
    finally:
        os.umask(old)
    f = tmp_path / "samples" / "w.jsonl"
    assert f.stat().st_mode & 0o777 == 0o644 and (tmp_path / "samples").stat().st_mode & 0o777 == 0o755
    assert [json.loads(x)["metric"] for x in f.read_text().splitlines()] == ["1", "2"]


def test_metrics_state_is_saved_only_in_and_loaded_only_from_roots_folder(base):
    """metrics.json holds the counters and the journal cursor: a member's file there forged the history the
    metrics export (issue 17, item 5's variant); a member-writable state folder is refused, not written."""
    state = shared_folder(base / "state")
    member("sh", "-c", "echo '{\"cursor\": \"forged\"}' > " + f"'{state}/metrics.json'")
    m = metrics.Metrics(str(state))
    assert m.store.cursor is None                    # not loaded from the member's file
    m.store.cursor = "ours"
    m.store.dirty = True
    assert m.save(force=True) is False               # refused: logged once, the agent goes on
    assert os.lstat(state / "metrics.json").st_uid == MEMBER
    os.chown(state, 0, 0)
    os.chmod(state, 0o755)                           # fixed since: the member's file is still no state of ours
    assert metrics.Metrics(str(state)).store.cursor is None
    os.unlink(state / "metrics.json")
    assert m.save(force=True) is True and metrics.Metrics(str(state)).store.cursor == "ours"
