"""A Slurm step's own cgroup is recognised, and the wrapper leaves the job there (no scope of its own).

The pure rule first (paths as Slurm 22.05 makes them on cgroup v1 and v2, and look-alikes that must not count),
then real cgroups on this machine's v1 freezer hierarchy (root only): a process moved into
``…/slurm/uid_0/job_N/step_0`` is found confined, and the real wrapper with ``scope = "required"`` runs there
(it exits 75 for want of a scope otherwise: no systemd here, no agent).
"""

import os
import pathlib
import subprocess
import time

import pytest

import helpers
from gpu_router import confinement

V2 = """0::/system.slice/slurmstepd.scope/job_123/step_batch/user/task_0
"""
V1 = """12:freezer:/slurm/uid_1000/job_77/step_0
11:memory:/slurm/uid_1000/job_77/step_0/task_0
1:name=systemd:/system.slice/slurmd.service
0::/system.slice/slurmd.service
"""


def test_parse_keeps_every_hierarchy():
    assert confinement.parse(V1) == [("freezer", "/slurm/uid_1000/job_77/step_0"),
                                     ("memory", "/slurm/uid_1000/job_77/step_0/task_0"),
                                     ("name=systemd", "/system.slice/slurmd.service"),
                                     ("", "/system.slice/slurmd.service")]


@pytest.mark.parametrize("path,found", [
    ("/system.slice/slurmstepd.scope/job_123/step_batch/user/task_0", ("123", "batch")),
    ("/system.slice/slurmstepd.scope/job_9/step_0", ("9", "0")),
    # Debian 12's slurm-wlm 22.05.8 (multiple-slurmd build), seen in the VM lane:
    ("/system.slice/gpu-router-vm_slurmstepd.scope/job_1/step_batch/user/task_0", ("1", "batch")),
    ("/system.slice/x_slurmstepd.scope.d/job_1/step_0", None),
    ("/slurmstepd.scope/job_9/step_extern", ("9", "extern")),
    ("/slurm/uid_1000/job_77/step_0/task_0", ("77", "0")),
    ("/slurm_node1/uid_0/job_5/step_interactive", ("5", "interactive")),
    ("/system.slice/slurmd.service", None),
    ("/user.slice/user-1000.slice/user@1000.service/job_1/step_0", None),   # no slurmstepd.scope above
    ("/system.slice/slurmstepd.scope/job_x/step_0", None),
    ("/system.slice/slurmstepd.scope/job_1", None),                         # the job, not a step
    ("/system.slice/slurmstepd.scope/job_1/step_", None),
    ("/uid_1000/job_77/step_0", None),                                      # v1 without Slurm's root
])
def test_slurm_step_paths(path, found):
    got = confinement.slurm_step(path)
    assert (got[:2] if got else None) == found


def test_classify_needs_a_root_owned_slurm_cgroup(tmp_path):
    """The path alone is not enough: a member may make it in a delegated subtree; then it is the member's."""
    job = tmp_path / "unified" / "system.slice" / "slurmstepd.scope" / "job_123"
    (job / "step_batch" / "user" / "task_0").mkdir(parents=True)
    held = confinement.classify(confinement.parse(V2), str(tmp_path))
    if os.geteuid() != 0:
        assert held is None
        return
    assert held.label == "slurm:123.batch" and held.cgroup == str(job / "step_batch/user/task_0")
    os.chown(job.parent, 65534, 65534)   # slurmstepd.scope made by a member
    assert confinement.classify(confinement.parse(V2), str(tmp_path)) is None


def test_classify_prefers_v2_and_reads_v1(tmp_path):
    (tmp_path / "freezer/slurm/uid_1000/job_77/step_0").mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(tmp_path / "freezer/slurm/uid_1000/job_77", 1000, 1000)   # a job's own folder may be the user's
        assert confinement.classify(confinement.parse(V1), str(tmp_path)).label == "slurm:77.0"
    assert confinement.classify(confinement.parse("0::/system.slice/x.service\n"), str(tmp_path)) is None


# ---- real cgroups ------------------------------------------------------------------------------------------------

FREEZER = pathlib.Path("/sys/fs/cgroup/freezer")
real = pytest.mark.skipif(os.geteuid() != 0 or not (FREEZER / "cgroup.procs").exists(),
                          reason="needs root and a cgroup v1 freezer hierarchy (this machine's layout)")


@pytest.fixture
def step_cgroup():
    """A real Slurm-shaped step cgroup (v1 freezer: moving into it changes no limit of ours), removed after."""
    job = f"job_{os.getpid()}{int(time.time() * 1000) % 100000}"
    top = FREEZER / "slurm"
    step = top / "uid_0" / job / "step_0"
    step.mkdir(parents=True)
    yield step
    for d in (step, step.parent, step.parent.parent):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)   # the process in it is still exiting (or another test's job is in uid_0)


@real
def test_a_process_in_a_real_step_cgroup_is_confined(step_cgroup):
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert confinement.find(p.pid) is None
        (step_cgroup / "cgroup.procs").write_text(str(p.pid))
        held = confinement.find(p.pid)
        assert held is not None and held.label == f"slurm:{step_cgroup.parent.name[4:]}.0"
        assert held.cgroup == str(step_cgroup)
    finally:
        p.kill()
        p.wait()


@real
def test_wrapper_keeps_a_slurm_job_in_its_step(step_cgroup, tmp_path, gr_bin, clean_env):
    """scope = "required" is met by Slurm's cgroup: the job runs there and the events say which step. Without
    the rule the wrapper would try to move the PID (here: no agent, no systemd) and exit 75."""
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"threshold": 100, "scope": "required"}},
                      router={"retry_exit_code": 75})
    rig.doc.setdefault("agent", {})["socket"] = str(tmp_path / "no-agent.sock")
    rig.rewrite()
    (tmp_path / "in").write_bytes(b"x" * 10)
    outside = rig.run("w", tmp_path / "in")
    assert outside.rc == 75 and "scope" in outside.err, outside   # the control: no scope can be made here
    argv = ["sh", "-c", f'echo $$ > {step_cgroup}/cgroup.procs && exec "$@"', "sh"] + rig.argv("w", tmp_path / "in")
    p = subprocess.run(argv, env=rig.env, capture_output=True, timeout=60)
    res = helpers.Result(p.returncode, p.stdout, p.stderr, rig)
    assert res.rc == 0, res
    assert res.event("routed")["GPU_ROUTER_SCOPE"] == f"slurm:{step_cgroup.parent.name[4:]}.0"
    assert [r["pid"] for r in rig.starts()] == [int(res.event("routed")["GPU_ROUTER_PID"])]   # ran, same PID


@real
def test_wrapper_in_a_step_asks_the_agent_to_account_it(step_cgroup, tmp_path, gr_bin, clean_env):
    """Inside a Slurm step the wrapper makes no scope but sends OP=track (any mode), so the agent accounts the job
    from the step's cgroup; on main it sent nothing. The agent here is a listening socket that records what comes
    (the agent's side is tested above), answering as the agent does."""
    import socket
    import threading

    from gpu_router import journal
    from gpu_router.daemon import broker

    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"threshold": 100, "scope": "required"}},
                      router={"retry_exit_code": 75})
    sock_path = tmp_path / "agent.sock"
    rig.doc.setdefault("agent", {})["socket"] = str(sock_path)
    rig.rewrite()
    (tmp_path / "in").write_bytes(b"x" * 10)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    os.chmod(sock_path, 0o777)
    listener.listen(8)
    listener.settimeout(30)
    got = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    payload = broker._recv_exact(conn, broker.frame_size(broker._recv_exact(conn, 4)))
                except (OSError, broker.Refused):
                    continue
                got.append(journal.decode_native(payload))
                conn.sendall(broker.frame({"OK": "1", "TRACKED": "1"}))

    threading.Thread(target=serve, daemon=True).start()
    try:
        argv = ["sh", "-c", f'echo $$ > {step_cgroup}/cgroup.procs && exec "$@"', "sh"] + rig.argv("w", tmp_path / "in")
        p = subprocess.run(argv, env=rig.env, capture_output=True, timeout=60)
    finally:
        listener.close()
    res = helpers.Result(p.returncode, p.stdout, p.stderr, rig)
    assert res.rc == 0, res
    tracks = [r for r in got if r.get("OP") == "track"]
    assert len(tracks) == 1, got
    assert tracks[0]["PID"] == res.event("routed")["GPU_ROUTER_PID"]
    assert tracks[0]["JOB"] == res.event("routed")["GPU_ROUTER_JOB"]


def test_units_and_memory_place_from_one_parser():
    """The wrapper's runner unit, the scope's BindsTo= service and `status`'s memory cgroup all come from
    confinement.parse (issue 20): one reading of /proc/PID/cgroup, on v2 and on hybrid v1."""
    v2 = confinement.parse("0::/system.slice/ci-runner.service/job.scope\n")
    hybrid = confinement.parse("5:memory:/system.slice/ci.service\n1:name=systemd:/system.slice/ci.service\n"
                               "0::/system.slice/ci.service\n")
    init = confinement.parse("0::/init.scope\n")
    assert (confinement.unit_of(v2), confinement.service_of(v2)) == ("job.scope", "ci-runner.service")
    assert (confinement.unit_of(hybrid), confinement.service_of(hybrid)) == ("ci.service", "ci.service")
    assert (confinement.unit_of(init), confinement.service_of(init)) == (None, None)
    assert confinement.memory_path(hybrid) == ("memory", "/system.slice/ci.service")
    assert confinement.memory_path(v2) == ("", "/system.slice/ci-runner.service/job.scope")
    assert confinement.unit_of(confinement.read(os.getpid())) == confinement.unit_of(confinement.read())


# ---- the agent accounts a Slurm job from its step's cgroup ---------------------------------------------------------

STEP = "/system.slice/node1_slurmstepd.scope/job_42/step_0"


def _slurm_agent(tmp_path, monkeypatch, pid, cgroup_line):
    """An in-process agent (backend none) with CGROUP_ROOT a plain folder in cgroup v2's layout holding Slurm's
    step cgroup, and confinement.PROC a folder like /proc whose <pid>/cgroup is ``cgroup_line``: a stand-in, as
    this host (cgroup v1/hybrid, no Slurm) cannot make Slurm's v2 cgroups nor put a process in one. The job is a
    real process; the tests/vm Slurm lane (GPU_ROUTER_VM_SLURM=1) checks the same on a real Slurm under v2."""
    from gpu_router.daemon import accounting, service

    base, cfg = helpers.agent_folder(tmp_path, workload='binary = "/bin/true"\nthreshold = 100\n')
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(base))
    monkeypatch.setenv("GPU_ROUTER_LOG", "stderr")
    cgroot = tmp_path / "cgroup"
    (cgroot / STEP.lstrip("/") / "user" / "task_0").mkdir(parents=True)
    (cgroot / "cgroup.controllers").write_text("memory pids\n")
    step = cgroot / STEP.lstrip("/")
    (step / "memory.current").write_text("4096\n")
    (step / "memory.peak").write_text(f"{300 * 1048576}\n")
    (step / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    monkeypatch.setattr(accounting, "CGROUP_ROOT", str(cgroot))
    monkeypatch.setattr(confinement, "CGROUP_ROOT", str(cgroot))
    (tmp_path / "proc" / str(pid)).mkdir(parents=True)
    (tmp_path / "proc" / str(pid) / "cgroup").write_text(cgroup_line)
    monkeypatch.setattr(confinement, "PROC", str(tmp_path / "proc"))
    return service.Agent(str(cfg))


def _track_and_finish(agent, monkeypatch, job):
    from gpu_router import journal

    request = journal.encode_native([
        ("OP", "track"), ("WORKLOAD", "tx"), ("JOB", f"tx-{job.pid}-abcdef"), ("MODE", "CPU"), ("DEVICE", "cpu"),
        ("PID", str(job.pid)), ("METRIC", "150"), ("SCOPE_POLICY", "required")])
    reply = journal.decode_native(agent._handle_request(request, job.pid, 0)[4:])
    assert reply == {"OK": "1", "TRACKED": "1"}
    account = agent.jobs[job.pid]
    events = []
    monkeypatch.setattr(journal, "emit", lambda name, msg, fields, **kw: events.append((name, fields)))
    job.stdin.close()  # the job ends when told, not after a time a loaded machine may outrun
    job.wait(10)
    agent.close_vanished()
    return account, next(f for name, f in events if name == "job-finished")


@pytest.mark.skipif(os.geteuid() != 0, reason="Slurm's cgroup must be root's (the owner check): needs root")
def test_the_agent_accounts_a_slurm_job_from_its_step_cgroup(tmp_path, monkeypatch):
    """OP=track from a PID in a Slurm step: the account reads the step's cgroup (its peak, its OOM kill), the
    event says which step. On main the account had no cgroup: no PEAK_RAM_MB, RESULT unknown, SCOPE None."""
    job = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
    try:
        agent = _slurm_agent(tmp_path, monkeypatch, job.pid, f"0::{STEP}/user/task_0\n")
        account, fields = _track_and_finish(agent, monkeypatch, job)
        assert account.control_group == STEP and account.holder is None
        assert (fields["SCOPE"], fields["PEAK_RAM_MB"], fields["RESULT"]) == ("slurm:42.0", 300.0, "oom-kill")
        assert sorted(os.listdir(tmp_path / "cgroup" / STEP.lstrip("/"))) == \
            ["memory.current", "memory.events", "memory.peak", "user"]   # read only: nothing written there
    finally:
        job.kill()
        job.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="the same agent as above")
def test_a_track_request_outside_slurm_gets_no_control_group(tmp_path, monkeypatch):
    """The control: the same request from a PID that is not in a Slurm step (a look-alike path a member could
    make under its own user@.service does not count) is followed without a cgroup, as scope = "off" always was."""
    job = subprocess.Popen(["sh", "-c", "read x; exit 0"], stdin=subprocess.PIPE)
    try:
        agent = _slurm_agent(tmp_path, monkeypatch, job.pid,
                             "0::/user.slice/user-1000.slice/user@1000.service/job_42/step_0\n")
        account, fields = _track_and_finish(agent, monkeypatch, job)
        assert account.control_group is None
        assert (fields["SCOPE"], fields["PEAK_RAM_MB"]) == (None, None)
    finally:
        job.kill()
        job.wait()


def test_step_account_is_the_step_in_the_memory_hierarchy(tmp_path):
    """The step (not its task, which Slurm removes as it ends) in the hierarchy holding memory: v2's path, v1's
    memory line; none where Slurm does not hold the memory (v1 without task/cgroup's memory part)."""
    (tmp_path / "unified" / STEP.lstrip("/")).mkdir(parents=True)
    (tmp_path / "memory/slurm/uid_1000/job_77/step_0/task_0").mkdir(parents=True)
    (tmp_path / "freezer/slurm/uid_1000/job_77/step_0").mkdir(parents=True)
    v2 = confinement.step_account(confinement.parse(f"0::{STEP}/user/task_0\n"), str(tmp_path))
    v1 = confinement.step_account(confinement.parse(V1), str(tmp_path))
    no_memory = confinement.step_account(confinement.parse(V1.replace("11:memory:/slurm/uid_1000/job_77/step_0/task_0",
                                                                      "11:memory:/system.slice/slurmd.service")),
                                         str(tmp_path))
    if os.geteuid() != 0:
        assert (v2, v1, no_memory) == (None, None, None)   # the owner check: these folders are not root's
        return
    assert (v2[0].label, v2[1]) == ("slurm:42.0", STEP)
    assert (v1[0].label, v1[1]) == ("slurm:77.0", "/slurm/uid_1000/job_77/step_0")
    assert (no_memory[0].label, no_memory[1]) == ("slurm:77.0", None)
    assert confinement.step_account(confinement.parse("0::/system.slice/x.service\n"), str(tmp_path)) is None


def test_no_oom_watch_is_registered_in_a_v1_slurm_step(tmp_path):
    """cgroup v1's OOM notification is registered by writing to the cgroup's cgroup.event_control: in Slurm's
    step the agent writes nothing (its oom_kill is read after the exit instead). Plain files stand in for the
    cgroup (this host cannot lend Slurm's); on main the registration was written into them."""
    from gpu_router.daemon import accounting

    for d in ("memory/slurm/uid_0/job_5/step_0", "memory/system.slice/gpu-router-x.scope"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
        (tmp_path / d / "cgroup.event_control").write_text("")
    assert accounting.watch_oom(str(tmp_path / "memory/slurm/uid_0/job_5/step_0")) is None
    assert (tmp_path / "memory/slurm/uid_0/job_5/step_0/cgroup.event_control").read_text() == ""
    fd = accounting.watch_oom(str(tmp_path / "memory/system.slice/gpu-router-x.scope"))   # the control: a scope
    try:
        assert (tmp_path / "memory/system.slice/gpu-router-x.scope/cgroup.event_control").read_text() != ""
    finally:
        if fd is not None:
            os.close(fd)
