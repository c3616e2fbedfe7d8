"""scopebus: as root the agent talks to systemd over its private socket; anything else there is not trusted to be
systemd, and the system bus is used as before (no systemd on this host: the lanes in tests/systemd/ run the real
thing, where the agent's StartTransientUnit goes over /run/systemd/private)."""

import os
import socket
import threading

import pytest

pytest.importorskip("pystemd", reason="python3-pystemd (Debian)")

from gpu_router import scope, scopebus  # noqa: E402


@pytest.mark.skipif(os.geteuid() != 0, reason="only root tries systemd's private socket")
@pytest.mark.parametrize("impostor", ["hangs up", "says nothing"])
def test_a_private_socket_that_is_not_systemd_is_not_used(tmp_path, impostor):
    """Neither a peer that hangs up nor one that never answers is taken for systemd, and neither holds the caller
    (the agent's loop) for sd-bus's 90 s authentication timeout: a 1 s handshake probe comes first."""
    path = str(tmp_path / "private")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    accepted = []

    def serve():  # no D-Bus, no systemd
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(conn)
            if impostor == "hangs up":
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    bus = scopebus.ScopeBus(private=path)
    outcome = []

    def try_open():
        try:
            bus.open()
            outcome.append("opened")
        except scope.ScopeError as exc:  # no system bus on this host either
            outcome.append(str(exc))

    opener = threading.Thread(target=try_open, daemon=True)
    opener.start()
    opener.join(30)
    assert outcome, "opening the connection hung on a private socket that never answers"
    assert outcome[0] == "opened" or "cannot reach systemd over D-Bus" in outcome[0], outcome
    assert accepted, "the private socket was not tried"
    assert not bus.private, "a socket that is not systemd was taken for systemd's"
    bus.close()
    srv.close()
    for conn in accepted:
        conn.close()


def test_no_private_socket_means_the_system_bus(tmp_path):
    bus = scopebus.ScopeBus(private=str(tmp_path / "absent"))
    try:
        bus.open()
    except scope.ScopeError as exc:
        assert "cannot reach systemd over D-Bus" in str(exc)
    assert not bus.private
    bus.close()
