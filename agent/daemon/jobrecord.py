"""What the agent knew of a job when it made the job's scope, kept in /run/gpu-router/jobs/<job>.json.

The scope's name and cgroup say little (workload, PID, slice); the request said much more (metric, device, input,
limits, predicted VRAM). The agent writes one record per job when the scope is made, updates it when the job's
VRAM peak grows (or a sample sees a new process of it), writes the job's outcome into it just before the job-finished
event, and removes it once the job is accounted. So an agent restarted mid-job (every package upgrade) adopts the
job with everything it knew and accounts it in full, and one killed while it accounted a job is followed by one that
writes the event only if the journal lacks it (jobend.JobEnd.recover): each job is accounted once. /run is
a tmpfs: records end with the boot, as the jobs do. A record that cannot be read is ignored (the job is then
adopted from its scope alone).
"""

import json
import os

from .. import atomicfile

VERSION = 1
FIELDS = ("job_id", "pid", "pid_start", "workload", "mode", "device", "metric", "scope", "control_group",
          "runtime_max", "started", "predicted_vram_mb", "memory_max_mb", "input", "input_bytes", "holder_pid",
          "holder_start", "peak_vram_mb", "vram_sampled", "vram_samples", "vram_pids",
          "input_id", "gpu_total_mb", "others_mb", "gpu_fault",  # the OOM evidence and key (issue 18)
          "outcome")  # the job's outcome while it is being accounted (jobend.py): {"fields": …, "peaks_known": …}


def directory(snapshot_path):
    """Next to the GPU snapshot (/run/gpu-router/jobs): the agent's runtime directory, which it may write."""
    return os.path.join(os.path.dirname(snapshot_path), "jobs")


def _name(job_id):
    if not atomicfile.is_name(job_id, 200):
        raise atomicfile.Refused(repr(job_id)[:80], "not a job id")
    return f"{job_id}.json"


def _path(folder, job_id):
    return os.path.join(folder, _name(job_id))


def write(folder, values):
    """Atomically (re)write the record of one job; ``values`` holds FIELDS (others are dropped).

    Only the agent reads records, and they name other accounts' inputs: the folder is 0700 and each file 0600
    (a folder an older agent made 0755 is narrowed). Written only inside a folder root alone can change, nothing
    in it followed (``atomicfile``); raises ``atomicfile.Refused`` (an OSError, also a ValueError) otherwise."""
    name = _name(values["job_id"])
    data = {"version": VERSION}
    data.update({k: values.get(k) for k in FIELDS})
    dfd = atomicfile.open_dir(folder, create=True, mode=0o700)
    try:
        if os.fstat(dfd).st_mode & 0o077:
            os.fchmod(dfd, 0o700)
        atomicfile.write_at(dfd, name, json.dumps(data, sort_keys=True) + "\n", mode=0o600)
    finally:
        os.close(dfd)


def remove(folder, job_id):
    try:
        atomicfile.remove_state(folder, _name(job_id))
    except (OSError, ValueError):  # a folder not root's alone holds no record of ours; the agent goes on
        pass


def outcome(record):
    """A record's outcome ({"fields": {NAME: value}, "peaks_known": bool}) when it has a whole one, else None (a
    record without one is a running job's; one that does not have this shape is accounted again from the rest)."""
    out = record.get("outcome")
    if not isinstance(out, dict) or not isinstance(out.get("fields"), dict):
        return None
    fields = out["fields"]
    if not all(isinstance(k, str) and isinstance(v, (str, int, float, type(None))) for k, v in fields.items()) \
            or not isinstance(fields.get("RESULT"), str) or not isinstance(fields.get("DURATION_S"), (int, float)):
        return None
    return out


def load_all(folder):
    """{job_id: record} of every readable record (version 1) that only root could have written; others are
    skipped, and so is the whole folder when it is not root's alone."""
    out = {}
    try:
        dfd = atomicfile.open_dir(folder)
    except OSError:
        return out
    try:
        names = sorted(os.listdir(dfd))
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            text = atomicfile.read_trusted_at(dfd, name, 1 << 20)
            if text is None:
                continue
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("version") == VERSION and data.get("job_id") == name[:-5] \
                    and isinstance(data.get("pid"), int):
                out[data["job_id"]] = data
    finally:
        os.close(dfd)
    return out
