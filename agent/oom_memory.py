"""Which inputs ran out of GPU memory: written by the agent only, read by the wrapper before it routes.

An input is known by what the agent itself stats of it, ``(st_dev, st_ino, st_size, st_mtime_ns)``: a rename keeps
it, an edit (new size or mtime) makes a new input. The agent (root) writes ``<state_dir>/oom/inputs.json`` (0600:
it names inputs) and, first, its marshal twin ``inputs.marshal`` (0644, identities and figures only, no paths), both
atomically and durably, so the memory survives restarts and reboots. The wrapper reads the twin only: one open,
one fstat, one read, no json; a twin that is not root's (or the reader's) to trust, or not this format, counts as
empty. Bounded: at most MAX_ENTRIES, the oldest dropped first; each entry expires TTL_S after the attempt ended.

Entry kinds (HACKING.md, "CUDA OOMs"):
  ``oom``      the attempt failed (non-zero exit) while its GPU was full (accounting.gpu_outcome): a fact;
  ``suspect``  its exit status is unknown (a container, an agent stopped meanwhile) and the GPU was full: the
               wrapper treats it as an OOM only for a retry within RETRY_WINDOW_S of the attempt's end (the caller
               retries on non-zero exit: a retry that soon is the sign it failed); the agent then makes it ``oom``.
Only this module knows the format. Module level: os, marshal, time (the hot path).
"""

import marshal
from . import fastos as os  # os without its import cost (fastos.py)
import time

VERSION = 1
FOLDER = "oom"
MAX_ENTRIES = 4096
TTL_S = 7 * 86400
RETRY_WINDOW_S = 120.0
_MAX_BYTES = 4 << 20
# entry tuple fields, in order (a tuple: cheap to marshal, compared by position)
FIELDS = ("kind", "ended", "workload", "peak_mb", "need_mb", "device", "job", "total_mb")


def paths(state_dir):
    folder = os.path.join(state_dir, FOLDER)
    return os.path.join(folder, "inputs.json"), os.path.join(folder, "inputs.marshal")


def identity_of(st):
    """The identity of a stat result: device, inode, size, mtime in ns."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def format_id(ident):
    return ":".join(str(int(x)) for x in ident)


def parse_id(text):
    """"dev:ino:size:mtime_ns" (the broker's INPUT_ID) → tuple, or None when it is not four decimal numbers."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    parts = text.split(":") if isinstance(text, str) and len(text) <= 100 else []
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def entry_dict(entry):
    return dict(zip(FIELDS, entry))


# ---------------------------------------------------------------- reading (wrapper hot path)

def input_identity(path):
    """The wrapper's own stat of its input (one stat), or None (no input, not there, not a regular file)."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if (st.st_mode & 0o170000) != 0o100000:
        return None
    return identity_of(st)


def _read_twin(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000 or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022 \
                or st.st_size > _MAX_BYTES:
            return None
        return os.read(fd, _MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)


def load_twin(state_dir):
    """{identity: entry tuple} from the twin; {} when absent, untrusted or not this format. Never raises."""
    data = _read_twin(paths(state_dir)[1])
    if not data:
        return {}
    try:
        doc = marshal.loads(data)
    except (ValueError, EOFError, TypeError, RecursionError, MemoryError):
        return {}
    if type(doc) is not dict or doc.get("version") != VERSION or type(doc.get("entries")) is not dict:
        return {}
    return doc["entries"]


def _valid(entry):
    return type(entry) is tuple and len(entry) == len(FIELDS) and entry[0] in ("oom", "suspect") \
        and type(entry[1]) in (int, float)


def applies(entry, now, retry_window_s=RETRY_WINDOW_S, ttl_s=TTL_S):
    """"oom" (route as after an OOM), "suspect" (the same, reason suspected) or None, for an entry at ``now``."""
    if not _valid(entry):
        return None
    age = now - entry[1]
    if age < -60 or age > ttl_s:
        return None
    if entry[0] == "suspect":
        return "suspect" if age <= retry_window_s else None
    return "oom"


def lookup(state_dir, path, now=None):
    """(identity, entry tuple, "oom" | "suspect") for the input at ``path``, or (identity, None, None)."""
    ident = input_identity(path)
    if ident is None:
        return None, None, None
    entry = load_twin(state_dir).get(ident)
    how = applies(entry, time.time() if now is None else now) if entry is not None else None
    return ident, (entry if how else None), how


# ---------------------------------------------------------------- agent side

def verify(pid, input_path, claimed):
    """The input identity the agent may record for a job: its own stat of INPUT as the process ``pid`` sees it
    (through /proc/PID/root or /proc/PID/cwd: the wrapper's mount namespace and working folder), and only when
    that equals what the wrapper claimed (INPUT_ID). A claim is evidence, never fact: None when they differ, when
    the agent cannot stat it, or when nothing was claimed."""
    if claimed is None or not input_path:
        return None
    raw = os.fsencode(input_path)
    where = b"/proc/%d/root%s" % (pid, raw) if raw.startswith(b"/") else b"/proc/%d/cwd/%s" % (pid, raw)
    try:
        st = os.stat(where)
    except (OSError, ValueError):
        return None
    if (st.st_mode & 0o170000) != 0o100000:
        return None
    mine = identity_of(st)
    return mine if mine == tuple(claimed) else None


class Memory:
    """The agent's copy: load at start (the JSON, root's), change, save both files."""

    def __init__(self, state_dir, log=None):
        self.state_dir = state_dir
        self.log = log
        self.entries = {}   # identity → entry tuple
        self.inputs = {}    # identity → the input's name as last seen (JSON only)
        self._load()

    def _load(self):
        import json

        path = paths(self.state_dir)[0]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return
            doc = json.loads(os.read(fd, _MAX_BYTES))
        except (OSError, ValueError):
            return
        finally:
            os.close(fd)
        if type(doc) is not dict or doc.get("version") != VERSION:
            return
        for item in doc.get("entries", ()):
            ident = parse_id(item.get("id", "")) if isinstance(item, dict) else None
            entry = tuple(item.get(k) for k in FIELDS) if ident else None
            if ident and _valid(entry):
                self.entries[ident] = entry
                self.inputs[ident] = item.get("input")

    def get(self, ident):
        return self.entries.get(ident)

    def mark(self, ident, kind, ended, workload, peak_mb, need_mb, device, job, total_mb, input_name=None):
        self.entries[ident] = (kind, float(ended), workload, peak_mb, need_mb, device, job, total_mb)
        self.inputs[ident] = input_name
        self.save()

    def prune(self, now=None):
        """Drop expired entries (and suspects past their window), then the oldest beyond MAX_ENTRIES."""
        now = time.time() if now is None else now
        keep = {k: e for k, e in self.entries.items() if applies(e, now) is not None}
        if len(keep) > MAX_ENTRIES:
            newest = sorted(keep, key=lambda k: keep[k][1])[-MAX_ENTRIES:]
            keep = {k: keep[k] for k in newest}
        changed = len(keep) != len(self.entries)
        self.entries = keep
        self.inputs = {k: v for k, v in self.inputs.items() if k in keep}
        return changed

    def save(self):
        import json

        from . import atomicfile

        self.prune()
        json_path, twin = paths(self.state_dir)
        os.makedirs(os.path.dirname(json_path), mode=0o755, exist_ok=True)
        atomicfile.write(twin, marshal.dumps({"version": VERSION, "time": time.time(), "entries": self.entries}),
                         0o644, durable=True)
        items = [dict(entry_dict(e), id=format_id(k), input=self.inputs.get(k)) for k, e in self.entries.items()]
        atomicfile.write(json_path, json.dumps({"version": VERSION, "entries": items}, indent=1) + "\n", 0o600,
                         durable=True)
