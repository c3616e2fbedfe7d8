"""Journal entries a member writes, read by root (issue 17, items 5-7), on a booted Debian with a real journald.

The agent runs as its service (from the checkout, as tests/systemd/srcinstall.py lays it out); two members of
gpu-router: alice runs jobs through the wrapper (input files named with ESC sequences), mallory writes journal
entries with the router's fields through python3-systemd, the agent's trusted fields included (journald drops a
client's _UID and _SYSTEMD_UNIT and writes its own). Then, as root: `gpu-router jobs` and `stats` (text and
JSON) and the agent's metrics (its journal follower, its saved counters) must believe nothing mallory wrote about
alice's job or in the agent's name, print no control character, and keep one label for workloads not configured.
"""

import json
import textwrap

import pytest

import harness
import srcinstall
from harness import require_lane

CONFIG = """
[gpu]
backend = "none"
sample_interval = "0.5s"

[workloads.w]
binary = "/usr/bin/python3"
probe = "file-size"
threshold = 1                 # every input is over: CPU
max_cpu_jobs = 4
scope = "required"            # the agent accounts every job: its job-finished is the outcome
"""

EVIL = "clip\x1b]0;owned\x07\x1b[2J\x9b31m.mp3"

FORGE = textwrap.dedent('''
    import sys
    from systemd import journal
    from gpu_router.journal import MESSAGE_IDS

    job = sys.argv[1]
    agent = dict(SYSLOG_IDENTIFIER="gpu-router", _UID="0", _SYSTEMD_UNIT="gpu-router-agent.service")

    def send(event, message, **fields):
        journal.send(message, MESSAGE_ID=MESSAGE_IDS[event], GPU_ROUTER_EVENT=event, **agent,
                     **{"GPU_ROUTER_" + k: v for k, v in fields.items()})

    send("job-finished", "forged", JOB=job, WORKLOAD="w", MODE="GPU", DEVICE="0", RESULT="oom-kill",
         EXIT_STATUS="137", DURATION_S="5.0", PEAK_VRAM_MB="15000", PEAK_RAM_MB="1")
    send("vram-foreign", "forged", DEVICE="0", PID="1", COMM="\\x1b[31mevil\\x07", USED_VRAM_MB="70000")
    send("gpu-health", "forged", DEVICE="0", HEALTH="gpu-lost")
    send("vram-underpredicted", "forged", JOB=job, WORKLOAD="w", MEASURED_VRAM_MB="9000", PREDICTED_VRAM_MB="1")
    for i in range(300):
        send("routed", "many", JOB=f"fake{i}-1-aa", WORKLOAD=f"fake{i}", MODE="GPU", REASON=f"r{i}",
             INPUT="/x/\\x1b[2J\\x01")
''')


@pytest.fixture(scope="module")
def box():
    require_lane()
    c = harness.Container()
    c.start()
    try:
        c.write_file("/etc/gpu-router/config.toml", CONFIG)
        c.write_file("/srv/job.py", "import sys\n")
        c.write_file("/srv/forge.py", FORGE)
        c.run(srcinstall.TREE + srcinstall.START, timeout=120)
        c.uids = {name: c.add_user(name, groups=["gpu-router"]) for name in ("alice", "mallory")}
        c.wait_for("test -S /run/gpu-router/agent.sock", timeout=30)
        yield c
    finally:
        c.stop()


def run_job(box):
    out = box.run_unit(["/usr/bin/python3", "-c", textwrap.dedent(f"""
        import os, subprocess
        path = os.path.expanduser("~/" + {EVIL!r})
        open(path, "wb").write(b"x" * 100)
        p = subprocess.run(["gpu-router", "run", "--workload", "w", "--", "/srv/job.py", path])
        print("rc=%d" % p.returncode)
    """)], user="alice", timeout=60).stdout
    assert "rc=0" in out, out


def finished_by_agent(box, job):
    return box.journal("GPU_ROUTER_EVENT=job-finished", f"GPU_ROUTER_JOB={job}",
                       "_SYSTEMD_UNIT=gpu-router-agent.service")


def saved_counters(box):
    try:
        data = json.loads(box.run(["cat", "/var/lib/gpu-router/metrics.json"]).stdout)
    except (harness.CommandError, ValueError):
        return None
    return {name: {tuple(k): v for k, v in rows} for name, rows in data["counters"].items()}


def test_forged_history_labels_and_control_characters_reach_no_reader(box):
    run_job(box)
    [routed] = box.journal("GPU_ROUTER_EVENT=routed", f"_UID={box.uids['alice']}")
    job = routed["GPU_ROUTER_JOB"]
    box.wait_for(lambda: finished_by_agent(box, job), timeout=30)
    box.run(["env", "PYTHONPATH=/opt/gpu-router/lib", "/usr/bin/python3", "/srv/forge.py", job], user="mallory")
    forged = box.journal("MESSAGE=forged")
    assert len(forged) == 4 and {e["_UID"] for e in forged} == {str(box.uids["mallory"])}  # journald's own
    run_job(box)  # a later job: once the agent counted it, it has read past everything mallory wrote

    # gpu-router jobs: alice's job as the agent saw it; no control character in the table; JSON intact
    table = box.run(["gpu-router", "jobs"]).stdout
    assert not any(c in table for c in "\x1b\x07\x9b\x01"), table
    assert "\\x1b]0;owned\\x07" in table and "oom-kill" not in table
    data = json.loads(box.run(["gpu-router", "jobs", "--json"]).stdout)
    [mine] = [j for j in data["jobs"] if j["job"] == job]
    # (success, or unknown where the agent lost the race for the exit status: the proc connector is silent in a
    # container; tests/systemd/README.md)
    assert mine["result"] in ("success", "unknown") and mine["exit_status"] in (0, None)
    assert mine["peak_vram_mb"] is None and mine["mode"] == "CPU"
    assert mine["input"].endswith(EVIL) and data["ignored"] >= 1
    one = box.run(["gpu-router", "jobs", job]).stdout
    assert "\x1b" not in one and "oom-kill" not in one

    # gpu-router stats: no reserve advice from a forged vram-foreign, no control character
    stats = box.run(["gpu-router", "stats"]).stdout
    assert "70000" not in stats and "\x1b" not in stats and "\x01" not in stats, stats
    sj = json.loads(box.run(["gpu-router", "stats", "--json"]).stdout)
    results = sj["workloads"]["w"]["results"]
    assert sj["foreign"] == {} and set(results) <= {"success", "unknown"} and sum(results.values()) == 2
    assert sj["workloads"]["w"]["underpredicted"] == 0 and sj["ignored"] >= 3

    # the agent's metrics: counted from the journal, by author, labels bounded by the config
    def counted():
        c = saved_counters(box)
        routed = (c or {}).get("gpu_router_jobs_routed_total", {})
        return c if routed.get(("w", "CPU", "over-threshold")) == 2 else None

    c = box.wait_for(counted, timeout=30)
    assert c["gpu_router_jobs_finished_total"].get(("w", "GPU", "oom-kill"), 0) == 0
    assert sum(v for k, v in c["gpu_router_jobs_finished_total"].items() if k[:2] == ("w", "CPU")) == 2
    assert not c.get("gpu_router_gpu_health_changes_total")
    labels = {k[0] for k in c["gpu_router_jobs_routed_total"]}
    assert labels == {"w", "other"}, labels
    assert c["gpu_router_jobs_routed_total"][("other", "GPU", "other")] == 300
