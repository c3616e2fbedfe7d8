"""Calibration samples: ``<[agent] state_dir>/samples/<workload>.jsonl``, one JSON object a line (metric → peaks),
appended by the agent (job outcomes, ``vram-underpredicted``) and by ``gpu-router calibrate``, fitted by calibrate.

The on-disk contract in one place: the folder, the line format, the writer (append, then trim to the newest lines
when the file grows past TRIM_BYTES) and the reader. The agent writes as root from values a job's wrapper or a
member's ledger entry named: the workload must be one safe name (the config's rule) and every write goes through
``atomicfile`` in a folder only root can change, never following anything planted (issue 17).
"""

import os
import time

from . import atomicfile

DIR = "samples"
KEEP = 5000                 # lines kept after a trim
TRIM_BYTES = KEEP * 400     # a file past this is trimmed to its newest KEEP // 2 lines
READ_LIMIT = TRIM_BYTES * 2
NAME_MAX = 64               # the config's limit on a workload name


def directory(state_dir):
    return os.path.join(state_dir, DIR)


def path(state_dir, workload):
    return os.path.join(directory(state_dir), f"{workload}.jsonl")


def _file_name(workload):
    if not atomicfile.is_name(workload, NAME_MAX):
        raise atomicfile.Refused(repr(workload)[:80], "not a workload name (letters, digits, '_', '.', '-')")
    return f"{workload}.jsonl"


def line(fields):
    """One sample line from a job-finished event's fields (MODE, METRIC, RESULT, PEAK_*, …)."""
    import json

    return json.dumps({"time": round(time.time(), 3), "mode": fields["MODE"], "metric": fields["METRIC"],
                       "result": fields["RESULT"], "peak_ram_mb": fields.get("PEAK_RAM_MB"),
                       "peak_vram_mb": fields.get("PEAK_VRAM_MB"),
                       "peak_vram_source": fields.get("PEAK_VRAM_SOURCE"), "duration_s": fields.get("DURATION_S"),
                       "predicted_vram_mb": fields.get("PREDICTED_VRAM_MB")}) + "\n"


def record(state_dir, fields):
    """Append one sample of ``fields["WORKLOAD"]`` to its file under ``state_dir``; returns the file's path.

    Raises ``atomicfile.Refused`` (an OSError) for a name that is not a workload name or a folder or file that is
    not root's alone, another OSError when the disk says no."""
    name = _file_name(fields.get("WORKLOAD"))
    dfd = atomicfile.open_dir(directory(state_dir), create=True, mode=0o755)
    try:
        try:
            size = atomicfile.append_at(dfd, name, line(fields))
        except atomicfile.Refused as exc:
            raise atomicfile.Refused(os.path.join(directory(state_dir), name), exc.why) from None
        if size > TRIM_BYTES:
            data = atomicfile.read_trusted_at(dfd, name, READ_LIMIT, raw=True)
            if data is not None:
                kept = data.splitlines(keepends=True)[-(KEEP // 2):]
                atomicfile.write_at(dfd, name, b"".join(kept))
    finally:
        os.close(dfd)
    return path(state_dir, fields["WORKLOAD"])


def append_file(file, fields):
    """The same line into a file of the operator's choosing (``calibrate --samples FILE``): theirs to name."""
    folder = os.path.dirname(os.path.abspath(file))
    os.makedirs(folder, exist_ok=True)
    with open(file, "a") as f:
        f.write(line(fields))


def parse(text):
    """Every line of ``text`` that decodes to a JSON object."""
    import json

    out = []
    for raw in text.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def read(state_dir, workload):
    """The recorded samples of ``workload`` (root's file only: Refused otherwise); [] when there are none."""
    text = atomicfile.read_state(directory(state_dir), _file_name(workload), READ_LIMIT)
    return [] if text is None else parse(text)


def read_file(file):
    """The samples in a file of the operator's choosing; a missing file is no samples."""
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            return parse(f.read(READ_LIMIT))
    except FileNotFoundError:
        return []
