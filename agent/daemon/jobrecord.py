"""What the agent knew of a job when it made the job's scope, kept in /run/gpu-router/jobs/<job>.json.

The scope's name and cgroup say little (workload, PID, slice); the request said much more (metric, device, input,
limits, predicted VRAM). The agent writes one record per job when the scope is made, updates it when the job's
VRAM peak grows (or a sample sees a new process of it), and removes it when the job is accounted, so an agent
restarted mid-job (every package upgrade) adopts the job with everything it knew and accounts it in full. /run is
a tmpfs: records end with the boot, as the jobs do. A record that cannot be read is ignored (the job is then
adopted from its scope alone).
"""

import json
import os

from .. import atomicfile

VERSION = 1
FIELDS = ("job_id", "pid", "pid_start", "workload", "mode", "device", "metric", "scope", "control_group",
          "runtime_max", "started", "predicted_vram_mb", "memory_max_mb", "input", "input_bytes", "holder_pid",
          "holder_start", "peak_vram_mb", "vram_sampled", "vram_samples", "vram_pids")


def directory(snapshot_path):
    """Next to the GPU snapshot (/run/gpu-router/jobs): the agent's runtime directory, which it may write."""
    return os.path.join(os.path.dirname(snapshot_path), "jobs")


def _path(folder, job_id):
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ValueError(f"bad job id {job_id!r}")
    return os.path.join(folder, f"{job_id}.json")


def write(folder, values):
    """Atomically (re)write the record of one job; ``values`` holds FIELDS (others are dropped).

    Only the agent reads records, and they name other accounts' inputs: the folder is 0700 and each file 0600
    (a folder an older agent made 0755 is narrowed)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_mode & 0o077:
        os.chmod(folder, 0o700)
    data = {"version": VERSION}
    data.update({k: values.get(k) for k in FIELDS})
    atomicfile.write(_path(folder, values["job_id"]), json.dumps(data, sort_keys=True) + "\n", mode=0o600)


def remove(folder, job_id):
    try:
        os.unlink(_path(folder, job_id))
    except (FileNotFoundError, ValueError):
        pass


def load_all(folder):
    """{job_id: record} of every readable record (version 1); unreadable ones are skipped."""
    out = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("version") == VERSION and data.get("job_id") == name[:-5] \
                and isinstance(data.get("pid"), int):
            out[data["job_id"]] = data
    return out
