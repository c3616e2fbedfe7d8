"""The broker's connections, served without ever waiting on a client.

The agent has one thread and one ``selectors`` loop; it also publishes the GPU snapshot and pets the watchdog.
So no client may hold that loop: every connection is non-blocking and has its own small state (what has been read,
what is left to write) and a deadline for the whole exchange. A silent client, one that sends a byte every few
seconds, or one that never reads its reply is closed at its deadline; meanwhile every other client is served as
its bytes arrive. The number of open connections is bounded (in all, and per uid), so a member opening thousands
cannot exhaust the agent's descriptors either. This is what sshd's LoginGraceTime and MaxStartups do.

``handler(payload, pid, uid) -> reply bytes`` runs once per complete request. It may instead return a callable,
``later(answer)``: the reply comes later (a scope being made), through ``answer(reply bytes)``; meanwhile the
connection is out of the selector and every other client is served.

Complete requests are not handled as they are read but by ``serve()``, which the loop calls after each turn (the
events of one ``select()``): the requests of a turn are one batch, handled inside ``batch(payloads)`` (a context
the agent gives: one read of the kernel's lock table for all of them, broker.LockView, and their holders started
together), so a burst costs one table read per turn instead of one per request.
"""

import contextlib
import errno
import os
import selectors
import socket
import struct
import time

from . import broker

DEADLINE_S = 2.0       # the wrapper sends its whole request at once: 2 s is ample, and bounds a slow client
MAX_OPEN = 256         # connections in all (well under the service's 1024 descriptors)
MAX_PER_UID = 64       # connections of one uid (a runner's burst of jobs is served; a flood is cut)
LATER_S = 8.0          # a reply that comes later: the handler answers first (its own bound), this only backs it up
_UCRED = struct.Struct("3i")


class Conn:
    """One client: credentials from the kernel at accept, a read buffer, then a reply to write."""

    __slots__ = ("sock", "fd", "pid", "uid", "gid", "deadline", "inbuf", "need", "outbuf", "waiting", "complete")

    def __init__(self, sock, pid, uid, gid, deadline):
        self.sock, self.fd = sock, sock.fileno()
        self.pid, self.uid, self.gid = pid, uid, gid
        self.deadline = deadline
        self.inbuf = b""
        self.need = None     # payload size once the 4-byte header is in
        self.outbuf = None   # the reply, once the request is handled
        self.waiting = False  # the handler answers later
        self.complete = False  # the whole request is read (in ``pending`` until served)


class Clients:
    def __init__(self, selector, handler, refuse=None, deadline_s=DEADLINE_S, max_open=MAX_OPEN,
                 max_per_uid=MAX_PER_UID, clock=time.monotonic, batch=None):
        self.selector = selector
        self.handler = handler
        self.batch = batch or contextlib.nullcontext
        self.pending = []  # (Conn, payload): complete requests read this turn, for serve()
        self.refuse = refuse or (lambda pid, uid, reason: None)
        self.deadline_s = deadline_s
        self.max_open = max_open
        self.max_per_uid = max_per_uid
        self.clock = clock
        self.conns = {}  # fd -> Conn
        self.served = 0
        self.dropped = 0

    # -- accepting -------------------------------------------------------------------------------------------

    def accept(self, listener, limit=64):
        """Take what is waiting on the listener (at most ``limit`` per wake-up, so the loop stays fair)."""
        for _ in range(limit):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.expire(force_oldest=True)  # out of descriptors: make room by closing the oldest
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _UCRED.size))
            except OSError:
                sock.close()
                continue
            # A connection waiting on its scope is the agent's to answer, not the uid's to hold: not counted.
            if len(self.conns) >= self.max_open or \
                    sum(1 for c in self.conns.values() if c.uid == uid and not c.waiting) >= self.max_per_uid:
                self.dropped += 1
                self.refuse(pid, uid, "too many open connections to the agent")
                _send_quietly(sock, broker.frame({"OK": "0", "ERROR": "too many open connections; retry"}))
                _close_read(sock)
                continue
            conn = Conn(sock, pid, uid, gid, self.clock() + self.deadline_s)
            self.conns[conn.fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, ("client", conn.fd))
            # A wrapper sends its request right after connect(): it is usually here already, and read now it is
            # served in this turn instead of the next select()'s.
            self._read(conn)

    # -- events ----------------------------------------------------------------------------------------------

    def ready(self, fd, events):
        conn = self.conns.get(fd)
        if conn is None:
            return
        if conn.outbuf is not None:
            self._write(conn)
        else:
            self._read(conn)

    def _read(self, conn):
        if conn.complete:
            return
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not chunk:
            self.close(conn)  # gone before its request was whole: nothing to answer
            return
        conn.inbuf += chunk
        if conn.need is None and len(conn.inbuf) >= 4:
            try:
                conn.need = broker.frame_size(conn.inbuf[:4])
            except broker.Refused as exc:
                self._answer(conn, {"OK": "0", "ERROR": str(exc)}, refused=str(exc))
                return
        if conn.need is not None and len(conn.inbuf) >= 4 + conn.need and not conn.complete:
            conn.complete = True  # read no further: the rest (at most an EOF) is left for _close_read
            self.pending.append((conn, conn.inbuf[4:4 + conn.need]))
            conn.inbuf = b""

    def serve(self):
        """Handle the requests read since the last call, as one batch (inside ``batch(payloads)``). The loop calls
        it after each turn's events and after expire(); a request read later is the next batch's."""
        while self.pending:
            todo, self.pending = self.pending, []
            with self.batch([payload for _, payload in todo]):
                for conn, payload in todo:
                    if self.conns.get(conn.fd) is conn:
                        self._handle(conn, payload)

    def _handle(self, conn, payload):
        try:
            reply = self.handler(payload, conn.pid, conn.uid)
        except Exception as exc:  # noqa: BLE001 - the handler must not raise; if it does, the client pays
            reply = broker.frame({"OK": "0", "ERROR": f"internal error: {type(exc).__name__}"})
        self.served += 1
        if callable(reply):
            self._wait(conn, reply)
            return
        conn.outbuf = reply
        self._write(conn)

    def _wait(self, conn, later):
        """Out of the selector until answered (a shut-down write side would read as EOF again and again)."""
        conn.waiting = True
        conn.deadline = self.clock() + LATER_S
        self.selector.unregister(conn.sock)
        later(lambda data, conn=conn: self._later(conn, data))

    def _later(self, conn, data):
        if self.conns.get(conn.fd) is not conn or not conn.waiting:
            return  # closed meanwhile (its backstop deadline): nobody to answer
        conn.waiting = False
        conn.outbuf = data
        self.selector.register(conn.sock, selectors.EVENT_WRITE, ("client", conn.fd))
        self._write(conn)

    def _answer(self, conn, fields, refused=None):
        if refused:
            self.refuse(conn.pid, conn.uid, refused)
        conn.outbuf = broker.frame(fields)
        self._write(conn)

    def _write(self, conn):
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self.close(conn)
            return
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, ("client", conn.fd))

    # -- deadlines -------------------------------------------------------------------------------------------

    def next_deadline(self):
        return min((c.deadline for c in self.conns.values()), default=None)

    def expire(self, now=None, force_oldest=False):
        """Close every connection past its deadline (and, when asked, the oldest one whatever its deadline)."""
        now = self.clock() if now is None else now
        late = [c for c in self.conns.values() if c.deadline <= now]
        if force_oldest and not late and self.conns:
            late = [min(self.conns.values(), key=lambda c: c.deadline)]
        for conn in late:
            if conn.waiting:
                conn.waiting = False
                _send_quietly(conn.sock, broker.frame({"OK": "0", "ERROR": "no answer in time; retry"}))
                self.close(conn)
                continue
            if conn.outbuf is None and not force_oldest:
                # The agent may be the slow one (a scope took seconds to make, an emulated or loaded host): what
                # the client sent in time is read first, so only a client that really is incomplete is expired.
                was_complete = conn.complete
                self._read(conn)
                if self.conns.get(conn.fd) is not conn or conn.outbuf is not None or \
                        (conn.complete and not was_complete):
                    continue  # whole (served below) or gone after all; a reply still to write keeps its deadline
            if conn.complete and conn.outbuf is None:  # read whole, yet never served (its batch failed)
                _send_quietly(conn.sock, broker.frame({"OK": "0", "ERROR": "internal error; retry"}))
                self.close(conn)
                continue
            if conn.outbuf is None:
                self.refuse(conn.pid, conn.uid, f"no complete request within {self.deadline_s:g}s")
                _send_quietly(conn.sock, broker.frame({"OK": "0", "ERROR": "request timed out"}))
            self.close(conn)
        self.serve()
        return len(late)

    def close(self, conn):
        if self.conns.pop(conn.fd, None) is None:
            return
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        _close_read(conn.sock)

    def drop(self, fd):
        conn = self.conns.get(fd)
        if conn is not None:
            self.close(conn)

    def close_all(self):
        for conn in list(self.conns.values()):
            self.close(conn)


def _close_read(sock):
    """Close after reading what is already there (at most a little): closing with unread data makes the kernel
    send a reset, which can destroy the reply before the client reads it."""
    try:
        for _ in range(4):
            if not sock.recv(65536):
                break
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _send_quietly(sock, data):
    try:
        sock.send(data)
    except OSError:
        pass


def open_fds():
    """How many descriptors this process has open (for tests and the status line)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1
