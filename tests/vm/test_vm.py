"""The cgroup v2 lane: boot Debian 12 (its cloud kernel, systemd 252, cgroup v2) under qemu, install the built
.deb, and run guest/checks.py inside as root with jobs started by a member of group gpu-router: scope limits
and holders, an agent restart while a job ends, and the acceptance batch (100 jobs, a slow GPU backend, an agent
restart midway). The guest's pytest result and counts come back on the work disk; see README.md here.
"""
import json
import os
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import vm  # noqa: E402

# guest/checks.py runs only inside the VM (its name keeps pytest from collecting it here: it would reconfigure
# this host).
pytestmark = pytest.mark.vm

# The acceptance batch's size. 100 is the measure (tests/vm/README.md has its figures); CI runs 40 so the
# lane fits its 7-minute budget on 2 emulated cores of a shared machine.
BATCH = int(os.environ.get("GPU_ROUTER_VM_BATCH", "40"))


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    vm.require_lane()
    base = tmp_path_factory.mktemp("vm")
    payload = base / "payload"
    payload.mkdir()
    shutil.copy2(vm.harness.build_deb(base / "deb"), payload / "gpu-router.deb")
    shutil.copytree(vm.HERE / "guest", payload / "guest")
    shutil.copy2(vm.HERE / "guest" / "run.sh", payload / "run.sh")
    vm.compile_static(vm.HERE / "guest" / "alloc.c", payload / "guest" / "alloc")
    (payload / "guest" / "params.json").write_text(json.dumps({"batch": BATCH}))
    run = vm.Run(payload, timeout=int(os.environ.get("GPU_ROUTER_VM_TIMEOUT", "600")))
    try:
        run.boot()
        yield run
    finally:
        run.clean()


def test_guest_suite_passes_on_cgroup_v2(guest):
    log = guest.read("pytest.log")
    assert guest.read("apt.rc").strip() == "0", guest.read("apt.log")[-3000:]
    assert guest.read("pytest.rc").strip() == "0", log[-12000:] + "\n--- agent ---\n" + guest.read("agent.log")[-4000:]
    assert " passed" in log and "failed" not in log.splitlines()[-1]


def test_acceptance_counts(guest):
    data = json.loads(guest.read("acceptance.json") or "{}")
    c = data.get("counts")
    assert c, guest.read("pytest.log")[-4000:]
    print(json.dumps(c, indent=1))
    per_shape = max(1, BATCH // 5)
    assert c["jobs"] == 5 * per_shape and c["unknown"] == 0
    blocked_oom = sum(1 for j in data["jobs"] if j["kind"] == "oom" and j["rc"] == 75)
    assert c["oom_kill"] == c["oom_jobs"] == per_shape - blocked_oom
    assert c["peak_ok"] == c["peak_checked"] == c["jobs"] - c["blocked"]
    assert c["spanning_restart"] > 0 and c["spanning_restart_ok"] == c["spanning_restart"]
