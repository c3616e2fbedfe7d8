"""The wrapper: config → probe → policy → slots → scope → journal → exec, once per job.

Ends in exec, so the job keeps the wrapper's PID: signals reach it directly, its exit status is the caller's, and
the slot and reservation descriptors (made inheritable just before exec) are held exactly as long as it lives.
Nothing heavy is imported on the way (see HACKING.md for the measured costs).
"""

from .. import fastos as os  # os without its import cost (fastos.py)
import sys
import time

from .. import config as _config
from .. import drainstate, journal, oom_memory, policy, slots
from .probe import ProbeFailed, find_input, measure

EX_USAGE = 2
LOOP_MARK = "GPU_ROUTER_EXEC"
EX_UNAVAILABLE = 69
POLL_S = 0.05


EX_OOM_REFUSED = 65  # the input ran out of GPU memory before and on_gpu_oom = "fail" (EX_DATAERR)


class OomRefused(Exception):
    """on_gpu_oom = "fail": the input ran out of GPU memory before; the wrapper refuses it."""


class Blocked(Exception):
    """No place for the job now: the caller should retry later."""

    def __init__(self, reason, message):
        self.reason = reason
        super().__init__(message)


def _err(message):
    try:
        os.write(2, f"gpu-router: {message}\n".encode("utf-8", "surrogateescape"))
    except OSError:
        pass


def _fmt(values):
    """Numbers for the journal as written (5000000, 3600, 120.032), never 5e+06: a field one can match on."""
    if values is None:
        return None
    return ",".join(str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else format(v, ".6g") for v in values)


class Job:
    """What the wrapper knows about one job as it goes; becomes the event's fields."""

    def __init__(self, workload, args):
        self.workload = workload
        self.args = args
        self.id = f"{workload.name}-{os.getpid()}-{os.urandom(3).hex()}"
        self.input = None
        self.values = None
        self.probe_reason = None
        self.gpu_state = None
        self.mode = None
        self.reason = None
        self.device = None
        self.slot = None
        self.slot_fd = None  # the descriptor holding the slot: the agent reads its locks (slots.fd_flock_table)
        self.fds = []
        self.predicted_vram_mb = None
        self.gpu = None
        self.scope = None
        self.waited = 0.0
        self.drain = None
        self.caller_unit = None
        self.input_id = None    # (dev, ino, size, mtime_ns) of the input: the OOM memory's key
        self.oom = None         # the OOM memory's entry for it (oom_memory.FIELDS), when one applies
        self.oom_how = None     # "oom" | "suspect"

    def fields(self):
        w = self.workload
        f = {
            "MODE": self.mode, "WORKLOAD": w.name, "JOB": self.id, "REASON": self.reason,
            "METRIC": _fmt(policy.combined_metric(w, self.values)) if self.values is not None else "unknown",
            "UNIT": ",".join(w.threshold_unit), "THRESHOLD": _fmt(w.threshold), "INPUT": self.input,
            "DEVICE": self.device, "SLOT": self.slot, "SCOPE": self.scope, "PID": os.getpid(),
            "PREDICTED_VRAM_MB": self.predicted_vram_mb, "GPU_STATE": self.gpu_state,
            "PROBE_ERROR": self.probe_reason, "CALLER_UNIT": self.caller_unit,
        }
        if self.waited:
            f["WAITED_S"] = round(self.waited, 3)
        if self.oom is not None:  # the attempt this routing remembers: when it ended, what it had, on which GPU
            f.update(OOM_BEFORE=self.oom_how, OOM_AT=round(self.oom[1], 3), OOM_PEAK_VRAM_MB=self.oom[3],
                     OOM_NEED_MB=self.oom[4], OOM_JOB=self.oom[6])
        return f


FRESH_S = 0.25  # vram admission asks the agent for a new sample when the snapshot is older than this


def read_gpus(cfg, fresh=False):
    """(list of policy.Gpu or None, state): the agent's snapshot, or None with why it is unknown.

    ``fresh`` (vram admission): a snapshot older than FRESH_S is refreshed first by asking the agent over its
    socket (OP=sample, ~1 ms and one NVML sample, shared by a burst): what another process took since the last
    periodic sample is then seen before admitting, not after the job's CUDA allocation fails. No agent: as it is.
    """
    from .. import snapshot

    snap, why = snapshot.read(cfg.gpu.snapshot, cfg.gpu.snapshot_max_age)
    if fresh and (snap is None or time.time() - snap.get("time", 0) > FRESH_S):
        from .. import scope

        try:
            if scope.ask_agent(cfg.agent.socket, [("OP", "sample")], timeout=1.0).get("OK") == "1":
                snap, why = snapshot.read(cfg.gpu.snapshot, cfg.gpu.snapshot_max_age)
        except (OSError, scope.ScopeError, ValueError):
            pass
    if snap is None:
        return None, f"unknown:{why}"
    if snap.get("error") and not snap.get("gpus"):
        # The backend failed as a whole (NVML init failure, driver gone): no GPU is usable.
        return [policy.Gpu(index=0, healthy=False, health=str(snap.get("error")))], "ok"
    return [policy.Gpu.from_snapshot(g) for g in snap.get("gpus", ())], "ok"


def _dead(pids):
    """The pids among ``pids`` that no longer run: no /proc entry, or a zombie (its VRAM is already freed)."""
    if not pids:
        return set()
    from .. import procstat  # only when the snapshot shows our processes outside the ledger (rare: hot path)

    out = set()
    for pid in pids:
        st = procstat.read(pid)
        if st is None or st.gone:
            out.add(pid)
    return out


def _blind_gpus(cfg):
    """GPUs to admit against when the snapshot is not fresh: a stale snapshot still tells the GPUs and their sizes
    ([host] gpu_vram_mb wins where set), else the configured count of GPUs of unknown size."""
    from .. import snapshot

    snap, _why = snapshot.read(cfg.gpu.snapshot, float("inf"))
    known = [g for g in (snap or {}).get("gpus", ()) if g.get("total_mb")] if snap else []
    if known:
        return [policy.Gpu(index=g["index"], uuid=g.get("uuid"),
                           total_mb=cfg.host.gpu_vram_mb or g["total_mb"]) for g in known]
    return [policy.Gpu(index=g.index, total_mb=cfg.host.gpu_vram_mb) for g in policy.assumed_gpus(cfg.host.gpus)]


def admit(job, cfg, dir_fd):
    """One admission attempt: True when the job holds a place (job.mode/device/slot/fds set)."""
    w = job.workload
    after = policy.after_gpu_oom(w, job.oom_how, job.oom[4] if job.oom else None)
    need = job.oom[4] if after is not None and after[0] == "gpu" else None
    if after is not None and after[0] == "fail":
        raise OomRefused(after[1])
    if after is not None and after[0] == "cpu":
        gpus = None  # the GPU state does not matter: the CPU is where it can finish
    else:
        gpus, job.gpu_state = read_gpus(cfg, fresh=w.admission == "vram")
    candidates = gpus if gpus is not None else policy.assumed_gpus(cfg.host.gpus)
    if after is not None and after[0] == "cpu":
        # Its GPU attempt ran out of memory: the CPU is where it can finish (on_gpu_oom = "cpu", the default).
        plan = policy.Plan("CPU", after[1])
    elif job.drain is not None:  # `gpu-router drain`: no new GPU job; the CPU takes it, or the caller retries
        plan = policy.plan(w, job.values, gpus if gpus is not None else None, None, cfg.gpu.reserve_mb)
        if plan.mode == "GPU":
            if job.drain.get("action") == "block":
                raise Blocked("drained", "GPUs are drained (gpu-router drain --block): no new GPU jobs")
            plan.mode, plan.reason, plan.spill, plan.full_reason = "CPU", "drained", False, None
            plan.predicted_vram_mb = None
    elif w.admission == "vram":
        with slots.Ledger(dir_fd, cfg.router.lock_dir) as ledger:
            live = ledger.live()
            dead = ()
            if gpus is not None:
                outside = set()
                for g in gpus:
                    outside.update(g.our_pids_outside({pid for pid, _ in live.get(g.key, ())}))
                dead = _dead(outside)
            # A flooded ledger (ledger.partial): reservations unseen, so admit as with no snapshot (blind).
            plan = policy.plan(w, job.values, None if ledger.partial else gpus, live, cfg.gpu.reserve_mb, dead,
                               need_mb=need)
            job.predicted_vram_mb = plan.predicted_vram_mb
            if plan.mode == "GPU" and plan.blind:
                plan.gpus = _blind_places(w, _blind_gpus(cfg), live, plan.predicted_vram_mb, cfg.gpu.reserve_mb)
                if not plan.gpus:
                    plan.full_reason = "blind-cap"
            if plan.mode == "GPU" and _take_gpu(job, plan, dir_fd, cfg, ledger, live):
                return True
    else:
        plan = policy.plan(w, job.values, gpus if gpus is not None else None, None, cfg.gpu.reserve_mb,
                           need_mb=need)
        if plan.mode == "GPU" and gpus is None:
            plan.gpus = candidates
        job.predicted_vram_mb = plan.predicted_vram_mb
        if plan.mode == "GPU" and _take_gpu(job, plan, dir_fd, cfg, None, None):
            return True
    job.reason = plan.reason
    if plan.mode == "GPU":
        full = plan.full_reason or "gpu-slots-full"
        if not plan.spill:
            raise Blocked(full, f"no GPU place ({full})")
        job.reason = f"spill:{full}"
    got = slots.try_slot(dir_fd, cfg.router.lock_dir, w.name, "cpu", w.max_cpu_jobs)
    if got is None:
        raise Blocked("cpu-slots-full", f"all {w.max_cpu_jobs} CPU slot(s) of {w.name} are taken")
    job.mode, job.device, job.slot, job.slot_fd = "CPU", "cpu", got[1], got[0]
    job.fds.append(got[0])
    return True


def _blind_places(w, gpus, live, predicted, reserve_mb):
    """GPUs that may take one more job while blind: fewer than blind_cap live reservations, and the reservations
    plus this one within the GPU's size less the reserve (where the size is known)."""
    out = []
    for g in gpus:
        held = live.get(g.key, ())
        if len(held) >= policy.blind_cap(w, g.total_mb, reserve_mb):
            continue
        if g.total_mb is not None and sum(mb for _, mb in held) + predicted > g.total_mb - reserve_mb:
            continue
        out.append(g)
    return out


def _take_gpu(job, plan, dir_fd, cfg, ledger, live):
    w = job.workload
    for gpu in plan.gpus:
        if w.max_gpu_jobs is None:
            # vram mode without a slot cap: the reservation is the place (the ledger's lock serialises admission).
            got = (None, len(live.get(gpu.key, ())))
        else:
            got = slots.try_slot(dir_fd, cfg.router.lock_dir, w.name, gpu.key, w.max_gpu_jobs)
            if got is None:
                continue
            job.fds.append(got[0])
            job.slot_fd = got[0]
        if ledger is not None:
            job.fds.append(ledger.reserve(gpu.key, plan.predicted_vram_mb, w.name, job.fields()["METRIC"]))
        job.mode, job.reason, job.gpu, job.slot = "GPU", plan.reason, gpu, got[1]
        job.device = str(gpu.index)
        return True
    return False


def admit_with_wait(job, cfg, dir_fd):
    """Admit now, or wait up to ``wait`` in arrival order (a ticket queue), or raise Blocked."""
    wait = job.workload.wait
    if wait <= 0:
        return admit(job, cfg, dir_fd)
    started = time.monotonic()
    w = job.workload
    if w.admission == "gpu-first":
        pool_kind = "cpu" if job.oom is not None and w.on_gpu_oom == "cpu" else "gpu"
    else:
        pool_kind = "cpu" if job.values is None or policy.over_threshold(w, job.values) or \
            (job.oom is not None and w.on_gpu_oom == "cpu") else "gpu"
    queue = slots.Queue(dir_fd, cfg.router.lock_dir, job.workload.name, pool_kind, wait)
    try:
        while True:
            if queue.is_head():
                try:
                    return admit(job, cfg, dir_fd)
                except Blocked:
                    if time.monotonic() - started >= wait:
                        raise
            elif time.monotonic() - started >= wait:
                raise Blocked("wait-timeout", f"still queued behind earlier jobs after {wait:g}s")
            time.sleep(POLL_S)
    finally:
        job.waited = time.monotonic() - started
        queue.leave()


def _probe(job):
    w = job.workload
    job.input = find_input(w.input, job.args)
    try:
        job.values = measure(w, job.input)
    except ProbeFailed as exc:
        job.probe_reason = exc.reason
        journal.emit("probe-failed", f"{w.name}: probe failed ({exc.reason}): {exc}; "
                     + ("refusing the job" if w.on_probe_error == "fail" else "routing to the CPU"),
                     {"WORKLOAD": w.name, "JOB": job.id, "INPUT": job.input, "REASON": exc.reason,
                      "PROBE": ",".join(w.probe), "ON_PROBE_ERROR": w.on_probe_error, "DETAIL": str(exc)})
        if w.on_probe_error == "fail":
            _err(f"{w.name}: {exc}; on_probe_error = \"fail\", not running the job")
            return False
    return True


def _oom_before(job, cfg):
    """Look the input up in the agent's OOM memory (one stat of the input, one read of the marshal twin)."""
    if not job.input:
        return
    job.input_id, job.oom, job.oom_how = oom_memory.lookup(cfg.agent.state_dir, job.input)


def _exec(job, cfg):
    w = job.workload
    env = dict(os.environ)
    env.update(w.env)
    env["GPU_ROUTER_JOB"] = job.id
    env["GPU_ROUTER_MODE"] = job.mode
    env[LOOP_MARK] = f"{os.getpid()}:{w.name}"  # exec keeps the PID: a wrapper that finds this is ourselves again
    if job.mode == "GPU":
        gpu = job.gpu
        use_uuid = cfg.gpu.visible_devices == "uuid" and gpu.uuid
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = gpu.uuid if use_uuid else str(gpu.index)
        extra = w.gpu_args
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job cannot touch VRAM even if its arguments are wrong
        extra = w.cpu_args
    argv = [w.binary] + job.args + extra
    slots.inherit(*job.fds)
    _restore_signals()
    try:
        os.execve(w.binary, argv, env)
    except OSError as exc:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        _err(f"{w.name}: cannot run {w.binary}: {exc.strerror}")
        journal.emit("job-finished", f"{w.name}: {w.binary} could not be started: {exc.strerror}",
                     dict(job.fields(), RESULT="failed", EXIT_STATUS=code))
        return code


def _restore_signals():
    """Undo what the interpreter did at start-up: Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays
    ignored across exec (subprocess's restore_signals does the same). Without this, `job | head` would not end
    the job as it does without the router. ``_signal`` is built in: no import cost."""
    import _signal

    for name in ("SIGPIPE", "SIGXFSZ"):
        number = getattr(_signal, name, None)
        if number is not None:
            try:
                _signal.signal(number, _signal.SIG_DFL)
            except (OSError, ValueError):
                pass


def runner_unit():
    """The systemd unit this process runs in before it moves to its scope (the runner's service or scope), or
    None: what GPU_ROUTER_CALLER_UNIT= records."""
    from .. import confinement

    return confinement.unit_of(confinement.read())


def _scope(job, cfg):
    """Put this process into its transient scope; Blocked when scope = "required" and none can be made."""
    w = job.workload
    if w.scope == "off":
        if job.mode == "GPU":  # no scope, but the agent follows it: its outcome and a CUDA OOM are known
            from .. import scope

            scope.track(job, cfg)
        return True
    from .. import confinement, scope

    held = confinement.find()
    if held is not None:  # a Slurm step: moving the PID would take it out of --mem, sacct and scancel
        job.scope = held.label
        scope.track(job, cfg)  # the agent accounts it from the step's cgroup (best-effort, TRACK_TIMEOUT_S at most)
        return True
    try:
        job.scope = scope.place(job, cfg)
        return True
    except scope.ScopeError as exc:
        if w.scope == "required":
            raise Blocked("scope-unavailable", f"no scope for the job: {exc}") from None
        journal.emit("scope-failed", f"{w.name}: running without a scope: {exc}",
                     dict(job.fields(), REASON="scope-unavailable", DETAIL=str(exc)))
        return True


EX_SOFTWARE = 70


def run(workload_name, args, config_file=None):
    """The whole wrapper; returns an exit code only when it does not exec. Never a traceback: an error nobody
    foresaw is one line, one journal event and exit 70 (EX_SOFTWARE), so a job runner sees a documented code."""
    try:
        return _run(workload_name, args, config_file)
    except Exception as exc:  # noqa: BLE001 - the last line of defence; every known failure has its own code
        what = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        _err(f"internal error, please report it: {what} (exit {EX_SOFTWARE})")
        journal.emit("config-error", f"gpu-router internal error: {what}",
                     {"WORKLOAD": workload_name, "REASON": "internal-error", "DETAIL": what}, priority=3)
        return EX_SOFTWARE


def _run(workload_name, args, config_file=None):
    try:
        cfg = _config.load(config_file)
        workload = cfg.workload(workload_name)
    except _config.ConfigError as exc:
        _err(f"config error: {exc}")
        journal.emit("config-error", f"config error: {exc}", {"WORKLOAD": workload_name, "DETAIL": str(exc)})
        return EX_USAGE
    if os.environ.get("GPU_ROUTER_PROBING") == str(os.getppid()):
        # We are a probe of another gpu-router (the probe tool itself is wrapped): run it as it is, no routing.
        _restore_signals()
        try:
            os.execv(workload.binary, [workload.binary] + list(args))
        except OSError as exc:
            _err(f"{workload.name}: cannot run {workload.binary}: {exc.strerror}")
            journal.emit("job-finished", f"{workload.name}: {workload.binary} could not be started: {exc.strerror}",
                         {"WORKLOAD": workload.name, "RESULT": "failed",
                          "EXIT_STATUS": 127 if isinstance(exc, FileNotFoundError) else 126})
            return 127 if isinstance(exc, FileNotFoundError) else 126
    if os.environ.get(LOOP_MARK) == f"{os.getpid()}:{workload.name}":
        # The real binary we exec'd is the router again (binary = the wrapped name, or a script exec'ing it): each
        # round would take another slot and end BLOCKED, and a retrying caller would loop for ever.
        message = (f"{workload.name}: binary = {workload.binary} leads back to gpu-router (the profile names the "
                   f"wrapped path, or a script that execs it): set binary to the real program (after `gpu-router "
                   f"wrap`, NAME.distrib or NAME.real) in {workload.source}")
        _err(f"config error: {message}")
        journal.emit("config-error", f"config error: {message}", {"WORKLOAD": workload.name, "DETAIL": message,
                                                                 "REASON": "binary-loops"})
        return EX_USAGE
    job = Job(workload, args)
    if not _probe(job):
        return cfg.router.probe_error_exit_code
    job.drain = drainstate.read(cfg.agent.state_dir)
    _oom_before(job, cfg)
    try:
        dir_fd = slots.open_lock_dir(cfg.router.lock_dir)
    except slots.LockDirError as exc:
        _err(str(exc))
        journal.emit("config-error", f"{workload.name}: {exc}", {"WORKLOAD": workload.name, "DETAIL": str(exc)})
        return EX_UNAVAILABLE
    try:
        admit_with_wait(job, cfg, dir_fd)
        if workload.scope != "off":  # journald will attribute our events to the scope from now on
            job.caller_unit = runner_unit()
        _scope(job, cfg)
    except Blocked as exc:
        for fd in job.fds:
            os.close(fd)
        job.mode, job.reason, job.device, job.slot = "BLOCKED", exc.reason, None, None
        journal.emit("blocked", f"{workload.name}: BLOCKED ({exc.reason}): {exc}; exit "
                     f"{workload.retry_exit_code} so the caller retries later", job.fields())
        _err(f"{workload.name}: BLOCKED ({exc}); retry later (exit {workload.retry_exit_code})")
        return workload.retry_exit_code
    except OomRefused as exc:
        for fd in job.fds:
            os.close(fd)
        job.mode, job.reason = "BLOCKED", str(exc)
        message = (f"{workload.name}: refused: this input ran out of GPU memory before (job {job.oom[6]}, "
                   f"{job.oom[3]} MiB on GPU {job.oom[5]}) and on_gpu_oom = \"fail\" (exit {EX_OOM_REFUSED})")
        journal.emit("blocked", message, job.fields())
        _err(message)
        return EX_OOM_REFUSED
    except slots.LockDirError as exc:
        for fd in job.fds:
            os.close(fd)
        _err(str(exc))
        journal.emit("config-error", f"{workload.name}: {exc}", {"WORKLOAD": workload.name, "JOB": job.id,
                                                                 "DETAIL": str(exc)})
        return EX_UNAVAILABLE
    finally:
        os.close(dir_fd)
    where = f"GPU {job.device}" if job.mode == "GPU" else "CPU"
    metric = job.fields()["METRIC"]
    if job.values is not None:
        metric += " " + ",".join(workload.threshold_unit)
    journal.emit("routed", f"{workload.name}: {job.mode} ({job.reason}), metric {metric}, {where} slot {job.slot}",
                 job.fields())
    return _exec(job, cfg)


def usage():
    return ("usage: gpu-router run [--config FILE] --workload NAME [--] ARGS...\n"
            "       or call gpu-router through a symlink named after the workload\n")


def main_run(argv):
    """``gpu-router run …`` argument parsing by hand: argparse costs ~9 ms and must not eat the job's options."""
    config_file = None
    workload = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-h", "--help"):
            sys.stdout.write(usage())
            return 0
        if arg in ("--config", "--workload", "-w"):
            if i + 1 >= len(argv):
                _err(f"{arg} needs a value\n{usage()}")
                return EX_USAGE
            if arg == "--config":
                config_file = argv[i + 1]
            else:
                workload = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("--workload="):
            workload = arg.split("=", 1)[1]
        else:
            break
        i += 1
    if not workload:
        _err("no workload named (--workload NAME)\n" + usage())
        return EX_USAGE
    return run(workload, argv[i:], config_file)
