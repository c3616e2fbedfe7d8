"""The agent's side of scope requests: who is asking (SO_PEERCRED), may they, and with which limits.

The request names a workload and the wrapper's decision; everything that bounds the job — MemoryMax, the slice,
RuntimeMaxSec, the PID put in the scope — comes from the agent's own config and the kernel's word on the peer,
never from the request. A refusal is logged as a ``broker-refused`` event.
"""

import os
import socket
import struct

from .. import config as _config
from .. import journal, policy, scope

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
    header = _recv_exact(conn, 4)
    size = int.from_bytes(header, "little")
    if size > MAX_REQUEST:
        raise Refused(f"request of {size} bytes is too large")
    return journal.decode_native(_recv_exact(conn, size))


def _recv_exact(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise Refused("connection closed mid-request")
        data += chunk
    return data


def reply(conn, fields):
    payload = journal.encode_native(list(fields.items()))
    try:
        conn.sendall(len(payload).to_bytes(4, "little") + payload)
    except OSError:
        pass


class Grant:
    """A scope request the agent accepted: what to create and how to account for it."""

    __slots__ = ("name", "props", "workload", "mode", "device", "metric", "pid", "job_id", "memory_max_mb",
                 "control_group", "input", "predicted_vram_mb", "scope_policy")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def grant(cfg, request, pid, uid):
    """Check a request against the config and the peer; the Grant, or Refused with the reason. Pure but /proc."""
    if request.get("OP") != "scope":
        raise Refused(f"unknown operation {request.get('OP')!r}")
    claimed = request.get("PID")
    if claimed is not None and claimed != str(pid):
        raise Refused(f"request names pid {claimed} but comes from pid {pid}")
    try:
        workload = cfg.workload(request.get("WORKLOAD", ""))
    except _config.ConfigError as exc:
        raise Refused(str(exc)) from None
    mode = request.get("MODE")
    if mode not in scope.SLICES:
        raise Refused(f"mode {mode!r} is not GPU or CPU")
    job_id = request.get("JOB", "")
    if not job_id.startswith(workload.name + "-") or not all(c.isalnum() or c in "-_." for c in job_id):
        raise Refused(f"bad job id {job_id!r}")
    metric = request.get("METRIC", "unknown")[:64]
    memory_max = policy.memory_max_mb(workload, mode)
    name = scope.unit_name(job_id)
    props = scope.properties(workload, mode, metric, pid, scope.caller_unit(pid), memory_max)
    predicted = request.get("PREDICTED_VRAM_MB") or None
    return Grant(name=name, props=props, workload=workload, mode=mode, device=request.get("DEVICE"),
                 metric=metric, pid=pid, job_id=job_id, memory_max_mb=memory_max,
                 control_group=scope.control_group(mode, job_id), scope_policy=request.get("SCOPE_POLICY"),
                 input=request.get("INPUT") or None, predicted_vram_mb=int(predicted) if predicted else None)


def refuse(conn, pid, uid, reason):
    journal.emit("broker-refused", f"refused a scope request from pid {pid} (uid {uid}): {reason}",
                 {"PID": pid, "UID": uid, "REASON": reason})
    reply(conn, {"OK": "0", "ERROR": reason})


def serve_one(conn, cfg, group_gid, start_scope=scope.start_scope):
    """Handle one connection; returns the Grant when a scope was made (for accounting), else None."""
    conn.settimeout(5)
    try:
        pid, uid, _ = peer_credentials(conn)
    except OSError:
        return None
    try:
        request = read_request(conn)  # read first: closing on unread data would reset the reply away
        authorize(pid, uid, group_gid)
        g = grant(cfg, request, pid, uid)
    except Refused as exc:
        refuse(conn, pid, uid, str(exc))
        return None
    except (OSError, ValueError) as exc:
        refuse(conn, pid, uid, f"bad request: {exc}")
        return None
    try:
        start_scope(g.name, g.props)
    except scope.ScopeError as exc:
        reply(conn, {"OK": "0", "ERROR": str(exc)})
        if g.scope_policy != "best-effort":
            return None
        # The job runs anyway, without a scope (no systemd here): account for it all the same.
        g.name = g.control_group = None
        return g
    reply(conn, {"OK": "1", "SCOPE": g.name})
    return g
