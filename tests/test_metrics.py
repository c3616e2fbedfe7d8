"""The agent's metrics (daemon/metrics.py): what the wrapper decides, counted from its real events; counters that
start at 0 and survive a restart; staleness and failure as series of their own; the file through prometheus_client.

The wrapper runs for real here (its events go to stderr as JSON lines, the same fields journald stores); the
journald reading itself (journal.Reader from a cursor) runs on a booted systemd in tests/systemd/test_metrics_lane.py.
"""
import os
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_router import config as gr_config
from gpu_router import slots
from gpu_router.daemon import metrics
from helpers import Rig, gpu_entry


def samples(text):
    """{(sample name, frozenset(labels)): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text, name, **labels):
    return samples(text).get((name, frozenset(labels.items())))


class Log:
    def __init__(self):
        self.lines = []

    def warning(self, message, **fields):
        self.lines.append(("warning", message, fields))

    def info(self, message, **fields):
        self.lines.append(("info", message, fields))


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    (tmp_path / "rig").mkdir()
    r = Rig(tmp_path / "rig", gr_bin, clean_env, {
        "tx": {"probe": "file-size", "threshold": 100, "max_gpu_jobs": 1, "max_cpu_jobs": 1},
        "be": {"probe": "file-size", "threshold": 100, "scope": "best-effort", "max_cpu_jobs": 1},
        "wt": {"probe": "file-size", "threshold": 100, "max_gpu_jobs": 0, "max_cpu_jobs": 1, "wait": "0.3s"},
    })
    r.write_snapshot([gpu_entry(0)])
    return r


def load(rig):
    return gr_config.load(str(rig.config))


def test_every_known_series_is_exported_at_zero_before_the_first_event(rig, tmp_path):
    m = metrics.Metrics(str(tmp_path / "state"))
    cfg = load(rig)
    m.seed(cfg)
    m.update(cfg, None, [])
    text = m.text()
    for workload in ("tx", "be", "wt"):
        assert value(text, "gpu_router_jobs_blocked_total", workload=workload, reason="cpu-slots-full") == 0
        assert value(text, "gpu_router_jobs_finished_total", workload=workload, mode="GPU", result="oom-kill") == 0
        assert value(text, "gpu_router_probe_failures_total", workload=workload, reason="input-missing") == 0
        assert value(text, "gpu_router_scope_failures_total", workload=workload) == 0
        assert value(text, "gpu_router_job_duration_seconds_count", workload=workload, mode="CPU") == 0
        assert value(text, "gpu_router_jobs_running", workload=workload, mode="GPU") == 0
    assert value(text, "gpu_router_config_errors_total") == 0


def test_wrapper_decisions_from_its_real_events_are_counted(rig, tmp_path):
    """BLOCKED by reason, probe failures, scope failures, waits and routes, from the events the wrapper wrote."""
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 10)
    big.write_bytes(b"x" * 500)
    events = []
    events += rig.run("tx", small).events                       # GPU under-threshold
    events += rig.run("tx", big).events                         # CPU over-threshold
    events += rig.run("tx", tmp_path / "missing").events        # probe failed, then CPU probe-failed
    events += rig.run("be", big).events                         # no systemd here: scope-failed, then routed
    rig.lock_dir.mkdir(exist_ok=True)
    dir_fd = slots.open_lock_dir(str(rig.lock_dir))
    held = slots.try_slot(dir_fd, str(rig.lock_dir), "tx", "cpu", 1)
    held_wt = slots.try_slot(dir_fd, str(rig.lock_dir), "wt", "cpu", 1)
    try:
        r = rig.run("tx", big)
        assert r.rc == 75, r
        events += r.events                                      # BLOCKED cpu-slots-full
        r = rig.run("wt", big)
        assert r.rc == 75, r
        events += r.events                                      # waited 0.3 s, then BLOCKED
    finally:
        os.close(held[0])
        os.close(held_wt[0])
        os.close(dir_fd)
    m = metrics.Metrics(str(tmp_path / "state"))
    cfg = load(rig)
    m.seed(cfg)
    assert sum(m.count_event(e) for e in events) == len(events)
    m.update(cfg, None, [])
    text = m.text()
    assert value(text, "gpu_router_jobs_routed_total", workload="tx", mode="GPU", reason="under-threshold") == 1
    assert value(text, "gpu_router_jobs_routed_total", workload="tx", mode="CPU", reason="over-threshold") == 1
    assert value(text, "gpu_router_jobs_routed_total", workload="tx", mode="CPU", reason="probe-failed") == 1
    assert value(text, "gpu_router_probe_failures_total", workload="tx", reason="no-input") == 1
    assert value(text, "gpu_router_scope_failures_total", workload="be") == 1
    assert value(text, "gpu_router_jobs_blocked_total", workload="tx", reason="cpu-slots-full") == 1
    assert value(text, "gpu_router_jobs_blocked_total", workload="wt", reason="cpu-slots-full") == 1
    assert value(text, "gpu_router_jobs_waited_total", workload="wt", outcome="blocked") == 1
    assert value(text, "gpu_router_job_wait_seconds_count", workload="wt") == 1
    assert value(text, "gpu_router_job_wait_seconds_bucket", workload="wt", le="0.25") == 0
    assert value(text, "gpu_router_job_wait_seconds_bucket", workload="wt", le="0.5") == 1


def test_wrapper_exec_failure_counts_as_a_failed_result(rig, tmp_path):
    rig.doc["workloads"]["tx"]["binary"] = str(tmp_path / "no-such-binary")
    rig.rewrite()
    (tmp_path / "in").write_bytes(b"x" * 500)
    r = rig.run("tx", tmp_path / "in")
    assert r.rc == 127
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(load(rig))
    for e in r.events:
        m.count_event(e)
    text = m.text()
    assert value(text, "gpu_router_jobs_finished_total", workload="tx", mode="CPU", result="failed") == 1
    assert value(text, "gpu_router_job_exit_statuses_total", workload="tx", status="127") == 1


def test_counters_survive_a_restart_and_seeding_keeps_them(rig, tmp_path):
    state = str(tmp_path / "state")
    cfg = load(rig)
    m = metrics.Metrics(state)
    m.seed(cfg)
    m.job_finished({"WORKLOAD": "tx", "MODE": "GPU", "RESULT": "oom-kill", "EXIT_STATUS": 137, "DURATION_S": 42.0,
                    "PEAK_RAM_MB": 3000.0, "PEAK_VRAM_MB": 5000})
    m.store.cursor = "s=abc;i=1"
    assert m.save()
    again = metrics.Metrics(state)
    again.seed(cfg)
    again.update(cfg, None, [])
    text = again.text()
    assert again.store.cursor == "s=abc;i=1"
    assert value(text, "gpu_router_jobs_finished_total", workload="tx", mode="GPU", result="oom-kill") == 1
    assert value(text, "gpu_router_jobs_finished_total", workload="tx", mode="GPU", result="success") == 0
    assert value(text, "gpu_router_job_duration_seconds_bucket", workload="tx", mode="GPU", le="30.0") == 0
    assert value(text, "gpu_router_job_duration_seconds_bucket", workload="tx", mode="GPU", le="60.0") == 1
    assert value(text, "gpu_router_job_duration_seconds_sum", workload="tx", mode="GPU") == 42.0
    assert value(text, "gpu_router_job_peak_vram_bytes_bucket", workload="tx", le="8.589934592e+09") == 1
    assert value(text, "gpu_router_job_peak_ram_bytes_count", workload="tx", mode="GPU") == 1


def test_health_is_0_or_1_with_gpu_and_uuid_and_its_reason_is_a_series_of_its_own(rig, tmp_path):
    cfg = load(rig)
    m = metrics.Metrics(str(tmp_path / "state"))
    snap = {"time": 1700000000.5, "source": "nvml", "error": None,
            "gpus": [gpu_entry(0), gpu_entry(1, healthy=False, health="xid-79")]}
    m.update(cfg, snap, [])
    text = m.text()
    u0, u1 = snap["gpus"][0]["uuid"], snap["gpus"][1]["uuid"]
    assert value(text, "gpu_router_gpu_healthy", gpu="0", uuid=u0) == 1
    assert value(text, "gpu_router_gpu_healthy", gpu="1", uuid=u1) == 0
    assert value(text, "gpu_router_gpu_health_info", gpu="1", uuid=u1, health="xid-79") == 1
    assert value(text, "gpu_router_gpu_memory_bytes", gpu="0", uuid=u0, kind="total") == 16384 * metrics.MiB
    assert value(text, "gpu_router_gpu_vram_reservable_bytes", gpu="0", uuid=u0) == 16384 * metrics.MiB
    assert value(text, "gpu_router_last_sample_timestamp_seconds") == 1700000000.5
    assert value(text, "gpu_router_backend_up") == 1
    assert value(text, "gpu_router_info", version=metrics.__version__, backend="nvml") == 1
    assert value(text, "gpu_router_slots", workload="tx", pool="gpu") == 2
    assert value(text, "gpu_router_slots", workload="tx", pool="cpu") == 1


def test_a_backend_failing_after_a_restart_still_shows_its_gpus_unhealthy(rig, tmp_path):
    """Issue 14: with the backend failing at start there were no GPU series at all; gpu_healthy == 0 never fired."""
    cfg = load(rig)
    state = str(tmp_path / "state")
    m = metrics.Metrics(state)
    m.update(cfg, {"time": 1700000000.0, "source": "nvml", "error": None, "gpus": [gpu_entry(0)]}, [])
    m.save()
    restarted = metrics.Metrics(state)
    restarted.update(cfg, {"time": 1700000100.0, "source": "nvml", "error": "init-failed: driver not loaded",
                           "gpus": []}, [])
    text = restarted.text()
    uuid = gpu_entry(0)["uuid"]
    assert value(text, "gpu_router_gpu_healthy", gpu="0", uuid=uuid) == 0
    assert value(text, "gpu_router_gpu_health_info", gpu="0", uuid=uuid, health="backend-error") == 1
    assert value(text, "gpu_router_backend_up") == 0
    assert value(text, "gpu_router_backend_error_info", source="nvml", reason="init-failed") == 1
    assert value(text, "gpu_router_last_sample_timestamp_seconds") is None  # never succeeded since this start


def test_stopping_marks_the_file_down(rig, tmp_path):
    cfg = load(rig)
    (tmp_path / "prom").mkdir()
    cfg.agent.metrics_dir = str(tmp_path / "prom")
    m = metrics.Metrics(str(tmp_path / "state"))
    snap = {"time": 1700000000.0, "source": "nvml", "error": None, "gpus": [gpu_entry(0)]}
    m.publish(cfg, snap, [])
    text = (tmp_path / "prom" / metrics.FILE_NAME).read_text()
    assert value(text, "gpu_router_agent_up") == 1
    m.stop(cfg)
    text = (tmp_path / "prom" / metrics.FILE_NAME).read_text()
    assert value(text, "gpu_router_agent_up") == 0
    assert value(text, "gpu_router_gpu_healthy", gpu="0", uuid=gpu_entry(0)["uuid"]) is None  # no frozen healthy=1
    assert value(text, "gpu_router_last_sample_timestamp_seconds") == 1700000000.0
    assert value(text, "gpu_router_jobs_finished_total", workload="tx", mode="CPU", result="success") == 0
    # where the file is, for debian/postrm
    assert (tmp_path / "state" / metrics.EXPORTED_NAME).read_text() == str(tmp_path / "prom" / metrics.FILE_NAME) + "\n"


def test_moving_metrics_dir_removes_the_old_file(rig, tmp_path):
    cfg = load(rig)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    m = metrics.Metrics(str(tmp_path / "state"))
    cfg.agent.metrics_dir = str(tmp_path / "a")
    m.publish(cfg, None, [])
    assert (tmp_path / "a" / metrics.FILE_NAME).exists()
    cfg.agent.metrics_dir = str(tmp_path / "b")
    m.publish(cfg, None, [])
    assert not (tmp_path / "a" / metrics.FILE_NAME).exists()
    assert (tmp_path / "b" / metrics.FILE_NAME).exists()


def test_an_unwritable_metrics_dir_warns_once_until_it_works_again(rig, tmp_path):
    cfg = load(rig)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    log = Log()
    m = metrics.Metrics(str(tmp_path / "state"), log=log)
    cfg.agent.metrics_dir = str(blocker)  # ENOTDIR for anyone, root included
    for _ in range(5):
        m.publish(cfg, None, [])
    assert [x[0] for x in log.lines] == ["warning"]
    blocker.unlink()
    blocker.mkdir()
    m.publish(cfg, None, [])
    m.publish(cfg, None, [])
    assert [x[0] for x in log.lines] == ["warning", "info"]
    assert sorted(p.name for p in blocker.iterdir()) == [metrics.FILE_NAME]


def test_slots_busy_reads_proc_locks_without_taking_a_lock(rig, tmp_path):
    cfg = load(rig)
    rig.lock_dir.mkdir(exist_ok=True)
    dir_fd = slots.open_lock_dir(str(rig.lock_dir))
    held = slots.try_slot(dir_fd, str(rig.lock_dir), "tx", "cpu", 1)
    try:
        m = metrics.Metrics(str(tmp_path / "state"))
        m.update(cfg, {"time": 1.0, "source": "nvml", "error": None, "gpus": [gpu_entry(0)]}, [])
        text = m.text()
        assert value(text, "gpu_router_slots_busy", workload="tx", pool="cpu") == 1
        assert value(text, "gpu_router_slots_busy", workload="tx", pool="gpu") == 0
    finally:
        os.close(held[0])
        os.close(dir_fd)


@pytest.mark.skipif(shutil.which("promtool", path="/usr/bin:/bin") is None and not os.environ.get("CI"),
                    reason="promtool (Debian's prometheus) is not installed")
def test_promtool_accepts_the_exposition(rig, tmp_path):
    cfg = load(rig)
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(cfg)
    m.job_finished({"WORKLOAD": "tx", "MODE": "CPU", "RESULT": "success", "EXIT_STATUS": 0, "DURATION_S": 3.0})
    m.update(cfg, {"time": 1.0, "source": "nvml", "error": None, "gpus": [gpu_entry(0)]}, [])
    p = subprocess.run(["promtool", "check", "metrics"], input=m.text(), capture_output=True, text=True)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), p


@pytest.mark.skipif(shutil.which("promtool", path="/usr/bin:/bin") is None and not os.environ.get("CI"),
                    reason="promtool (Debian's prometheus) is not installed")
def test_promtool_accepts_the_example_alert_rules():
    rules = os.path.join(os.path.dirname(__file__), "..", "packaging", "prometheus", "gpu-router.rules.yml")
    p = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
    assert p.returncode == 0 and "SUCCESS: 6 rules found" in p.stdout, p


def test_every_exported_metric_is_documented_in_the_readme_and_the_man_page(rig, tmp_path):
    cfg = load(rig)
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(cfg)
    m.update(cfg, {"time": 1.0, "source": "nvml", "error": "gpu-lost: x",
                   "gpus": [dict(gpu_entry(0), utilization=50)]}, [])
    families = {f.name for f in text_string_to_metric_families(m.text())}
    exported = {n[:-len("_total")] if n.endswith("_total") else n for n in families}
    declared = {n[:-len("_total")] if n.endswith("_total") else n
                for n in list(metrics.COUNTERS) + list(metrics.HISTOGRAMS) + list(metrics.GAUGES)}
    assert exported <= declared
    repo = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(repo, "README.md")).read()
    man = open(os.path.join(repo, "packaging", "man", "gpu-router-agent.8")).read()
    for name in list(metrics.COUNTERS) + list(metrics.HISTOGRAMS) + list(metrics.GAUGES):
        assert f"`{name}`" in readme, name
        assert f" {name}" in man, name


def test_every_metric_the_docs_name_is_exported():
    """The other way round (issue 20): HACKING said gpu_router_drained, docs/fleet.md gpu_router_gpu_memory_mib."""
    import glob
    import re

    repo = os.path.join(os.path.dirname(__file__), "..")
    declared = set(metrics.COUNTERS) | set(metrics.HISTOGRAMS) | set(metrics.GAUGES)
    files = [os.path.join(repo, n) for n in ("README.md", "HACKING.md")] + sorted(
        glob.glob(os.path.join(repo, "docs", "**", "*.md"), recursive=True)
        + glob.glob(os.path.join(repo, "packaging", "man", "*"))
        + glob.glob(os.path.join(repo, "packaging", "prometheus", "*")))
    unknown = set()
    for path in files:
        text = open(path).read().replace("\\_", "_")
        for name in re.findall(r"gpu_router_[a-z_]+[a-z]", text):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if name not in declared and base not in declared:
                unknown.add(f"{os.path.relpath(path, repo)}: {name}")
    assert not unknown, sorted(unknown)



@pytest.mark.parametrize("content,warned", [
    ("{", ["warning"]),
    ('{"version": 1, "counters": {"gpu_router_jobs_blocked_total": 5}}', ["warning"]),
    ('{"version": 1, "counters": {"gpu_router_jobs_blocked_total": [[1, 2]]}}', ["warning"]),
    ("[]", []),  # valid JSON, not ours: nothing to keep, nothing to say
])
def test_a_damaged_state_file_starts_the_counters_again_with_a_warning(rig, tmp_path, content, warned):
    state = tmp_path / "state"
    state.mkdir()
    (state / metrics.STATE_NAME).write_text(content)
    log = Log()
    m = metrics.Metrics(str(state), log=log)
    m.seed(load(rig))
    m.update(load(rig), None, [])
    assert value(m.text(), "gpu_router_jobs_blocked_total", workload="tx", reason="cpu-slots-full") == 0
    assert [x[0] for x in log.lines] == warned


def test_a_vram_profile_without_a_slot_cap_counts_its_reservations(tmp_path, gr_bin, clean_env):
    """admission = "vram" with no max_gpu_jobs (VRAM decides, issue 11): no slot files and no fixed capacity; the
    places held are the workload's live reservations. Before, the metrics took max_gpu_jobs for a number and the
    agent's sample loop died on it."""
    (tmp_path / "rig").mkdir()
    rig = Rig(tmp_path / "rig", gr_bin, clean_env, {
        "vr": {"probe": "file-size", "threshold": 100, "admission": "vram", "gpu_vram_mb": 1000}})
    cfg = load(rig)
    assert cfg.workload("vr").max_gpu_jobs is None
    rig.lock_dir.mkdir(exist_ok=True)
    dir_fd = slots.open_lock_dir(str(rig.lock_dir))
    with slots.Ledger(dir_fd, str(rig.lock_dir)) as ledger:
        fd = ledger.reserve("gpu0", 1000, "vr", "10")
    try:
        m = metrics.Metrics(str(tmp_path / "state"))
        m.update(cfg, {"time": 1.0, "source": "nvml", "error": None, "gpus": [gpu_entry(0)]}, [])
        text = m.text()
        assert value(text, "gpu_router_slots_busy", workload="vr", pool="gpu") == 1
        assert value(text, "gpu_router_slots", workload="vr", pool="gpu") is None
        assert value(text, "gpu_router_slots", workload="vr", pool="cpu") == 1
    finally:
        os.close(fd)
        os.close(dir_fd)
