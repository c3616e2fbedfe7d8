"""What the operator sees of CUDA OOMs (issue 18): `explain` says an input goes to the CPU because it ran out of GPU
memory before (when, how much); calibrate's fit lies above the runs that ran out of memory (censored samples);
`check` and `stats` apply the runbook's gate (a metric that does not predict VRAM → GPU-first); `stats` counts
OOMs per workload and what their retries did."""

import json
import subprocess
import time

import pytest

import helpers
from gpu_router import oom_memory
from gpu_router.ops import calibrate, stats


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    r = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"probe": "file-size", "threshold": 1000,
                                                         "cpu_args": ["--device", "cpu"]}},
                    host={"gpu_vram_mb": 8192, "ram_mb": 32768, "other_ram_mb": 3072})
    r.state = tmp_path / "state"
    r.doc["agent"] = {"state_dir": str(r.state)}
    r.rewrite()
    return r


def cli(rig, *args):
    return subprocess.run([rig.gr_bin] + [str(a) for a in args], env=rig.env, capture_output=True, text=True,
                          timeout=60)


def remember(rig, path, kind="oom", ended=None):
    m = oom_memory.Memory(str(rig.state))
    m.mark(oom_memory.input_identity(str(path)), kind, ended or time.time(), "w", 7900, 8309, "0", "w-77-abcdef",
           8192, str(path))


def test_explain_tells_the_input_goes_to_the_cpu_because_it_ran_out_of_gpu_memory(rig, tmp_path):
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 100)
    d = json.loads(cli(rig, "explain", "--json", path).stdout)
    assert (d["decision"], d["reason"], d["oom_before"]) == ("GPU", "under-threshold", None)
    remember(rig, path)
    p = cli(rig, "explain", path)
    assert p.returncode == 0, p.stderr
    assert "decision   CPU  (cuda-oom-before)" in p.stdout
    assert "oom before ran out of GPU memory on GPU 0 at " in p.stdout and "(job w-77-abcdef: 7900 MiB of 8192, " \
        "needs more than 8309 MiB); on_gpu_oom = cpu" in p.stdout
    d = json.loads(cli(rig, "explain", "--json", path).stdout)
    assert d["oom_before"]["peak_mb"] == 7900 and d["oom_before"]["how"] == "oom"
    rig.doc["workloads"]["w"]["on_gpu_oom"] = "fail"
    rig.rewrite()
    d = json.loads(cli(rig, "explain", "--json", path).stdout)
    assert (d["decision"], d["reason"]) == ("REFUSED", "cuda-oom-before, on_gpu_oom = fail")


def test_the_wrapper_routes_a_remembered_input_to_the_cpu_and_says_why(rig, tmp_path):
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 100)
    remember(rig, path, kind="suspect", ended=time.time() - 5)
    res = rig.run("w", path)
    assert res.rc == 0
    routed = res.event("routed")
    assert (routed["GPU_ROUTER_MODE"], routed["GPU_ROUTER_REASON"]) == ("CPU", "cuda-oom-suspected")
    assert routed["GPU_ROUTER_OOM_BEFORE"] == "suspect" and routed["GPU_ROUTER_OOM_NEED_MB"] == "8309"
    remember(rig, path, kind="suspect", ended=time.time() - oom_memory.RETRY_WINDOW_S - 5)  # not a quick retry
    res = rig.run("w", path)
    routed = res.event("routed")
    assert (routed["GPU_ROUTER_MODE"], routed["GPU_ROUTER_REASON"]) == ("GPU", "under-threshold")


def test_the_fit_lies_above_the_runs_that_ran_out_of_memory():
    points = [(10, 1010), (20, 1020), (30, 1030), (40, 1040)]
    plain = calibrate.recommend(calibrate.fit(points), points, 0.0)
    censored = [(25, 3000)]
    result = calibrate.fit(points, censored)
    rec = calibrate.recommend(result, points, 0.0)
    assert result["censored"] == 1
    assert rec["vram_base_mb"] + rec["vram_per_unit_mb"] * 25 > 3000 > plain["vram_base_mb"] + \
        plain["vram_per_unit_mb"] * 25
    assert any("ran out of GPU memory" in n for n in rec["notes"])
    # one input that needed three times what its metric says: the metric does not predict VRAM
    assert result["r2"] == pytest.approx(1.0) and result["r2_with_ooms"] < calibrate.GOOD_FIT_R2
    assert rec["strategy"] == "gpu-first" and rec["admission"] is None
    assert any("gpu-first" in n for n in rec["notes"])


def _samples(points, ooms=()):
    return [{"mode": "GPU", "metric": str(x), "result": "success", "peak_vram_mb": y} for x, y in points] + \
        [{"mode": "GPU", "metric": str(x), "result": "cuda-oom", "peak_vram_mb": y} for x, y in ooms]


def test_the_runbooks_gate_on_recorded_samples():
    good = _samples([(10, 1010), (20, 1020), (30, 1030)])
    assert calibrate.predictive_gate(good, "vram") is None
    bad = _samples([(10, 1010), (20, 5020), (30, 1030), (40, 900)], ooms=[(15, 7000)])
    note = calibrate.predictive_gate(bad, "vram")
    assert "does not predict VRAM" in note and "1 ran out of GPU memory" in note and "gpu-first" in note
    assert calibrate.predictive_gate(bad, "gpu-first") is None


def test_check_says_the_metric_does_not_predict_vram(rig):
    (rig.state / "samples").mkdir(parents=True)
    with open(rig.state / "samples" / "w.jsonl", "w") as f:
        for s in _samples([(10, 1010), (20, 5020), (30, 1030), (40, 900)], ooms=[(15, 7000)]):
            f.write(json.dumps(s) + "\n")
    p = cli(rig, "check")
    assert "! the metric does not predict VRAM" in p.stdout, p.stdout
    assert p.returncode == 0                                  # advice, not a blocking problem


def test_stats_count_ooms_per_workload_and_what_their_retries_did():
    ev = [{"GPU_ROUTER_EVENT": "job-finished", "GPU_ROUTER_WORKLOAD": "w", "GPU_ROUTER_RESULT": "cuda-oom",
           "GPU_ROUTER_OOM_CAUSE": "outgrew"},
          {"GPU_ROUTER_EVENT": "job-finished", "GPU_ROUTER_WORKLOAD": "w", "GPU_ROUTER_RESULT": "cuda-oom",
           "GPU_ROUTER_OOM_CAUSE": "squeezed"},
          {"GPU_ROUTER_EVENT": "routed", "GPU_ROUTER_WORKLOAD": "w", "GPU_ROUTER_MODE": "CPU",
           "GPU_ROUTER_REASON": "cuda-oom-before"},
          {"GPU_ROUTER_EVENT": "routed", "GPU_ROUTER_WORKLOAD": "w", "GPU_ROUTER_MODE": "GPU",
           "GPU_ROUTER_REASON": "under-threshold"}]
    w = stats.summarize(ev)["w"]
    assert w["cuda_oom"] == {"outgrew": 1, "squeezed": 1} and w["after_oom"] == {"CPU:cuda-oom-before": 1}
    assert any("2 GPU job(s) ran out of GPU memory" in t for t in w["advice"])


def test_jobs_show_an_oom_and_the_retry_that_followed_it():
    from gpu_router.ops import jobs

    ev = [{"GPU_ROUTER_EVENT": "routed", "GPU_ROUTER_JOB": "w-1-a", "GPU_ROUTER_WORKLOAD": "w",
           "GPU_ROUTER_MODE": "GPU", "GPU_ROUTER_REASON": "under-threshold", "__REALTIME_TIMESTAMP": "1000000"},
          {"GPU_ROUTER_EVENT": "job-finished", "GPU_ROUTER_JOB": "w-1-a", "GPU_ROUTER_RESULT": "cuda-oom",
           "GPU_ROUTER_OOM_CAUSE": "outgrew", "GPU_ROUTER_OOM_MEMORY": "oom", "__REALTIME_TIMESTAMP": "2000000"},
          {"GPU_ROUTER_EVENT": "routed", "GPU_ROUTER_JOB": "w-2-b", "GPU_ROUTER_WORKLOAD": "w",
           "GPU_ROUTER_MODE": "CPU", "GPU_ROUTER_REASON": "cuda-oom-before", "GPU_ROUTER_OOM_JOB": "w-1-a",
           "__REALTIME_TIMESTAMP": "3000000"}]
    first, retry = jobs.join(ev)
    text = jobs.table([first, retry], now=10)
    assert "cuda-oom:outgrew" in text and "CPU(after-oom)" in text
    assert "input remembered (oom)" in jobs.one(first)
    assert "ran out of GPU memory in job w-1-a (cuda-oom-before)" in jobs.one(retry)
    assert [j["job"] for j in jobs.select([first, retry], result="cuda-oom")] == ["w-1-a"]
