"""structlog for the resident agent and the CLI, with python3-systemd's journal.send as the sink.

Events (``journal.emit``) and structlog lines land in the journal with the same ``GPU_ROUTER_*`` fields. Not used
by the wrapper: ``import structlog`` alone costs ~60 ms there.
"""

import os

from .. import journal

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _systemd_send():
    """python3-systemd's journal.send, unless tests point events at a socket of their own."""
    if os.environ.get("GPU_ROUTER_JOURNAL_SOCKET") or os.environ.get("GPU_ROUTER_LOG") == "stderr":
        return None
    if not os.path.exists(journal.DEFAULT_SOCKET):
        return None
    try:
        import systemd.journal  # noqa: F401 - only whether python3-systemd is there (sd_send imports it too)
    except ImportError:
        return None

    return sd_send


def sd_send(pairs):
    """Hand one event to python3-systemd as bytes, field by field (``sendv``): a value that is not UTF-8 (a file
    name a caller chose) is stored as it is. ``journal.send(**fields)`` would encode text values strictly and raise
    UnicodeEncodeError on them, in the agent's loop."""
    from systemd import journal as sd_journal

    sd_journal.sendv(*[journal.field_name(key).encode() + b"=" + journal.field_bytes(value)
                       for key, value in pairs])


def _render(logger, method_name, event_dict):
    """The last processor: hand the event to the journal sink as GPU_ROUTER_* fields; structlog prints nothing."""
    message = str(event_dict.pop("event", ""))
    event_dict.pop("level", None)
    fields = {str(k).upper(): v for k, v in event_dict.items()}
    pairs = journal.build_fields("agent", message, fields, _PRIORITY.get(method_name, 6))
    if journal.SINK is not None:
        try:
            journal.SINK(pairs)
            return ""
        except Exception:  # noqa: BLE001 - logging never takes the agent down
            pass
    if os.environ.get("GPU_ROUTER_LOG") != "stderr":
        try:
            journal.send_journald(journal.encode_native(pairs))
            return ""
        except Exception:  # noqa: BLE001
            pass
    try:
        os.write(2, journal.json_line(pairs).encode("utf-8", "surrogateescape"))
    except Exception:  # noqa: BLE001
        pass
    return ""


class _Silent:
    def msg(self, message):
        pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def setup():
    """Configure structlog and the event sink for a long-running process; returns a bound logger."""
    import structlog

    journal.SINK = _systemd_send()
    structlog.configure(
        processors=[structlog.processors.add_log_level, _render],
        logger_factory=lambda *args: _Silent(),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger()
