"""Upgrade from the last released .deb (built from its own commit) to this tree, with a job running.

test_deb.py upgrades the tree to itself; this module upgrades across real changes between releases (0.1.0 had a flat
module layout: gpu_router/agent.py, gpu_router/wrap.py, …; its prerm calls `python3 -m gpu_router.wrap`). What an
operator's `apt install ./gpu-router_new.deb` must do on a host with a wrapped workload and a job running: keep the
job alive in its scope, keep the wrap and the socket, restart the agent on the new code, leave no module of the
old layout behind, and route the next job.
"""

import io
import subprocess
import tarfile

import pytest

import harness
from harness import require_lane
from test_deb import APT, PROFILE, build_fake, build_gpu_router, host, show

REPO = harness.REPO
# The commit that was released as 0.1.0 (landed main before the layout move). Bump with each release.
PREVIOUS_RELEASE = "020ffd9"
NEW_VERSION = "0.1.0+upgrade1"


def _previous_tree(dest):
    """The previous release's files, from git history (CI clones the whole history)."""
    proc = subprocess.run(["git", "archive", "--format=tar", PREVIOUS_RELEASE], cwd=REPO, capture_output=True)
    if proc.returncode:
        msg = f"git archive {PREVIOUS_RELEASE} failed (a shallow clone?): {proc.stderr.decode(errors='replace')}"
        if harness.lane_required():
            pytest.fail(msg)
        pytest.skip(msg)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest)  # our own history, not an untrusted archive
    host("dpkg-buildpackage", "-us", "-uc", "-b", cwd=dest)
    return next(dest.parent.glob("gpu-router_*_all.deb"))


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    require_lane()
    base = tmp_path_factory.mktemp("release")
    old = _previous_tree(base / "prev" / "src")
    new = build_gpu_router(base, NEW_VERSION)
    fake = build_fake(base, "1.0", "v1")
    c = harness.Container(packages=harness.PACKAGES_WITH_METRICS)  # the new .deb depends on python3-prometheus-client
    c.start()
    try:
        for deb in (old, new, fake):
            c.copy_in(deb, "/scratch/")
        c.debs = {"old": f"/scratch/{old.name}", "new": f"/scratch/{new.name}", "fake": f"/scratch/{fake.name}"}
        yield c
    finally:
        c.stop()


def test_upgrade_from_the_previous_release_with_a_running_job(box, request):
    request.addfinalizer(lambda: box.run(["touch", "/run/gr-rel-release"], check=False))  # also on a failure
    box.run([*APT, "install", box.debs["old"], box.debs["fake"]], timeout=300)
    old_version = box.run(["dpkg-query", "-W", "-f=${Version}", "gpu-router"]).stdout
    assert old_version != NEW_VERSION
    assert box.run(["test", "-f", "/usr/lib/python3/dist-packages/gpu_router/agent.py"], check=False).returncode == 0
    box.run(["useradd", "-m", "-G", "gpu-router", "runner"])
    box.write_file("/etc/gpu-router/workloads.d/transcribe.toml", PROFILE)
    box.write_file("/srv/input", "x" * 100)
    box.run(["chmod", "644", "/srv/input"])
    box.run(["gpu-router", "wrap", "/usr/bin/fake-transcribe", "--workload", "transcribe"])
    box.wait_for(["fake-transcribe", "/srv/input"], timeout=10, interval=0.5)

    # A job of the group member's, through the agent (scope = "required"), running across the upgrade.
    box.run(["systemd-run", "--unit=gr-rel-job", "--uid=runner", "-p", "RemainAfterExit=yes",
             "--setenv=FAKE_UNTIL=/run/gr-rel-release", "/usr/bin/fake-transcribe", "/srv/input"])
    scope = box.wait_for(lambda: box.run("systemctl list-units --plain --no-legend --state=active "
                                         "'gpu-router-transcribe-*.scope' | awk '{print $1}'").stdout.strip(),
                         timeout=20)
    job_pid = show(box, "gr-rel-job.service", "MainPID")["MainPID"]
    agent_before = show(box, "gpu-router-agent.service", "MainPID")["MainPID"]
    socket_before = show(box, "gpu-router-agent.socket", "ActiveEnterTimestampMonotonic")

    box.run([*APT, "install", box.debs["new"]], timeout=300)
    assert box.run(["dpkg-query", "-W", "-f=${Version}", "gpu-router"]).stdout == NEW_VERSION
    assert box.run(["kill", "-0", job_pid], check=False).returncode == 0, "the job died in the upgrade"
    assert show(box, scope, "ActiveState")["ActiveState"] == "active"
    assert show(box, "gpu-router-agent.socket", "ActiveEnterTimestampMonotonic") == socket_before
    box.wait_for("systemctl is-active --quiet gpu-router-agent.service", timeout=60)
    assert show(box, "gpu-router-agent.service", "MainPID")["MainPID"] not in ("0", agent_before)
    assert box.run(["readlink", "/usr/bin/fake-transcribe"]).stdout.strip() == "/usr/bin/gpu-router"

    # The new layout is what runs, and nothing of the old one is left to be imported by mistake.
    lib = "/usr/lib/python3/dist-packages/gpu_router"
    left = box.run(f"find {lib} -maxdepth 1 \\( -name 'agent.py' -o -name 'gpu.py' -o -name 'run.py' "
                   f"-o -name 'wrap.py' \\) -print; find {lib} -name '*.pyc' -path '*__pycache__*' "
                   f"\\( -name 'agent.*' -o -name 'gpu.*' \\) -print").stdout.split()
    assert left == [], left
    assert box.run(["test", "-f", f"{lib}/daemon/service.py"], check=False).returncode == 0
    cmdline = box.run(["cat", f"/proc/{show(box, 'gpu-router-agent.service', 'MainPID')['MainPID']}/cmdline"])
    assert "gpu-router-agent" in cmdline.stdout

    box.run(["touch", "/run/gr-rel-release"])  # checked: the job may end now

    def finished():
        props = show(box, "gr-rel-job.service", "SubState", "ExecMainStatus", "Result")
        return props if props["SubState"] == "exited" else None

    props = box.wait_for(finished, timeout=90, interval=0.5)
    assert (props["Result"], props["ExecMainStatus"]) == ("success", "0"), props
    # The next job routes through the new code, as the group member.
    out = box.wait_for(lambda: box.run(["fake-transcribe", "/srv/input"], user="runner", check=False).stdout,
                       timeout=15, interval=0.5)
    assert out.strip() == "fake-transcribe v1 /srv/input --device cpu"
    # And the new package removes cleanly with the new prerm (python3 -m gpu_router.ops.wrap unwrap --all).
    box.run([*APT, "purge", "gpu-router"], timeout=300)
    assert box.run(["readlink", "/usr/bin/fake-transcribe"], check=False).stdout.strip() == ""
    assert "fake-transcribe" not in box.run(["dpkg-divert", "--list"]).stdout
