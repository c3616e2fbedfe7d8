"""Metrics an operator can alert on, end to end (issue 14).

A booted Debian runs the agent as its service (from the checkout, as tests/systemd/test_scopes.py installs it) with
``metrics_dir`` set; Debian's prometheus-node-exporter (the host's binary, reading the container's textfile
directory) serves the file; each scenario is played for real — jobs BLOCKED while the one CPU slot is held, a job
killed by the kernel's OOM killer in its scope, the GPU backend failing, the agent stopped — and node_exporter is
scraped before and after it. The shipped rules (packaging/prometheus/gpu-router.rules.yml, unchanged) then run in
``promtool test rules`` over those scrapes, laid out on promtool's clock (before: 15 minutes, after: 20): each
scenario must fire its alert(s) and no other, and nothing may fire before it.

The one translation: promtool's clock starts at 0, so Unix timestamps among the scraped values
(``gpu_router_last_sample_timestamp_seconds``) keep the age they had when scraped and advance with promtool's
clock exactly when they advanced between two real scrapes (a running agent), or stay put (a stopped one).

Also checked here, on journald for real: the wrapper's decisions are counted from the journal (no call from the
wrapper), and counters and the journal cursor survive an agent restart, events written while it was down included.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request

import pytest

import harness
import srcinstall
from harness import require_lane

RULES = harness.REPO / "packaging" / "prometheus" / "gpu-router.rules.yml"
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
PROMTOOL = "/usr/bin/promtool"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
ALERTS = ("GpuRouterGpuUnhealthy", "GpuRouterGpuBackendDown", "GpuRouterBlockedRateHigh", "GpuRouterJobOomKilled",
          "GpuRouterAgentStale", "GpuRouterCpuPathSaturated")

# One fake GPU through the agent's real nvidia-smi backend; /srv/smi-fail makes it fail as without a driver.
FAKE_SMI = """#!/bin/sh
if [ -e /srv/smi-fail ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9
fi
case "$1" in
  --query-gpu=index,uuid,name,memory.total,memory.used,memory.free) echo "0, GPU-00000000-fake, Fake GPU, 16384, 500, 15884";;
  --query-gpu=driver_version) echo "550.00";;
esac
exit 0
"""

CONFIG = f"""
[gpu]
backend = "nvidia-smi"
sample_interval = "0.5s"

[agent]
metrics_dir = "{TEXTFILE_DIR}"

[workloads.hog]
binary = "/usr/bin/python3"
probe = "file-size"
threshold = 1                 # every input is over: CPU
max_cpu_jobs = 1              # one CPU slot: a second job is BLOCKED
max_gpu_jobs = 1
cpu_memory_max = 200          # MiB: the runaway's limit
scope = "required"
"""

ALLOC = """
import sys, time
block = bytearray(int(sys.argv[1]) * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(float(sys.argv[2]))
"""

INSTALL = srcinstall.TREE + "mkdir -p /var/lib/prometheus/node-exporter\n" + srcinstall.START


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def box():
    require_lane()
    for tool in (NODE_EXPORTER, PROMTOOL):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing (apt-get install prometheus-node-exporter prometheus; .ci/deps)")
    c = harness.Container(packages=harness.PACKAGES_WITH_METRICS)
    c.start()
    exporter = None
    try:
        c.write_file("/etc/gpu-router/config.toml", CONFIG)
        c.write_file("/srv/alloc.py", ALLOC)
        c.write_file("/srv/input", "x" * 100)
        c.write_file("/usr/local/bin/nvidia-smi", FAKE_SMI, mode=0o755)
        c.run(INSTALL, timeout=120)
        c.add_user("runner", groups=["gpu-router"])
        port = _free_port()
        exporter = subprocess.Popen(
            [NODE_EXPORTER, "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={c.host_path(TEXTFILE_DIR)}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        c.url = f"http://127.0.0.1:{port}/metrics"
        c.wait_for(lambda: _get(c.url), timeout=20, interval=0.1)
        yield c
    finally:
        if exporter is not None:
            os.killpg(exporter.pid, signal.SIGTERM)
            exporter.wait(10)
        c.stop()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def scrape(box):
    """{(name, labels...): value} of gpu_router_* series as node_exporter serves them (the scrape must be clean)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(box.url)
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "node_textfile_scrape_error":
                assert s.value == 0, text
            if s.name.startswith("gpu_router_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(series, name, **labels):
    return sum(v for (n, lab), v in series.items()
               if n == name and all(dict(lab).get(k) == v2 for k, v2 in labels.items()))


def until(box, predicate, timeout=30):
    """The first scrape that satisfies predicate."""
    found = {}

    def check():
        s = found["last"] = scrape(box)
        return predicate(s)
    try:
        box.wait_for(check, timeout=timeout, interval=0.25)
    except TimeoutError:
        interesting = {k: v for k, v in found.get("last", {}).items() if v and not k[0].endswith(("_bucket", "_sum"))}
        log = box.run(["journalctl", "-u", "gpu-router-agent", "--no-pager", "-n", "30"], check=False).stdout
        raise AssertionError(f"not reached; last scrape's non-zero series: {interesting}\n{log}") from None
    return found["last"]


def capture(box, predicate, timeout=30):
    """Two scrapes 1.2 s apart once predicate holds: (first, second, time of the second)."""
    first = until(box, predicate, timeout)
    time.sleep(1.2)
    second = scrape(box)
    assert predicate(second), second
    return first, second, time.time()


TS = "gpu_router_last_sample_timestamp_seconds"
BEFORE, AFTER = 15, 20  # points (one a minute) before and after the scenario starts


def _fmt(v):
    return format(v, ".10g")


def _part(cap, key, start_min, points, present_before):
    """promtool's expanding notation for one series over ``points`` minutes from ``start_min``."""
    first, second, when = cap
    if key not in second:
        # gone: a stale marker where it was there before (as Prometheus writes when a series ends), then nothing
        return ("stale " + f"_x{points - 1}") if present_before else f"_x{points}"
    value = second[key]
    if key[0] == TS:
        age = when - value
        start = start_min * 60 - age
        step = 60 if first.get(key) != value else 0   # advancing (agent sampling) or frozen
        return f"{_fmt(start)}+{step}x{points - 1}"
    return f"{_fmt(value)}+0x{points - 1}"


def _labels(name, labels):
    inner = ",".join(f'{k}="{v}"' for k, v in list(labels) + [("instance", "gpu-host:9100"), ("job", "node")])
    return f"{name}{{{inner}}}"


def promtool_case(before, after, expect):
    """One test group: ``before`` held 15 minutes, then ``after`` held 20; ``expect``: {minute: {alert labels}}."""
    keys = sorted(set(before[1]) | set(after[1]))
    series = []
    for key in keys:
        values = _part(before, key, 0, BEFORE, False) + " " + _part(after, key, BEFORE, AFTER, key in before[1])
        series.append({"series": _labels(*key), "values": values})
    tests = []
    for minute, alerts in sorted(expect.items()):
        tests.append({"expr": 'sum by (alertname, workload, gpu, result) (ALERTS{alertstate="firing"})',
                      "eval_time": f"{minute}m",
                      "exp_samples": [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in sorted(a)) + "}",
                                       "value": 1} for a in alerts]})
    return {"interval": "1m", "input_series": series, "promql_expr_test": tests}


def run_promtool(tmp_path, cases):
    shutil.copy(RULES, tmp_path / "gpu-router.rules.yml")
    doc = {"rule_files": ["gpu-router.rules.yml"], "evaluation_interval": "1m", "tests": cases}
    (tmp_path / "tests.yml").write_text(json.dumps(doc, indent=1))  # JSON is YAML
    p = subprocess.run([PROMTOOL, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    return p


def alert(name, **labels):
    return frozenset([("alertname", name)] + list(labels.items()))


def gpu_router(box, *args, user="runner", timeout=60):
    """The wrapper's exit status, as its caller sees it (a shell in a unit: systemd-run says 255 for a signal)."""
    out = box.run_unit(f"gpu-router run --workload hog -- {' '.join(args)} >/dev/null 2>/tmp/wrapper.err; echo $?",
                       user=user, timeout=timeout).stdout
    return int(out.split()[-1])


def test_every_alert_fires_on_its_scenario_and_stays_quiet_otherwise(box, tmp_path):
    up = lambda s: total(s, "gpu_router_agent_up") == 1 and total(s, "gpu_router_backend_up") == 1  # noqa: E731
    c0 = capture(box, up)
    assert total(c0[1], "gpu_router_jobs_blocked_total") == 0
    assert ("gpu_router_jobs_blocked_total", (("reason", "cpu-slots-full"), ("workload", "hog"))) in c0[1]

    # 1. The one CPU slot held by a job, six more BLOCKED: BLOCKED rate, then the CPU path saturated.
    script = textwrap.dedent("""
        gpu-router run --workload hog -- /srv/alloc.py 10 8 /srv/input >/dev/null 2>&1 &
        sleep 1.5
        for i in 1 2 3 4 5 6; do gpu-router run --workload hog -- /srv/alloc.py 1 0 /srv/input 2>/dev/null; echo "rc=$?"; done
    """)
    out = box.run_unit(script, user="runner", timeout=60).stdout
    assert out.split() == ["rc=75"] * 6, out
    c1 = capture(box, lambda s: total(s, "gpu_router_jobs_blocked_total", reason="cpu-slots-full") == 6
                 and total(s, "gpu_router_slots_busy", pool="cpu") == 1)
    c2 = capture(box, lambda s: total(s, "gpu_router_slots_busy", pool="cpu") == 0
                 and total(s, "gpu_router_jobs_finished_total") == 1, timeout=30)

    # 2. A runaway killed by the OOM killer in its 200 MiB scope.
    assert gpu_router(box, "/srv/alloc.py", "400", "1", "/srv/input") == 137
    c3 = capture(box, lambda s: total(s, "gpu_router_jobs_finished_total", result="oom-kill") == 1)

    # 3. The GPU backend fails (as without a driver): the GPU it knew is unhealthy, the backend down.
    box.run(["touch", "/srv/smi-fail"])
    c4 = capture(box, lambda s: total(s, "gpu_router_backend_up") == 0)
    assert total(c4[1], "gpu_router_backend_error_info", reason="init-failed") == 1
    assert total(c4[1], "gpu_router_gpu_healthy", gpu="0", uuid="GPU-00000000-fake") == 0
    box.run(["rm", "/srv/smi-fail"])
    until(box, lambda s: total(s, "gpu_router_backend_up") == 1)

    # 4. The agent stops (socket too, so that nothing starts it again): the file says so.
    box.run(["systemctl", "stop", "gpu-router-agent.socket", "gpu-router-agent.service"])
    c5 = capture(box, lambda s: total(s, "gpu_router_agent_up") == 0)
    assert total(c5[1], "gpu_router_gpu_healthy") == 0 and not any(k[0] == "gpu_router_gpu_healthy" for k in c5[1])

    hog = {"workload": "hog"}
    cases = [
        promtool_case(c0, c1, {14: [], 22: [alert("GpuRouterBlockedRateHigh", **hog)],
                               27: [alert("GpuRouterCpuPathSaturated", **hog)]}),
        promtool_case(c2, c3, {14: [], 16: [alert("GpuRouterJobOomKilled", result="oom-kill", **hog)]}),
        promtool_case(c3, c4, {14: [], 21: [alert("GpuRouterGpuUnhealthy", gpu="0"),
                                            alert("GpuRouterGpuBackendDown")]}),
        promtool_case(c3, c5, {14: [], 21: [alert("GpuRouterAgentStale")]}),
    ]
    p = run_promtool(tmp_path, cases)
    assert p.returncode == 0, p.stdout + p.stderr
    fired = {a for case in cases for t in case["promql_expr_test"] for a in [s["labels"] for s in t["exp_samples"]]}
    assert {a for a in ALERTS if any(f'alertname="{a}"' in f for f in fired)} == set(ALERTS)

    # The test itself can fail: the same scrapes with the scenario's alert expected before it happened do fail.
    wrong = [promtool_case(c0, c1, {14: [alert("GpuRouterBlockedRateHigh", **hog)]})]
    assert run_promtool(tmp_path, wrong).returncode != 0

    # 5. Counters and the journal cursor survive a restart; what the wrapper did meanwhile is counted.
    before = c5[1]
    rc = gpu_router(box, "/srv/alloc.py", "1", "0", "/srv/input", user="root")  # root makes its own scope
    assert rc == 0, box.run(["cat", "/tmp/wrapper.err"]).stdout
    box.run(["systemctl", "start", "gpu-router-agent.socket", "gpu-router-agent.service"])
    routed = dict(workload="hog", mode="CPU", reason="over-threshold")
    after = until(box, lambda s: total(s, "gpu_router_agent_up") == 1
                  and total(s, "gpu_router_jobs_routed_total", **routed)
                  == total(before, "gpu_router_jobs_routed_total", **routed) + 1)
    for name in ("gpu_router_jobs_blocked_total", "gpu_router_jobs_finished_total"):
        assert total(after, name) == total(before, name), name
    assert total(after, "gpu_router_jobs_finished_total", result="oom-kill") == 1
