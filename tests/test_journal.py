"""Events: the journald native protocol on a real socket, the JSON-lines fallback, and failures that never stop
a job."""

import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

import helpers
from gpu_router import journal


@pytest.fixture
def jsock(monkeypatch):
    js = helpers.JournalSocket()
    monkeypatch.setenv("GPU_ROUTER_JOURNAL_SOCKET", js.path)
    monkeypatch.delenv("GPU_ROUTER_LOG", raising=False)
    yield js
    js.close()


# ---- the encoding -------------------------------------------------------------------------------------------

def test_encode_simple_and_multiline_exactly():
    data = journal.encode_native([("A", "1"), ("B", "two\nlines"), ("C", "")])
    assert data == b"A=1\n" + b"B\n" + (9).to_bytes(8, "little") + b"two\nlines\n" + b"C=\n"


@pytest.mark.parametrize("value", ["plain", "", "a=b=c", "line1\nline2", "\n", "ends with newline\n",
                                   "ünïcödé ✓ 音声", "tab\tand\rcr", "x" * 100_000, "bad \udcff byte",
                                   "/tmp/a b\nc.wav"])
def test_round_trip(value):
    pairs = [("MESSAGE", "m"), ("GPU_ROUTER_INPUT", value), ("GPU_ROUTER_MODE", "GPU")]
    assert journal.decode_native(journal.encode_native(pairs)) == dict(pairs)


def test_build_fields():
    fields = dict(journal.build_fields("blocked", "msg", {"MODE": "BLOCKED", "METRIC": 1234.56789, "SLOT": 0,
                                                          "DEVICE": None, "WORKLOAD": "w"}))
    assert fields == {"MESSAGE": b"msg", "MESSAGE_ID": journal.MESSAGE_IDS["blocked"].encode(), "PRIORITY": b"5",
                      "SYSLOG_IDENTIFIER": b"gpu-router", "GPU_ROUTER_EVENT": b"blocked",
                      "GPU_ROUTER_MODE": b"BLOCKED", "GPU_ROUTER_METRIC": b"1234.57", "GPU_ROUTER_SLOT": b"0",
                      "GPU_ROUTER_WORKLOAD": b"w"}
    assert dict(journal.build_fields("routed", "m", {}, priority=2))["PRIORITY"] == b"2"


# ---- names that are not UTF-8 (issue 8, 1): fields are bytes; nothing a caller names can raise ---------------

NOT_UTF8 = b"/tmp/in\xff\xfe.wav"


@pytest.mark.parametrize("value", [NOT_UTF8, NOT_UTF8.decode("utf-8", "surrogateescape"), "lone \ud800 surrogate",
                                   b"nul\0byte\nnewline", 12.5, object()])
def test_build_fields_takes_any_value_as_bytes(value):
    fields = dict(journal.build_fields("job-finished", "m", {"INPUT": value, "bad key=x": "v"}))
    assert isinstance(fields["GPU_ROUTER_INPUT"], bytes)
    assert "GPU_ROUTER_BAD_KEY_X" in fields  # a field name journald would drop is mended, not lost
    journal.parse_native(journal.encode_native(list(fields.items())))


def test_non_utf8_input_reaches_the_journal_byte_for_byte(jsock):
    name = NOT_UTF8.decode("utf-8", "surrogateescape")  # how Python hands a non-UTF-8 argv to the wrapper
    assert journal.emit("job-finished", f"finished {name}", {"INPUT": name, "RAW": NOT_UTF8}) == "journald"
    assert jsock.wait_for(lambda e: True)
    raw = journal.parse_native(jsock.datagrams[-1])
    assert raw[b"GPU_ROUTER_INPUT"] == NOT_UTF8 and raw[b"GPU_ROUTER_RAW"] == NOT_UTF8
    assert raw[b"MESSAGE"] == b"finished " + NOT_UTF8


def test_python3_systemd_sink_takes_non_utf8_fields(monkeypatch):
    """The agent's sink (python3-systemd): journal.send(**fields) raised UnicodeEncodeError on such a name and
    killed the agent; the sink now hands bytes to sendv. No journald runs on this host, so sendv may fail with an
    OSError (emit then falls back to stderr); it must not raise anything."""
    pytest.importorskip("systemd.journal")
    from gpu_router.daemon import log

    name = NOT_UTF8.decode("utf-8", "surrogateescape")
    pairs = journal.build_fields("job-finished", f"m {name}", {"INPUT": name})
    try:
        log.sd_send(pairs)
    except OSError:
        pass
    monkeypatch.setattr(journal, "SINK", log.sd_send)
    monkeypatch.delenv("GPU_ROUTER_LOG", raising=False)
    assert journal.emit("job-finished", f"m {name}", {"INPUT": name}) in ("journald", "stderr")


def test_a_sink_that_raises_anything_falls_back_to_stderr(monkeypatch, capfd):
    def broken(pairs):
        raise UnicodeEncodeError("utf-8", "x", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(journal, "SINK", broken)
    monkeypatch.delenv("GPU_ROUTER_LOG", raising=False)
    assert journal.emit("routed", "m", {"INPUT": NOT_UTF8}) == "stderr"
    assert capfd.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("data", [b"A", b"A\n\x05", b"A\n" + (100).to_bytes(8, "little") + b"x\n", b"=v\n",
                                  b"A\n" + (1).to_bytes(8, "little") + b"xy"])
def test_parse_native_refuses_malformed_frames(data):
    with pytest.raises(ValueError):
        journal.parse_native(data)


def test_message_ids_are_distinct_128_bit_ids_with_priorities():
    ids = list(journal.MESSAGE_IDS.values())
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert set(journal.PRIORITIES) == set(journal.MESSAGE_IDS)
    for name in ("routed", "blocked", "probe-failed", "config-error", "job-finished", "scope-failed"):
        assert name in journal.MESSAGE_IDS


# ---- a real socket --------------------------------------------------------------------------------------------

def test_emit_sends_one_datagram_to_the_socket(jsock, capfd):
    sink = journal.emit("routed", "whisper: GPU (under-threshold)\nsecond line",
                        {"MODE": "GPU", "WORKLOAD": "whisper", "INPUT": "/tmp/a b\nc.wav", "SLOT": 1})
    assert sink == "journald"
    events = jsock.wait_for(lambda e: True)
    assert len(events) == 1
    ev = events[0]
    assert ev["MESSAGE"] == "whisper: GPU (under-threshold)\nsecond line"
    assert ev["MESSAGE_ID"] == journal.MESSAGE_IDS["routed"] == "ad6853f5daa045ce9cee622a6d0c3e62"
    assert (ev["PRIORITY"], ev["SYSLOG_IDENTIFIER"]) == ("6", "gpu-router")
    assert (ev["GPU_ROUTER_MODE"], ev["GPU_ROUTER_INPUT"], ev["GPU_ROUTER_SLOT"]) == ("GPU", "/tmp/a b\nc.wav", "1")
    assert capfd.readouterr().err == ""  # nothing on stderr when journald took it


def test_large_event_goes_through_a_sealed_memfd(jsock):
    detail = "y" * (1 << 20)  # larger than any datagram the socket takes
    assert journal.emit("probe-failed", "big", {"DETAIL": detail}) == "journald"
    events = jsock.wait_for(lambda e: True)
    assert jsock.fds_received == 1
    assert events[0]["GPU_ROUTER_DETAIL"] == detail


def test_gpu_router_log_stderr_skips_the_socket(jsock, monkeypatch, capfd):
    monkeypatch.setenv("GPU_ROUTER_LOG", "stderr")
    assert journal.emit("blocked", "m", {"MODE": "BLOCKED"}) == "stderr"
    line = capfd.readouterr().err
    assert json.loads(line)["GPU_ROUTER_MODE"] == "BLOCKED"
    assert jsock.events(settle=0.1) == []


# ---- fallbacks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["absent", "regular-file", "directory", "no-listener"])
def test_fallback_to_json_lines_on_stderr(tmp_path, monkeypatch, capfd, what):
    path = tmp_path / "socket"
    if what == "regular-file":
        path.write_text("")
    elif what == "directory":
        path.mkdir()
    elif what == "no-listener":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(path))
        s.close()  # the name stays, nobody listens: ECONNREFUSED
    monkeypatch.setenv("GPU_ROUTER_JOURNAL_SOCKET", str(path))
    monkeypatch.delenv("GPU_ROUTER_LOG", raising=False)
    assert journal.emit("probe-failed", "multi\nline ✓", {"INPUT": "a\nb", "REASON": "input-empty"}) == "stderr"
    err = capfd.readouterr().err
    assert err.count("\n") == 1, "one event, one line"
    ev = json.loads(err)
    assert ev["MESSAGE"] == "multi\nline ✓" and ev["GPU_ROUTER_INPUT"] == "a\nb"
    assert ev["MESSAGE_ID"] == journal.MESSAGE_IDS["probe-failed"] and ev["GPU_ROUTER_REASON"] == "input-empty"


EMIT = ("import sys; sys.path.append(%r); from gpu_router import journal\n"
        "print(journal.emit('routed', 'm', {'MODE': 'GPU'}), flush=True)\n" % str(helpers.LIB))


def test_both_sinks_failing_is_not_an_error(tmp_path):
    code = "import os; os.close(2)\n" + EMIT
    p = subprocess.run([helpers.PYTHON, "-IS", "-c", code], capture_output=True, text=True, timeout=30,
                       env={"GPU_ROUTER_JOURNAL_SOCKET": str(tmp_path / "none")})
    assert (p.returncode, p.stdout) == (0, "None\n")


def test_stuck_journald_does_not_hang_the_emitter():
    folder = helpers.public_tmpdir()
    path = str(folder / "s")
    s, c = helpers.stuck_socket(path)
    try:
        started = time.monotonic()
        p = subprocess.run([helpers.PYTHON, "-IS", "-c", EMIT], capture_output=True, text=True, timeout=20,
                           env={"GPU_ROUTER_JOURNAL_SOCKET": path})
        took = time.monotonic() - started
        assert p.stdout == "stderr\n" and json.loads(p.stderr)["GPU_ROUTER_MODE"] == "GPU"
        assert took < journal.SEND_TIMEOUT_S + 3
    finally:
        s.close()
        c.close()
        os.unlink(path)
        os.rmdir(folder)


def test_busy_journald_that_drains_in_time_still_gets_the_event():
    folder = helpers.public_tmpdir()
    path = str(folder / "s")
    s, c = helpers.stuck_socket(path)
    got = []

    def drain_later():
        time.sleep(journal.SEND_TIMEOUT_S / 4)
        s.settimeout(3)
        try:
            while True:
                data = s.recv(1 << 16)
                if b"GPU_ROUTER_MODE=GPU" in data:
                    got.append(journal.decode_native(data))
                    return
        except OSError:
            return

    t = threading.Thread(target=drain_later)
    t.start()
    try:
        p = subprocess.run([helpers.PYTHON, "-IS", "-c", EMIT], capture_output=True, text=True, timeout=20,
                           env={"GPU_ROUTER_JOURNAL_SOCKET": path})
        t.join(5)
        assert p.stdout == "journald\n", p
        assert got and got[0]["MESSAGE_ID"] == journal.MESSAGE_IDS["routed"]
    finally:
        s.close()
        c.close()
        os.unlink(path)
        os.rmdir(folder)


def test_socket_path_from_environment(monkeypatch):
    monkeypatch.delenv("GPU_ROUTER_JOURNAL_SOCKET", raising=False)
    assert journal.journal_socket_path() == "/run/systemd/journal/socket"
    monkeypatch.setenv("GPU_ROUTER_JOURNAL_SOCKET", "/tmp/x")
    assert journal.journal_socket_path() == "/tmp/x"


def test_json_line_is_what_json_dumps_writes():
    nasty = "".join(chr(i) for i in range(128)) + '"\\ \u2028 ✓ 音 \udcff'
    pairs = [("MESSAGE", nasty), ("GPU_ROUTER_INPUT", "a\nb"), ("EMPTY", "")]
    line = journal.json_line(pairs)
    assert line == json.dumps(dict(pairs), ensure_ascii=False) + "\n"
    assert json.loads(line) == dict(pairs)


def test_stderr_fallback_does_not_import_json(tmp_path):
    code = EMIT + "print('json' in sys.modules, 'socket' in sys.modules)\n"
    p = subprocess.run([helpers.PYTHON, "-IS", "-c", code], capture_output=True, text=True, timeout=30,
                       env={"GPU_ROUTER_LOG": "stderr"})
    assert p.stdout == "stderr\nFalse False\n", p
