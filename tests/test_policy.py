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


# ---- room under lag (issue 11): each admitted job counted once, dead pids never --------------------------------

def ours_gpu(total=16384, foreign=0, procs=()):
    """A GPU whose snapshot says per process whether it is ours and which admitted job (ledger pid) it belongs to."""
    usage = {pid: mb for pid, mb, _ours, _job in procs}
    return Gpu(index=0, uuid="GPU-0", total_mb=total, free_mb=total - foreign - sum(usage.values()),
               foreign_mb=foreign, ours_mb=sum(mb for _p, mb, ours, _j in procs if ours), usage=usage,
               ours={pid for pid, _mb, ours, _j in procs if ours},
               owner={pid: job for pid, _mb, _o, job in procs if job is not None})


def test_finished_jobs_still_in_the_sample_do_not_count_twice():
    """Three 3700 MiB jobs ended after the last sample; three new ones hold reservations: a 4th fits the empty GPU.
    Before: the finished jobs' use counted as unattributed ours on top of the reservations → no-vram-room."""
    g = ours_gpu(procs=[(11, 3700, True, 11), (12, 3700, True, 12), (13, 3700, True, 13)])
    res = {"gpu0": [(21, 3700), (22, 3700), (23, 3700)]}
    assert policy.room_mb(g, res["gpu0"], 0, dead={11, 12, 13}) == 16384 - 3 * 3700
    p = policy.plan(vram(), [10.0], [g], res, 0, dead={11, 12, 13})
    assert [x.index for x in p.gpus] == [0] and p.full_reason is None
    # The same pids alive (an adopted job without a reservation, say) do count: the safe side.
    assert policy.room_mb(g, res["gpu0"], 0) == 16384 - 6 * 3700


def test_each_job_counts_once_at_max_of_reservation_and_its_trees_measured_use():
    g = ours_gpu(foreign=1000, procs=[
        (100, 2500, True, 100), (101, 800, True, 100),   # job 100 and its child: 3300 measured, 3000 reserved
        (200, 100, True, 200),                            # job 200 uses 100 of its 3700 so far
        (300, 400, True, None),                           # ours by cgroup, no live reservation: counts at use
        (400, 999, False, None)])                         # foreign: already in foreign_mb
    res = [(100, 3000), (200, 3700), (500, 2000)]         # job 500: admitted after the sample, reservation only
    assert policy.room_mb(g, res, 512) == 16384 - 512 - 1000 - (3300 + 3700 + 2000) - 400


def test_a_job_over_its_reservation_counts_at_its_measured_use_at_once():
    g = ours_gpu(procs=[(7, 4400, True, 7)])
    assert policy.room_mb(g, [(7, 4000)], 0) == 16384 - 4400
    w = vram(vram_model="linear", vram_per_unit_mb=1.0, threshold=10 ** 9)
    p = policy.plan(w, [12000.0], [g], {"gpu0": [(7, 4000)]}, 0)
    assert (p.mode, p.gpus, p.full_reason) == ("GPU", [], "no-vram-room")  # 11984 left, not the 12384 of 4000
    assert policy.plan(w, [11000.0], [g], {"gpu0": [(7, 4000)]}, 0).gpus == [g]


def test_a_job_well_past_its_reservation_is_unbounded_nothing_goes_beside_it():
    """Issue 18 (protect the neighbours): a job measured more than OUTGROWN x its reservation follows no prediction;
    a job admitted beside it would run out of memory when it grows on, so the GPU has no room until it ends."""
    g = ours_gpu(procs=[(7, 9000, True, 7)])
    assert policy.room_mb(g, [(7, 4000)], 0) == 0
    w = vram(vram_model="linear", vram_per_unit_mb=1.0, threshold=10 ** 9)
    p = policy.plan(w, [100.0], [g], {"gpu0": [(7, 4000)]}, 0)
    assert (p.mode, p.gpus, p.full_reason) == ("GPU", [], "no-vram-room")


def test_burst_of_reservations_within_one_sample_never_exceeds_capacity():
    g = ours_gpu(total=16000)
    res = []
    admitted = 0
    for pid in range(1000, 1020):  # 20 arrivals, none sampled yet: reservations alone decide
        p = policy.plan(vram(), [1.0], [g], {"gpu0": res}, 0)
        if p.gpus:
            res.append((pid, p.predicted_vram_mb))
            admitted += 1
    assert admitted == 16000 // 3700 and sum(mb for _, mb in res) <= 16000


def test_vram_mode_has_no_slot_cap_unless_one_is_set():
    assert vram().max_gpu_jobs is None
    assert vram(max_gpu_jobs=2).max_gpu_jobs == 2
    assert wl().max_gpu_jobs == 1  # slots mode: the runbook's one per GPU


def test_blind_cap_is_what_fits_the_worst_case_or_the_configured_safe_cap():
    w = vram(vram_model="linear", vram_base_mb=1000, vram_per_unit_mb=1.0, threshold=3000)  # 4000 at the threshold
    assert policy.blind_cap(w, 16384, 384) == 16000 // 4000
    out_of_reach = vram(vram_model="linear", vram_base_mb=1000, vram_per_unit_mb=1.0, threshold=10 ** 9)
    assert policy.blind_cap(out_of_reach, 16384, 0) == 1       # the worst case is the whole GPU: one at a time
    assert policy.blind_cap(vram(gpu_vram_mb=3700), 16384, 0) == 4
    assert policy.blind_cap(vram(gpu_vram_mb=3700, blind_max_gpu_jobs=2), 16384, 0) == 2
    assert policy.blind_cap(vram(gpu_vram_mb=3700), None, 0) == 1  # size unknown too
    p = policy.plan(w, [10.0], None, {}, 0)
    assert p.blind and p.mode == "GPU"


def test_a_dead_child_of_a_live_job_does_not_inflate_the_jobs_measured_use():
    g = ours_gpu(procs=[(100, 3000, True, 100), (101, 5000, True, 100)])  # 101: the job's child, gone since
    assert policy.room_mb(g, [(100, 4000)], 0, dead={101}) == 16384 - 4000
    assert policy.room_mb(g, [(100, 4000)], 0) == 0   # alive, the child makes the job 2x its reservation


# ---- after a CUDA OOM, and GPU-first (issue 18) -------------------------------------------------------------

@pytest.mark.parametrize("setting,how,need,expected", [
    ("cpu", "oom", 9000, ("cpu", "cuda-oom-before")),
    ("cpu", "suspect", 9000, ("cpu", "cuda-oom-suspected")),
    ("gpu-with-room", "oom", 9000, ("gpu", "cuda-oom-before")),
    ("gpu-with-room", "oom", None, ("cpu", "cuda-oom-before")),   # no measured need: the CPU
    ("fail", "oom", 9000, ("fail", "cuda-oom-before")),
    ("cpu", None, None, None),
])
def test_after_gpu_oom(setting, how, need, expected):
    assert policy.after_gpu_oom(wl(on_gpu_oom=setting), how, need) == expected


def test_the_default_after_an_oom_is_the_cpu():
    assert wl().on_gpu_oom == "cpu"


def test_a_measured_need_picks_a_gpu_with_room_for_it_or_the_cpu():
    vram = wl(admission="vram", gpu_vram_mb=3000)
    p = policy.plan(vram, [10], [gpu(0, total=16384, foreign=9000), gpu(1, total=16384)], {}, 0, need_mb=9000)
    assert (p.mode, p.reason, [g.index for g in p.gpus], p.predicted_vram_mb) == ("GPU", "cuda-oom-need", [1], 9000)
    p = policy.plan(vram, [10], [gpu(0, total=8000)], {}, 0, need_mb=9000)
    assert (p.mode, p.reason) == ("CPU", "cuda-oom-too-large")
    p = policy.plan(wl(), [10], [gpu(0, free=5000), gpu(1, free=12000)], need_mb=9000)       # slots mode
    assert (p.mode, p.reason, [g.index for g in p.gpus]) == ("GPU", "cuda-oom-need", [1])
    p = policy.plan(wl(), [10], [gpu(0, free=5000)], need_mb=9000)
    assert (p.mode, p.gpus, p.full_reason) == ("GPU", [], "no-vram-room")
    assert policy.plan(wl(), [10], None, need_mb=9000).mode == "CPU"                       # GPUs unknown


def test_gpu_first_tries_the_gpu_whatever_the_metric():
    first = wl(admission="gpu-first")
    assert first.max_gpu_jobs == 1
    for values in ([10], [10 ** 9], None):
        p = policy.plan(first, values, [gpu(0)])
        assert (p.mode, p.reason) == ("GPU", "gpu-first")
    assert policy.plan(wl(), [10 ** 9], [gpu(0)]).mode == "CPU"
