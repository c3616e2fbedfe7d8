"""`gpu-router stats` arithmetic and advice on journal entries as journalctl -o json writes them (the lane in
tests/systemd reads a real journal)."""

from gpu_router.ops import stats


def ev(kind, workload="w", **fields):
    e = {"GPU_ROUTER_EVENT": kind, "GPU_ROUTER_WORKLOAD": workload}
    e.update({f"GPU_ROUTER_{k}": v for k, v in fields.items()})
    return e


def test_counts_by_mode_reason_and_result():
    events = [ev("routed", MODE="GPU", REASON="under-threshold"), ev("routed", MODE="CPU", REASON="over-threshold"),
              ev("blocked", MODE="BLOCKED", REASON="cpu-slots-full"), ev("job-finished", RESULT="success"),
              ev("job-finished", RESULT="oom-kill"), ev("probe-failed", REASON="input-missing"),
              ev("routed", workload="other", MODE="GPU", REASON="under-threshold")]
    per = stats.summarize(events)
    w = per["w"]
    assert (w["GPU"], w["CPU"], w["BLOCKED"], w["probe_failed"]) == (1, 1, 1, 1)
    assert w["reasons"] == {"GPU:under-threshold": 1, "CPU:over-threshold": 1, "BLOCKED:cpu-slots-full": 1}
    assert w["results"] == {"success": 1, "oom-kill": 1}
    assert per["other"]["GPU"] == 1
    assert any("OOM" in tip for tip in w["advice"]) and any("explain" in tip for tip in w["advice"])


def test_advice_names_the_pool_that_blocks():
    cpu_bound = [ev("routed", MODE="CPU", REASON="over-threshold")] + \
        [ev("blocked", MODE="BLOCKED", REASON="cpu-slots-full")] * 5
    tips = stats.summarize(cpu_bound)["w"]["advice"]
    assert any("CPU slots" in t for t in tips) and not any("on the GPU" in t for t in tips)
    gpu_bound = [ev("routed", MODE="GPU", REASON="under-threshold")] * 10 + \
        [ev("blocked", MODE="BLOCKED", REASON="gpu-slots-full")] * 4
    tips = stats.summarize(gpu_bound)["w"]["advice"]
    assert any("on the GPU" in t for t in tips) and not any("CPU slots" in t for t in tips)
    quiet = [ev("routed", MODE="GPU", REASON="under-threshold")] * 10
    assert stats.summarize(quiet)["w"]["advice"] == []


def test_other_users_processes_are_counted_per_gpu_and_advised_against_the_reserve():
    events = [ev("vram-foreign", workload=None, DEVICE="0", PID="41", COMM="python3", USED_VRAM_MB="6000"),
              ev("vram-foreign", workload=None, DEVICE="0", PID="42", COMM="blender", USED_VRAM_MB="2000"),
              ev("vram-foreign", workload=None, DEVICE="1", PID="43", COMM="x", USED_VRAM_MB="not a number"),
              ev("routed", MODE="GPU", REASON="vram-fits")]
    assert set(stats.summarize(events)) == {"w"}  # a GPU's event is no workload's
    g = stats.foreign(events, reserve_mb=0)
    assert set(g) == {"0"} and (g["0"]["events"], g["0"]["largest_mb"], g["0"]["largest_comm"]) == (2, 6000, "python3")
    assert any("reserve_mb = 6000" in t for t in g["0"]["advice"])
    assert stats.foreign(events, reserve_mb=6000)["0"]["advice"] == []      # already held back
    assert stats.foreign(events, reserve_mb=None)["0"]["advice"] == []      # no config: no advice, still counted
