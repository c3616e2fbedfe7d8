"""daemon/sdglue.py, systemd's protocol through python3-systemd, against the real protocol: a datagram socket in the
place of systemd's NOTIFY_SOCKET (what it receives, the fd included), and descriptors passed the way systemd passes
them (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, fds from 3) to a real process. The booted lanes (tests/systemd) run
the same code under systemd itself: the fd store across agent restarts, socket activation, the watchdog."""

import array
import json
import os
import socket

from helpers import LIB

from gpu_router.daemon import sdglue


def _listen(path):
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.bind(path)
    r.settimeout(5)
    return r


def _receive(r):
    msg, anc, _, _ = r.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


def test_notify_and_the_fd_store_reach_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    r = _listen(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = sdglue.Notifier()
    assert n.enabled
    n("READY=1")
    assert _receive(r) == (b"READY=1", [])
    a, b = socket.socketpair()
    assert n.store_fd(a.fileno(), "proc-events") is True
    msg, fds = _receive(r)
    assert msg == b"FDSTORE=1\nFDNAME=proc-events" and len(fds) == 1
    # The descriptor systemd would keep is the very socket: what goes in one end comes out of the stored copy.
    b.send(b"x")
    assert os.read(fds[0], 1) == b"x"
    os.close(fds[0])


def test_abstract_notify_socket(monkeypatch):
    name = f"gpu-router-test-{os.getpid()}"
    r = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    r.bind("\0" + name)
    r.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    n = sdglue.Notifier()
    n("STATUS=abstract")  # python3-sdnotify's path
    assert _receive(r)[0] == b"STATUS=abstract"
    assert n.store_fd(0, "stdin") is True  # python3-systemd's (a descriptor passed)
    assert _receive(r)[0] == b"FDSTORE=1\nFDNAME=stdin"


def test_outside_systemd_silent(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = sdglue.Notifier()
    assert not n.enabled
    n("READY=1")
    assert n.store_fd(0, "x") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    sdglue.Notifier()("STATUS=x")  # never raises: the agent goes on without systemd's ear
    assert sdglue.Notifier().store_fd(0, "x") is False


CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from gpu_router.daemon import sdglue
fds = sdglue.passed_fds()
sock, how = sdglue.listening_socket(sys.argv[2], "nogroup")
print(json.dumps({"fds": fds, "how": how, "fileno": sock.fileno(), "again": sdglue.passed_fds() is fds,
                  "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
"""


def _passed(tmp_path, names, pid_matches=True):
    """Run CHILD with two sockets at fds 3 and 4, as systemd passes them."""
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    env = {"PATH": "/usr/bin:/bin", "LISTEN_FDS": "2"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    out_r, out_w = os.pipe()
    pid_expr = "$$" if pid_matches else "1"
    argv = ["sh", "-c", f'LISTEN_PID={pid_expr} exec /usr/bin/python3 -I -c "$0" "$1" "$2"', CHILD, str(LIB),
            str(tmp_path / "bound.sock")]
    pid = os.posix_spawn("/bin/sh", argv, env, file_actions=[
        (os.POSIX_SPAWN_DUP2, a.fileno(), 3), (os.POSIX_SPAWN_DUP2, b.fileno(), 4),
        (os.POSIX_SPAWN_DUP2, out_w, 1)])
    os.close(out_w)
    with os.fdopen(out_r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return json.loads(out)


def test_socket_activation_by_name(tmp_path):
    got = _passed(tmp_path, "gpu-router-agent.socket:proc-events")
    assert got["fds"] == {"gpu-router-agent.socket": 3, "proc-events": 4}
    assert (got["how"], got["fileno"], got["again"], got["env"]) == ("systemd", 3, True, [])


def test_socket_activation_without_names_and_not_ours(tmp_path):
    got = _passed(tmp_path, None)
    assert got["fds"] == {"fd0": 3, "fd1": 4} and got["how"] == "systemd" and got["env"] == []
    # LISTEN_PID names another process: nothing is ours, the socket is bound here, the variables are still unset.
    got = _passed(tmp_path, "a:b", pid_matches=False)
    assert got["fds"] == {} and got["how"] == "bound" and got["env"] == []
    assert (tmp_path / "bound.sock").exists()


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdglue.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdglue.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert sdglue.watchdog_interval() is None
