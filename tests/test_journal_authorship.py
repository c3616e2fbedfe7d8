"""Journal entries are untrusted input to root (issue 17, items 5-7): an author for every entry, every field as
bounded text, labels bounded by the config, and no member-chosen text reaching a terminal raw.

Entries here are dicts as the two readers give them (journalctl -o json; python3-systemd's Reader with raw values),
with journald's trusted fields (_UID, _SYSTEMD_UNIT) set as journald sets them; the same attacks against a real
journald, a real agent and members' real processes run in tests/systemd/test_journal_authors.py.
"""

import argparse
import datetime
import json
import os
import random
import uuid

import pytest

import helpers
from gpu_router import config as gr_config
from gpu_router import journal_read as R
from gpu_router.daemon import metrics
from gpu_router.journal import MESSAGE_IDS
from gpu_router.ops import common, live, status
from gpu_router.ops import jobs as J
from gpu_router.ops import stats as S

AGENT = {"_UID": "0", "_SYSTEMD_UNIT": "gpu-router-agent.service", "_PID": "300"}
ALICE = {"_UID": "1001", "_SYSTEMD_UNIT": "runner.service", "_PID": "4001"}
MALLORY = {"_UID": "1002", "_SYSTEMD_UNIT": "session-3.scope", "_PID": "5001"}
CONTROL = [chr(c) for c in list(range(0x20)) + [0x7F] + list(range(0x80, 0xA0))] + ["\u202e"]


def ev(author, kind, job=None, t=100.0, **fields):
    e = dict(author, MESSAGE_ID=MESSAGE_IDS[kind], GPU_ROUTER_EVENT=kind, MESSAGE=f"{kind} {job}",
             __REALTIME_TIMESTAMP=str(int(t * 1e6)), SYSLOG_IDENTIFIER="gpu-router")
    if job:
        e["GPU_ROUTER_JOB"] = job
    e.update({f"GPU_ROUTER_{k}": v for k, v in fields.items()})
    return e


def routed(author, job, t=100.0, **fields):
    return ev(author, "routed", job, t, **dict({"WORKLOAD": "w", "MODE": "GPU", "REASON": "under-threshold",
                                                "DEVICE": "0", "PREDICTED_VRAM_MB": "3000"}, **fields))


def finished(author, job, t=110.0, **fields):
    return ev(author, "job-finished", job, t, **dict({"WORKLOAD": "w", "MODE": "GPU", "RESULT": "success",
                                                      "EXIT_STATUS": "0", "DURATION_S": "10.0",
                                                      "PEAK_VRAM_MB": "2900"}, **fields))


def no_control(text):
    bad = [c for c in text if c in CONTROL and c != "\n"]
    assert not bad, f"control characters reach the terminal: {bad!r} in {text!r}"


# ---- authorship -------------------------------------------------------------------------------------------------

def test_a_member_cannot_rewrite_another_members_job():
    """The forged history of issue 17 (5): Mallory writes an oom-kill with 15000 MB for Alice's job."""
    events = [routed(ALICE, "w-4001-aa"), finished(AGENT, "w-4001-aa"),
              finished(MALLORY, "w-4001-aa", t=111, RESULT="oom-kill", EXIT_STATUS="137", PEAK_VRAM_MB="15000"),
              routed(MALLORY, "w-4001-aa", t=112, MODE="CPU", DEVICE="cpu"),
              ev(MALLORY, "blocked", "w-4001-aa", t=113, WORKLOAD="w", MODE="BLOCKED", REASON="gpu-slots-full")]
    kept, ignored = R.trusted(events)
    assert ignored == 3
    [job] = J.join(kept)
    assert (job["result"], job["peak_vram_mb"], job["mode"], job["uid"]) == ("success", 2900, "GPU", 1001)
    assert S.summarize(kept)["w"]["results"] == {"success": 1}


def test_the_agents_events_count_only_from_the_agent():
    foreign = dict(DEVICE="0", PID="77", COMM="x", USED_VRAM_MB="70000")
    as_root_elsewhere = dict(AGENT, _SYSTEMD_UNIT="session-1.scope")
    events = [ev(MALLORY, "vram-foreign", **foreign), ev(as_root_elsewhere, "vram-foreign", **foreign),
              ev(MALLORY, "vram-underpredicted", "w-1-aa", WORKLOAD="w", MEASURED_VRAM_MB="9", PREDICTED_VRAM_MB="1"),
              ev(MALLORY, "gpu-health", DEVICE="0", HEALTH="gpu-lost"), ev(MALLORY, "broker-refused"),
              ev(MALLORY, "agent"), ev(MALLORY, "drain", REASON="drained"),
              ev(AGENT, "vram-foreign", DEVICE="0", PID="78", COMM="blender", USED_VRAM_MB="2000")]
    kept, ignored = R.trusted(events)
    assert ignored == 7 and len(kept) == 1
    g = S.foreign(kept, reserve_mb=0)
    assert g["0"]["largest_mb"] == 2000 and not any("70000" in t for t in g["0"]["advice"])
    assert R.trusted([ev(dict(AGENT, _SYSTEMD_UNIT="x"), "drain", REASON="drained")])[1] == 0  # root's CLI


def test_a_wrapper_job_finished_is_only_ever_an_exec_failure_of_its_own_job():
    own = [routed(ALICE, "w-4001-bb")]
    exec_failed = finished(ALICE, "w-4001-bb", RESULT="failed", EXIT_STATUS="127")  # ALICE's _PID is 4001
    for key in ("DURATION_S", "PEAK_VRAM_MB"):
        exec_failed.pop("GPU_ROUTER_" + key)
    assert R.trusted(own + [exec_failed])[1] == 0
    assert R.trusted(own + [dict(exec_failed, GPU_ROUTER_RESULT="oom-kill")])[1] == 1
    assert R.trusted(own + [dict(exec_failed, GPU_ROUTER_PEAK_VRAM_MB="15000")])[1] == 1
    assert R.trusted(own + [dict(exec_failed, **MALLORY)])[1] == 1
    assert R.trusted([dict(exec_failed, _UID=None)])[1] == 1  # not from journald: nobody vouches for it
    # the first event of its job seen (a --since window that starts after the job's routed): only from the
    # wrapper's own PID, the one in the job id
    assert R.trusted([exec_failed])[1] == 0 and R.trusted([dict(exec_failed, _PID="4002")])[1] == 1
    assert R.trusted([dict(exec_failed, **MALLORY)])[1] == 1


# ---- fields as the readers give them ------------------------------------------------------------------------------

def test_every_field_is_bounded_text_whatever_the_reader_gave():
    raw = {"_UID": 1001, "__REALTIME_TIMESTAMP": datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc),
           "MESSAGE_ID": uuid.UUID(MESSAGE_IDS["routed"]), "GPU_ROUTER_EVENT": b"routed",
           "GPU_ROUTER_JOB": "w-4001-cc",
           "GPU_ROUTER_INPUT": list(b"/d/\x1b[2Jclip\x07.mp3"),        # journalctl -o json: a byte array
           "GPU_ROUTER_WORKLOAD": b"w\xff",                              # not UTF-8
           "GPU_ROUTER_MODE": ["GPU", "CPU"],                            # written twice: no one value
           "GPU_ROUTER_CALLER_UNIT": "x" * 100000, b"GPU_ROUTER_DEVICE": bytearray(b"0"), 42: "odd key"}
    e = R.decode(raw)
    assert e["_UID"] == "1001" and e["__REALTIME_TIMESTAMP"] == str(int(datetime.datetime(
        2026, 1, 2, tzinfo=datetime.timezone.utc).timestamp() * 1e6))
    assert e["MESSAGE_ID"] == MESSAGE_IDS["routed"] and e["GPU_ROUTER_EVENT"] == "routed"
    assert e["GPU_ROUTER_INPUT"] == "/d/\x1b[2Jclip\x07.mp3" and "GPU_ROUTER_MODE" not in e
    assert len(e["GPU_ROUTER_CALLER_UNIT"]) == R.MAX_VALUE and e["GPU_ROUTER_DEVICE"] == "0"
    assert e["GPU_ROUTER_WORKLOAD"] == "w\udcff"
    [job] = J.join([e])
    for text in (J.table([job]), J.one(job)):
        no_control(text)
    assert "\\x1b[2Jclip\\x07.mp3" in J.table([job]) and "w\\xff" in J.one(job)
    assert len(R.decode({f"F{i}": "v" for i in range(10000)})) == R.MAX_FIELDS


@pytest.mark.parametrize("spec,expect", [("-1h", 1e9 - 3600), ("-2d", 1e9 - 172800), ("-1h30min", 1e9 - 5400),
                                         ("+10s", 1e9 + 10), ("1h ago", 1e9 - 3600), ("@12345", 12345),
                                         ("now", 1e9)])
def test_since_takes_journalctls_relative_forms(spec, expect):
    assert R.when(spec, now=1e9) == expect


def test_since_takes_journalctls_absolute_forms_and_refuses_the_rest():
    today = R.when("today", now=1e9)
    assert R.when("yesterday", now=1e9) < today <= 1e9 < R.when("tomorrow", now=1e9)
    assert R.when("2026-01-31 08:00") == R.when("2026-01-31 08:00:00") > R.when("2026-01-31")
    for bad in ("", "soon", "-1parsec", "2026-13-01", "-"):
        with pytest.raises(ValueError):
            R.when(bad, now=1e9)


# ---- the terminal ---------------------------------------------------------------------------------------------------

EVIL = "clip\x1b]0;owned\x07\x1b[2J\x9b31m\nFAKE LINE\u202e.mp3"


def test_emit_escapes_control_characters_but_keeps_lines(capsys):
    common.emit(argparse.Namespace(json=False), None, f"a\n{EVIL}\nb")
    out = capsys.readouterr().out
    no_control(out)
    assert out.count("\n") == 4 and "\\x1b]0;owned\\x07" in out
    common.emit(argparse.Namespace(json=True), {"input": EVIL}, "")
    assert json.loads(capsys.readouterr().out) == {"input": EVIL}  # JSON escapes by itself, and stays exact


def test_status_and_its_job_list_escape_a_members_input_name():
    job = {"pid": 4001, "workload": "w", "user": "alice", "elapsed_s": 5, "mode": "GPU", "device": "0", "slot": 0,
           "vram_used_mb": None, "vram_reserved_mb": 3000, "ram_mb": 1, "memory_max_mb": None,
           "input": "/home/alice/" + EVIL}
    text = live.render([job], [])
    no_control(text)
    assert "FAKE LINE" in text and len(text.splitlines()) == 4  # no line of its own
    data = {"snapshot": {"state": "ok", "age_s": 1, "source": "nvml", "error": None},
            "gpus": [{"index": 0, "name": "GPU\x1b[8m", "healthy": True}], "workloads": {}, "reservations": {},
            "scopes": [], "jobs": [job], "waiting": [],
            "drain": {"action": "cpu", "by": "root\x1b[1m", "reason": "r\x07", "since": None}}
    no_control(status.render(data))


def test_stats_text_escapes_names_from_the_journal(tmp_path, monkeypatch, capsys):
    events = [routed(ALICE, "w-4001-dd", WORKLOAD=EVIL), finished(AGENT, "w-4001-dd", WORKLOAD=EVIL),
              ev(AGENT, "vram-foreign", DEVICE="0", PID="78", COMM="\x1b[31mpython", USED_VRAM_MB="2000")]
    monkeypatch.setattr(S, "read_events", lambda *a, **k: R.trusted(events))
    args = argparse.Namespace(since="-1d", directory=None, chart=None, json=False, config=str(tmp_path / "none"))
    assert S.cmd_stats(args) == 0
    out = capsys.readouterr().out
    no_control(out)
    assert "\\x1b[31mpython" in out


# ---- metrics: labels bounded by the config, zeros from the start ----------------------------------------------------

@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "config.toml"
    helpers.write_toml(path, {"gpu": {"snapshot": str(tmp_path / "gpus.json")},
                              "router": {"lock_dir": str(tmp_path / "locks")},
                              "agent": {"state_dir": str(tmp_path / "state")},
                              "workloads": {"tx": {"binary": "/bin/true", "probe": "file-size", "threshold": 100,
                                                   "max_gpu_jobs": 1, "max_cpu_jobs": 1}}})
    return gr_config.load(str(path), use_cache=False)


def series(m):
    return sum(len(v) for v in m.store.counters.values()) + sum(len(v) for v in m.store.histograms.values())


def test_thousands_of_workload_names_from_members_make_one_label(cfg, tmp_path):
    """Issue 17 (6): 3,000 events with distinct WORKLOAD values grew the files 7x and 35x."""
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(cfg)
    before = series(m)
    for i in range(3000):
        e = R.decode(routed(ALICE, f"w{i}-4001-{i:x}", WORKLOAD=f"w{i}", MODE=f"M{i % 7}", REASON=f"r{i}",
                            WAITED_S="0.5"))
        assert m.count_event(e)
        m.count_event(R.decode(ev(ALICE, "blocked", f"x{i}", WORKLOAD=f"w{i}", REASON=f"r{i}")))
        m.job_finished({"WORKLOAD": f"w{i}", "MODE": "GPU", "RESULT": f"res{i}", "EXIT_STATUS": 1000 + i,
                        "DURATION_S": 1})
    assert series(m) - before <= 12
    m.update(cfg, None, [])
    text = m.text()
    assert "w2999" not in text and "r2999" not in text and "res2999" not in text
    from test_metrics import value

    assert value(text, "gpu_router_jobs_routed_total", workload="other", mode="other", reason="other") == 3000
    assert value(text, "gpu_router_job_exit_statuses_total", workload="other", status="other") == 3000
    assert m.save(force=True)
    assert os.path.getsize(tmp_path / "state" / metrics.STATE_NAME) < 30000


def test_a_saved_file_with_thousands_of_labels_folds_at_the_first_sample(cfg, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    rows = [[["tx", "cpu-slots-full"], 2]] + [[[f"w{i}", "gpu-slots-full"], 1] for i in range(3000)] + [
        [["tx", "r\x1b[2J\n"], 1], [["tx", "r\x07"], 1]]
    hist = [[[f"w{i}"], [1] + [0] * 12 + [0.5]] for i in range(3000)]
    (state / metrics.STATE_NAME).write_text(json.dumps({
        "version": 1, "gpus": {"0": "GPU-0"},
        "counters": {"gpu_router_jobs_blocked_total": rows,
                     "gpu_router_gpu_health_changes_total": [[["x\x1b", "gpu-lost"], 1],
                                                             [["7", "gpu-lost"], 1]]},
        "histograms": {"gpu_router_job_wait_seconds": hist}}))
    m = metrics.Metrics(str(state))
    m.seed(cfg)
    blocked = m.store.counters["gpu_router_jobs_blocked_total"]
    assert blocked[("tx", "cpu-slots-full")] == 2 and blocked[("other", "gpu-slots-full")] == 3000
    assert {k[0] for k in blocked} == {"tx", "other"} and blocked[("tx", "other")] == 2
    health = m.store.counters["gpu_router_gpu_health_changes_total"]
    assert {k[0] for k in health} == {"0", "other"} and health[("other", "gpu-lost")] == 2
    assert "\x1b" not in m.text()
    assert m.store.histograms["gpu_router_job_wait_seconds"][("other",)][0] == 3000
    assert m.save(force=True) and os.path.getsize(state / metrics.STATE_NAME) < 30000


def test_drained_exit_statuses_and_health_changes_are_exported_at_zero(cfg, tmp_path):
    """Issue 20: increase() misses the first drain's BLOCKED jobs, exit statuses and health changes otherwise."""
    m = metrics.Metrics(str(tmp_path / "state"))
    m.update(cfg, {"time": 1.0, "source": "nvml", "error": None, "gpus": [helpers.gpu_entry(0)]}, [])
    m.seed(cfg)
    from test_metrics import value

    text = m.text()
    assert value(text, "gpu_router_jobs_blocked_total", workload="tx", reason="drained") == 0
    assert value(text, "gpu_router_jobs_routed_total", workload="tx", mode="CPU", reason="drained") == 0
    assert value(text, "gpu_router_job_exit_statuses_total", workload="tx", status="137") == 0
    assert value(text, "gpu_router_gpu_health_changes_total", gpu="0", health="gpu-lost") == 0


def test_backend_none_on_a_host_whose_gpus_were_seen_exports_no_unhealthy_gpu(cfg, tmp_path):
    """Issue 20: [gpu] backend = "none" after GPUs were seen left gpu_healthy 0 for ever (the alert never
    cleared)."""
    from test_metrics import value

    m = metrics.Metrics(str(tmp_path / "state"))
    m.update(cfg, {"time": 1.0, "source": "nvml", "error": None, "gpus": [helpers.gpu_entry(0)]}, [])
    assert m.save(force=True)
    cfg.gpu.backend = "none"
    again = metrics.Metrics(str(tmp_path / "state"))
    again.update(cfg, {"time": 2.0, "source": "none", "error": None, "gpus": []}, [])
    assert value(again.text(), "gpu_router_gpu_healthy", gpu="0", uuid=helpers.gpu_entry(0)["uuid"]) is None
    cfg.gpu.backend = "auto"  # a backend that fails as a whole still shows the GPUs it saw, unhealthy
    again.update(cfg, {"time": 3.0, "source": "nvml", "error": "init-failed: x", "gpus": []}, [])
    assert value(again.text(), "gpu_router_gpu_healthy", gpu="0", uuid=helpers.gpu_entry(0)["uuid"]) == 0


# ---- the fuzz: hostile entries through every reader -----------------------------------------------------------------

def _hostile(rng, i):
    pick = rng.choice
    value = pick([lambda: "".join(pick(CONTROL + list("abc/-.0123456789")) for _ in range(rng.randint(0, 40))),
                  lambda: bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))),
                  lambda: list(bytes(rng.randrange(256) for _ in range(rng.randint(0, 20)))),
                  lambda: ["a", "b"], lambda: "x" * rng.choice([5000, 200000]), lambda: rng.randint(-2**70, 2**70),
                  lambda: pick(["nan", "inf", "-inf", "1e400", "-0", "1e15", "127", "reasons", "GPU", "unit"]),
                  lambda: None, lambda: 3.5])
    author = pick([AGENT, ALICE, MALLORY, dict(MALLORY, _SYSTEMD_UNIT="gpu-router-agent.service"), {},
                   {"_UID": [49]}, {"_UID": "0"}])
    e = dict(author)
    e["GPU_ROUTER_EVENT"] = pick(list(MESSAGE_IDS) + ["nope", value()])
    e["__REALTIME_TIMESTAMP"] = str(rng.randint(0, 2 * 10**15))
    e["MESSAGE"] = value()
    for key in rng.sample(["JOB", "WORKLOAD", "MODE", "REASON", "RESULT", "EXIT_STATUS", "DURATION_S", "PEAK_RAM_MB",
                           "PEAK_VRAM_MB", "PREDICTED_VRAM_MB", "MEASURED_VRAM_MB", "USED_VRAM_MB", "DEVICE", "PID",
                           "COMM", "INPUT", "WAITED_S", "HEALTH", "SUPPRESSED", "METRIC", "THRESHOLD", "UNIT",
                           "CALLER_UNIT", "ON_PROBE_ERROR", "SCOPE"], rng.randint(0, 12)):
        e["GPU_ROUTER_" + key] = pick([value(), f"w-{i % 9}-aa", "w", "tx", "GPU", "failed", "127", "0"])
    if rng.random() < 0.1:
        e[pick(["GPU_ROUTER_JOB", "MESSAGE", 7, b"K\xff", "x" * 300])] = value()
    return e


def test_fuzz_hostile_journal_entries_through_jobs_stats_and_metrics(cfg, tmp_path):
    rng = random.Random(17)
    raw = [_hostile(rng, i) for i in range(800)]
    kept, ignored = R.trusted(raw)
    assert kept and ignored
    decoded = [R.decode(e) for e in raw]
    for e in kept:  # nothing the agent writes came from another author
        if e.get("GPU_ROUTER_EVENT") in ("vram-foreign", "gpu-health", "vram-underpredicted", "agent",
                                         "broker-refused") or (e.get("GPU_ROUTER_EVENT") == "job-finished"
                                                               and "GPU_ROUTER_DURATION_S" in e):
            assert R.is_agent(e)
    for events in (kept, decoded):  # the readers take anything decode() gives, believed or not
        jobs = J.settle(J.join(events))
        no_control(J.table(jobs, now=1e9))
        for j in jobs[:50]:
            no_control(J.one(j))
        json.dumps(jobs, default=str)
        per = S.summarize(events)
        S.foreign(events, reserve_mb=100)
        S.metrics_by_mode(events)
        for name, w in per.items():
            S.advice(w)
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(cfg)
    before = series(m)
    authors = R.Authors()
    for e in decoded:
        if authors.check(e):
            m.count_event(e)
    m.update(cfg, None, [])
    text = m.text()
    assert series(m) - before <= 40  # OTHER rows and statuses 0-255 of the agent's own: never one per entry
    labels = {v for fam in m.store.counters.values() for k in fam for v in k}
    assert all(len(v) <= 32 and v.isprintable() for v in labels), labels
    assert m.save(force=True)


def test_one_reader_of_the_journal():
    """Issue 20: stats read through a journalctl subprocess while the metrics used python3-systemd's Reader. Every
    reader goes through journal_read (its decoding and authorship): no other module opens the journal."""
    import pathlib

    agent = pathlib.Path(R.__file__).resolve().parent
    found = []
    for path in sorted(agent.rglob("*.py")):
        if path.name == "journal_read.py":
            continue
        text = path.read_text()
        for needle in ('"journalctl"', "'journalctl'", ".Reader(", "journal.Reader", "sd_journal_open"):
            if needle in text:
                found.append(f"{path.relative_to(agent)}: {needle}")
    assert not found, found


def test_a_config_without_workloads_still_folds_the_saved_labels(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / metrics.STATE_NAME).write_text(json.dumps({"version": 1, "counters": {
        "gpu_router_jobs_blocked_total": [[[f"w{i}", "gpu-slots-full"], 1] for i in range(50)]}}))
    path = tmp_path / "config.toml"
    helpers.write_toml(path, {"agent": {"state_dir": str(state)}})
    m = metrics.Metrics(str(state))
    m.seed(gr_config.load(str(path), use_cache=False))
    assert m.store.counters["gpu_router_jobs_blocked_total"] == {("other", "gpu-slots-full"): 50}


def test_a_members_own_wait_cannot_make_the_histogram_sum_infinite(cfg, tmp_path):
    m = metrics.Metrics(str(tmp_path / "state"))
    m.seed(cfg)
    for _ in range(3):
        m.count_event(R.decode(routed(ALICE, "tx-4001-ee", WORKLOAD="tx", MODE="CPU", REASON="over-threshold",
                                      WAITED_S="1e308")))
    assert m.store.histograms["gpu_router_job_wait_seconds"][("tx",)][-1] == 3 * metrics.MAX_WAIT_S
