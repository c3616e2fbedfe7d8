"""The GPU snapshot: the agent writes ``/run/gpu-router/gpus.json`` (+ marshal twin), the wrapper reads it.

The wrapper's hot path reads this instead of asking NVML (``import pynvml`` alone is ~34 ms, driver init can take
seconds); so this module imports only os, marshal and time at module level. The marshal twin ``gpus.marshal`` is
what the wrapper decodes (marshal is built in; json costs ~7 ms of imports); json is imported lazily only when the
twin is missing or unreadable.

marshal is not safe against hostile bytes, so a file is decoded only when it is ours to trust: a regular file, opened
without following a symlink, owned by root or by the reader's euid, and not writable by group or others.

Schema (HACKING.md): ``{"version": 1, "time", "source", "error", "driver", "gpus": [{index, uuid, name, total_mb,
used_mb, free_mb, healthy, health, ours_mb, foreign_mb, processes: [{pid, used_mb, ours}]}]}``.
"""

import marshal
from . import fastos as os  # os without its import cost (fastos.py)
import time

VERSION = 1
DEFAULT_PATH = "/run/gpu-router/gpus.json"
DEFAULT_MAX_AGE_S = 5.0
_MAX_BYTES = 4 << 20  # a snapshot of hundreds of GPUs is far below this; a bigger file is not ours


def twin_path(path):
    """gpus.json -> gpus.marshal (same folder)."""
    base = path[:-5] if path.endswith(".json") else path
    return base + ".marshal"


# ---------------------------------------------------------------- writing (agent side)

def write(path, snapshot):
    """Publish `snapshot` at `path` (JSON) and its marshal twin, each atomically; the twin first.

    Twin first: a wrapper that finds a fresh JSON also finds a twin at least as fresh. No folder fsync: the file
    lives on /run (tmpfs) and is rewritten every interval; a crash loses nothing a reboot would keep.
    """
    import json

    from . import atomicfile

    atomicfile.write(twin_path(path), marshal.dumps(snapshot))
    atomicfile.write(path, json.dumps(snapshot, separators=(",", ":"), allow_nan=False).encode() + b"\n")


# ---------------------------------------------------------------- reading (wrapper hot path)

def _read_trusted(path):
    """(bytes, None) or (None, reason). The checks are on the opened descriptor: no race with a swap of the name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "no-snapshot"
    except OSError as exc:
        import errno  # not preloaded by python3 -IS: only on this error path

        if exc.errno == errno.ELOOP:  # the name is a symlink
            return None, "untrusted-snapshot"
        return None, "no-snapshot" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else "unreadable-snapshot"
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None, "untrusted-snapshot"
        if st.st_size > _MAX_BYTES:
            return None, "corrupt-snapshot"
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks), None
    except OSError:
        return None, "unreadable-snapshot"
    finally:
        os.close(fd)


_INF = float("inf")
_MAX_GPUS = 1024
_MAX_PROCESSES = 65536


def _finite(v, lo=0):
    """A real number (not bool) that is finite and >= lo."""
    return type(v) in (int, float) and v == v and lo <= v < _INF


def _mb(v):
    return v is None or (_finite(v) and v < 1 << 40)


def _str(v, limit=256):
    return type(v) is str and len(v) <= limit


def _gpu_ok(g):
    """Every field a reader uses has the type the schema gives it (None where the schema allows null)."""
    if type(g) is not dict:
        return False
    index = g.get("index")
    if type(index) is not int or not 0 <= index < _MAX_GPUS:
        return False
    for key in ("total_mb", "used_mb", "free_mb", "ours_mb", "foreign_mb"):
        if not _mb(g.get(key)):
            return False
    if type(g.get("healthy", True)) is not bool:
        return False
    for key in ("uuid", "name"):
        if g.get(key) is not None and not _str(g.get(key)):
            return False
    if not _str(g.get("health", "ok"), 64):
        return False
    procs = g.get("processes", [])
    if type(procs) is not list or len(procs) > _MAX_PROCESSES:
        return False
    for p in procs:
        if type(p) is not dict or type(p.get("pid")) is not int or not 0 < p["pid"] < 1 << 31 \
                or not _mb(p.get("used_mb")) or type(p.get("ours", False)) is not bool:
            return False
    return True


def valid(snapshot):
    """True when ``snapshot`` has the schema's shape all the way down (what a reader may then index freely)."""
    if type(snapshot) is not dict or type(snapshot.get("gpus")) is not list or len(snapshot["gpus"]) > _MAX_GPUS:
        return False
    if not _finite(snapshot.get("time")):  # NaN or inf is never fresh
        return False
    if snapshot.get("error") is not None and not _str(snapshot.get("error"), 4096):
        return False
    for key in ("source", "driver"):
        if snapshot.get(key) is not None and not _str(snapshot.get(key)):
            return False
    return all(_gpu_ok(g) for g in snapshot["gpus"])


def _check(snapshot, max_age_s, now):
    if type(snapshot) is dict and "version" in snapshot and snapshot.get("version") != VERSION:
        return None, "unsupported-snapshot"
    if not valid(snapshot):
        return None, "corrupt-snapshot"
    if snapshot.get("version") != VERSION:
        return None, "unsupported-snapshot"
    age = now - snapshot["time"]
    if not age == age or age > max_age_s or age < -max_age_s:  # far in the future: a clock step; unknown
        return None, "stale-snapshot"
    return snapshot, "ok"


def read(path=DEFAULT_PATH, max_age_s=DEFAULT_MAX_AGE_S, now=None):
    """(snapshot dict, "ok") or (None, reason); never raises.

    Reasons: "no-snapshot" (agent not running / no GPU host), "stale-snapshot" (older than max_age_s: the agent is
    stuck or gone), "untrusted-snapshot" (symlink, wrong owner, group/other-writable, not a regular file),
    "corrupt-snapshot" (does not decode to the schema), "unsupported-snapshot" (another schema version),
    "unreadable-snapshot" (an I/O error). The wrapper treats every None as "GPU state unknown".
    """
    now = time.time() if now is None else now
    data, reason = _read_trusted(twin_path(path))
    if data is not None:
        try:
            return _check(marshal.loads(data), max_age_s, now)
        except (ValueError, EOFError, TypeError, RecursionError, MemoryError):
            reason = "corrupt-snapshot"  # the JSON is written after the twin, so it may still be good
    elif reason != "no-snapshot":
        return None, reason
    data, json_reason = _read_trusted(path)
    if data is None:
        return None, reason if json_reason == "no-snapshot" else json_reason
    import json

    try:
        snapshot = json.loads(data)
    except (ValueError, RecursionError, MemoryError):  # JSONDecodeError, UnicodeDecodeError; deep nesting
        return None, "corrupt-snapshot"
    return _check(snapshot, max_age_s, now)
