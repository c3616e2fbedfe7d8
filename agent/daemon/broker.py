"""The agent's side of scope requests: who is asking (SO_PEERCRED), may they, and with which limits.

The request names a workload and the wrapper's decision; everything that bounds the job — MemoryMax, the slice,
RuntimeMaxSec, the PID put in the scope — comes from the agent's own config and the kernel's word on the peer,
never from the request. A refusal is logged as a ``broker-refused`` event.
"""

import os
import socket
import struct

from .. import config as _config
from .. import confinement, journal, oom_memory, policy, procstat, scope, slots, trust

_UCRED = struct.Struct("3i")
MAX_REQUEST = 64 * 1024


class Refused(Exception):
    pass


def peer_credentials(conn):
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it at connect()."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(data)


def process_groups(pid):
    """Every group id of a process (primary and supplementary), from /proc/PID/status."""
    groups = set()
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Gid:"):
                groups.update(int(x) for x in line.split()[1:])
            elif line.startswith("Groups:"):
                groups.update(int(x) for x in line.split()[1:])
    return groups


def group_id(name):
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def authorize(pid, uid, group_gid):
    """Root, or a member of the gpu-router group (by the process's groups, which setgroups() made real)."""
    if uid == 0:
        return
    if group_gid is None:
        raise Refused("the gpu-router group does not exist; only root may ask for scopes")
    try:
        groups = process_groups(pid)
    except OSError:
        raise Refused(f"cannot read the groups of pid {pid}") from None
    if group_gid not in groups:
        raise Refused(f"uid {uid} (pid {pid}) is not in group gpu-router")


def read_request(conn):
    """{name bytes: value bytes} of one framed request from a blocking socket (serve_one; the agent's loop reads
    through clients.py instead, never blocking)."""
    header = _recv_exact(conn, 4)
    size = frame_size(header)
    return parse_request(_recv_exact(conn, size))


def frame_size(header):
    size = int.from_bytes(header, "little")
    if size > MAX_REQUEST:
        raise Refused(f"request of {size} bytes is too large (at most {MAX_REQUEST})")
    return size


def parse_request(payload):
    """The request's fields, still bytes; Refused when the frame is malformed."""
    try:
        return journal.parse_native(payload, max_fields=MAX_FIELDS)
    except ValueError as exc:
        raise Refused(f"malformed request: {exc}") from None


def _recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise Refused("connection closed mid-request")
        data += chunk
    return data


def frame(fields):
    payload = journal.encode_native(list(fields.items()))
    return len(payload).to_bytes(4, "little") + payload


def reply(conn, fields):
    try:
        conn.sendall(frame(fields))
    except OSError:
        pass


# ---- validation: every field is bytes until it passes one of these ----------------------------------------------

MAX_FIELDS = 32


def _shown(value, limit=64):
    """A field as it may appear in a reply or a log line: bounded, and never an exception."""
    return value[:limit].decode("utf-8", "backslashreplace")


def _ascii_field(request, name, default=b""):
    value = request.get(name.encode(), default)
    if len(value) > 255 or not value.isascii():
        raise Refused(f"field {name} is not a short ASCII string")
    return value.decode("ascii")


_metric = trust.metric  # the wrapper's METRIC: "unknown" or comma-separated finite numbers (one rule: trust.py)


MAX_INPUT = 4096


def _input(value):
    """INPUT is a path the member chose: kept as bytes (journal.field_bytes logs it faithfully), bounded."""
    if not value:
        return None
    return value[:MAX_INPUT]


class Grant:
    """A scope request the agent accepted: what to create and how to account for it."""

    __slots__ = ("name", "props", "workload", "mode", "device", "metric", "pid", "job_id", "memory_max_mb",
                 "control_group", "input", "predicted_vram_mb", "scope_policy", "input_id", "confined")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def grant(cfg, request, pid, uid, locks=None):
    """Check a request (bytes fields) against the config and the peer; the Grant, or Refused with the reason."""
    if not isinstance(request, dict) or not all(isinstance(k, bytes) and isinstance(v, bytes)
                                                for k, v in request.items()):
        raise Refused("malformed request")
    op = request.get(b"OP")
    if op not in (b"scope", b"track"):
        raise Refused(f"unknown operation {_shown(op or b'')!r}")
    claimed = request.get(b"PID")
    if claimed is not None and claimed != str(pid).encode():
        raise Refused(f"request names pid {_shown(claimed)} but comes from pid {pid}")
    name = _ascii_field(request, "WORKLOAD")
    try:
        workload = cfg.workload(name)
    except _config.ConfigError as exc:
        raise Refused(str(exc)) from None
    mode = _ascii_field(request, "MODE")
    if mode not in scope.SLICES:
        raise Refused(f"mode {mode!r} is not GPU or CPU")
    job_raw = request.get(b"JOB", b"")
    job_id = trust.job_id(job_raw, workload.name, pid)  # "<workload>-<the caller's pid>-<suffix>"
    if job_id is None:
        raise Refused(f"bad job id {_shown(job_raw)!r} (expected {workload.name}-{pid}-…)")
    device = _ascii_field(request, "DEVICE", b"") or None
    if device is not None and device != "cpu" and not device.isdigit():
        raise Refused(f"bad device {device!r}")
    metric = _metric(request.get(b"METRIC", b"unknown"))
    predicted_raw = request.get(b"PREDICTED_VRAM_MB", b"")
    predicted = trust.digits(predicted_raw, 9)
    policy_raw = request.get(b"SCOPE_POLICY", b"")
    scope_policy = policy_raw.decode("ascii") if policy_raw in (b"required", b"best-effort", b"off") else None
    if uid != 0:
        held = held_slots(pid, cfg.router.lock_dir, workload.name, cfg=cfg, view=locks,
                          fd=trust.digits(request.get(b"SLOT_FD", b""), 7), wanted=(mode, device))
        if held is not None:
            if not held:
                raise Refused(f"pid {pid} holds no slot of workload {workload.name!r}: only a job the wrapper "
                              f"admitted gets a scope")
            if mode not in held:
                raise Refused(f"pid {pid} asks for a {mode} scope but holds a {'/'.join(sorted(held))} slot")
            if mode == "GPU" and device is not None and device not in held["GPU"]:
                raise Refused(f"pid {pid} asks for GPU {device} but holds a slot on GPU "
                              f"{'/'.join(sorted(held['GPU']))}")
    if op == b"track":  # scope = "off", or a Slurm step: an account only (no scope, no holder, no limits)
        # Where Slurm confines the caller (the agent's own reading of /proc/PID/cgroup, never a request field), the
        # job is accounted from its step's cgroup: peaks and OOM kills from where it really is. Read only: nothing
        # is written to Slurm's cgroups, no holder put there, no PID moved (--mem, sacct and scancel stay Slurm's).
        held = confinement.step_account(confinement.read(pid))
        return Grant(workload=workload, mode=mode, device=device, metric=metric, pid=pid, job_id=job_id,
                     scope_policy="off", input=_input(request.get(b"INPUT")), predicted_vram_mb=predicted,
                     input_id=oom_memory.parse_id(request.get(b"INPUT_ID", b"")),
                     confined=held[0].label if held else None, control_group=held[1] if held else None)
    memory_max = policy.memory_max_mb(workload, mode)
    unit = scope.unit_name(job_id)
    props = scope.properties(workload, mode, metric, pid, scope.binding_service(pid), memory_max)
    return Grant(name=unit, props=props, workload=workload, mode=mode, device=device,
                 metric=metric, pid=pid, job_id=job_id, memory_max_mb=memory_max,
                 control_group=scope.control_group(mode, job_id), scope_policy=scope_policy,
                 input=_input(request.get(b"INPUT")), predicted_vram_mb=predicted,
                 # the wrapper's stat of INPUT, "dev:ino:size:mtime_ns": a claim the agent checks against its own
                 # stat (oom_memory.verify) before it may name an input in the OOM memory; malformed → None
                 input_id=oom_memory.parse_id(request.get(b"INPUT_ID", b"")))


def held_slots(pid, lock_dir, workload, locks_path="/proc/locks", cfg=None, view=None, fd=None, wanted=None):
    """{"GPU": {device, …}, "CPU": {"cpu"}} of the slots of ``workload`` that ``pid`` holds (flock), from the
    kernel's lock table; None when that cannot be known (then the request is judged on its own).

    ``fd``: the descriptor the request says holds its slot (SLOT_FD), a member's word: its locks are read from the
    kernel (slots.fd_flock_table, no global lock), and if they show ``pid`` holding a real slot that gives
    ``wanted`` (mode, device), that is the answer; anything else (an old wrapper, a wrong descriptor, a slot of
    another mode) falls back to the whole table, which decides as before. The shortcut only ever grants what the
    table would: the same kernel record of the same lock, on a slot file checked the same way (trust.slot_holders).

    The MODE of a scope decides its limits (slice, MemoryMax): the agent takes it from the slot the caller actually
    holds, not from what it says. The wrapper takes its slot before it asks, in the same PID, and the lock is the
    kernel's record of who holds what. Only files named as a slot (trust.slot_name; with ``cfg`` a slot the
    config has), one link, are looked at, at most trust.MAX_NAMES names. ``view``: the LockView of the batch the
    request is served in (one table read for all of them), else the table is read for this request alone."""
    pools = trust.pools_of(cfg) if cfg is not None else {workload: (1 << 20, 1 << 20)}
    if fd is not None:
        own = slots.fd_flock_table(pid, fd)
        if own:
            held = _held(_slot_holders(lock_dir, pools, own), workload, pid)
            mode, device = wanted or (None, None)
            if held and mode in held and (mode != "GPU" or device is None or device in held["GPU"]):
                return held
    if view is None:
        view = LockView(locks_path)
    return _held(view.slot_holders(lock_dir, pools), workload, pid)


def _held(found, workload, pid):
    if found is None:
        return None
    held = {}
    for (w, pool), holders in found.items():
        if w == workload and pid in holders:
            if pool == "cpu":
                held.setdefault("CPU", set()).add("cpu")
            else:
                held.setdefault("GPU", set()).add(pool[3:])
    return held


class LockView:
    """Who holds which slot, read from the kernel once for a batch of requests (the requests of one loop turn,
    clients.Clients.serve) instead of once per request: /proc/locks and the lock dir's slot files.

    Why a shared read is still the kernel's word for each request: it is made lazily, at the first check that needs
    it, and a batch is only served once all of its requests have been received (serve() starts after the turn's
    reads; a request read later belongs to the next batch, with a view of its own). So for every request of the
    batch the table is read after the request arrived and before it is answered — the same window in which the
    per-request read was made. A slot released before that read is not in it, and the request is refused as it
    always was; a view is never kept across batches (a table read before a request arrived could show a slot its
    sender had already given up)."""

    def __init__(self, locks_path="/proc/locks"):
        self.locks_path = locks_path
        self.reads = 0      # table reads made: at most one
        self._table = None  # {(major, minor, inode): pid}, or None (not read yet, or unreadable)
        self._found = {}    # (lock_dir, pools) → trust.slot_holders of every workload

    def slot_holders(self, lock_dir, pools):
        """{(workload, pool): {pid, …}} of the real slots held, every workload of ``pools``; None when the table
        or the lock dir cannot be read."""
        key = (lock_dir, tuple(sorted(pools.items())))
        if key in self._found:
            return self._found[key]
        if self.reads == 0:
            self.reads += 1
            self._table = slots.flock_table(self.locks_path)  # None: unreadable (for the whole batch)
        found = _slot_holders(lock_dir, pools, self._table) if self._table is not None else None
        self._found[key] = found
        return found


def _slot_holders(lock_dir, pools, table):
    """trust.slot_holders of the lock dir against a flock table; None when the lock dir cannot be opened."""
    try:
        dir_fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return trust.slot_holders(dir_fd, pools, table)
    finally:
        os.close(dir_fd)


class RateLimit:
    """At most ``burst`` events per key in any ``window`` seconds, then one line saying how many were held back
    (what journald's own RateLimitBurst does per service, here per uid: one member cannot flood the journal)."""

    def __init__(self, burst=10, window=10.0, keys=1024):
        self.burst, self.window, self.keys = burst, window, keys
        self.state = {}  # key -> [window start, count, suppressed]

    def allow(self, key, now=None):
        """(allowed?, events suppressed since the last allowed one)."""
        import time

        now = time.monotonic() if now is None else now
        entry = self.state.get(key)
        if entry is None or now - entry[0] >= self.window:
            if entry is None and len(self.state) >= self.keys:
                self.state.clear()  # bounded memory: a flood of distinct keys costs at most a few extra lines
            suppressed = entry[2] if entry else 0
            self.state[key] = [now, 1, 0]
            return True, suppressed
        if entry[1] < self.burst:
            entry[1] += 1
            suppressed, entry[2] = entry[2], 0
            return True, suppressed
        entry[2] += 1
        return False, 0


REFUSALS = RateLimit()


def log_refusal(pid, uid, reason):
    """A broker-refused event, rate-limited per uid; the caller is told the reason in the reply either way."""
    allowed, suppressed = REFUSALS.allow(uid)
    if not allowed:
        return False
    more = f" ({suppressed} more refusals for uid {uid} not logged)" if suppressed else ""
    journal.emit("broker-refused", f"refused a scope request from pid {pid} (uid {uid}): {reason}{more}",
                 {"PID": pid, "UID": uid, "REASON": reason, "SUPPRESSED": suppressed or None})
    return True


def refuse(conn, pid, uid, reason):
    log_refusal(pid, uid, reason)
    reply(conn, {"OK": "0", "ERROR": reason})


def peer_gone(pid):
    """The process that sent a request has exited (no /proc entry, or a zombie). Its request waited in the socket's
    queue while no agent ran (a restart), or its wrapper gave up waiting (the 1 s of OP=sample), exec'd its job
    and the job ended: refusing it refuses nobody, so it is answered but not logged as a refusal (which would
    show a member refused, and count in gpu_router_broker_refusals_total, after every agent restart)."""
    st = procstat.read(pid)
    return st is None or st.gone


def handle(payload, pid, uid, cfg, group_gid, start_scope=scope.start_scope, existing=None, fresh_sample=None,
           locks=None):
    """One complete request (the frame's payload) → (reply fields, Grant or None). Never raises.

    ``existing(pid, grant)``: the scope the agent already made for this PID, if any, still alive: a PID is in one
    scope at a time (a wrapped program that execs another wrapped program, or a member asking again), so a second
    request is answered with that scope and makes nothing new: no second unit, no second account. ``grant`` is
    the checked request, for an account that knows less than it says (see Agent.existing_scope); for ``OP=track``
    any account of the PID counts (None: none), its scope or "" when it has none.

    ``OP=track`` is the request of a GPU job whose workload has ``scope = "off"``: the same fields, checked the same
    way, but no scope and no holder are made; the Grant (name and control_group None) is accounted like a
    best-effort job without systemd, so its outcome and CUDA OOMs are known all the same.
    """
    try:
        request = parse_request(payload)
        authorize(pid, uid, group_gid)
        if request.get(b"OP") == b"sample" and fresh_sample is not None:
            # vram admission asks it when its snapshot is older than a moment: publish a new one unless one was
            # taken just now; the reply carries its time, nothing else is done for it.
            return {"OK": "1", "TIME": repr(fresh_sample())}, None
        g = grant(cfg, request, pid, uid, locks)
    except Refused as exc:
        if not peer_gone(pid):
            log_refusal(pid, uid, str(exc))
        return {"OK": "0", "ERROR": str(exc)}, None
    except Exception as exc:  # noqa: BLE001 - nothing a caller sends may take the agent down
        reason = f"bad request: {type(exc).__name__}"
        log_refusal(pid, uid, reason)
        return {"OK": "0", "ERROR": reason}, None
    held = existing(pid, g) if existing is not None else None
    if g.name is None:  # OP=track (scope = "off"): the agent only follows the job; a PID followed already is kept
        return ({"OK": "1", "TRACKED": "1", "REUSED": "1"}, None) if held is not None else \
            ({"OK": "1", "TRACKED": "1"}, g)
    if held:
        return {"OK": "1", "SCOPE": held, "REUSED": "1"}, None
    try:
        start_scope(g.name, g.props)
    except scope.ScopeError as exc:
        return scope_failed(g, exc)
    except Exception as exc:  # noqa: BLE001
        return {"OK": "0", "ERROR": f"scope failed: {type(exc).__name__}"}, None
    return {"OK": "1", "SCOPE": g.name}, g


def scope_failed(g, exc):
    """No scope for a granted request → (reply fields, Grant or None). Also the agent's answer when a scope's job
    ends in failure after the call (Agent.scope_ended)."""
    if g.scope_policy != "best-effort":
        return {"OK": "0", "ERROR": str(exc)}, None
    # The job runs anyway, without a scope (no systemd here): account for it all the same.
    g.name = g.control_group = None
    return {"OK": "0", "ERROR": str(exc)}, g


def serve_one(conn, cfg, group_gid, start_scope=scope.start_scope, existing=None, fresh_sample=None):
    """Handle one connection with blocking reads (tests, tools); returns the Grant when one was made, else None.
    The agent's loop uses clients.Clients instead: it never waits on a client."""
    conn.settimeout(5)
    try:
        pid, uid, _ = peer_credentials(conn)
    except OSError:
        return None
    try:
        header = _recv_exact(conn, 4)
        payload = _recv_exact(conn, frame_size(header))  # read first: closing on unread data resets the reply
    except Refused as exc:
        refuse(conn, pid, uid, str(exc))
        return None
    except OSError:
        return None
    fields, g = handle(payload, pid, uid, cfg, group_gid, start_scope, existing, fresh_sample)
    reply(conn, fields)
    return g
