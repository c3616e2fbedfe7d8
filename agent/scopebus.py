"""One system-bus connection that makes scopes: StartTransientUnit, then the end of its job (JobRemoved).

systemd answers StartTransientUnit at once with the path of the start job it queued; the job ends a moment later
(the PIDs have moved) and the manager says so with JobRemoved(id, job, unit, result). So the connection is opened
once, the signal matched once (AddMatch), and any number of scopes can be in flight together: the agent puts
``fileno()`` in its selectors loop and answers each wrapper when its own job ends, never after another's. The
wrapper's root path (no agent) uses the same connection type and waits for its one job (``wait``).

Anyone on the bus may send us a signal: a JobRemoved counts only from systemd's own unique name.

As root (the agent, and the wrapper's root path) the connection goes straight to systemd's private socket,
/run/systemd/private, as systemctl's does: no dbus-daemon between us, so a StartTransientUnit round trip is one hop
each way instead of two (measured ~0.7–1.1 ms against ~1.8–2.2 ms in the lane's container, and the bus daemon is
one process fewer to wait for on a busy host). Only systemd is at the other end of that socket, so every message
on it is systemd's; it sends every manager signal to a direct connection unasked (no AddMatch there), of which
only JobRemoved is kept. Where that socket cannot be reached (not root, not systemd, a sandbox), the system bus as
before.
"""

import errno
import os

from .scope import ScopeError

SYSTEMD = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER = b"org.freedesktop.systemd1.Manager"
UNIT_PREFIX = b"/org/freedesktop/systemd1/unit"
_DBUS = (b"org.freedesktop.DBus", b"/org/freedesktop/DBus", b"org.freedesktop.DBus")
_RULE = (b"type='signal',sender='org.freedesktop.systemd1',path='/org/freedesktop/systemd1',"
         b"interface='org.freedesktop.systemd1.Manager',member='JobRemoved'")
# The connection itself is gone (dbus restarted, closed): reconnecting and calling again is safe, the call was
# never delivered.
_LOST = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN, errno.EBADF}
_MAX_MESSAGES = 4096  # per drain: the loop gets back to its other work even under a flood of signals
PRIVATE = "/run/systemd/private"


def unit_values(props):
    """(name, value) pairs from scope.properties → pystemd's property dict (PIDs needs its own signature)."""
    values = {}
    for key, value in props:
        if key == "PIDs":
            values[b"_custom"] = (b"PIDs", b"au", value)
        elif isinstance(value, str):
            values[key.encode()] = value.encode()
        elif isinstance(value, list):
            values[key.encode()] = [v.encode() if isinstance(v, str) else v for v in value]
        else:
            values[key.encode()] = value
    return values


class ScopeBus:
    def __init__(self, private=PRIVATE):
        self.bus = None
        self.manager = None  # systemd's unique name on the bus
        self.private_path = private  # systemd's own socket, tried first as root (None: never)
        self.private = False  # the open connection is the private socket

    def open(self):
        try:
            from pystemd.dbuslib import DBus, DBusAddress, apply_signature
        except ImportError:
            raise ScopeError("pystemd is not installed (python3-pystemd)") from None
        if self.private_path and os.geteuid() == 0 and _answers(self.private_path):
            bus = DBusAddress(b"unix:path=" + os.fsencode(self.private_path), True)
            try:
                bus.open()
                bus.call_method(SYSTEMD, MANAGER_PATH, b"org.freedesktop.DBus.Peer", b"Ping", [])
            except Exception:  # noqa: BLE001 - refused, or not systemd: the system bus then
                _close(bus)
            else:
                self.bus, self.manager, self.private = bus, None, True
                return
        bus = DBus()
        try:
            bus.open()
            bus.call_method(*_DBUS, b"AddMatch", apply_signature(b"s", [_RULE]))
            self.manager = bus.call_method(*_DBUS, b"GetNameOwner", apply_signature(b"s", [SYSTEMD])).body
        except Exception as exc:  # pystemd's DBus errors: no bus, no systemd on it
            _close(bus)
            raise ScopeError(f"cannot reach systemd over D-Bus: {exc}") from None
        self.bus, self.private = bus, False

    def close(self):
        if self.bus is not None:
            _close(self.bus)
        self.bus, self.private = None, False

    def fileno(self):
        return self.bus.get_fd() if self.bus is not None else None

    def start(self, name, props):
        """Queue the scope's start job; its path (bytes). Reconnects once when the connection had been lost."""
        if self.bus is None:
            self.open()
        try:
            return self._call(name, props)
        except ScopeError:
            raise
        except Exception as exc:  # noqa: BLE001 - pystemd raises its own DBus errors
            if -getattr(exc, "errno", 0) not in _LOST:
                raise ScopeError(f"systemd refused the scope {name}: {exc}") from None
        self.close()
        self.open()
        try:
            return self._call(name, props)
        except Exception as exc:  # noqa: BLE001
            raise ScopeError(f"systemd refused the scope {name}: {exc}") from None

    def _call(self, name, props):
        from pystemd.dbuslib import apply_signature
        from pystemd.systemd1.unit_signatures import signature_array

        args = apply_signature(b"ss", [name.encode(), b"fail"]) + signature_array(unit_values(props))
        args += [(ord(b"a"), b"(sa(sv))"), (-1, None)]  # no auxiliary units
        return self.bus.call_method(SYSTEMD, MANAGER_PATH, MANAGER, b"StartTransientUnit", args).body

    def drain(self):
        """Read what the connection holds: [(job path, result)] for each JobRemoved systemd sent. OSError-free:
        a lost connection raises ScopeError (the caller reconnects)."""
        ended, empty, refreshed = [], 0, False
        for _ in range(_MAX_MESSAGES):
            try:
                msg = self.bus.process()
            except Exception as exc:  # noqa: BLE001
                raise ScopeError(f"the D-Bus connection failed: {exc}") from None
            if msg.is_empty():
                # Nothing left, or one message sd-bus answered itself (a Ping): only twice in a row means done.
                empty += 1
                if empty == 2:
                    break
                continue
            empty = 0
            if not msg.is_signal(MANAGER, b"JobRemoved"):
                continue
            if not self.private:  # on the bus anyone may send a signal (on systemd's own socket only systemd can)
                if msg.get_sender() != self.manager and not refreshed:
                    refreshed = True  # systemd re-executed itself and has a new name, or this is a forgery
                    self._refresh_manager()
                if msg.get_sender() != self.manager:
                    continue
            msg.process_reply(False)
            body = msg.body
            if isinstance(body, list) and len(body) == 4:
                ended.append((body[1], body[3].decode("ascii", "replace")))
        return ended

    def _refresh_manager(self):
        from pystemd.dbuslib import apply_signature

        try:
            self.manager = self.bus.call_method(*_DBUS, b"GetNameOwner", apply_signature(b"s", [SYSTEMD])).body
        except Exception:  # noqa: BLE001 - no owner now: keep the old name
            pass

    def wait(self, job, timeout):
        """Block until ``job`` ends (the wrapper's root path); its result, or None after ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for path, result in self.drain():
                if path == job:
                    return result
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self.bus.wait(int(left * 1_000_000))
            except Exception as exc:  # noqa: BLE001
                raise ScopeError(f"the D-Bus connection failed: {exc}") from None

    def active_state(self, name):
        """The unit's ActiveState (str), asked directly: the word when a job's signal may have been lost."""
        from pystemd.dbuslib import path_encode

        if self.bus is None:
            self.open()
        try:
            state = self.bus.get_property(SYSTEMD, path_encode(UNIT_PREFIX, name.encode()),
                                          b"org.freedesktop.systemd1.Unit", b"ActiveState", b"s")
        except Exception as exc:  # noqa: BLE001
            raise ScopeError(f"cannot read the state of {name}: {exc}") from None
        return state.decode("ascii", "replace") if isinstance(state, bytes) else str(state)


PROBE_TIMEOUT_S = 1.0


def _answers(path):
    """Whether the private socket accepts us within PROBE_TIMEOUT_S: connected and authenticated (the D-Bus
    EXTERNAL handshake's first line answered ``OK``). sd-bus would wait up to its 90 s authentication timeout for
    a peer that does not answer (systemd stuck, or not systemd), with the agent's loop held all that time."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(PROBE_TIMEOUT_S)
        s.connect(path)
        s.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        return s.recv(256).startswith(b"OK ")
    except OSError:
        return False
    finally:
        s.close()


def _close(bus):
    try:
        bus.close()
    except Exception:  # noqa: BLE001 - closing what failed to open
        pass


def start_and_wait(name, props, timeout):
    """StartTransientUnit and wait for the job's end on a connection of its own (the wrapper, root, no agent)."""
    bus = ScopeBus()
    try:
        job = bus.start(name, props)
        result = bus.wait(job, timeout)
        if result == "done":
            return
        if result is None:
            state = bus.active_state(name)
            if state == "active":
                return
            result = f"state {state}"
        else:
            result = f"job {result}"
        raise ScopeError(f"scope {name} did not become active ({result})")
    finally:
        bus.close()
