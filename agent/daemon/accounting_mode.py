"""`gpu-router-agent --enable-accounting`: the unit's privileged ExecStartPre that turns the GPUs' per-process
accounting mode on, and the record of when it did (the agent then knows which running jobs the driver saw only
from that moment on)."""

import os

from .. import config as _config


def enabled_at_path(cfg):
    return os.path.join(os.path.dirname(cfg.gpu.snapshot), "accounting-enabled.json")


def read_enabled_at(cfg):
    """{GPU index: when --enable-accounting turned its accounting mode on}, from this boot (/run)."""
    import json

    from .. import atomicfile

    try:  # root's own state only (atomicfile: a folder and file no other account could have planted)
        data = json.loads(atomicfile.read_state(*os.path.split(enabled_at_path(cfg)), 1 << 16) or "{}")
        return {int(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def enable_accounting(config_file=None):
    """`gpu-router-agent --enable-accounting`, the unit's ExecStartPre=+: turn on the GPUs' per-process accounting
    mode with full privileges. The driver lets only CAP_SYS_ADMIN change it, and the agent's own sandbox does not
    have that capability (nor should it, for this one call). Honours [gpu] accounting and backend; records when it
    turned a GPU's mode on (the agent then knows which already-running jobs the driver did not see from their
    start). Logs what it did or why it could not; always exits 0: a GPU without accounting still works."""
    from . import log as _log

    log = _log.setup()
    try:
        cfg = _config.load(config_file)
    except _config.ConfigError as exc:
        log.warning("accounting mode not changed: config error", error=str(exc))
        return 0
    if cfg.gpu.accounting == "off" or cfg.gpu.backend == "none":
        return 0
    try:
        from . import gpu_backends

        backend = gpu_backends.open_backend(cfg.gpu.backend, call_timeout_s=cfg.gpu.call_timeout,
                                            accounting="auto")
        try:
            backend.sample()
            notes = backend.drain_notes()
            enabled = backend.enabled_here()
        finally:
            backend.close()
        for level, message, fields in notes:
            getattr(log, level)(message, **fields)
        if enabled:
            import json

            from .. import atomicfile

            known = read_enabled_at(cfg)
            known.update(enabled)
            atomicfile.write_state(*os.path.split(enabled_at_path(cfg)),
                                   json.dumps({str(k): v for k, v in known.items()}) + "\n", mode=0o644)
    except Exception as exc:  # noqa: BLE001 - never a traceback, never a failed start over this
        log.warning("accounting mode not changed", error=f"{type(exc).__name__}: {exc}")
    return 0
