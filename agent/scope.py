"""Put the wrapper's own process into a transient systemd scope, so a runaway job is killed alone.

The wrapper asks the agent over ``/run/gpu-router/agent.sock``: the agent already holds a D-Bus connection and
pystemd (whose import alone costs ~90 ms here, against a ~1 ms socket round trip), identifies the caller with
SO_PEERCRED, and sets the limits from its own config. Only when the agent is unreachable does a root caller create
the scope itself with pystemd. Either way the scope holds this PID, which then execs: the job is the scope.

Requests and replies use journald's native field encoding (``journal.encode_native``): binary-safe, and already
here, so the hot path needs neither json nor a second format.
"""

from . import fastos as os  # os without its import cost (fastos.py)

from . import journal

SLICES = {"GPU": "gpu-router-gpu.slice", "CPU": "gpu-router-cpu.slice"}
ACTIVE_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0


class ScopeError(Exception):
    """No scope could be made; the message says why (agent down, refused, systemd not running, …)."""


class Unanswered(ScopeError):
    """The agent took the request and went away without a word (killed, crashed, or an older agent's stop)."""


def unit_name(job_id):
    return f"gpu-router-{job_id}.scope"


def slice_path(slice_name):
    """A slice's cgroup path: systemd nests by dashes, so gpu-router-cpu.slice lives at
    /gpu.slice/gpu-router.slice/gpu-router-cpu.slice (note the implicit gpu.slice at the top)."""
    stem = slice_name[:-len(".slice")]
    parts = stem.split("-")
    return "".join("/" + "-".join(parts[:i + 1]) + ".slice" for i in range(len(parts)))


def control_group(mode, job_id):
    return f"{slice_path(SLICES[mode])}/{unit_name(job_id)}"


def properties(workload, mode, metric_text, pid, caller_unit=None, memory_max_mb=None):
    """The scope's unit properties, as (name, value) pairs; limits come only from the profile (the config)."""
    desc = f"gpu-router {workload.name} job on {mode} (metric {metric_text})"
    props = [("Description", desc), ("Slice", SLICES[mode]), ("PIDs", [pid]),
             ("CollectMode", "inactive-or-failed")]
    if memory_max_mb is not None:
        props.append(("MemoryMax", int(memory_max_mb) * 1024 * 1024))
    if workload.runtime_max:
        props.append(("RuntimeMaxUSec", int(workload.runtime_max * 1_000_000)))
    if caller_unit and workload.bind_to_caller:
        props.append(("BindsTo", [caller_unit]))
        props.append(("After", [caller_unit]))
    return props


def running_scopes():
    """{scope name: (control group, [pids])} of gpu-router scopes alive now: `status`, and the agent's adoption
    after a restart (daemon/resident.py)."""
    from . import confinement

    root = confinement.systemd_root()
    found = {}
    for slice_name in SLICES.values():
        cg_dir = slice_path(slice_name)
        try:
            names = os.listdir(root + cg_dir)
        except OSError:
            continue
        for name in names:
            if not (name.startswith("gpu-router-") and name.endswith(".scope")):
                continue
            try:
                with open(os.path.join(root + cg_dir, name, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            if pids:
                found[name] = (f"{cg_dir}/{name}", pids)
    return found


def binding_service(pid="self"):
    """The .service a process runs in (from /proc/PID/cgroup), for BindsTo=; None outside a service."""
    from . import confinement

    return confinement.service_of(confinement.read(pid))


# ---- asking the agent ----------------------------------------------------------------------------------------

def request_fields(job, cfg):
    return [("OP", "scope"), ("WORKLOAD", job.workload.name), ("JOB", job.id), ("MODE", job.mode),
            ("DEVICE", str(job.device)), ("PID", str(os.getpid())), ("SCOPE_POLICY", job.workload.scope),
            ("METRIC", job.fields()["METRIC"]), ("INPUT", _bounded(job.input or "")),
            ("PREDICTED_VRAM_MB", str(job.predicted_vram_mb or "")),
            ("INPUT_ID", ":".join(str(x) for x in job.input_id) if getattr(job, "input_id", None) else ""),
            ("SLOT_FD", str(job.slot_fd) if getattr(job, "slot_fd", None) is not None else "")]


TRACK_TIMEOUT_S = 1.0


def track(job, cfg):
    """scope = "off" (a GPU job), or a Slurm step: ask the agent to follow it (OP=track: a scope request's fields),
    so its outcome and a CUDA OOM are known and its input remembered. Best-effort and short: the job runs whatever
    the answer, and a request the agent reads after we exec'd still names this PID, which the job keeps."""
    fields = [("OP", "track")] + request_fields(job, cfg)[1:]
    try:
        return ask_agent(cfg.agent.socket, fields, timeout=TRACK_TIMEOUT_S).get("OK") == "1"
    except (OSError, ScopeError):
        return False


MAX_INPUT_BYTES = 4096


def _bounded(text):
    """INPUT only labels the job's account: an input path named by an option may be any length (a 100 KiB value
    would make the request too large and a required scope impossible), so it is cut, never refused."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    return data if len(data) <= MAX_INPUT_BYTES else data[:MAX_INPUT_BYTES - 3] + b"..."


def ask_agent(socket_path, fields, timeout=REQUEST_TIMEOUT_S):
    """Send one request, read one reply (both native-encoded); OSError when the agent is not there."""
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        payload = journal.encode_native(fields)
        sock.sendall(len(payload).to_bytes(4, "little") + payload)
        sock.shutdown(_socket.SHUT_WR)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "little"):
            chunk = sock.recv(65536)  # the whole frame, then done: no wait for the agent to close its end
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    if len(data) < 4:
        raise Unanswered("the agent closed the connection without an answer")
    try:
        return journal.decode_native(data[4:4 + int.from_bytes(data[:4], "little")])
    except ValueError:
        raise ScopeError("the agent's answer is malformed") from None


def place(job, cfg):
    """Move this process into its scope and return the scope's name; ScopeError when that is impossible."""
    import time

    end = time.monotonic() + REQUEST_TIMEOUT_S
    try:
        try:
            reply = ask_agent(cfg.agent.socket, request_fields(job, cfg))
        except Unanswered:
            # The agent went away holding the request (a restart's SIGKILL, a crash). Asking the next one is
            # safe: had the scope been made, the agent answers with the scope this PID is already in (REUSED).
            left = end - time.monotonic()
            if left < 1.0:
                raise
            reply = ask_agent(cfg.agent.socket, request_fields(job, cfg), timeout=left)
    except OSError as exc:
        if os.geteuid() != 0:
            raise ScopeError(f"the agent is not reachable at {cfg.agent.socket} ({exc.strerror or exc}); "
                             f"is gpu-router-agent.socket running and is the caller in group gpu-router?") from None
        return place_directly(job)
    if reply.get("OK") != "1":
        raise ScopeError(f"the agent refused: {reply.get('ERROR', 'no reason given')}")
    return reply["SCOPE"]


def place_directly(job):
    """Root without an agent: create the scope ourselves over D-Bus (no accounting then)."""
    from . import policy

    w = job.workload
    props = properties(w, job.mode, job.fields()["METRIC"], os.getpid(), binding_service(),
                       policy.memory_max_mb(w, job.mode))
    name = unit_name(job.id)
    start_scope(name, props)
    return name


def start_scope(name, props, timeout=ACTIVE_TIMEOUT_S):
    """StartTransientUnit over the system bus, then wait for its job's end (the PID has moved): scopebus.py."""
    from . import scopebus

    scopebus.start_and_wait(name, props, timeout)
