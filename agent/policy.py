"""Pure routing decisions: no I/O, no clock, no processes — everything arrives as arguments.

``plan()`` answers where a job should go and in which order to try the places; ``slots`` then tries them with
flock, because whether a slot is free is a fact only the kernel knows at that instant. Reasons are short tokens
(they become ``GPU_ROUTER_REASON``), so ``journalctl GPU_ROUTER_REASON=gpu-unhealthy`` works.
"""


class Gpu:
    """One GPU as the policy sees it (from the agent's snapshot, or assumed when the state is unknown).

    ``usage``: pid → MiB that process uses on this GPU (as sampled); ``ours``: the pids of those that are our jobs'
    (None when the snapshot does not say per process); ``owner``: pid → the pid of the admitted job (the ledger's
    holder) whose process tree it belongs to, where the agent could tell.
    """

    __slots__ = ("index", "uuid", "total_mb", "free_mb", "foreign_mb", "ours_mb", "healthy", "health", "usage",
                 "ours", "owner")

    def __init__(self, index, uuid=None, total_mb=None, free_mb=None, foreign_mb=0, ours_mb=0, healthy=True,
                 health="ok", usage=None, ours=None, owner=None):
        self.index = index
        self.uuid = uuid
        self.total_mb = total_mb
        self.free_mb = free_mb
        self.foreign_mb = foreign_mb
        self.ours_mb = ours_mb
        self.healthy = healthy
        self.health = health
        self.usage = usage or {}  # pid → MiB used by that process on this GPU
        self.ours = ours
        self.owner = owner or {}

    @property
    def key(self):
        """The name of this GPU in lock files and the ledger: the index, stable under CUDA_DEVICE_ORDER=PCI_BUS_ID."""
        return f"gpu{self.index}"

    @classmethod
    def from_snapshot(cls, entry):
        """An unhealthy GPU's numbers are null in the snapshot, and so is a process's use when NVML cannot tell."""
        foreign = entry.get("foreign_mb")
        procs = entry.get("processes", ())
        return cls(index=entry["index"], uuid=entry.get("uuid"), total_mb=entry.get("total_mb"),
                   free_mb=entry.get("free_mb"),
                   foreign_mb=foreign if foreign is not None else (entry.get("used_mb") or 0),
                   ours_mb=entry.get("ours_mb") or 0, healthy=entry.get("healthy", True),
                   health=entry.get("health", "ok"),
                   usage={p["pid"]: p.get("used_mb") or 0 for p in procs},
                   ours={p["pid"] for p in procs if p.get("ours")} if all("ours" in p for p in procs) else None,
                   owner={p["pid"]: p["job"] for p in procs if p.get("job") is not None})

    def our_pids_outside(self, reserved):
        """Our processes on this GPU that are not themselves a live reservation's holder (alive by its lock): the
        wrapper checks whether these still run (a job's child, or a job that ended after the sample)."""
        if self.ours is None:
            return ()
        return [pid for pid in self.ours if pid not in reserved]


class Plan:
    """Where to try to place a job: ``mode`` GPU or CPU, GPUs in order of preference, and a CPU fallback if any."""

    __slots__ = ("mode", "gpus", "reason", "spill", "predicted_vram_mb", "full_reason", "blind")

    def __init__(self, mode, reason, gpus=(), spill=False, predicted_vram_mb=None, full_reason=None, blind=False):
        self.blind = blind  # vram mode without a fresh snapshot: the caller applies blind_cap
        self.mode = mode
        self.reason = reason
        self.gpus = list(gpus)
        self.spill = spill
        self.predicted_vram_mb = predicted_vram_mb
        self.full_reason = full_reason  # why the GPU list is empty when mode is GPU (e.g. no VRAM room)

    def __repr__(self):
        return (f"Plan({self.mode}, {self.reason}, gpus={[g.index for g in self.gpus]}, spill={self.spill}, "
                f"vram={self.predicted_vram_mb}, full={self.full_reason})")


def combined_metric(workload, values):
    """The values compared with the thresholds: each on its own ("all"), or their product ("product")."""
    if workload.combine == "product":
        product = 1.0
        for v in values:
            product *= v
        return [product]
    return list(values)


def over_threshold(workload, values):
    """The first (index, value, threshold) at or over its threshold, or None when every metric is under."""
    for i, (value, limit) in enumerate(zip(combined_metric(workload, values), workload.threshold)):
        if value >= limit:
            return i, value, limit
    return None


def predict_vram_mb(workload, values):
    """VRAM a GPU job of this size needs: a constant, or base + per_unit × metric (fitted by calibration)."""
    if workload.vram_model == "linear":
        metric = combined_metric(workload, values)[0] if values else 0.0
        return int(workload.vram_base_mb + workload.vram_per_unit_mb * metric + 0.999)
    return workload.gpu_vram_mb


OUTGROWN = 1.1  # a job measured above its reservation by more than this factor is unbounded (room_mb)


def room_mb(gpu, reservations, reserve_mb, dead=()):
    """VRAM still ours to give on ``gpu``: total − reserve − foreign − Σ max(reservation, measured use) of live jobs.

    Each admitted job counts once, at max(its reservation, the measured use of its process tree), so a job that
    outgrew its prediction counts at what it uses from the sample that shows it, and a job the last sample has not
    seen yet counts at its reservation alone. ``reservations`` are live by construction (the ledger's locks). Our
    processes that no live reservation covers count at their use only while they live: ``dead`` are the pids the
    caller found gone, so a finished job's VRAM, still in the last sample, is never added to the reservations of the
    jobs that took its place. Foreign use (other processes, driver overhead) comes from the sample as it is.
    """
    if gpu.total_mb is None:
        return None
    held = {}
    for pid, mb in reservations:
        held[pid] = held.get(pid, 0) + mb
    if gpu.ours is None:
        # No per-process ownership in the snapshot: every pid with use is ours up to ours_mb (the safe side).
        committed = 0
        attributed = 0
        for pid, mb in held.items():
            used = gpu.usage.get(pid, 0)
            attributed += used
            committed += max(mb, used)
        unattributed = max(0, gpu.ours_mb - attributed)
        return gpu.total_mb - reserve_mb - gpu.foreign_mb - committed - unattributed
    measured = {}
    loose = 0
    for pid in gpu.ours:
        if pid in dead and pid not in held:
            continue
        used = gpu.usage.get(pid, 0)
        job = pid if pid in held else gpu.owner.get(pid)
        if job in held:
            measured[job] = measured.get(job, 0) + used
        else:
            loose += used
    committed = sum(max(mb, measured.get(pid, 0)) for pid, mb in held.items())
    room = gpu.total_mb - reserve_mb - gpu.foreign_mb - committed - loose
    if any(measured.get(pid, 0) > mb * OUTGROWN for pid, mb in held.items()):
        # A job measured well past its reservation is bounded by no prediction: it may grow into whatever is left
        # (the jobs admitted beside it would run out of memory when it does). Nothing more goes beside it until
        # it ends; it then either finished or ran out of memory itself (its input goes where on_gpu_oom says).
        return min(room, 0)
    return room


def blind_cap(workload, total_mb, reserve_mb):
    """How many jobs of this profile one GPU may hold when its state is unknown (no fresh snapshot), vram mode.

    ``blind_max_gpu_jobs`` when the operator set it; else floor((total − reserve) / largest plausible prediction),
    the largest plausible prediction being the model's at the threshold (the largest input the GPU is ever given),
    or the whole GPU when the threshold is out of the GPU's reach: one job at a time, never the raised slot cap.
    Without a known total: one.
    """
    if workload.blind_max_gpu_jobs is not None:
        return workload.blind_max_gpu_jobs
    if total_mb is None:
        return 1
    usable = total_mb - reserve_mb
    largest = predict_vram_mb(workload, [t for t in workload.threshold]) if workload.vram_model == "linear" \
        else workload.gpu_vram_mb
    largest = min(max(largest, 1), usable) if usable > 0 else 1
    return max(1, usable // largest)


def after_gpu_oom(workload, how, need_mb):
    """What the OOM memory (oom_memory.py) makes of a job whose input ran out of GPU memory before: ``how`` is
    "oom" (known) or "suspect" (a retry right after a GPU attempt whose exit status is unknown, with its GPU full),
    ``need_mb`` the lower bound of its need measured then. Returns (action, reason): ``("cpu", reason)``,
    ``("fail", reason)``, ``("gpu", reason)`` (a GPU with room for need_mb, ``plan(need_mb=…)``), or None."""
    if how not in ("oom", "suspect"):
        return None
    reason = "cuda-oom-before" if how == "oom" else "cuda-oom-suspected"
    action = workload.on_gpu_oom
    if action == "gpu-with-room" and need_mb:
        return "gpu", reason
    if action == "fail":
        return "fail", reason
    return "cpu", reason


def plan(workload, values, gpus, reservations=None, reserve_mb=0, dead=(), need_mb=None):
    """Decide GPU or CPU for a job.

    ``values``: the probe's metric values, or None when unknown (the caller already chose CPU-or-fail).
    ``gpus``: list of Gpu, or None when the GPU state is unknown (no/stale snapshot): then the profile's
    threshold alone decides, as the original router did, over the GPUs assumed by the caller.
    ``reservations``: {gpu key: [(pid, MiB), …]} of live admitted jobs (vram mode).
    ``dead``: pids of our processes in the snapshot that the caller found gone (see room_mb).
    ``need_mb``: the input ran out of GPU memory before with this much (``after_gpu_oom`` said "gpu"): only a GPU
    with room for it may take it (reason ``cuda-oom-need``); none could ever → CPU, ``cuda-oom-too-large``.
    ``admission = "gpu-first"``: the metric does not predict VRAM; every job tries the GPU (no threshold), and an
    input that ran out of memory there goes where ``on_gpu_oom`` says on its retry (after_gpu_oom).
    """
    if values is None and workload.admission != "gpu-first":
        return Plan("CPU", "probe-failed")
    if workload.max_gpu_jobs == 0:
        return Plan("CPU", "gpu-disabled")
    if workload.admission != "gpu-first" and over_threshold(workload, values) is not None:
        return Plan("CPU", "over-threshold")
    if gpus is not None and not gpus:
        return Plan("CPU", "no-gpu")
    usable = [g for g in gpus] if gpus is not None else None
    if usable is not None:
        usable = [g for g in usable if g.healthy]
        if not usable:
            return Plan("CPU", "gpu-unhealthy")
    spill = workload.spill_to_cpu and workload.max_cpu_jobs > 0
    if need_mb:
        if usable is None or any(g.total_mb is None for g in usable):
            return Plan("CPU", "cuda-oom-before")  # its need cannot be checked against unknown GPUs
        if all(need_mb > g.total_mb - reserve_mb for g in usable):
            return Plan("CPU", "cuda-oom-too-large", predicted_vram_mb=need_mb)
    if workload.admission == "vram":
        predicted = max(predict_vram_mb(workload, values), need_mb or 0)
        if usable is None or any(g.total_mb is None for g in usable):
            # Unknown VRAM: the caller admits at most blind_cap() jobs per GPU, under the ledger's lock.
            return Plan("GPU", "under-threshold", gpus=usable or [], spill=spill, predicted_vram_mb=predicted,
                        blind=True)
        reservations = reservations or {}
        rooms = [(room_mb(g, reservations.get(g.key, ()), reserve_mb, dead), g) for g in usable]
        fitting = [(r, g) for r, g in rooms if r >= predicted]
        fitting.sort(key=lambda rg: (-rg[0], rg[1].index))
        # Too large means no GPU could ever hold it (its size less the reserve); foreign use comes and goes,
        # and a GPU full of it is "no room now" (BLOCKED, or spill where configured), like one full of our jobs.
        full = None if fitting else ("vram-too-large" if all(predicted > g.total_mb - reserve_mb for g in usable)
                                     else "no-vram-room")
        if full == "vram-too-large":
            # No GPU could ever hold it: the CPU is the only place, like a job over the threshold.
            return Plan("CPU", "vram-too-large", predicted_vram_mb=predicted)
        return Plan("GPU", "cuda-oom-need" if need_mb else "under-threshold", gpus=[g for _, g in fitting],
                    spill=spill, predicted_vram_mb=predicted, full_reason=full)
    reason = "gpu-first" if workload.admission == "gpu-first" else "under-threshold"
    if usable is not None:
        usable = sorted(usable, key=lambda g: (-(g.free_mb if g.free_mb is not None else 0), g.index))
    if need_mb:
        fitting = [g for g in usable if (g.free_mb or 0) - reserve_mb >= need_mb]
        return Plan("GPU", "cuda-oom-need", gpus=fitting, spill=spill, predicted_vram_mb=need_mb,
                    full_reason=None if fitting else "no-vram-room")
    return Plan("GPU", reason, gpus=usable or [], spill=spill)


def assumed_gpus(count):
    """GPUs to try when the state is unknown: the configured count (host.gpus), else one."""
    return [Gpu(index=i, total_mb=None) for i in range(1 if count is None else count)]


def memory_max_mb(workload, mode):
    """MemoryMax of the job's scope in MiB, or None for no limit: a number, or "auto" = RAM per job + margin."""
    setting = workload.gpu_memory_max if mode == "GPU" else workload.cpu_memory_max
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    ram = workload.cpu_ram_mb if mode == "CPU" else (workload.gpu_ram_mb if workload.gpu_ram_mb is not None
                                                       else workload.cpu_ram_mb)
    if not ram:
        return None
    return int(ram * (1 + workload.memory_margin) + 0.999)


def budget_problems(workload, b):
    """What the operator must act on in a budget() worksheet (`check` and `init` print these)."""
    problems = []
    if b["vram_headroom_mb"] is not None and b["vram_headroom_mb"] < 0:
        problems.append("VRAM headroom is negative: lower max_gpu_jobs or gpu_vram_mb")
    if b["ram_headroom_mb"] is not None and b["ram_headroom_mb"] < 0:
        problems.append("RAM headroom is negative: lower max_cpu_jobs or cpu_ram_mb")
    if b["gpu_vram_mb"] is None and workload.max_gpu_jobs:
        problems.append("GPU VRAM unknown: set [host] gpu_vram_mb or start gpu-router-agent")
    return problems


def budget(workload, host_gpu_vram_mb, gpus_count, ram_mb, other_ram_mb):
    """The runbook's memory budget worksheet as numbers (``gpu-router check``)."""
    vram_per_job = workload.gpu_vram_mb if workload.vram_model == "constant" else None
    vram_headroom = None
    if host_gpu_vram_mb is not None and vram_per_job is not None and workload.max_gpu_jobs is not None:
        vram_headroom = host_gpu_vram_mb - vram_per_job * workload.max_gpu_jobs
    ram_headroom = None
    if ram_mb is not None:
        ram_headroom = ram_mb - other_ram_mb - workload.cpu_ram_mb * workload.max_cpu_jobs
        if workload.gpu_ram_mb is not None and gpus_count:
            per_gpu = workload.max_gpu_jobs
            if per_gpu is None:  # vram mode without a slot cap: as many as the VRAM holds at the smallest prediction
                smallest = workload.vram_base_mb if workload.vram_model == "linear" else workload.gpu_vram_mb
                per_gpu = host_gpu_vram_mb // smallest if host_gpu_vram_mb and smallest and smallest > 0 else 0
            ram_headroom -= workload.gpu_ram_mb * per_gpu * gpus_count
    gpu_peak = workload.gpu_ram_mb if workload.gpu_ram_mb is not None else 0
    suggested = int(max(gpu_peak, workload.cpu_ram_mb) * 1.2 + 0.999) or None
    return {"vram_per_job_mb": vram_per_job, "gpu_vram_mb": host_gpu_vram_mb, "max_gpu_jobs": workload.max_gpu_jobs,
            "vram_headroom_mb": vram_headroom, "ram_per_job_mb": workload.cpu_ram_mb,
            "max_cpu_jobs": workload.max_cpu_jobs, "ram_mb": ram_mb, "other_ram_mb": other_ram_mb,
            "ram_headroom_mb": ram_headroom, "suggested_memory_max_mb": suggested}
