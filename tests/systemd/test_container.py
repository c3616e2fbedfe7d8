"""The facts DESIGN.md §5 ("Real systemd for tests") builds on, proved on a booted systemd; and the harness's own
promises (users, timeouts, copying, clean-up after Ctrl-C and after SIGKILL)."""
import json
import os
import pathlib
import signal
import subprocess
import textwrap
import time
import uuid

import pytest

import harness

pytestmark = pytest.mark.systemd

CAP_NET_ADMIN = 12
HARNESS = pathlib.Path(harness.__file__)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def _cap_mask(status: str, field: str) -> int:
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)


# ------------------------------------------------------------------------------------------------------------------
# The container itself


def test_boots_to_running_or_degraded(container):
    state = container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    failed = container.run(["systemctl", "--failed", "--no-legend", "--plain", "--no-pager"]).stdout
    assert state in ("running", "degraded"), f"state {state!r}; failed units:\n{failed}"
    assert container.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert container.run(["systemd-detect-virt"], check=False).stdout.strip() == "systemd-nspawn"
    assert 'VERSION_CODENAME=bookworm' in container.run(["cat", "/etc/os-release"]).stdout
    # PID 1's command remounted the memory and pids hierarchies read-write: that is what makes MemoryMax= bite
    opts = container.run(["python3", "-c", textwrap.dedent("""\
        for line in open('/proc/self/mountinfo'):
            f = line.split()
            if f[4] in ('/sys/fs/cgroup/memory', '/sys/fs/cgroup/pids'):
                print(f[4], f[5].split(',')[0])""")]).stdout.split("\n")
    assert sorted(filter(None, opts)) == ["/sys/fs/cgroup/memory rw", "/sys/fs/cgroup/pids rw"]
    assert container.leader and os.path.exists(f"/proc/{container.leader}")
    assert (container.root / "usr/lib/systemd/systemd").exists()


def test_repo_at_src_read_only_and_scratch_shared(container):
    assert container.run(["cat", "/src/pyproject.toml"]).stdout == (harness.REPO / "pyproject.toml").read_text()
    r = container.run(["touch", "/src/.gr-lane-must-fail"], check=False)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    tag = _tag()
    container.run(f"echo {tag} > /scratch/from-inside-{tag}")
    assert (container.scratch / f"from-inside-{tag}").read_text().strip() == tag
    (container.scratch / f"from-host-{tag}").write_text(tag)
    assert container.run(["cat", f"/scratch/from-host-{tag}"]).stdout == tag


def test_commands_run_in_the_containers_cgroups_under_its_cap(container):
    assert ":memory:/\n" in container.run(["cat", "/proc/self/cgroup"]).stdout  # the container's root cgroup
    top = container._cgroups["memory"]
    assert int((top / "memory.limit_in_bytes").read_text()) == container.memory_max == 4 << 30
    p = container.popen(["sleep", "30"])
    try:
        own = harness._cgroup_dirs(p.pid)  # nsenter, as the host sees it: below the capped cgroup
        assert own["memory"] == top or top in own["memory"].parents, own
    finally:
        assert container.kill(p) == -signal.SIGTERM  # nsenter passes the command's death on


# ------------------------------------------------------------------------------------------------------------------
# Scopes and MemoryMax on cgroup v1


def test_memorymax_scope_kills_the_hog_only(container):
    tag = _tag()
    script = textwrap.dedent(f"""\
        systemd-run --scope --quiet --unit=gr-sibling-{tag} -p MemoryMax=200M sleep 60 >/dev/null 2>&1 &
        sibling=$!
        i=0; until systemctl is-active --quiet gr-sibling-{tag}.scope; do
            i=$((i+1)); [ $i -gt 100 ] && {{ echo "sibling scope never became active"; exit 9; }}; sleep 0.05
        done
        systemd-run --scope --quiet --unit=gr-hog-{tag} -p MemoryMax=200M \\
            python3 -c "b = b'x' * (400 << 20); print('hog survived', len(b))"
        echo "hog=$?"
        kill -0 $sibling && echo "sibling=alive"
        echo "sibling-scope=$(systemctl is-active gr-sibling-{tag}.scope)"
        kill $sibling
        echo "shell=alive"
        """)
    out = container.run(script, timeout=60).stdout
    assert "hog=137" in out, out  # SIGKILLed by the OOM killer of the scope's memory cgroup
    assert "hog survived" not in out
    assert "sibling=alive" in out and "sibling-scope=active" in out, out
    assert "shell=alive" in out
    # cgroup v1: systemd does not notice the OOM kill of a scope's process; the scope just ends "successfully"
    log = container.journal(f"UNIT=gr-hog-{tag}.scope", output="cat")
    assert "Deactivated successfully" in log and "oom" not in log.lower(), log


def test_scope_memory_limit_is_visible(container):
    tag = _tag()
    unit = f"gr-limit-{tag}.scope"
    container.run(f"systemd-run --scope --quiet --unit={unit} -p MemoryMax=200M sleep 60 >/dev/null 2>&1 &")
    try:
        container.wait_for(["systemctl", "is-active", "--quiet", unit], timeout=10)
        show = container.run(["systemctl", "show", "-p", "MemoryMax", "-p", "ControlGroup", unit]).stdout
        props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
        assert props["MemoryMax"] == str(200 << 20)
        cgroup = props["ControlGroup"]
        assert cgroup.endswith("/" + unit)
        inside = container.run(["cat", f"/sys/fs/cgroup/memory{cgroup}/memory.limit_in_bytes"]).stdout
        assert int(inside) == 200 << 20
        host = container.cgroup_path(cgroup, "memory") / "memory.limit_in_bytes"
        assert int(host.read_text()) == 200 << 20  # the host sees the very same limit
    finally:
        container.run(["systemctl", "stop", unit], check=False)


# ------------------------------------------------------------------------------------------------------------------
# The journal


def test_custom_journal_field_is_queryable(container):
    tag = _tag()
    unit = f"gr-journal-{tag}"
    send = ("from systemd import journal; "
            f"journal.send(MESSAGE='lane probe {tag}', GPU_ROUTER_MODE='BLOCKED', GPU_ROUTER_LANE_TAG='{tag}')")
    container.run_unit(["python3", "-c", send], unit=unit)
    # logger --journald: the same fields without python3-systemd (as the wrapper's native-protocol sink does)
    container.run(["logger", "--journald"], input=f"MESSAGE=lane logger {tag}\nGPU_ROUTER_MODE=BLOCKED\n"
                                                   f"GPU_ROUTER_LANE_TAG={tag}\nSYSLOG_IDENTIFIER=gr-lane\n")

    def mine():
        found = [e for e in container.journal("GPU_ROUTER_MODE=BLOCKED") if e.get("GPU_ROUTER_LANE_TAG") == tag]
        return found if len(found) == 2 else None

    entries = container.wait_for(mine, timeout=15)
    by_msg = {e["MESSAGE"]: e for e in entries}
    assert set(by_msg) == {f"lane probe {tag}", f"lane logger {tag}"}
    assert by_msg[f"lane probe {tag}"]["_SYSTEMD_UNIT"] == f"{unit}.service"  # attribution via run_unit
    assert by_msg[f"lane logger {tag}"]["SYSLOG_IDENTIFIER"] == "gr-lane"
    # the match filters: the same tag under another mode is not there
    assert not [e for e in container.journal("GPU_ROUTER_MODE=GPU") if e.get("GPU_ROUTER_LANE_TAG") == tag]
    text = container.journal(f"GPU_ROUTER_LANE_TAG={tag}", output="cat")
    assert f"lane probe {tag}" in text


# ------------------------------------------------------------------------------------------------------------------
# The harness's API


def test_run_as_unprivileged_user(container):
    uid = container.add_user("gr-lane-user")
    assert uid >= 1000
    r = container.run("id -u; id -g; echo $HOME; grep CapEff /proc/self/status", user="gr-lane-user")
    lines = r.stdout.splitlines()
    assert lines[0] == str(uid) and lines[2] == "/home/gr-lane-user"
    assert _cap_mask(r.stdout, "CapEff") == 0
    assert container.run(["touch", "/etc/gr-lane"], user="gr-lane-user", check=False).returncode != 0
    assert container.run_unit(["id", "-un"], user="gr-lane-user").stdout.strip() == "gr-lane-user"
    # without the agent's broker an unprivileged caller cannot make a scope of the system manager (no polkit)
    r = container.run(["systemd-run", "--scope", "--quiet", "true"], user="gr-lane-user", check=False)
    assert r.returncode != 0, r


def test_run_unit_passes_arguments_literally_and_returns_the_exit_status(container):
    r = container.run_unit(["sh", "-c", 'echo "$0|$1|%n"; exit 7', "$HOME", "${PATH}"], check=False)
    assert r.returncode == 7
    assert r.stdout.strip() == "$HOME|${PATH}|%n"
    with pytest.raises(harness.CommandError) as err:
        container.run_unit("echo to-stderr >&2; exit 3")
    assert err.value.returncode == 3 and "to-stderr" in str(err.value)


def test_run_timeout_kills_the_command_inside(container):
    with pytest.raises(subprocess.TimeoutExpired):
        container.run("sleep 77.25; echo never", timeout=1)
    container.wait_for(lambda: "77.25" not in container.run(["ps", "-eo", "args"]).stdout, timeout=5)


def test_copy_in_resolves_symlinks_inside_the_container(container, tmp_path):
    tag = _tag()
    script = tmp_path / "hello"
    script.write_text(f"#!/bin/sh\necho hello {tag}\n")
    script.chmod(0o755)
    container.copy_in(script, f"/bin/gr-lane-{tag}")  # /bin is a symlink to usr/bin on bookworm
    assert (container.root / f"usr/bin/gr-lane-{tag}").exists()
    assert container.run([f"/usr/bin/gr-lane-{tag}"]).stdout.strip() == f"hello {tag}"
    # an absolute symlink inside points into the container, never to the host's /etc
    container.run(["ln", "-s", "/etc", f"/tmp/escape-{tag}"])
    container.copy_in(script, f"/tmp/escape-{tag}/gr-lane-{tag}")
    assert not pathlib.Path(f"/etc/gr-lane-{tag}").exists()
    assert container.run(["cat", f"/etc/gr-lane-{tag}"]).stdout == script.read_text()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_text("x")
    container.copy_in(tree, f"/opt/gr-lane-{tag}")
    assert container.run(["cat", f"/opt/gr-lane-{tag}/sub/f"]).stdout == "x"


# ------------------------------------------------------------------------------------------------------------------
# CAP_NET_ADMIN and the kernel's proc connector (job accounting wants PROC_EVENT_EXIT for a job's exit status)

PROBE = textwrap.dedent('''\
    """Proc connector probe. Modes:
    probe SECS     bind to CN_IDX_PROC, PROC_CN_MCAST_LISTEN, fork a child that exits 3, print what arrived
    nolisten SECS  the same without LISTEN: anything arriving means the kernel sends for someone else
    hold           bind + LISTEN, print one line, wait for stdin to close, IGNORE (so the listener count drops)
    """
    import errno, json, os, select, socket, struct, sys, time

    NETLINK_CONNECTOR, CN_IDX_PROC, CN_VAL_PROC = 11, 1, 1
    LISTEN, IGNORE = 1, 2
    PROC_EVENT_EXIT = 0x80000000
    NLMSG, CNMSG = struct.Struct("=IHHII"), struct.Struct("=IIIIHH")
    EVENT, EXIT = struct.Struct("=IIQ"), struct.Struct("=iiII")


    def control(s, op):
        body = struct.pack("=I", op)
        msg = CNMSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(body), 0) + body
        s.send(NLMSG.pack(NLMSG.size + len(msg), 3, 0, 0, 0) + msg)  # NLMSG_DONE


    mode = sys.argv[1]
    out = {"mode": mode, "pid_here": os.getpid()}
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)  # a busy host sends a lot
        s.bind((0, CN_IDX_PROC))
    except OSError as exc:
        out["bind"] = errno.errorcode.get(exc.errno, str(exc.errno))
        print(json.dumps(out))
        sys.exit(0)
    out["bind"] = "ok"
    if mode in ("probe", "hold"):
        control(s, LISTEN)
    if mode == "hold":
        print(json.dumps(out), flush=True)
        sys.stdin.read()
        control(s, IGNORE)
        sys.exit(0)
    time.sleep(0.2)
    child = os.fork()
    if child == 0:
        os._exit(3)
    os.waitpid(child, 0)
    out["child_pid_here"] = child
    events, messages, overflow = [], 0, False
    deadline = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < deadline:
        if not select.select([s], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        try:
            data = s.recv(65536)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            overflow = True
            continue
        messages += 1
        off = NLMSG.size + CNMSG.size
        if len(data) >= off + EVENT.size + EXIT.size and EVENT.unpack_from(data, off)[0] == PROC_EVENT_EXIT:
            pid, tgid, code, sig = EXIT.unpack_from(data, off + EVENT.size)
            if code == 3 << 8:
                events.append({"pid": pid, "tgid": tgid, "exit_code": code})
                break
    out.update(messages=messages, overflow=overflow, exit3_events=events)
    if mode == "probe":
        control(s, IGNORE)
    print(json.dumps(out))
    ''')


@pytest.fixture(scope="module")
def probe(container, tmp_path_factory):
    host = tmp_path_factory.mktemp("proc-connector") / "proc_connector_probe.py"
    host.write_text(PROBE)
    container.copy_in(host, "/usr/local/lib/gr-lane/proc_connector_probe.py")
    return host, "/usr/local/lib/gr-lane/proc_connector_probe.py"


def test_container_services_have_cap_net_admin(container):
    status = container.run_unit(["cat", "/proc/self/status"]).stdout
    assert _cap_mask(status, "CapBnd") & (1 << CAP_NET_ADMIN), "the harness passes --capability=CAP_NET_ADMIN"
    assert _cap_mask(status, "CapEff") & (1 << CAP_NET_ADMIN)


def test_nspawn_drops_cap_net_admin_by_default_and_stop_cleans_up():
    with harness.Container(capabilities=()) as bare:
        status = bare.run_unit(["cat", "/proc/self/status"]).stdout
        assert not _cap_mask(status, "CapBnd") & (1 << CAP_NET_ADMIN)
        leader, state_dir, cgroups = bare.leader, bare.dir, list(bare._cgroups.values())
        assert all(cg.is_dir() for cg in cgroups)
        assert (harness.PROPAGATE_DIR / bare.name).is_dir()
    assert _dead(leader)
    assert not state_dir.exists()
    assert not [mp for _, mp, _, _ in harness._mountinfo() if mp.startswith(str(state_dir))]
    assert not [cg for cg in cgroups if cg.exists()]
    assert not (harness.PROPAGATE_DIR / bare.name).exists()


def _host_probe(host_script, mode, *args):
    r = subprocess.run(["/usr/bin/python3", str(host_script), mode, *args], capture_output=True, text=True,
                       timeout=30, check=True)
    return json.loads(r.stdout)


def test_proc_connector_exit_event_reaches_the_container_with_host_pids(container, probe):
    """A service in the container can bind to the proc connector and receives PROC_EVENT_EXIT with the exit
    status (3 << 8) - but only while a process in the host's pid namespace has subscribed, and the PIDs in the
    events are the host's, not the container's."""
    host_script, inner_script = probe
    holder = subprocess.Popen(["/usr/bin/python3", str(host_script), "hold"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(holder.stdout.readline())["bind"] == "ok"
        out = json.loads(container.run_unit(["python3", inner_script, "probe", "3"]).stdout)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert out["bind"] == "ok"
    assert out["exit3_events"], f"no PROC_EVENT_EXIT with exit code 3 reached the container: {out}"
    assert all(e["exit_code"] == 3 << 8 for e in out["exit3_events"])
    # the child is pid ~50 in the container; the event names it by its host pid
    assert out["child_pid_here"] not in [e["pid"] for e in out["exit3_events"]], out


def test_proc_connector_listen_from_the_container_is_ignored(container, probe):
    """The kernel ignores PROC_CN_MCAST_LISTEN from outside the initial pid namespace: a subscriber in the
    container alone gets nothing at all."""
    host_script, inner_script = probe
    if _host_probe(host_script, "nolisten", "1")["messages"]:
        pytest.skip("the kernel already sends proc events without our subscription (a host process listens, or "
                    "one exited without PROC_CN_MCAST_IGNORE and leaked the kernel's listener count, which only "
                    "a reboot resets): the container's own LISTEN cannot be observed here")
    out = json.loads(container.run_unit(["python3", inner_script, "probe", "2"]).stdout)
    if out["messages"] and _host_probe(host_script, "nolisten", "1")["messages"]:
        pytest.skip("a host process subscribed to proc events while this test ran: inconclusive")
    assert out["bind"] == "ok"
    assert out["messages"] == 0 and out["exit3_events"] == [], out


# ------------------------------------------------------------------------------------------------------------------
# Clean-up when the owner is interrupted or killed


def _cmdline(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _default_sigint():  # `cmd &` in a non-interactive shell ignores SIGINT, and children inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def shell_container(tmp_path):
    """`harness.py shell -- sleep 300` in a subprocess, its own state dir; whatever the test does, reaped after."""
    state_root = tmp_path / "state"
    env = {"PATH": harness.PATH, "LANG": "C.UTF-8", "GPU_ROUTER_TEST_STATE": str(state_root),
           "GPU_ROUTER_TEST_CACHE": str(harness.CACHE_DIR), "GPU_ROUTER_TEST_MIRROR": harness.MIRROR}
    p = subprocess.Popen(["/usr/bin/python3", str(HARNESS), "shell", "--", "sleep", "300"], env=env,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        line = p.stderr.readline()
        if not line.startswith("booted "):
            p.kill()
            pytest.fail(f"harness.py shell did not boot: {line}{p.stderr.read()}")
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        state = json.loads(pathlib.Path(fields["dir"], "state.json").read_text())
        deadline = time.monotonic() + 10  # until `sleep 300` runs inside: a signal before that is another test
        while not any(_cmdline(pid) == "sleep 300" for cg in state["cgroups"]
                      for pid in harness._cgroup_procs(pathlib.Path(cg))):
            assert time.monotonic() < deadline, "sleep 300 never started inside"
            time.sleep(0.02)
        yield (p, int(fields["leader"]), pathlib.Path(fields["dir"]),
               [pathlib.Path(c) for c in state["cgroups"]], state_root)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        harness.reap_stale(state_root)


def _dead(pid):
    try:  # a zombie waiting for its new parent (the host's init) to reap it counts as dead
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _assert_gone(leader, state_dir, cgroups):
    assert _dead(leader), "the container still runs"
    assert not (harness.PROPAGATE_DIR / state_dir.name.split(".")[0]).exists()
    assert not [mp for _, mp, _, _ in harness._mountinfo() if mp.startswith(str(state_dir))]
    assert not state_dir.exists()
    assert not [cg for cg in cgroups if cg.exists()]


def test_ctrl_c_stops_and_cleans_up(shell_container):
    harness_proc, leader, state_dir, cgroups, _ = shell_container
    assert os.path.exists(f"/proc/{leader}") and cgroups
    harness_proc.send_signal(signal.SIGINT)
    harness_proc.wait(30)
    _assert_gone(leader, state_dir, cgroups)


def test_a_killed_owner_is_reaped_by_the_next_run(shell_container):
    harness_proc, leader, state_dir, cgroups, state_root = shell_container
    harness_proc.kill()
    harness_proc.wait(10)
    time.sleep(0.2)
    assert not _dead(leader), "expected the orphaned container to outlive its owner"
    assert str(state_dir) in harness.reap_stale(state_root)
    _assert_gone(leader, state_dir, cgroups)
