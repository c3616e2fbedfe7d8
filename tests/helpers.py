"""Helpers for the router's tests: config files, real sample media, a fake workload, a journald socket, events.

Nothing here mocks the router: configs are real TOML files, media are made by ffmpeg, the fake job is a real
executable whose own records (start/end times, a counter under its own flock) are what concurrency is measured on,
and the journald socket is a real AF_UNIX datagram socket speaking the native protocol.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
LIB = REPO / ".build" / "lib"
if str(LIB) not in sys.path:
    sys.path.insert(0, str(LIB))

from gpu_router import config as gr_config  # noqa: E402
from gpu_router import journal  # noqa: E402

PYTHON = "/usr/bin/python3"
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---- TOML (a small writer: tests must not depend on the code under test to produce their input) -------------

def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string for everything we write
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_text(doc):
    """{section: {key: value}} and {"workloads": {name: {key: value}}} → TOML text."""
    out = []
    for section, table in doc.items():
        if section == "workloads":
            for name, wl in table.items():
                out.append(f"[workloads.{name}]")
                out += [f"{k} = {_toml_value(v)}" for k, v in wl.items()]
                out.append("")
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
            out.append("")
    return "\n".join(out)


def write_toml(path, doc):
    path = pathlib.Path(path)
    path.write_text(toml_text(doc))
    return path


def workload(**overrides):
    """A validated Workload record (through the real validation), for the pure unit tests."""
    table = {"binary": "/bin/true", "threshold": 100, "scope": "off"}
    table.update(overrides)
    plain = gr_config.validate({"workloads": {"w": table}}, "/test/config.toml", [])
    return gr_config.build(plain).workloads["w"]


# ---- sample media (real files, made by ffmpeg once per session) -------------------------------------------

_MEDIA_RECIPES = {
    # name: ffmpeg arguments after "-y -v error" (output path appended)
    "2s.wav": ["-f", "lavfi", "-i", "sine=d=2", "-ac", "1", "-ar", "8000"],
    "5s.wav": ["-f", "lavfi", "-i", "sine=d=5", "-ac", "1", "-ar", "8000"],
    "2s-64x48.mkv": ["-f", "lavfi", "-i", "testsrc=d=2:s=64x48:r=5", "-c:v", "ffv1"],
    "2s-320x240.mkv": ["-f", "lavfi", "-i", "testsrc=d=2:s=320x240:r=5", "-c:v", "ffv1"],
    "37x23.png": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1"],
    "37x23.jpg": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1", "-pix_fmt", "yuvj420p"],
    "37x23.gif": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1"],
    "37x23.bmp": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1"],
    "37x23-lossy.webp": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1", "-c:v", "libwebp",
                         "-lossless", "0"],
    "37x23-lossless.webp": ["-f", "lavfi", "-i", "testsrc=s=37x23", "-frames:v", "1", "-c:v", "libwebp",
                            "-lossless", "1"],
    "37x23-anim.webp": ["-f", "lavfi", "-i", "testsrc=s=37x23:r=2:d=1", "-c:v", "libwebp_anim", "-loop", "0"],
    "2s.mp3": ["-f", "lavfi", "-i", "sine=d=2", "-ac", "1", "-ar", "8000"],
    "3000x2000.png": ["-f", "lavfi", "-i", "color=c=red:s=3000x2000", "-frames:v", "1"],
}

_media_lock = threading.Lock()


def media(tmp_path_factory, name):
    """Path of a real media file ``name`` (see _MEDIA_RECIPES), generated once per test session."""
    ffmpeg = shutil.which("ffmpeg", path=SAFE_PATH)  # not $PATH: some tests empty it before asking for media
    if ffmpeg is None:
        import pytest

        pytest.skip("ffmpeg is not installed (apt install ffmpeg): no sample media")
    folder = tmp_path_factory.getbasetemp() / "media"
    with _media_lock:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o755)
        path = folder / name
        if not path.exists():
            tmp = folder / (".tmp." + name)
            subprocess.run([ffmpeg, "-nostdin", "-y", "-v", "error"] + _MEDIA_RECIPES[name] + [str(tmp)],
                           check=True, timeout=60)
            tmp.chmod(0o644)
            tmp.rename(path)
    return path


# ---- the fake workload ---------------------------------------------------------------------------------------

FAKE_JOB = r'''#!/usr/bin/python3 -S
# A fake workload: records what it got (argv, routing env, pid, inherited fds) at start in JOB_LOG/<pid>.start,
# counts how many of its mode run at once under its own flock, sleeps JOB_SLEEP seconds, optionally copies
# JOB_READ to JOB_COPY, writes JOB_LOG/<pid>.json with start and end times, and exits JOB_EXIT.
import fcntl, json, os, sys, time
log = os.environ.get("JOB_LOG")
start = time.monotonic()
mode = os.environ.get("GPU_ROUTER_MODE", "?")
record = {"pid": os.getpid(), "argv": sys.argv, "mode": mode, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "cuda_order": os.environ.get("CUDA_DEVICE_ORDER"), "job": os.environ.get("GPU_ROUTER_JOB"),
          "start": start, "fds": {}}
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith(("SigIgn:", "SigBlk:")):
            record[line.split(":")[0]] = line.split()[1]
for fd in os.listdir("/proc/self/fd"):
    try:
        record["fds"][fd] = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        pass
counter = None
if log:
    counter = os.open(os.path.join(log, "count." + mode), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(counter, fcntl.LOCK_EX)
    n = int(os.pread(counter, 32, 0) or b"0") + 1
    os.ftruncate(counter, 0); os.pwrite(counter, str(n).encode(), 0)
    fcntl.flock(counter, fcntl.LOCK_UN)
    record["concurrent"] = n
    with open(os.path.join(log, ".%d.start" % os.getpid()), "w") as f:
        json.dump(record, f)
    os.rename(os.path.join(log, ".%d.start" % os.getpid()), os.path.join(log, "%d.start" % os.getpid()))
if os.environ.get("JOB_READ"):
    with open(os.environ["JOB_READ"], "rb") as src, open(os.environ["JOB_COPY"], "wb") as dst:
        dst.write(src.read())
if os.environ.get("JOB_SLEEP"):
    time.sleep(float(os.environ["JOB_SLEEP"]))
if counter is not None:
    fcntl.flock(counter, fcntl.LOCK_EX)
    n = int(os.pread(counter, 32, 0) or b"0") - 1
    os.ftruncate(counter, 0); os.pwrite(counter, str(n).encode(), 0)
    fcntl.flock(counter, fcntl.LOCK_UN)
    record["end"] = time.monotonic()
    with open(os.path.join(log, ".%d.json" % os.getpid()), "w") as f:
        json.dump(record, f)
    os.rename(os.path.join(log, ".%d.json" % os.getpid()), os.path.join(log, "%d.json" % os.getpid()))
sys.exit(int(os.environ.get("JOB_EXIT", "0")))
'''


def install_fake_job(folder):
    path = pathlib.Path(folder) / "fake-job"
    path.write_text(FAKE_JOB)
    path.chmod(0o755)
    return path


def job_records(log_dir, suffix="json"):
    """The fake job's own records: "json" for finished jobs (with start and end), "start" for every start."""
    return [json.loads(p.read_text()) for p in sorted(pathlib.Path(log_dir).glob("*." + suffix))
            if not p.name.startswith(".")]


def max_overlap(intervals):
    """The largest number of [start, end] intervals that overlap at one instant."""
    points = []
    for s, e in intervals:
        points.append((s, 1))
        points.append((e, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # an end at the same instant as a start counts first
    best = cur = 0
    for _, d in points:
        cur += d
        best = max(best, cur)
    return best


# ---- a rig: config + temp state for one wrapper test ----------------------------------------------------------

class Rig:
    """Everything one wrapper test needs: a config file, a lock dir, a snapshot path, a cache dir, a job log."""

    def __init__(self, root, gr_bin, env, workloads, router=None, gpu=None, host=None, mode=0o755):
        self.root = pathlib.Path(root)
        self.root.chmod(mode)
        self.gr_bin = str(gr_bin)
        self.lock_dir = self.root / "locks"
        self.snapshot = self.root / "gpus.json"
        self.cache = self.root / "cache"
        self.cache.mkdir()
        self.cache.chmod(0o755)
        self.log = self.root / "log"
        self.log.mkdir()
        self.log.chmod(0o777)
        self.job = install_fake_job(self.root)
        self.config = self.root / "config.toml"
        self.doc = {"router": dict({"lock_dir": str(self.lock_dir)}, **(router or {})),
                    "gpu": dict({"snapshot": str(self.snapshot)}, **(gpu or {}))}
        if host:
            self.doc["host"] = host
        wl = {}
        for name, table in workloads.items():
            t = {"binary": str(self.job), "scope": "off"}
            t.update(table)
            wl[name] = t
        self.doc["workloads"] = wl
        write_toml(self.config, self.doc)
        self.config.chmod(0o644)
        self.env = dict(env)
        self.env.update({"GPU_ROUTER_CACHE_DIR": str(self.cache), "GPU_ROUTER_CONFIG": str(self.config),
                         "GPU_ROUTER_LOG": "stderr", "JOB_LOG": str(self.log),
                         "GPU_ROUTER_WRAPPED_DIR": str(self.root / "wrapped")})

    def rewrite(self):
        write_toml(self.config, self.doc)

    def argv(self, workload, *args):
        return [self.gr_bin, "run", "--workload", workload, "--"] + [str(a) for a in args]

    def run(self, workload, *args, env=None, timeout=60, user=None, **kw):
        e = dict(self.env, **(env or {}))
        argv = self.argv(workload, *args)
        if user:
            argv = as_user(user) + argv
        p = subprocess.run(argv, env=e, capture_output=True, timeout=timeout, **kw)
        return Result(p.returncode, p.stdout, p.stderr, self)

    def spawn(self, workload, *args, env=None, stderr=None, **kw):
        e = dict(self.env, **(env or {}))
        return subprocess.Popen(self.argv(workload, *args), env=e, stdout=subprocess.DEVNULL,
                                stderr=stderr if stderr is not None else subprocess.DEVNULL, **kw)

    def warm(self, workload, *args, env=None):
        """Run jobs until the config cache exists (a source changed in the cache's own clock tick is not cached,
        so on kernels with coarse timestamps the first run right after writing the config may not cache it)."""
        deadline = time.monotonic() + 5
        while True:
            res = self.run(workload, *args, env=env)
            assert res.rc == 0, res
            if any(self.cache.iterdir()):
                return res
            assert time.monotonic() < deadline, "the config cache was never written"
            time.sleep(0.01)

    def records(self):
        return job_records(self.log)

    def starts(self):
        return job_records(self.log, "start")

    def write_snapshot(self, gpus, age=0.0, error=None, source="nvml"):
        from gpu_router import snapshot

        snap = {"version": 1, "time": time.time() - age, "source": source, "error": error,
                "driver": "550.54.15", "gpus": gpus}
        snapshot.write(str(self.snapshot), snap)
        return snap


def gpu_entry(index, total_mb=16384, used_mb=0, healthy=True, health="ok", uuid=None, processes=(),
              ours_mb=0):
    return {"index": index, "uuid": uuid or f"GPU-{index:08d}-aaaa-bbbb-cccc-000000000000",
            "name": "Fake GPU", "total_mb": total_mb, "used_mb": used_mb, "free_mb": total_mb - used_mb,
            "healthy": healthy, "health": health, "ours_mb": ours_mb, "foreign_mb": used_mb - ours_mb,
            "processes": list(processes)}


class Result:
    def __init__(self, rc, out, err, rig=None):
        self.rc = rc
        self.out = out.decode("utf-8", "surrogateescape")
        self.err = err.decode("utf-8", "surrogateescape")
        self.rig = rig

    @property
    def events(self):
        return stderr_events(self.err)

    def event(self, name):
        found = [e for e in self.events if e.get("GPU_ROUTER_EVENT") == name]
        assert len(found) == 1, f"expected one {name!r} event, got {len(found)}: {self.err}"
        return found[0]

    def __repr__(self):
        return f"Result(rc={self.rc}, out={self.out!r}, err={self.err!r})"


def stderr_events(text):
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


# ---- unprivileged runs --------------------------------------------------------------------------------------

def can_drop_privileges():
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def as_user(user="nobody", group="nogroup"):
    return ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups"]


def public_tmpdir():
    """A temp dir an unprivileged user can reach (pytest's tmp_path is 0700 root)."""
    d = tempfile.mkdtemp(prefix="grt-", dir="/tmp")
    os.chmod(d, 0o755)
    return pathlib.Path(d)


# ---- a journald-protocol socket of the test's own ------------------------------------------------------------

class JournalSocket:
    """An AF_UNIX datagram socket bound in a short temp dir, drained by a thread (the kernel queues only
    ``net.unix.max_dgram_qlen`` datagrams, 10 by default, before senders block)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="grj-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.settimeout(0.05)
        self.datagrams = []
        self.fds_received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self):
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fd = int.from_bytes(payload[:4], sys.byteorder)
                    self.fds_received += 1
                    try:
                        data = os.pread(fd, 64 << 20, 0)
                    finally:
                        os.close(fd)
            self.datagrams.append(data)

    def events(self, settle=0.2):
        time.sleep(settle)
        return [journal.decode_native(d) for d in list(self.datagrams)]

    def wait_for(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = [journal.decode_native(d) for d in list(self.datagrams)]
            found = [e for e in evs if predicate(e)]
            if found:
                return found
            time.sleep(0.02)
        return []

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def processes_with_arg(marker):
    """PIDs of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != b"Z":
            found.append(int(entry))
    return found


def hold_flock(path):
    """An fd holding an exclusive flock on ``path`` (created), for tests that occupy a slot by hand."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o660)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def stuck_socket(path):
    """A bound datagram socket nobody reads, its queue filled: a journald that hangs. Returns (server, client)."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    c.setblocking(False)
    c.connect(path)
    try:
        while True:
            c.send(b"MESSAGE=filler\n")
    except BlockingIOError:
        pass
    return s, c


# ---- an agent of the tests' own (no systemd) ------------------------------------------------------------------

TX_WORKLOAD = """binary = "/bin/sh"
probe = "file-size"
threshold = 100
input = "arg:3"
scope = "best-effort"
"""


def agent_config(base, backend="none", sample_interval=None, workload=TX_WORKLOAD, gpu_extra=""):
    """config.toml text for an agent in ``base``: [router] lock_dir, [gpu] backend and snapshot there, [agent]
    socket and state_dir there, group "users", and one profile [workloads.tx] (``workload``: its body)."""
    interval = f'sample_interval = "{sample_interval}"\n' if sample_interval else ""
    return f"""
[router]
lock_dir = "{base}/locks"
[gpu]
backend = "{backend}"
snapshot = "{base}/gpus.json"
{interval}{gpu_extra}
[agent]
socket = "{base}/agent.sock"
state_dir = "{base}/state"
group = "users"
[workloads.tx]
{workload}"""


def agent_folder(tmp_path, **config):
    """<tmp_path>/agent with locks/ (0770) and config.toml (agent_config(**config)); returns (folder, config
    path). tmp_path is made 0755 so that a second account's jobs can reach the socket."""
    base = tmp_path / "agent"
    (base / "locks").mkdir(parents=True, mode=0o770)
    os.chmod(tmp_path, 0o755)
    cfg = base / "config.toml"
    cfg.write_text(agent_config(base, **config))
    return base, cfg


@contextlib.contextmanager
def memory_cgroup(tag):
    """A memory cgroup of the test's own under this process's (v1 memory controller, or v2), as (path relative to
    the hierarchy, as a job's control_group says it; absolute path); skips the test where none can be made. Removed
    afterwards, once its processes are gone (the test may remove it first, as systemd removes a scope's)."""
    import pytest

    from gpu_router.daemon import accounting

    if os.geteuid() != 0:
        pytest.skip("needs root to make a memory cgroup")
    root = own = None
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, cg = line.split(":", 2)
        if "memory" in controllers.split(",") and os.path.isdir(os.path.join(accounting.CGROUP_ROOT, "memory")):
            root, own = os.path.join(accounting.CGROUP_ROOT, "memory"), cg
            break
        if controllers == "" and os.path.exists(os.path.join(accounting.CGROUP_ROOT, "cgroup.controllers")):
            root, own = accounting.CGROUP_ROOT, cg
            break
    if root is None:
        pytest.skip("no memory cgroup controller here")
    rel = f"{own.rstrip('/')}/gpu-router-test-{tag}-{os.getpid()}"
    path = root + rel
    try:
        os.mkdir(path)
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup here: {exc}")
    try:
        yield rel, path
    finally:
        deadline = time.monotonic() + 5
        while os.path.isdir(path) and time.monotonic() < deadline:
            try:
                os.rmdir(path)
            except OSError:
                time.sleep(0.05)
