"""The pure policy: decisions from (profile, metrics, GPU state, reservations), no processes, no files."""

import copy

import pytest

import helpers
from gpu_router import policy
from gpu_router.policy import Gpu


def wl(**kw):
    kw.setdefault("threshold", 3600)
    kw.setdefault("probe", "ffprobe-duration")
    return helpers.workload(**kw)


def gpu(index, total=16384, foreign=0, ours=0, healthy=True, free=None, usage=None, health="ok"):
    return Gpu(index=index, uuid=f"GPU-{index}", total_mb=total, free_mb=free if free is not None else total - foreign - ours,
               foreign_mb=foreign, ours_mb=ours, healthy=healthy, health=health, usage=usage)


# ---- slots mode -----------------------------------------------------------------------------------------------

def test_unknown_metric_goes_to_cpu():
    p = policy.plan(wl(), None, [gpu(0)])
    assert (p.mode, p.reason, p.gpus) == ("CPU", "probe-failed", [])


@pytest.mark.parametrize("value,mode,reason", [(0.5, "GPU", "under-threshold"), (3599.99, "GPU", "under-threshold"),
                                               (3600, "CPU", "over-threshold"), (7200, "CPU", "over-threshold")])
def test_threshold_is_strict(value, mode, reason):
    p = policy.plan(wl(), [value], [gpu(0)])
    assert (p.mode, p.reason) == (mode, reason)


def test_gpu_disabled_profile():
    p = policy.plan(wl(max_gpu_jobs=0), [1.0], [gpu(0)])
    assert (p.mode, p.reason) == ("CPU", "gpu-disabled")


def test_unknown_gpu_state_routes_by_threshold_alone():
    p = policy.plan(wl(), [10.0], None)
    assert (p.mode, p.reason, p.gpus) == ("GPU", "under-threshold", [])  # the caller supplies assumed GPUs
    assert policy.plan(wl(), [4000.0], None).mode == "CPU"


def test_no_gpu_at_all():
    p = policy.plan(wl(), [10.0], [])
    assert (p.mode, p.reason) == ("CPU", "no-gpu")


def test_all_unhealthy_goes_to_cpu():
    p = policy.plan(wl(), [10.0], [gpu(0, healthy=False, health="xid-79"), gpu(1, healthy=False)])
    assert (p.mode, p.reason) == ("CPU", "gpu-unhealthy")


def test_unhealthy_gpu_is_skipped_and_gpus_ordered_by_free_memory():
    gpus = [gpu(0, foreign=8000), gpu(1, healthy=False), gpu(2, foreign=100), gpu(3, foreign=100)]
    p = policy.plan(wl(), [10.0], gpus)
    assert [g.index for g in p.gpus] == [2, 3, 0]


def test_spill_only_where_configured_and_a_cpu_slot_exists():
    assert policy.plan(wl(), [10.0], [gpu(0)]).spill is False
    assert policy.plan(wl(spill_to_cpu=True), [10.0], [gpu(0)]).spill is True
    assert policy.plan(wl(spill_to_cpu=True, max_cpu_jobs=0), [10.0], [gpu(0)]).spill is False


def test_multi_metric_all_must_be_under():
    w = wl(probe=["ffprobe-duration", "video-pixels"], threshold=[3600, 2_073_600])
    assert policy.plan(w, [100.0, 921_600.0], [gpu(0)]).mode == "GPU"
    assert policy.plan(w, [4000.0, 921_600.0], [gpu(0)]).mode == "CPU"
    assert policy.plan(w, [100.0, 8_294_400.0], [gpu(0)]).mode == "CPU"
    assert policy.over_threshold(w, [100.0, 8_294_400.0]) == (1, 8_294_400.0, 2_073_600)
    assert policy.over_threshold(w, [100.0, 100.0]) is None


def test_combine_product():
    w = wl(probe=["ffprobe-duration", "video-pixels"], combine="product", threshold=1e9)
    assert policy.combined_metric(w, [600.0, 921_600.0]) == [552_960_000.0]
    assert policy.plan(w, [600.0, 921_600.0], [gpu(0)]).mode == "GPU"  # each alone would be fine either way
    assert policy.plan(w, [1200.0, 921_600.0], [gpu(0)]).mode == "CPU"  # 1.1e9
    assert policy.plan(w, [3000.0, 100.0], [gpu(0)]).mode == "GPU"  # long but tiny: product decides


def test_plan_does_not_mutate_its_inputs():
    gpus = [gpu(0, foreign=10), gpu(1, foreign=5000)]
    reservations = {"gpu0": [(11, 100)]}
    before = (copy.deepcopy([g.__getattribute__("index") for g in gpus]), copy.deepcopy(reservations))
    policy.plan(wl(admission="vram", gpu_vram_mb=1000), [1.0], gpus, reservations, 512)
    policy.plan(wl(), [1.0], gpus)
    assert ([g.index for g in gpus], reservations) == before


# ---- vram mode ---------------------------------------------------------------------------------------------------

def vram(**kw):
    kw.setdefault("admission", "vram")
    kw.setdefault("gpu_vram_mb", 3700)
    return wl(**kw)


def test_room_mb_counts_reserve_foreign_reservations_and_unattributed_use():
    g = gpu(0, total=16384, foreign=1024, ours=3000, usage={100: 2500, 200: 100, 300: 400})
    # pid 100 reserved 2000 but uses 2500 → counts 2500; pid 200 reserved 3700, uses 100 → 3700;
    # our pid 300 holds no reservation (a job's child): its 400 count as unattributed
    reservations = [(100, 2000), (200, 3700)]
    assert policy.room_mb(g, reservations, 512) == 16384 - 512 - 1024 - (2500 + 3700) - (3000 - 2600)
    assert policy.room_mb(g, [], 0) == 16384 - 1024 - 3000
    assert policy.room_mb(Gpu(index=0, total_mb=None), [], 0) is None


def test_vram_admits_where_there_is_room_most_room_first():
    gpus = [gpu(0, foreign=10000), gpu(1, foreign=1000), gpu(2, foreign=1000), gpu(3, foreign=14000)]
    p = policy.plan(vram(), [10.0], gpus, {}, 0)
    assert (p.mode, p.reason, p.predicted_vram_mb) == ("GPU", "under-threshold", 3700)
    assert [g.index for g in p.gpus] == [1, 2, 0]  # gpu3 has only 2384 MiB of room
    assert p.full_reason is None


def test_vram_reservations_of_live_jobs_take_room():
    gpus = [gpu(0), gpu(1)]
    res = {"gpu0": [(1, 3700), (2, 3700), (3, 3700), (4, 3700)], "gpu1": [(5, 3700)]}
    p = policy.plan(vram(), [10.0], gpus, res, 0)
    assert [g.index for g in p.gpus] == [1]  # gpu0 has 1584 left
    res["gpu1"] = [(5, 3700)] * 4
    p = policy.plan(vram(), [10.0], gpus, res, 0)
    assert (p.mode, p.gpus, p.full_reason) == ("GPU", [], "no-vram-room")


def test_vram_reserve_mb_is_held_back():
    g = [gpu(0, total=4000)]
    assert policy.plan(vram(), [1.0], g, {}, 0).gpus
    p = policy.plan(vram(), [1.0], g, {}, 301)
    assert (p.mode, p.reason) == ("CPU", "vram-too-large")


def test_vram_too_large_for_any_gpu_goes_to_cpu_not_blocked():
    p = policy.plan(vram(gpu_vram_mb=20000), [10.0], [gpu(0), gpu(1)], {}, 0)
    assert (p.mode, p.reason, p.predicted_vram_mb) == ("CPU", "vram-too-large", 20000)


def test_vram_full_with_spill_keeps_gpu_mode_and_spill_flag():
    p = policy.plan(vram(spill_to_cpu=True), [10.0], [gpu(0, foreign=14000)], {}, 0)
    assert (p.mode, p.full_reason, p.spill, p.gpus) == ("GPU", "no-vram-room", True, [])


def test_vram_unknown_state_falls_back_to_threshold_with_prediction():
    p = policy.plan(vram(), [10.0], None, {}, 0)
    assert (p.mode, p.reason, p.predicted_vram_mb) == ("GPU", "under-threshold", 3700)
    p = policy.plan(vram(), [10.0], [Gpu(index=0, total_mb=None)], {}, 0)
    assert p.mode == "GPU" and [g.index for g in p.gpus] == [0]


def test_vram_unhealthy_and_threshold_still_apply():
    assert policy.plan(vram(), [10.0], [gpu(0, healthy=False)], {}, 0).reason == "gpu-unhealthy"
    assert policy.plan(vram(), [5000.0], [gpu(0)], {}, 0).reason == "over-threshold"


def test_linear_vram_model():
    w = vram(vram_model="linear", gpu_vram_mb=0, vram_base_mb=1000, vram_per_unit_mb=0.5)
    assert policy.predict_vram_mb(w, [3000.0]) == 2500
    assert policy.predict_vram_mb(w, [3001.0]) == 2501  # 2500.5 rounds up: never under-predict
    p = policy.plan(w, [3000.0], [gpu(0, total=3000)], {}, 0)
    assert (p.mode, p.predicted_vram_mb) == ("GPU", 2500)
    assert policy.plan(w, [3500.0], [gpu(0, total=2700)], {}, 0).reason == "vram-too-large"


def test_gpu_from_snapshot_entry():
    entry = helpers.gpu_entry(1, total_mb=24000, used_mb=3000, ours_mb=1000,
                              processes=[{"pid": 7, "used_mb": 1000, "ours": True},
                                         {"pid": 8, "used_mb": 2000, "ours": False}])
    g = Gpu.from_snapshot(entry)
    assert (g.index, g.total_mb, g.free_mb, g.foreign_mb, g.ours_mb, g.healthy) == (1, 24000, 21000, 2000, 1000, True)
    assert g.usage == {7: 1000, 8: 2000} and g.key == "gpu1"
    old = {"index": 0, "total_mb": 100, "used_mb": 40}  # no foreign/ours split: all use counts as foreign
    assert Gpu.from_snapshot(old).foreign_mb == 40


def test_assumed_gpus():
    assert [g.index for g in policy.assumed_gpus(None)] == [0]
    assert [g.index for g in policy.assumed_gpus(3)] == [0, 1, 2]
    assert all(g.total_mb is None for g in policy.assumed_gpus(2))


# ---- memory limits and the budget worksheet --------------------------------------------------------------------

def test_memory_max_mb():
    w = wl(cpu_ram_mb=11000, gpu_ram_mb=4000, memory_margin=0.2)
    assert policy.memory_max_mb(w, "CPU") == 13200
    assert policy.memory_max_mb(w, "GPU") == 4800
    assert policy.memory_max_mb(wl(cpu_ram_mb=11000), "GPU") == 13200  # no gpu_ram_mb: the CPU figure
    assert policy.memory_max_mb(wl(cpu_ram_mb=1001, memory_margin=0.1), "CPU") == 1102  # 1101.1 rounds up
    assert policy.memory_max_mb(wl(), "CPU") is None  # nothing known: no limit
    assert policy.memory_max_mb(wl(cpu_ram_mb=11000, cpu_memory_max="off"), "CPU") is None
    assert policy.memory_max_mb(wl(cpu_ram_mb=11000, gpu_memory_max=6000), "GPU") == 6000


def test_budget_matches_the_runbook_worksheet():
    w = wl(gpu_vram_mb=3700, cpu_ram_mb=11000, max_gpu_jobs=2, max_cpu_jobs=1)
    b = policy.budget(w, 8192, 1, 32768, 3072)
    assert b["vram_headroom_mb"] == 8192 - 2 * 3700
    assert b["ram_headroom_mb"] == 32768 - 3072 - 11000
    assert b["suggested_memory_max_mb"] == 13200
    w = wl(gpu_vram_mb=3700, cpu_ram_mb=11000, gpu_ram_mb=3000, max_gpu_jobs=3, max_cpu_jobs=2)
    b = policy.budget(w, 8192, 2, 32768, 3072)
    assert b["vram_headroom_mb"] == 8192 - 3 * 3700 < 0
    assert b["ram_headroom_mb"] == 32768 - 3072 - 2 * 11000 - 3000 * 3 * 2
    b = policy.budget(w, None, 1, None, 3072)
    assert b["vram_headroom_mb"] is None and b["ram_headroom_mb"] is None
    lin = wl(admission="vram", vram_model="linear", vram_per_unit_mb=1.0)
    assert policy.budget(lin, 8192, 1, 32768, 3072)["vram_per_job_mb"] is None


def test_vram_gpu_full_of_foreign_use_is_no_room_now_not_too_large():
    """A foreign process that fills the GPU is transient: BLOCKED (retry later), not a CPU job without spill."""
    p = policy.plan(vram(), [10.0], [gpu(0, foreign=14000)], {}, 0)
    assert (p.mode, p.gpus, p.full_reason, p.spill) == ("GPU", [], "no-vram-room", False)
