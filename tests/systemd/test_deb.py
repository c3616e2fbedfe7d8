"""The .deb's life on a booted Debian: install, wrap a packaged workload, upgrade under a running job, upgrade the
workload, remove, purge.

gpu-router is built twice from a copy of the tree (0.1.0 as it is, and a bumped version for the upgrade), a fake
workload package ships /usr/bin/fake-transcribe in two versions, and everything is installed with apt inside a
container of this module's own. The steps share that container and run in order; each checks what dpkg,
systemd and the filesystem say.
"""

import subprocess
import textwrap
import time

import pytest

import harness
from harness import require_lane

REPO = harness.REPO
HOST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}
APT = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-y", "-q", "--no-install-recommends"]
UPGRADE_VERSION = "0.1.0+test1"

PROFILE = """
[workloads.transcribe]
binary = "/usr/bin/fake-transcribe.distrib"
probe = "file-size"
threshold = 1               # every input is over: the CPU, in gpu-router-cpu.slice
max_gpu_jobs = 0
max_cpu_jobs = 2
cpu_args = ["--device", "cpu"]
scope = "required"
"""


def fake_workload(version, text):
    return f"""#!/bin/sh
# fake workload {version}: holds (see below), then prints its version and arguments
# Holds until the file $FAKE_UNTIL exists (at most $FAKE_SLEEP s, default 120), else sleeps $FAKE_SLEEP s:
# a lane releases a job when it has checked what it needs, never after a guessed time.
if [ -n "$FAKE_UNTIL" ]; then
    i=0
    while [ ! -e "$FAKE_UNTIL" ] && [ "$i" -lt "$(( ${{FAKE_SLEEP:-120}} * 10 ))" ]; do sleep 0.1; i=$((i + 1)); done
elif [ -n "$FAKE_SLEEP" ]; then
    sleep "$FAKE_SLEEP"
fi
echo "fake-transcribe {text} $*"
"""


def host(*cmd, cwd=None):
    proc = subprocess.run(cmd, cwd=cwd, env=HOST_ENV, capture_output=True, text=True, timeout=300)
    if proc.returncode:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


build_gpu_router = harness.build_deb  # one builder for every lane that installs the .deb (tests/vm too)


def build_fake(base, version, text):
    tree = base / f"fake-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: fake-workload\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        f"Description: a stand-in workload for gpu-router's tests\n ships /usr/bin/fake-transcribe\n")
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/fake-transcribe").write_text(fake_workload(version, text))
    (tree / "usr/bin/fake-transcribe").chmod(0o755)
    out = base / f"fake-workload_{version}_all.deb"
    host("dpkg-deb", "--root-owner-group", "-b", str(tree), str(out))
    return out


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    require_lane()
    base = tmp_path_factory.mktemp("debs")
    first = build_gpu_router(base)
    second = build_gpu_router(base, UPGRADE_VERSION)
    return {"gpu-router": first, "gpu-router-upgrade": second,
            "fake-1": build_fake(base, "1.0", "v1"), "fake-2": build_fake(base, "1.1", "v2")}


@pytest.fixture(scope="module")
def box(debs):
    c = harness.Container(packages=harness.PACKAGES_WITH_METRICS)  # the .deb depends on python3-prometheus-client
    c.start()
    try:
        for deb in debs.values():
            c.copy_in(deb, "/scratch/")
        yield c
    finally:
        c.stop()


def deb_in(box, debs, key):
    return f"/scratch/{debs[key].name}"


def show(box, unit, *props):
    out = box.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def sh(box, script, **kw):
    return box.run(textwrap.dedent(script), **kw)


# ---- 1. install ------------------------------------------------------------------------------------------------

def test_install_starts_the_socket_and_the_agent(box, debs):
    t0 = time.monotonic()
    box.run([*APT, "install", deb_in(box, debs, "gpu-router")], timeout=300)
    box.timings["install_s"] = time.monotonic() - t0
    box.wait_for("systemctl is-active --quiet gpu-router-agent.service", timeout=60)
    assert box.run(["systemctl", "is-active", "gpu-router-agent.socket"]).stdout.strip() == "active"
    for unit in ("gpu-router-agent.socket", "gpu-router-agent.service"):
        assert box.run(["systemctl", "is-enabled", unit]).stdout.strip() == "enabled", unit
    assert box.run(["getent", "group", "gpu-router"]).returncode == 0
    assert box.run(["stat", "-c", "%a %U %G", "/run/gpu-router/locks"]).stdout.split() == \
        ["3770", "root", "gpu-router"]
    assert box.run(["stat", "-c", "%a %G", "/run/gpu-router/agent.sock"]).stdout.split() == ["660", "gpu-router"]
    assert box.run(["head", "-1", "/usr/bin/gpu-router"]).stdout.strip() == "#!/usr/bin/python3 -IS"
    catalog = box.run(["journalctl", "--list-catalog"]).stdout       # systemd's trigger updated the catalog
    assert "ad6853f5daa045ce9cee622a6d0c3e62" in catalog
    assert box.run(["dpkg-query", "-W", "-f=${Conffiles}", "gpu-router"]).stdout.split()[0] == \
        "/etc/gpu-router/config.toml"


def test_the_autopkgtest_runs_one_wrapped_job(box):
    """debian/tests/wrapped-job, as autopkgtest would run it on the installed package (needs-root, in a
    container): one member's job through the broker, in its scope; it cleans up after itself."""
    box.copy_in(REPO / "debian/tests/wrapped-job", "/scratch/wrapped-job", mode=0o755)
    out = box.run(["/scratch/wrapped-job"], env={"AUTOPKGTEST_TMP": "/var/tmp"}, timeout=120)
    assert "ok: one wrapped job ran in its scope" in out.stdout, out.stdout + out.stderr
    assert "job ran with: hello" in out.stdout
    assert box.run(["getent", "passwd", "gpurouter-autopkgtest"], check=False).returncode == 2  # cleaned up


# ---- 2. wrap a packaged workload -------------------------------------------------------------------------------

def test_wrap_a_packaged_workload(box, debs):
    box.run([*APT, "install", deb_in(box, debs, "fake-1")], timeout=300)
    box.write_file("/etc/gpu-router/workloads.d/transcribe.toml", PROFILE)
    box.write_file("/srv/input", "x" * 100)
    r = box.run(["gpu-router", "wrap", "/usr/bin/fake-transcribe", "--workload", "transcribe"])
    assert "fake-transcribe.distrib" in r.stdout
    assert box.run(["readlink", "/usr/bin/fake-transcribe"]).stdout.strip() == "/usr/bin/gpu-router"
    assert "diversion of /usr/bin/fake-transcribe to /usr/bin/fake-transcribe.distrib by gpu-router" in \
        box.run(["dpkg-divert", "--list"]).stdout
    # The agent (which makes the job's scope) rereads the config every sample interval (1 s): until it has seen
    # the new profile, a job is BLOCKED (75) with "no workload profile named 'transcribe'".
    out = box.wait_for(["fake-transcribe", "/srv/input"], timeout=10, interval=0.5).stdout
    assert out.strip() == "fake-transcribe v1 /srv/input --device cpu"


# ---- 3. upgrade gpu-router while a job runs --------------------------------------------------------------------

def test_upgrade_with_a_running_job_keeps_the_job_the_wrap_and_the_socket(box, debs, request):
    request.addfinalizer(lambda: box.run(["touch", "/run/gr-deb-release"], check=False))  # also on a failure
    box.run(["systemd-run", "--unit=gr-deb-job", "-p", "RemainAfterExit=yes", "--setenv=FAKE_UNTIL=/run/gr-deb-release",
             "/usr/bin/fake-transcribe", "/srv/input"])
    scope = box.wait_for(lambda: box.run("systemctl list-units --plain --no-legend --state=active "
                                         "'gpu-router-transcribe-*.scope' | awk '{print $1}'").stdout.strip(),
                         timeout=20)
    job_pid = show(box, "gr-deb-job.service", "MainPID")["MainPID"]
    assert job_pid != "0"
    assert show(box, scope, "Slice")["Slice"] == "gpu-router-cpu.slice"
    before = {u: show(box, u, "ActiveEnterTimestampMonotonic", "MainPID")
              for u in ("gpu-router.slice", "gpu-router-cpu.slice", "gpu-router-agent.socket",
                        "gpu-router-agent.service")}

    t0 = time.monotonic()
    box.run([*APT, "install", deb_in(box, debs, "gpu-router-upgrade")], timeout=300)
    box.timings["upgrade_s"] = time.monotonic() - t0
    assert box.run(["dpkg-query", "-W", "-f=${Version}", "gpu-router"]).stdout == UPGRADE_VERSION

    assert box.run(["kill", "-0", job_pid], check=False).returncode == 0, "the job died in the upgrade"
    assert show(box, scope, "ActiveState")["ActiveState"] == "active"
    after = {u: show(box, u, "ActiveEnterTimestampMonotonic", "MainPID") for u in before}
    for unit in ("gpu-router.slice", "gpu-router-cpu.slice", "gpu-router-agent.socket"):
        assert after[unit]["ActiveEnterTimestampMonotonic"] == before[unit]["ActiveEnterTimestampMonotonic"], \
            f"{unit} was restarted by the upgrade"
    box.wait_for("systemctl is-active --quiet gpu-router-agent.service", timeout=60)
    agent = show(box, "gpu-router-agent.service", "MainPID")["MainPID"]
    assert agent not in ("0", before["gpu-router-agent.service"]["MainPID"]), "the agent was not restarted"
    assert box.run(["readlink", "/usr/bin/fake-transcribe"]).stdout.strip() == "/usr/bin/gpu-router"

    box.run(["touch", "/run/gr-deb-release"])  # checked: the job may end now

    def finished():
        props = show(box, "gr-deb-job.service", "SubState", "ExecMainStatus", "Result")
        return props if props["SubState"] == "exited" else None

    props = box.wait_for(finished, timeout=90, interval=0.5)
    assert (props["Result"], props["ExecMainStatus"]) == ("success", "0"), props
    box.run(["systemctl", "stop", "gr-deb-job.service"], check=False)


# ---- 4. upgrade the workload -----------------------------------------------------------------------------------

def test_workload_upgrade_keeps_the_diversion(box, debs):
    box.run([*APT, "install", deb_in(box, debs, "fake-2")], timeout=300)
    assert box.run(["readlink", "/usr/bin/fake-transcribe"]).stdout.strip() == "/usr/bin/gpu-router"
    assert "fake workload 1.1" in box.run(["cat", "/usr/bin/fake-transcribe.distrib"]).stdout
    out = box.run(["fake-transcribe", "/srv/input"]).stdout
    assert out.strip() == "fake-transcribe v2 /srv/input --device cpu"


# ---- 5. remove, then purge -------------------------------------------------------------------------------------

def test_remove_gives_the_workload_back(box):
    # Metrics exported to a directory of the administrator's choosing (issue 14): the file goes with the package.
    box.run(r"""set -e
        mkdir -p /srv/metrics /etc/systemd/system/gpu-router-agent.service.d
        printf '[Service]\nReadWritePaths=/srv/metrics\n' > /etc/systemd/system/gpu-router-agent.service.d/m.conf
        sed -i 's|^#metrics_dir = .*|metrics_dir = "/srv/metrics"|' /etc/gpu-router/config.toml
        systemctl daemon-reload
        systemctl restart gpu-router-agent.service""")
    box.wait_for("grep -q '^gpu_router_agent_up 1' /srv/metrics/gpu_router.prom", timeout=30)
    box.run([*APT, "remove", "gpu-router"], timeout=300)
    assert box.run(["test", "-e", "/srv/metrics/gpu_router.prom"], check=False).returncode != 0
    box.run(["rm", "-r", "/etc/systemd/system/gpu-router-agent.service.d"])
    r = box.run(["stat", "-c", "%F", "/usr/bin/fake-transcribe"])
    assert r.stdout.strip() == "regular file"
    assert box.run(["/usr/bin/fake-transcribe", "x"]).stdout.strip() == "fake-transcribe v2 x"
    assert box.run(["test", "-e", "/usr/bin/fake-transcribe.distrib"], check=False).returncode != 0
    assert "gpu-router" not in box.run(["dpkg-divert", "--list"]).stdout
    assert box.run(["dpkg-query", "-S", "/usr/bin/fake-transcribe"]).stdout.strip() == \
        "fake-workload: /usr/bin/fake-transcribe"
    assert box.run(["test", "-e", "/etc/gpu-router/config.toml"], check=False).returncode == 0  # conffile kept
    assert box.run(["systemctl", "is-active", "gpu-router-agent.socket"], check=False).stdout.strip() != "active"


def test_purge_leaves_nothing_behind(box):
    box.run([*APT, "purge", "gpu-router"], timeout=300)
    assert box.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "gpu-router"], check=False).stdout in \
        ("", "not-installed")
    assert "gpu-router" not in box.run(["dpkg-divert", "--list"]).stdout
    assert "0 unit files listed" in box.run(["systemctl", "list-unit-files", "gpu-router*"], check=False).stdout
    for path in ("/run/gpu-router", "/var/lib/gpu-router", "/usr/bin/gpu-router", "/usr/sbin/gpu-router-agent",
                 "/etc/gpu-router/config.toml", "/usr/lib/python3/dist-packages/gpu_router"):
        assert box.run(["test", "-e", path], check=False).returncode != 0, f"{path} is left"
    assert box.run(["getent", "group", "gpu-router"], check=False).returncode == 2
    # Only what the administrator wrote is left: dpkg does not remove files it did not install.
    left = box.run(["find", "/etc/gpu-router"], check=False).stdout.split()
    assert left == ["/etc/gpu-router", "/etc/gpu-router/workloads.d",
                    "/etc/gpu-router/workloads.d/transcribe.toml"], left
    assert box.run(["/usr/bin/fake-transcribe", "x"]).stdout.strip() == "fake-transcribe v2 x"
