"""Process exit statuses from the kernel's proc connector (netlink), for job accounting.

A job execs from the wrapper, so its parent is the caller and nobody but the caller can wait() for it; a scope
records no exit status either. The proc connector announces every process exit with its wait status, to a
listener with CAP_NET_ADMIN in the initial network namespace: exactly the agent's situation. Where it is not
available (no capability, another network namespace) the agent still accounts jobs, without EXIT_STATUS.

Across agent restarts: the agent hands its subscribed socket to systemd's file descriptor store (FDSTORE=1,
FDNAME=proc-connector) and gets it back on the next start (``from_fd``). While no agent runs, the kernel keeps
queueing exit events in that socket (its receive buffer is raised to RCVBUF bytes: ~10,000 exits), so the exits of
jobs that ended during the restart are read by the next agent, in order.
"""

import errno
import os
import socket
import struct

from .. import procstat

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 3
SO_RCVBUFFORCE = 33
RCVBUF = 8 << 20
FD_NAME = "proc-connector"

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")
_EXIT = struct.Struct("=IIII")


class Unavailable(Exception):
    pass


def open_listener(verify=True):
    """A non-blocking netlink socket subscribed to process events; Unavailable with the reason otherwise."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        raise Unavailable(f"netlink connector socket: {exc.strerror}") from None
    try:
        sock.bind((0, CN_IDX_PROC))  # port id 0: the kernel picks a free one
        _grow_buffer(sock)
        _control(sock, PROC_CN_MCAST_LISTEN)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise Unavailable(f"subscribing to process events: {exc.strerror} (needs CAP_NET_ADMIN in the initial "
                          f"network namespace)") from None
    if verify and not _hears_an_exit(sock):
        close_listener(sock)
        raise Unavailable("subscribed, but no exit event arrives (the kernel ignores listeners outside the initial "
                          "PID and user namespaces, e.g. in a container)")
    return sock


def _grow_buffer(sock):
    """Room for the exits of a busy host while nobody reads (an agent restart): SO_RCVBUFFORCE as root."""
    for opt in (SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
            return
        except OSError:
            continue


def from_fd(fd):
    """The subscribed socket a previous agent left in systemd's fd store (still listening, events queued)."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_NETLINK:
        sock.detach()
        raise Unavailable(f"fd {fd} is not a netlink socket")
    sock.setblocking(False)
    return sock


def _control(sock, op_code):
    op = struct.pack("=I", op_code)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0)
    sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(cn) + len(op), NLMSG_DONE, 0, 0, 0) + cn + op)


def close_listener(sock, unsubscribe=True):
    """Unsubscribe, then close: the kernel counts listeners and keeps sending events to nobody otherwise.

    ``unsubscribe=False`` when a copy of the socket stays in systemd's fd store for the next agent: the listener
    count is global, so unsubscribing would stop the events the next agent must read.
    """
    if unsubscribe:
        try:
            _control(sock, PROC_CN_MCAST_IGNORE)
        except OSError:
            pass
    sock.close()


def _hears_an_exit(sock, timeout=1.0):
    """The kernel accepts the subscription silently even where it will never deliver: prove it with a child."""
    import select
    import time

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if any(p == pid for p, _ in drain(sock)):
            return True
    return False


def parse(datagram):
    """[(pid, wait status)] of thread-group leaders that exited, from one netlink datagram."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, _, _, _, _ = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size:
            break
        body = offset + _NLMSGHDR.size
        if body + _CN_MSG.size + _EVENT_HEAD.size + _EXIT.size <= len(datagram):
            idx, val, _, _, _, _ = _CN_MSG.unpack_from(datagram, body)
            event = body + _CN_MSG.size
            what, _, _ = _EVENT_HEAD.unpack_from(datagram, event)
            if idx == CN_IDX_PROC and val == CN_VAL_PROC and what == PROC_EVENT_EXIT:
                pid, tgid, code, _ = _EXIT.unpack_from(datagram, event + _EVENT_HEAD.size)
                if pid == tgid:
                    out.append((pid, code))
        offset += (length + 3) & ~3
    return out


def drain(sock):
    """Every pending exit event, without blocking."""
    events = []
    while True:
        try:
            events += parse(sock.recv(65536))
        except BlockingIOError:
            return events
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # events were dropped under load; keep going
                continue
            raise


def zombie_status(pid):
    """The wait status of an exited process its parent has not reaped yet (/proc/PID/stat field 52), else None."""
    st = procstat.read(pid)
    return st.exit_status if st is not None and st.gone else None


def exit_code(status):
    """The shell's view of a wait status: the exit code, or 128 + signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
