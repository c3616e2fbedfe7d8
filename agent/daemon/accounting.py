"""What each job cost and how it ended: exit status, OOM kill, timeout, peak RAM and VRAM, duration.

The agent learns of a job when it makes its scope (or finds a running one after a restart), samples its cgroup's
memory and its VRAM while it runs, and closes the account when the kernel reports the job's exit (procevents)
or its scope's cgroup disappears. ``classify`` is pure, so every outcome rule is tested without processes.
"""

import ctypes  # at the agent's start (~5 ms), not in the first cgroup v2 job's grant: _inotify
import os
import time

from .. import confinement, procstat, samples

CGROUP_ROOT = "/sys/fs/cgroup"
# A VRAM peak from the agent's own samples (no driver accounting) becomes a calibration sample only when at least
# this many GPU samples saw the job running: the max of fewer is a guess at a short job's peak (HACKING.md).
MIN_VRAM_SAMPLES = 5


def classify(wait_status, oom_kills, runtime_max, duration, failcnt=0):
    """RESULT of a job: success | failed | oom-kill | timeout | unknown (no exit status and nothing else known).

    cgroup v1 reports an OOM kill only through the cgroup's counters (systemd says Result=signal there), so a
    SIGKILL with oom_kill > 0 — or with the limit hit (failcnt) when the kernel has no oom_kill counter — is
    oom-kill. A job that ran for its RuntimeMaxSec and died of the SIGTERM systemd sends is timeout.
    """
    signal = None
    if wait_status is not None and os.WIFSIGNALED(wait_status):
        signal = os.WTERMSIG(wait_status)
    if oom_kills:
        return "oom-kill"
    if signal == 9 and failcnt:
        return "oom-kill"
    if runtime_max and duration is not None and duration >= runtime_max - 0.5 and \
            (signal in (15, 9) or wait_status is None):
        return "timeout"
    if wait_status is None:
        return "unknown"
    if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0:
        return "success"
    return "failed"


# A GPU counts as full for an OOM verdict when its use reached its total less this much: an allocation that fails
# leaves at most the size of that one allocation free (CUDA allocators grow in chunks of 2–20 MiB for small tensors;
# one tensor of a model's layer or a batch is seldom more than a few percent of the GPU).
OOM_SLACK_MIN_MB = 256
OOM_SLACK_FRACTION = 0.05


def oom_slack_mb(total_mb):
    return max(OOM_SLACK_MIN_MB, int(total_mb * OOM_SLACK_FRACTION))


def gpu_was_full(peak_vram_mb, total_mb, others_mb):
    """Whether the job's GPU was full while it ran: the job's own peak plus what the other processes used on that
    GPU reached the GPU's total less oom_slack_mb. Both figures are measured: the driver's per-process peak (or our
    samples), and the other processes' use in the GPU sample nearest before the job's end or the one right after
    its exit (JobAccount.see_gpu). None when a figure is missing (then nothing can be said)."""
    if peak_vram_mb is None or total_mb is None or others_mb is None:
        return None
    return peak_vram_mb + others_mb >= total_mb - oom_slack_mb(total_mb)


def gpu_outcome(result, mode, gpu_fault, peak_vram_mb, total_mb, others_mb):
    """RESULT of a GPU job refined from the GPU's own signals (``classify`` gives ``result`` first):

    - ``gpu-fault``: the job failed (non-zero exit or a signal other than an OOM kill or timeout) and its GPU
      reported a fault while it ran (an Xid event, GPU lost, reset required: the monitor marked it unhealthy);
    - ``cuda-oom``: the job failed and its GPU was full while it ran (``gpu_was_full``);
    - otherwise ``result`` unchanged: a failure without such evidence stays ``failed``, an unknown exit status
      stays ``unknown`` (the agent may still remember it as a suspect, oom_memory.py), never a guess.
    The job's stderr is never read (the caller's stdio stays exactly the caller's).
    """
    if mode != "GPU" or result != "failed":
        return result
    if gpu_fault:
        return "gpu-fault"
    if gpu_was_full(peak_vram_mb, total_mb, others_mb):
        return "cuda-oom"
    return result


def oom_cause(peak_vram_mb, predicted_vram_mb):
    """Why a job ran out of GPU memory: ``outgrew`` (it used more than its reservation, or had none: its input is
    what needs more) or ``squeezed`` (it stayed within its reservation: others took the room; its input fits)."""
    if predicted_vram_mb is None or peak_vram_mb is None or peak_vram_mb > predicted_vram_mb:
        return "outgrew"
    return "squeezed"


def oom_need_mb(peak_vram_mb, total_mb):
    """A lower bound of what the input needs: more than its peak when it failed; one slack step above it."""
    if peak_vram_mb is None:
        return None
    return int(peak_vram_mb + (oom_slack_mb(total_mb) if total_mb else OOM_SLACK_MIN_MB))


def memory_dir(control_group):
    """The memory controller's directory for a unit's ControlGroup, on cgroup v2 or v1 (hybrid)."""
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):
        return CGROUP_ROOT + control_group
    return os.path.join(CGROUP_ROOT, "memory") + control_group


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _oom_kills(out, text):
    """The "oom_kill N" line of memory.events (v2) or memory.oom_control (v1), into out["oom_kills"]."""
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            out["oom_kills"] = int(value)


def read_memory(directory):
    """{'current', 'peak', 'oom_kills', 'failcnt'} in bytes/counts from whichever cgroup version is there."""
    out = {}
    v2_current = _read(os.path.join(directory, "memory.current"))
    if v2_current is not None:
        out["current"] = int(v2_current)
        peak = _read(os.path.join(directory, "memory.peak"))
        if peak is not None:
            out["peak"] = int(peak)
        _oom_kills(out, _read(os.path.join(directory, "memory.events")))
        return out
    usage = _read(os.path.join(directory, "memory.usage_in_bytes"))
    if usage is None:
        return out
    out["current"] = int(usage)
    peak = _read(os.path.join(directory, "memory.max_usage_in_bytes"))
    if peak is not None:
        out["peak"] = int(peak)
    failcnt = _read(os.path.join(directory, "memory.failcnt"))
    if failcnt is not None:
        out["failcnt"] = int(failcnt)
    _oom_kills(out, _read(os.path.join(directory, "memory.oom_control")))
    return out


def watch_oom(directory):
    """An fd that becomes readable when the cgroup at ``directory`` hits an OOM, or None where it cannot be had.

    The kill and the scope's removal follow each other within milliseconds, faster than any sampling: the
    notification is what makes an OOM kill certain to be seen. cgroup v1: an eventfd registered on
    memory.oom_control through cgroup.event_control. cgroup v2: inotify on memory.events (the kernel signals
    every change of it).
    """
    if os.path.exists(os.path.join(directory, "memory.events")):
        return _inotify(os.path.join(directory, "memory.events"))
    if confinement.slurm_step(directory) is not None:
        return None  # v1 wants a write into Slurm's cgroup (cgroup.event_control): the agent only reads there
    try:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except (AttributeError, OSError):
        return None
    try:
        ofd = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ofd}")
        finally:
            os.close(ofd)
    except OSError:
        os.close(efd)
        return None
    return efd


def _inotify(path):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, path.encode(), 0x00000002) < 0:  # IN_MODIFY
        os.close(fd)
        return None
    return fd


class JobAccount:
    """One running job as the agent follows it."""

    def __init__(self, job_id, pid, workload, mode, device, metric, scope, control_group, runtime_max,
                 started=None, predicted_vram_mb=None, memory_max_mb=None, input_path=None, pid_start=None):
        self.job_id = job_id
        self.pid = pid
        self.pid_start = pid_start
        self.workload = workload
        self.mode = mode
        self.device = device
        self.metric = metric
        self.scope = scope
        self.control_group = control_group
        self.runtime_max = runtime_max
        self.started = time.time() if started is None else started
        self.predicted_vram_mb = predicted_vram_mb
        self.memory_max_mb = memory_max_mb
        self.input = input_path
        self.peak_ram = 0
        self.peak_known = False     # the cgroup's own peak counter was read after the job ended
        self.peak_vram_mb = None
        self.vram_sampled = False   # a GPU sample with per-process use was taken while the job ran
        self.vram_samples = 0       # how many such samples
        self.vram_pids = []         # the job's processes the GPU samples saw (its main PID comes first at the end)
        self.vram_source = None     # "accounting" (the driver's per-process peaks) | "sampled" (our samples)
        self.oom_kills = 0
        self.failcnt = 0
        self.wait_status = None
        self.pidfd = None
        self.oomfd = None
        self.holder = None          # holder.Holder keeping the scope's cgroup alive until the final read
        self.gpu_total_mb = None    # the job's GPU's size, from the GPU samples
        self.others_mb = None       # the least VRAM the other processes used on the job's GPU in any sample
        self.gpu_fault = None       # the health the job's GPU fell to while the job ran (xid-79, gpu-lost, …)
        self.input_id = None        # (dev, ino, size, mtime_ns) of the input as the agent verified it

    def to_record(self):
        """What jobrecord keeps of this job (what the agent knew at scope creation, plus the VRAM peak so far)."""
        out = {k: getattr(self, k) for k in ("job_id", "pid", "pid_start", "workload", "mode", "device", "metric",
                                             "scope", "control_group", "runtime_max", "started",
                                             "predicted_vram_mb", "memory_max_mb", "peak_vram_mb", "vram_sampled",
                                             "vram_samples", "vram_pids", "gpu_total_mb", "others_mb",
                                             "gpu_fault")}
        out["input_id"] = list(self.input_id) if self.input_id else None
        # INPUT is the bytes the member named (broker.py keeps them exact); JSON holds them as a surrogate-escaped
        # string, turned back into the same bytes by from_record.
        out["input"] = os.fsdecode(self.input) if isinstance(self.input, bytes) else self.input
        out["input_bytes"] = isinstance(self.input, bytes)
        out["holder_pid"] = self.holder.pid if self.holder is not None else None
        out["holder_start"] = self.holder.start if self.holder is not None else None
        return out

    @classmethod
    def from_record(cls, r):
        job = cls(r["job_id"], r["pid"], r.get("workload"), r.get("mode"), r.get("device"),
                  r.get("metric") or "unknown", r.get("scope"), r.get("control_group"), r.get("runtime_max"),
                  started=r.get("started"), predicted_vram_mb=r.get("predicted_vram_mb"),
                  memory_max_mb=r.get("memory_max_mb"), pid_start=r.get("pid_start"),
                  input_path=os.fsencode(r["input"]) if r.get("input_bytes") and r.get("input") else r.get("input"))
        job.peak_vram_mb = r.get("peak_vram_mb")
        job.vram_sampled = bool(r.get("vram_sampled"))
        job.vram_samples = int(r.get("vram_samples") or (1 if job.vram_sampled else 0))
        job.vram_pids = [int(p) for p in r.get("vram_pids") or () if isinstance(p, int)]
        for key in ("gpu_total_mb", "others_mb"):
            setattr(job, key, r.get(key) if isinstance(r.get(key), (int, float)) else None)
        job.gpu_fault = r.get("gpu_fault") if isinstance(r.get("gpu_fault"), str) else None
        ident = r.get("input_id")
        job.input_id = tuple(ident) if isinstance(ident, list) and len(ident) == 4 and \
            all(isinstance(x, int) for x in ident) else None
        return job

    def sample(self, vram=None):
        """Fold the cgroup's counters and this job's VRAM use (from the GPU snapshot) into the peaks.

        ``vram``: {pid: MiB} of this job's processes (the main PID and those the monitor attributes to it) in a
        GPU sample that lists processes ({} when it listed none of them; None when there was no such sample).
        Their sum is the job's use at that moment. Returns True when the VRAM peak grew.
        """
        if self.control_group:
            mem = read_memory(memory_dir(self.control_group))
            self.peak_ram = max(self.peak_ram, mem.get("peak", 0), mem.get("current", 0))
            self.oom_kills = max(self.oom_kills, mem.get("oom_kills", 0))
            self.failcnt = max(self.failcnt, mem.get("failcnt", 0))
        if vram is None:
            return False
        self.vram_sampled = True
        self.vram_samples += 1
        grew = False
        for pid in vram:
            if pid not in self.vram_pids:
                self.vram_pids.append(pid)
                grew = True  # the record keeps them: an agent restarted later still asks the driver for them
        used = sum(vram.values()) if vram else None
        if used is not None and used > (self.peak_vram_mb or 0):
            self.peak_vram_mb = used
            return True
        return grew

    def see_gpu(self, gpu, after_exit=False, also_mb=0):
        """Fold one GPU sample (a snapshot's entry for this job's device) into the OOM evidence: the GPU's size, what
        the other processes used (used − this job's processes), and a fault seen while the job ran."""
        if self.mode != "GPU" or gpu is None or str(gpu.get("index")) != str(self.device):
            return
        if not gpu.get("healthy", True):
            self.gpu_fault = self.gpu_fault or str(gpu.get("health") or "unhealthy")
            return
        total, used = gpu.get("total_mb"), gpu.get("used_mb")
        if total is None or used is None:
            return
        self.gpu_total_mb = total
        mine = sum(p.get("used_mb") or 0 for p in gpu.get("processes", ())
                   if p.get("pid") == self.pid or p.get("job") == self.pid)
        others = max(0, used - mine) + (also_mb if after_exit else 0)
        # ``also_mb``: jobs that failed on this GPU just before (jobend.NEIGHBOUR_S), gone from this sample.
        # The latest sample while it ran, and the one right after its exit: the two nearest the moment it failed (a
        # job that runs out of memory exits at once); either one showing the GPU full at the job's peak is evidence.
        self.others_mb = max(self.others_mb, others) if after_exit and self.others_mb is not None else others

    def accounting_pids(self):
        """The PIDs whose driver-kept peaks make the job's: its main PID, and its processes the samples saw."""
        return [self.pid] + [p for p in self.vram_pids if p != self.pid]

    def first_start(self):
        """Wall-clock start of the job's main process (no process of the job can be older), or None."""
        return procstat.ticks_to_time(self.pid_start)

    def take_accounted(self, peaks):
        """The driver's per-PID peaks (backend.accounted_peaks) or None → PEAK_VRAM_MB and its source."""
        if peaks is not None:
            self.peak_vram_mb = sum(peaks.values())
            self.vram_source = "accounting"
        else:
            self.vram_source = "sampled"

    def final_read(self):
        """Read the cgroup's counters once the job has ended: exact while the holder keeps the cgroup alive."""
        if not self.control_group:
            return
        mem = read_memory(memory_dir(self.control_group))
        if "peak" in mem:
            self.peak_ram = max(self.peak_ram, mem["peak"])
            self.peak_known = True
        self.oom_kills = max(self.oom_kills, mem.get("oom_kills", 0))
        self.failcnt = max(self.failcnt, mem.get("failcnt", 0))

    def outcome(self, now=None):
        """The job-finished event's fields."""
        duration = (time.time() if now is None else now) - self.started
        result = classify(self.wait_status, self.oom_kills, self.runtime_max, duration, self.failcnt)
        result = gpu_outcome(result, self.mode, self.gpu_fault, self.peak_vram_mb, self.gpu_total_mb,
                             self.others_mb)
        fields = {"WORKLOAD": self.workload, "JOB": self.job_id, "MODE": self.mode, "DEVICE": self.device,
                  "METRIC": self.metric, "SCOPE": self.scope, "PID": self.pid, "INPUT": self.input,
                  "RESULT": result, "DURATION_S": round(duration, 3),
                  "PEAK_RAM_MB": round(self.peak_ram / 1048576, 1) if self.peak_known else None,
                  "PEAK_VRAM_MB": self.peak_vram_mb, "PEAK_VRAM_SOURCE": self.vram_source,
                  "PREDICTED_VRAM_MB": self.predicted_vram_mb,
                  "MEMORY_MAX_MB": self.memory_max_mb}
        if self.mode == "GPU":
            # the figures an OOM verdict rests on, so a reader can judge it (HACKING.md, "CUDA OOMs")
            fields.update(GPU_TOTAL_MB=self.gpu_total_mb, GPU_OTHERS_MB=self.others_mb, GPU_FAULT=self.gpu_fault)
            if result == "cuda-oom":
                fields["OOM_CAUSE"] = oom_cause(self.peak_vram_mb, self.predicted_vram_mb)
        if self.wait_status is not None:
            fields["EXIT_STATUS"] = _shell_status(self.wait_status)
            if os.WIFSIGNALED(self.wait_status):
                fields["SIGNAL"] = os.WTERMSIG(self.wait_status)
        return fields

    def peaks_known(self, gpu_sampling=True):
        """Whether this job's peaks are exact enough to calibrate from: the RAM peak read from the cgroup after
        the job ended, and for a GPU job on a host whose backend lists processes, the driver's accounting, or at
        least MIN_VRAM_SAMPLES samples of the job (the max of fewer is a guess: a short job's peak falls between
        samples, and a low peak in the calibration samples admits jobs into CUDA OOMs)."""
        if not self.peak_known:
            return False
        if self.mode != "GPU" or not gpu_sampling:
            return True
        return self.vram_source == "accounting" or self.vram_samples >= MIN_VRAM_SAMPLES


def _shell_status(status):
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def record_sample(state_dir, fields, peaks_known=True):
    """Append (metric → peaks) for calibration to state_dir/samples/<workload>.jsonl (``samples.record``: the
    file's format, its trim, and the checks that keep root from writing anywhere else); the file's path, or None.

    Not written: an unknown metric or result, or peaks that are not known (``JobAccount.peaks_known``: the
    cgroup's peak counter was not read after the job ended, or no GPU sample saw a GPU job). Raises OSError
    (``atomicfile.Refused`` for a name that is not a workload's, or a folder or file not root's alone).
    """
    if fields.get("METRIC") in (None, "unknown") or fields["RESULT"] == "unknown":
        return None
    if not peaks_known:
        return None  # a peak that is not known is not a sample: calibration would fit a wrong value
    return samples.record(state_dir, fields)
