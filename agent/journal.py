"""Events to journald as native structured fields; JSON lines on stderr where journald is absent.

The wrapper emits its decision right before exec, so this module speaks the journald native protocol itself over
``_socket`` (python3-systemd's ``systemd.journal`` costs ~30 ms of imports; the whole wrapper budget is ~13 ms).
The agent and the CLI log through structlog (``log.py``), whose sink is python3-systemd's ``journal.send``: both
produce the same fields, so ``journalctl GPU_ROUTER_MODE=BLOCKED`` sees every event whichever half wrote it.

A sink failure is swallowed: logging never stops a job.
"""

import os
import sys

# One MESSAGE_ID per event type (fixed; packaging/catalog/gpu-router.catalog explains each one).
MESSAGE_IDS = {
    "routed": "ad6853f5daa045ce9cee622a6d0c3e62",
    "blocked": "4de208b7d75b4d139f59bd4bc777a4e1",
    "probe-failed": "02c7dfd0de95427091e442b3f49a8a82",
    "job-finished": "00414ae04f2b42d9a119a7b053d9b3c8",
    "scope-failed": "a38803a9e3a5429980786cbd48685c79",
    "gpu-health": "a25b79794e8d4660a62ed16a535b122f",
    "broker-refused": "e86165cf4e984f68ad0df8c395cfddf0",
    "config-error": "7b68d5f6d8b14931ab335f51c2a7e293",
    "agent": "54a617728d844aa2a604f62789ccdabd",
    "drain": "4ab238b86dc14d4c8726ea79a4dd6eed",
}

# syslog priorities: a BLOCKED job or a failed probe is worth a notice, a refused caller a warning.
PRIORITIES = {
    "routed": 6, "blocked": 5, "probe-failed": 5, "job-finished": 6, "scope-failed": 4,
    "gpu-health": 4, "broker-refused": 4, "config-error": 3, "agent": 6, "drain": 5,
}

DEFAULT_SOCKET = "/run/systemd/journal/socket"
SEND_TIMEOUT_S = 0.5  # the longest a job waits for a journald that does not read
PREFIX = "GPU_ROUTER_"


def journal_socket_path():
    return os.environ.get("GPU_ROUTER_JOURNAL_SOCKET") or DEFAULT_SOCKET


def build_fields(event, message, fields, priority=None):
    """The full field list of one event: journald's own fields plus ours, prefixed; None values dropped."""
    out = [
        ("MESSAGE", message),
        ("MESSAGE_ID", MESSAGE_IDS[event]),
        ("PRIORITY", str(PRIORITIES[event] if priority is None else priority)),
        ("SYSLOG_IDENTIFIER", "gpu-router"),
        (PREFIX + "EVENT", event),
    ]
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = format(value, ".6g")
        out.append((PREFIX + key, str(value)))
    return out


def encode_native(pairs):
    """journald's native datagram format: KEY=value lines, or KEY\\n<u64le length>value\\n where value has a newline."""
    chunks = []
    for key, value in pairs:
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data:
            chunks.append(key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
        else:
            chunks.append(key.encode() + b"=" + data + b"\n")
    return b"".join(chunks)


def decode_native(datagram):
    """Inverse of encode_native (tests and the agent's own receiver use it)."""
    fields = {}
    pos = 0
    while pos < len(datagram):
        nl = datagram.index(b"\n", pos)
        line = datagram[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = nl + 1
        else:
            key = line
            size = int.from_bytes(datagram[nl + 1:nl + 9], "little")
            value = datagram[nl + 9:nl + 9 + size]
            pos = nl + 9 + size + 1
        fields[key.decode()] = value.decode("utf-8", "surrogateescape")
    return fields


def _send_journald(payload):
    import _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        # A blocking send to a journald that does not read (stuck, or its queue full) would hang the job forever.
        # Connected, the socket waits for room in journald's queue (poll on a connected datagram socket sees the
        # peer's queue), but only this long; then the event goes to stderr.
        sock.settimeout(SEND_TIMEOUT_S)
        sock.connect(journal_socket_path())
        try:
            sock.send(payload)
        except OSError as exc:
            if exc.errno != 90:  # EMSGSIZE: journald takes large entries through a memfd; here, a temp file
                raise
            _send_journald_fd(sock, payload)
    finally:
        sock.close()


def _send_journald_fd(sock, payload):
    import _socket

    fd = os.memfd_create("gpu-router-journal", os.MFD_CLOEXEC | 0x0002)  # MFD_ALLOW_SEALING
    try:
        os.write(fd, payload)
        import fcntl
        fcntl.fcntl(fd, 1033, 0x0001 | 0x0002 | 0x0004 | 0x0008)  # F_ADD_SEALS: seal, shrink, grow, write
        sock.sendmsg([], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
    finally:
        os.close(fd)


def _json_line(pairs):
    """One JSON object a line, as json.dumps(dict(pairs), ensure_ascii=False) writes it, without importing json
    (~2-5 ms on the hot path, where journald is absent): every value is already a string."""
    table = {i: "\\u%04x" % i for i in range(32)}
    table.update({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r", 34: '\\"', 92: "\\\\"})
    return "{" + ", ".join(f'"{k.translate(table)}": "{v.translate(table)}"' for k, v in dict(pairs).items()) \
        + "}\n"


# The agent and the CLI install python3-systemd's journal.send here (log.py); the wrapper keeps the native one.
SINK = None


def emit(event, message, fields, priority=None):
    """Write one event; returns the sink used ("journald", "stderr" or None when both failed)."""
    pairs = build_fields(event, message, fields, priority)
    if os.environ.get("GPU_ROUTER_LOG") != "stderr":
        try:
            if SINK is not None:
                SINK(pairs)
            else:
                _send_journald(encode_native(pairs))
            return "journald"
        except OSError:
            pass
    try:
        os.write(2, _json_line(pairs).encode("utf-8", "surrogateescape"))
        return "stderr"
    except OSError:
        return None
