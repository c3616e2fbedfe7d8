"""Events to journald as native structured fields; JSON lines on stderr where journald is absent.

The wrapper emits its decision right before exec, so this module speaks the journald native protocol itself over
``_socket`` (python3-systemd's ``systemd.journal`` costs ~30 ms of imports; the whole wrapper budget is ~13 ms).
The agent and the CLI log through structlog (``log.py``), whose sink is python3-systemd's ``journal.send``: both
produce the same fields, so ``journalctl GPU_ROUTER_MODE=BLOCKED`` sees every event whichever half wrote it.

A sink failure is swallowed: logging never stops a job.
"""

from . import fastos as os  # os without its import cost (fastos.py)
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
    "vram-underpredicted": "0231da9691fb4c7cafd364e3e3c48c3c",
    "vram-foreign": "7f0e3c5a1d6b4e2f9a8c4b7d2e1f6a93",
}

# syslog priorities: a BLOCKED job or a failed probe is worth a notice, a refused caller a warning.
PRIORITIES = {
    "routed": 6, "blocked": 5, "probe-failed": 5, "job-finished": 6, "scope-failed": 4,
    "gpu-health": 4, "broker-refused": 4, "config-error": 3, "agent": 6, "drain": 5,
    "vram-underpredicted": 4, "vram-foreign": 5,
}

DEFAULT_SOCKET = "/run/systemd/journal/socket"
SEND_TIMEOUT_S = 0.5  # the longest a job waits for a journald that does not read
PREFIX = "GPU_ROUTER_"


def journal_socket_path():
    return os.environ.get("GPU_ROUTER_JOURNAL_SOCKET") or DEFAULT_SOCKET


def field_bytes(value):
    """A field's value as the bytes journald stores: bytes as they are (a file name that is not UTF-8 stays
    itself), text as UTF-8 with surrogate escapes turned back into the bytes they stand for; never raises."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, float):
        value = format(value, ".6g")
    elif not isinstance(value, str):
        value = str(value)
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte: show it, escaped
        return value.encode("utf-8", "backslashreplace")


def field_name(key):
    """A journald field name: A-Z, 0-9 and '_', not starting with a digit or '_' (others are dropped by journald,
    so they are mended here rather than lost)."""
    text = key.decode("ascii", "replace") if isinstance(key, (bytes, bytearray)) else str(key)
    if text.isascii() and text.isupper() and text[0].isalpha() and text.replace("_", "").isalnum() \
            and len(text) <= 64:
        return text  # the common case, in C: every name the code itself writes
    name = "".join(c if ("A" <= c <= "Z" or "0" <= c <= "9" or c == "_") else "_" for c in text.upper())[:64]
    if not name or not ("A" <= name[0] <= "Z"):
        name = "X" + name[:63]
    return name


def build_fields(event, message, fields, priority=None):
    """The full field list of one event: journald's own fields plus ours, prefixed; None values dropped.

    Values are bytes (``field_bytes``): whatever a caller named — a path that is not UTF-8, a newline, a NUL —
    reaches the journal as it is, and nothing here can raise on it."""
    out = [
        ("MESSAGE", field_bytes(message)),
        ("MESSAGE_ID", MESSAGE_IDS[event].encode()),
        ("PRIORITY", str(PRIORITIES[event] if priority is None else priority).encode()),
        ("SYSLOG_IDENTIFIER", b"gpu-router"),
        (PREFIX + "EVENT", event.encode()),
    ]
    for key, value in fields.items():
        if value is None:
            continue
        out.append((field_name(PREFIX + str(key)), field_bytes(value)))
    return out


def encode_native(pairs):
    """journald's native datagram format: KEY=value lines, or KEY\n<u64le length>value\n where value has a newline.
    Values may be bytes or text (``field_bytes``)."""
    chunks = []
    for key, value in pairs:
        data = field_bytes(value)
        name = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
        if b"\n" in data:
            chunks.append(name + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
        else:
            chunks.append(name + b"=" + data + b"\n")
    return b"".join(chunks)


MAX_FIELDS = 256


def parse_native(datagram, max_fields=MAX_FIELDS):
    """{name bytes: value bytes} from the native format; ValueError on anything malformed (the broker's parser:
    nothing is decoded here, every field stays bytes until its reader validates it)."""
    if not isinstance(datagram, (bytes, bytearray, memoryview)):
        raise ValueError("not bytes")
    data = bytes(datagram)
    fields = {}
    pos, end = 0, len(data)
    while pos < end:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"field at byte {pos} has no end")
        line = data[pos:nl]
        eq = line.find(b"=")
        if eq >= 0:
            key, value = line[:eq], line[eq + 1:]
            pos = nl + 1
        else:
            key = line
            if nl + 9 > end:
                raise ValueError(f"field {key[:32]!r} has no length")
            size = int.from_bytes(data[nl + 1:nl + 9], "little")
            if nl + 9 + size + 1 > end or data[nl + 9 + size:nl + 10 + size] != b"\n":
                raise ValueError(f"field {key[:32]!r} is shorter than its length")
            value = data[nl + 9:nl + 9 + size]
            pos = nl + 9 + size + 1
        if not key:
            raise ValueError(f"empty field name at byte {pos}")
        if len(fields) >= max_fields:
            raise ValueError(f"more than {max_fields} fields")
        fields[key] = value
    return fields


def decode_native(datagram):
    """Inverse of encode_native, as text (undecodable bytes as surrogate escapes); for tests and replies."""
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in parse_native(datagram, max_fields=1 << 30).items()}


def send_journald(payload):
    """One native-protocol datagram to journald (a memfd when it is too large for one); OSError when it cannot."""
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
            import errno  # not preloaded by python3 -IS: only on this error path

            if exc.errno != errno.EMSGSIZE:  # journald takes large entries through a memfd
                raise
            _send_fd(sock, payload)
    finally:
        sock.close()


def _send_fd(sock, payload):
    import _socket

    import fcntl

    fd = os.memfd_create("gpu-router-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, payload)
        # journald takes a memfd only once sealed
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        sock.sendmsg([], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))])
    finally:
        os.close(fd)


def _text(value):
    return value.decode("utf-8", "surrogateescape") if isinstance(value, (bytes, bytearray)) else str(value)


def json_line(pairs):
    """One JSON object a line, as json.dumps(dict(pairs), ensure_ascii=False) writes it, without importing json
    (~2-5 ms on the hot path, where journald is absent). Bytes that are not UTF-8 are written as they are (the
    line is then as faithful as the journal's field)."""
    table = {i: "\\u%04x" % i for i in range(32)}
    table.update({8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r", 34: '\\"', 92: "\\\\"})
    return "{" + ", ".join(f'"{_text(k).translate(table)}": "{_text(v).translate(table)}"'
                           for k, v in dict(pairs).items()) + "}\n"




# The agent and the CLI install python3-systemd's journal.send here (log.py); the wrapper keeps the native one.
SINK = None


def emit(event, message, fields, priority=None):
    """Write one event; returns the sink used ("journald", "stderr" or None when both failed). Never raises: a
    field no sink can take costs that event, never the job or the agent."""
    try:
        pairs = build_fields(event, message, fields, priority)
    except Exception:  # noqa: BLE001 - an unknown event name, a str() that raises: keep the process alive
        pairs = [("MESSAGE", field_bytes(message)), ("SYSLOG_IDENTIFIER", b"gpu-router"),
                 (PREFIX + "EVENT", field_bytes(event))]
    if os.environ.get("GPU_ROUTER_LOG") != "stderr":
        try:
            if SINK is not None:
                SINK(pairs)
            else:
                send_journald(encode_native(pairs))
            return "journald"
        except Exception:  # noqa: BLE001 - OSError, or a sink that cannot take a value
            pass
    try:
        os.write(2, json_line(pairs).encode("utf-8", "surrogateescape"))
        return "stderr"
    except Exception:  # noqa: BLE001
        return None
