"""The agent's side of systemd's service protocol: sd_notify and socket activation.

sd_notify: READY/STATUS/STOPPING/WATCHDOG through python3-sdnotify (one datagram socket, connected once);
FDSTORE=1 through python3-systemd's notify, which can pass a descriptor (sdnotify cannot): systemd keeps the proc
connector's socket across an agent restart, so exits that happen meanwhile are not lost. Socket activation
(python3-systemd's sd_listen_fds): the broker socket and the fd-store entries systemd passes back, by name.
Outside systemd every call here is silent and the agent binds its own socket.
"""

import os
import socket

from . import broker, procevents

_PASSED = None


def _notify_fds(text, fds):
    """sd_pid_notify_with_fds(3): True when sent, False where it cannot be sent."""
    from systemd import daemon

    try:
        return bool(daemon.notify(text, fds=fds))
    except (OSError, ValueError):
        return False


class Notifier:
    """sd_notify; silent outside systemd (no NOTIFY_SOCKET, or nobody listening: the agent goes on without it)."""

    def __init__(self):
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sender = None
        if self.enabled:
            import sdnotify

            self._sender = sdnotify.SystemdNotifier()  # never raises (debug=False); sends nothing if unconnected

    def __call__(self, text):
        if self._sender is not None:
            self._sender.notify(text)

    def store_fd(self, fd, name):
        """FDSTORE=1: systemd keeps a copy of ``fd`` and passes it to the next start of this service (needs
        FileDescriptorStoreMax= in the unit). False outside systemd or where it cannot be sent."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return False
        return _notify_fds(f"FDSTORE=1\nFDNAME={name}", [fd])


def passed_fds():
    """{name: fd} systemd passed us (sd_listen_fds: the broker socket, fd-store entries), read once; the LISTEN_*
    variables are then unset (a child must not take them for its own). A nameless fd is ``fd<i>``."""
    global _PASSED
    if _PASSED is None:
        from systemd import daemon

        _PASSED = {}
        try:
            named = daemon.listen_fds_with_names(False)  # {fd: name}; only when LISTEN_PID is ours
        except OSError:  # LISTEN_FDNAMES does not name every fd: by number, as systemd passed them
            try:
                named = {fd: "" for fd in daemon.listen_fds(False)}
            except OSError:  # LISTEN_FDS is not a number: nothing passed
                named = {}
        for i, (fd, name) in enumerate(sorted(named.items())):
            if not name or (name == "unknown" and "LISTEN_FDNAMES" not in os.environ):
                name = f"fd{i}"
            _PASSED.setdefault(name, fd)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    return _PASSED


def watchdog_interval():
    """Half of WatchdogSec (systemd passes WATCHDOG_USEC), or None when no watchdog is armed for us. (python3-systemd
    235 has no sd_watchdog_enabled.)"""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def listening_socket(path, group):
    """The socket systemd passed us (LISTEN_FDS), or one bound here: 0660, group gpu-router."""
    broker_fds = [fd for name, fd in sorted(passed_fds().items(), key=lambda kv: kv[1])
                  if name != procevents.FD_NAME]
    if broker_fds:
        return socket.socket(fileno=broker_fds[0]), "systemd"
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    gid = broker.group_id(group)
    if gid is not None and os.geteuid() == 0:
        os.chown(path, 0, gid)
    sock.listen(64)
    return sock, "bound"
