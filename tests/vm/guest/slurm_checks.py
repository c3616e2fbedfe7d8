"""Inside the VM (cgroup v2, systemd 252): Slurm with proctrack/cgroup + task/cgroup + cgroup/v2, gpu-router's
printed slurm.conf/gres.conf installed as they are, and a wrapped job (scope = "required") submitted by `runner`.

Checked: the job stays in its step's cgroup (…/slurmstepd.scope/job_N/step_batch…) and the wrapper's routed event
says SCOPE=slurm:N.batch; `scancel` ends it; Slurm's --mem limit kills a runaway (OUT_OF_MEMORY). The agent
accounts each job from its step's cgroup (OP=track; it writes nothing there): its job-finished says
SCOPE=slurm:N.batch, a PEAK_RAM_MB from the step's memory.peak, and oom-kill for the runaway (memory.events).
Copied into the payload as checks.py (run.sh runs that name).
"""
import json
import pathlib
import re
import subprocess
import time

import pytest

NODE = "gpu-router-vm"
CONFIG = """
[gpu]
backend = "none"

[host]
other_ram_mb = 512            # a 3 GB VM

[workloads.mem]
binary = "/usr/local/bin/alloc"
probe = "file-size"
threshold = 1                 # every input is over: the CPU pool
max_gpu_jobs = 0
max_cpu_jobs = 2
cpu_ram_mb = 200
scope = "required"            # met by Slurm's step cgroup: no scope of gpu-router's can be asked for there
"""
SITE = f"""ClusterName=vm
SlurmctldHost={NODE}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerParameters=bf_interval=30
SlurmUser=slurm
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
ReturnToService=2
MinJobAge=600
NodeName={NODE} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
CGROUP_CONF = """CgroupPlugin=cgroup/v2
ConstrainRAMSpace=yes
"""
SCRIPT = """#!/bin/sh
cat /proc/self/cgroup > /tmp/cgroup.$SLURM_JOB_ID
exec gpu-router run --workload mem -- "$@"
"""


def sh(cmd, check=True, timeout=120, user=None):
    argv = cmd if isinstance(cmd, list) else ["sh", "-c", cmd]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{cmd} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_for(predicate, timeout=90, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def logs():
    return sh("tail -40 /var/log/slurm/*.log; systemctl status --no-pager munge slurmctld slurmd", check=False).stdout


@pytest.fixture(scope="module", autouse=True)
def slurm():
    pathlib.Path("/etc/gpu-router/config.toml").write_text(CONFIG)
    sh("install -m 755 /work/guest/alloc /usr/local/bin/alloc")
    pathlib.Path("/usr/local/bin/mem-job").write_text(SCRIPT)
    sh("chmod 755 /usr/local/bin/mem-job; mkdir -p /srv/in; chmod 755 /srv/in")
    sh("id runner >/dev/null 2>&1 || useradd -m -G gpu-router runner")
    sh(f"grep -q {NODE} /etc/hosts || echo '127.0.0.1 {NODE}' >> /etc/hosts")
    sh("systemctl restart gpu-router-agent.service")
    # The VM has no network (qemu -nic none), and Slurm's getaddrinfo(AI_ADDRCONFIG) finds no address with only
    # loopback up: a dummy interface, by systemd-networkd (no iproute2 in the image).
    net = pathlib.Path("/etc/systemd/network")
    net.mkdir(parents=True, exist_ok=True)
    (net / "10-dummy.netdev").write_text("[NetDev]\nName=dummy0\nKind=dummy\n")
    (net / "10-dummy.network").write_text("[Match]\nName=dummy0\n\n[Network]\nAddress=10.253.0.1/24\n")
    sh("systemctl restart systemd-networkd")
    wait_for(lambda: "10.253.0.1" in sh("cat /proc/net/fib_trie", check=False).stdout, timeout=30)
    pathlib.Path("/etc/slurm").mkdir(exist_ok=True)
    pathlib.Path("/etc/slurm/slurm.conf").write_text(SITE)
    pathlib.Path("/etc/slurm/cgroup.conf").write_text(CGROUP_CONF)
    sh("gpu-router slurm-conf --print slurm.conf > /tmp/slurm.conf && gpu-router slurm-conf --print gres.conf "
       "> /tmp/gres.conf && cp /tmp/slurm.conf /tmp/gres.conf /etc/slurm/")
    sh("mkdir -p /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm; "
       "chown slurm: /var/lib/slurm/slurmctld /var/log/slurm; systemctl restart munge; "
       "systemctl restart slurmctld slurmd")
    try:
        wait_for(lambda: sh("sinfo -h -o %T", check=False).stdout.strip() == "idle", timeout=120)
    except TimeoutError:
        raise AssertionError("slurm never became idle:\n" + logs()) from None
    yield


def submit(args, mem="200M", n=0):
    path = f"/srv/in/{n}"
    pathlib.Path(path).write_text("x" * 10)
    opt = sh(["gpu-router", "slurm-conf", "--request", path], user="runner").stdout.split()
    out = sh(["sbatch", "--parsable", *opt, f"--mem={mem}", "--output=/tmp/slurm-%j.out",
              "/usr/local/bin/mem-job", *map(str, args), path], user="runner").stdout
    return int(out.strip().split(";")[0])


def jobcomp(jid):
    for line in reversed(pathlib.Path("/var/log/slurm/jobcomp.log").read_text().splitlines()
                         if pathlib.Path("/var/log/slurm/jobcomp.log").exists() else []):
        f = dict(re.findall(r"(\w+)=(\S*)", line))
        if f.get("JobId") == str(jid):
            return f
    return None


def alloc_pid(path):
    r = sh(["pgrep", "-f", f"^/usr/local/bin/alloc .* {path}$"], check=False)
    return int(r.stdout.split()[0]) if r.stdout.split() else None


def events(name):
    sh("journalctl --sync")
    return [json.loads(x) for x in sh(f"journalctl -b -o json GPU_ROUTER_EVENT={name}").stdout.splitlines()]


def routed_for(path):
    mine = [e for e in events("routed") if e.get("GPU_ROUTER_INPUT") == path]
    assert mine, f"no routed event for {path}"
    return mine[-1]


def finished(job, timeout=60):
    """The agent's job-finished event for the wrapper's JOB id (written at the job's exit, by the agent)."""
    try:
        return wait_for(lambda: next((e for e in events("job-finished") if e.get("GPU_ROUTER_JOB") == job), None),
                        timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"no job-finished for {job}:\n" +
                             sh("journalctl -b -u gpu-router-agent --no-pager | tail -30", check=False).stdout) \
            from None


def test_printed_files_pass_check_and_slurm_uses_cgroup_v2():
    assert pathlib.Path("/sys/fs/cgroup/cgroup.controllers").exists()
    r = sh(["gpu-router", "slurm-conf", "--check"], check=False)
    assert r.returncode == 0, r.stdout
    assert "proctrack/cgroup" in sh("scontrol show config").stdout


def test_wrapped_job_stays_in_its_step_cgroup():
    jid = submit([20, 6, 0], n=1)
    pid = wait_for(lambda: alloc_pid("/srv/in/1"), timeout=90)
    cgroup = pathlib.Path(f"/proc/{pid}/cgroup").read_text()
    before = pathlib.Path(f"/tmp/cgroup.{jid}").read_text()
    assert f"_slurmstepd.scope/job_{jid}/step_batch/" in cgroup, (cgroup, before)   # Debian: <node>_slurmstepd
    assert "/gpu.slice/" not in cgroup                                               # not in gpu-router's scope
    wait_for(lambda: jobcomp(jid), timeout=90)
    assert jobcomp(jid)["JobState"] == "COMPLETED", jobcomp(jid)
    sh("journalctl --sync")
    routed = [json.loads(x) for x in sh("journalctl -b -o json GPU_ROUTER_EVENT=routed").stdout.splitlines()]
    mine = [e for e in routed if e.get("GPU_ROUTER_INPUT") == "/srv/in/1" or e.get("GPU_ROUTER_PID") == str(pid)]
    assert mine and mine[-1]["GPU_ROUTER_SCOPE"] == f"slurm:{jid}.batch", routed[-3:]
    done = finished(mine[-1]["GPU_ROUTER_JOB"])   # accounted by the agent from the step's own cgroup
    assert (done["GPU_ROUTER_SCOPE"], done["GPU_ROUTER_RESULT"]) == (f"slurm:{jid}.batch", "success"), done
    assert 20 <= float(done["GPU_ROUTER_PEAK_RAM_MB"]) <= 200, done   # alloc touched 20 MiB; --mem=200M


def test_scancel_ends_the_wrapped_job():
    jid = submit([20, 120, 0], n=2)
    pid = wait_for(lambda: alloc_pid("/srv/in/2"), timeout=90)
    t0 = time.monotonic()
    sh(["scancel", str(jid)])
    wait_for(lambda: not pathlib.Path(f"/proc/{pid}").exists(), timeout=30, interval=0.2)
    print(f"scancel: the job was gone after {time.monotonic() - t0:.1f} s")
    wait_for(lambda: jobcomp(jid), timeout=60)
    assert jobcomp(jid)["JobState"] == "CANCELLED", jobcomp(jid)


def test_slurm_mem_limit_kills_a_runaway():
    jid = submit([400, 5, 0], mem="100M", n=3)
    wait_for(lambda: jobcomp(jid), timeout=120)
    assert jobcomp(jid)["JobState"] == "OUT_OF_MEMORY", jobcomp(jid)
    done = finished(routed_for("/srv/in/3")["GPU_ROUTER_JOB"])
    print("runaway's job-finished:", {k: v for k, v in done.items() if k.startswith("GPU_ROUTER_")})
    assert (done["GPU_ROUTER_SCOPE"], done["GPU_ROUTER_RESULT"]) == (f"slurm:{jid}.batch", "oom-kill"), done
    if done.get("GPU_ROUTER_PEAK_RAM_MB") is not None:   # absent only where slurmstepd removed the step first
        assert 50 <= float(done["GPU_ROUTER_PEAK_RAM_MB"]) <= 101, done   # --mem=100M: at the limit, not above
