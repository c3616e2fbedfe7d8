"""The configuration model, its one validation, and the cache that keeps TOML parsing off the hot path.

Sources, in order: the main file (/etc/gpu-router/config.toml, or --config / GPU_ROUTER_CONFIG), then the drop-ins
``workloads.d/*.toml`` beside it, each holding ``[workloads.NAME]`` tables. Defaults live here, in the schema. A
profile with ``vram_model = "calibrated"`` also reads ``<[agent] state_dir>/calibration/NAME.toml``, the model
``gpu-router calibrate`` fitted (a tool's file, never the admin's), at load; it becomes the linear model.

Every value goes through ``validate()``; an error names the file, the key and what is allowed, and is raised before
anything runs, so a bad config never runs a job on the wrong device.

The records below are slotted classes rather than dataclasses: ``import dataclasses`` costs ~20 ms here, more
than the wrapper's whole budget. A validated config is stored as a marshal'd dict keyed by the sources' stat
data; a hit costs ~0.2 ms instead of ~15 ms of tomllib. Only a cache owned by root or by the caller, and not
writable by anyone else, is trusted.
"""

import marshal
from . import fastos as os  # os without its import cost (fastos.py)
import _stat  # stat.py re-exports these from the built-in _stat: no module to load

DEFAULT_PATH = "/etc/gpu-router/config.toml"
DEFAULT_CACHE_DIR = "/run/gpu-router/cache"
CACHE_FORMAT = 6
CALIBRATION_DIR = "calibration"  # under [agent] state_dir: written by `gpu-router calibrate`

PROBES = ("ffprobe-duration", "mediainfo-duration", "media-duration", "file-size", "image-pixels",
          "video-pixels", "line-count", "command")


class ConfigError(Exception):
    """A config problem, already phrased for the operator: file, key, what is allowed."""

    def __init__(self, message, path=None, key=None):
        self.path = path
        self.key = key
        message = str(message)
        if len(message) > 400:  # a hostile value is never echoed back whole
            message = message[:400] + "…"
        where = ": ".join(x for x in (path, key) if x)
        super().__init__(f"{where}: {message}" if where else message)


class Record:
    """A minimal record: fields named by __slots__, built from keyword arguments, comparable, printable."""

    __slots__ = ()

    def __init__(self, **values):
        for name in self.__slots__:
            setattr(self, name, values[name])

    def asdict(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other):
        return type(self) is type(other) and self.asdict() == other.asdict()

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.asdict().items())})"


# The records (Router, Host, Gpu, Agent, Workload, Config) are defined after the schema below: their slots are the
# schema's keys, so a key added there reaches the record (tests/test_config_schema.py).


# ---- value parsing (shared by validation and by the CLI) ----------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


MAX_DURATION_S = 366 * 86400  # no duration in this file means more than a year
MIB_MAX = 1 << 24             # 16 TiB: no memory size in this file is larger
SIZE_MAX_BYTES = float(1 << 60)  # parse_size: 1 EiB, far past any input or memory, far from float overflow
NUMBER_MAX = 1e15             # thresholds and model coefficients: finite, and far from float overflow
MAX_CONFIG_BYTES = 1 << 20    # a config file or drop-in larger than 1 MiB is not one
MAX_DEPTH = 4                 # tables and arrays nest at most this deep (the schema needs 3)


def _show(value, limit=60):
    """A value as an error message shows it: repr, bounded (a 1 MB string is not echoed back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _short(key, limit=64):
    """A key as an error message names it (a hostile 1 MB key is cut)."""
    key = str(key)
    return key if len(key) <= limit else key[:limit] + "…"


def parse_duration(value):
    """'30s', '5m', '1h30m', '250ms' or a plain number of seconds → float seconds; ValueError otherwise.
    Always finite, never negative, at most MAX_DURATION_S."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        if value != value or value < 0 or value > MAX_DURATION_S:
            raise ValueError("out of range")
        return float(value)
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("not a duration")
    text = value.strip().lower().replace(" ", "")
    if not text:
        raise ValueError("empty")
    total, number, i = 0.0, "", 0
    while i < len(text):
        ch = text[i]
        if ch.isascii() and (ch.isdigit() or ch == "."):
            number += ch
            i += 1
            continue
        unit = ""
        while i < len(text) and text[i].isascii() and text[i].isalpha():
            unit += text[i]
            i += 1
        if not number or unit not in _DURATION_UNITS:
            raise ValueError(f"bad unit {unit!r}")
        total += float(number) * _DURATION_UNITS[unit]
        number = ""
    if number:
        total += float(number)
    if total != total or total > MAX_DURATION_S:
        raise ValueError("out of range")
    return total


# Sizes: K, M, G, T (and KiB, MiB, …) count in 1024s as systemd's MemoryMax does; kB, MB, GB, TB in 1000s.
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3,
               "gib": 1024 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
               "tb": 1000 ** 4}


def parse_size(value, unit_bytes=1):
    """'11G', '3700M', '512KiB', '2GB' or a plain number (counted in ``unit_bytes``) → a number of ``unit_bytes``
    (1 for bytes, 1 << 20 for MiB); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, (int, float)):
        if value < 0 or value != value or value > SIZE_MAX_BYTES / unit_bytes:
            raise ValueError("out of range")
        return value
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("not a size")
    text = value.strip().replace(" ", "")
    i = 0
    while i < len(text) and (text[i].isdigit() or text[i] == "."):
        i += 1
    number, unit = text[:i], text[i:].lower()
    if not number or unit not in _SIZE_UNITS:
        raise ValueError(f"bad size {value!r}")
    if not unit:
        return float(number) if "." in number else int(number)
    size = float(number) * _SIZE_UNITS[unit] / unit_bytes
    if not size <= SIZE_MAX_BYTES / unit_bytes:  # NaN, inf and absurd sizes alike
        raise ValueError(f"size out of range {value!r}")
    return int(size) if size == int(size) else size


# ---- the schema ---------------------------------------------------------------------------------------------
# Each entry: key → (checker, default). A checker takes the raw value and returns the clean one or raises
# ValueError with what is allowed.

def _int(lo=None, hi=MIB_MAX):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a whole number{_range(lo, hi)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"expected a whole number{_range(lo, hi)}, got {_show(v)}")
        return v
    return check


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" >= {lo}"
    return ""


def _number(positive=True, hi=NUMBER_MAX):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number")
        if v > hi:
            raise ValueError(f"expected a number <= {hi:g}, got {_show(v)}")
        if positive and v <= 0:
            raise ValueError(f"expected a number > 0, got {_show(v)}")
        if not positive and v < 0:
            raise ValueError(f"expected a number >= 0, got {_show(v)}")
        return float(v) if isinstance(v, float) else v
    return check


def _optional(check):
    def wrapped(v):
        return None if v is None else check(v)
    return wrapped


def _choice(*allowed):
    def check(v):
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(repr(a) for a in allowed)}, got {_show(v)}")
        return v
    return check


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _abspath(v):
    if not isinstance(v, str) or not v.startswith("/") or "\0" in v or len(v) > 4096:
        raise ValueError(f"expected an absolute path, got {_show(v)}")
    return os.path.normpath(v)


def _string(v):
    if not isinstance(v, str) or not v or len(v) > 256 or "\0" in v:
        raise ValueError("expected a non-empty string (at most 256 characters, no NUL)")
    return v


def _strlist(v):
    if not isinstance(v, list) or len(v) > 256 or \
            not all(isinstance(x, str) and len(x) <= 4096 and "\0" not in x for x in v):
        raise ValueError("expected a list of strings (at most 256, each at most 4096 characters, no NUL)")
    return list(v)


def _intlist(v):
    if not isinstance(v, list) or len(v) > 1024 or \
            not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 65535 for x in v):
        raise ValueError("expected a list of whole numbers from 0 to 65535")
    return list(v)


def _duration(v, lo=0.0, hi=MAX_DURATION_S):
    try:
        seconds = parse_duration(v)
    except ValueError:
        raise ValueError(f"expected a duration such as \"30s\", \"5m\" or a number of seconds, at most "
                         f"{_human(hi)}, got {_show(v)}") from None
    if seconds < lo or seconds > hi:
        raise ValueError(f"expected a duration from {_human(lo)} to {_human(hi)}, got {_show(v)}")
    return seconds


def _human(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if 0 < seconds < 1 and abs(seconds * 1000 - round(seconds * 1000)) < 1e-9:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def _bounded_duration(lo, hi):
    def check(v):
        return _duration(v, lo, hi)
    return check


def _positive_duration(v):
    seconds = _duration(v)
    if seconds <= 0:
        raise ValueError(f"expected a duration > 0, got {_show(v)}")
    return seconds


# The unit each built-in probe measures in, and the other names of units it converts from (factor to its own).
_TIME = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "ms": 0.001, "m": 60, "min": 60, "mins": 60,
         "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600}
_BYTES = {"bytes": 1, "byte": 1, **{k: v for k, v in _SIZE_UNITS.items() if k}}
_PIXELS = {"pixels": 1, "pixel": 1, "px": 1, "kilopixels": 1000, "megapixels": 10 ** 6, "mp": 10 ** 6}
PROBE_UNITS = {"ffprobe-duration": ("seconds", _TIME), "mediainfo-duration": ("seconds", _TIME),
               "media-duration": ("seconds", _TIME), "file-size": ("bytes", _BYTES),
               "image-pixels": ("pixels", _PIXELS), "video-pixels": ("pixels", _PIXELS),
               "line-count": ("lines", {"lines": 1, "line": 1})}


def unit_factor(probe, unit):
    """How many of ``probe``'s own unit one ``unit`` is (1 for its own), or ValueError naming what is allowed.
    The operator's command probe measures in whatever unit its author says: any name, no conversion."""
    if probe not in PROBE_UNITS:
        return 1
    base, names = PROBE_UNITS[probe]
    factor = names.get(unit.strip().lower()) if isinstance(unit, str) else None
    if factor is None:
        raise ValueError(f"probe {probe!r} measures in {base}; threshold_unit {unit!r} is not a unit of it "
                         f"(allowed: {', '.join(sorted(names, key=lambda n: (names[n], n)))})")
    return factor


def threshold_value(probe, value):
    """A threshold as written (3600, "1h", "90min", "11G") → a number in ``probe``'s own unit."""
    if isinstance(value, str):
        try:
            if probe in PROBE_UNITS and PROBE_UNITS[probe][1] is _TIME:
                number = parse_duration(value)
            elif probe == "file-size":
                number = parse_size(value)
            else:
                raise ValueError
        except ValueError:
            kind = {"file-size": ", or a size such as \"11G\""}.get(probe, "")
            if probe in PROBE_UNITS and PROBE_UNITS[probe][1] is _TIME:
                kind = ", or a duration such as \"1h\" or \"90min\""
            raise ValueError(f"expected a number{kind}, got {value!r}") from None
        if number <= 0:
            raise ValueError(f"expected a value > 0, got {value!r}")
        return number
    return _number(positive=True)(value)


def _probes(v):
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        raise ValueError(f"expected a probe name or a list of them ({', '.join(PROBES)})")
    for name in names:
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; expected one of {', '.join(PROBES)}")
    return names


def _thresholds(v):
    values = v if isinstance(v, list) else [v]
    if len(values) > 16:
        raise ValueError("expected at most 16 thresholds")
    for x in values:
        if not isinstance(x, str):
            _number(positive=True)(x)
        elif not x.strip() or len(x) > 64:
            raise ValueError("expected a number or a value with its unit, such as \"1h\" or \"11G\"")
    return list(values)  # numbers in the probe's unit, or strings read per probe by _normalize_thresholds


def _units(v):
    values = v if isinstance(v, list) else [v]
    if len(values) > 16:
        raise ValueError("expected at most 16 units")
    return [_string(x) for x in values]


def _input(v):
    if v == "last-file":
        return v
    if isinstance(v, str) and v.startswith("arg:") and 4 < len(v) <= 12:
        try:
            int(v[4:])
            return v
        except ValueError:
            pass
    if isinstance(v, str) and v.startswith("option:") and 7 < len(v) <= 256 and "\0" not in v:
        return v
    raise ValueError(f"expected \"last-file\", \"arg:N\" (N counts from 1, negative from the end) or "
                     f"\"option:--name\", got {_show(v)}")


def mib(lo=None, hi=MIB_MAX):
    """MiB as a whole number, or a size with its unit ("11G", "3700M", "512MiB")."""
    check = _int(lo, hi)

    def parse(v):
        if isinstance(v, str):
            try:
                mb = parse_size(v, 1 << 20)
            except ValueError:
                raise ValueError(f"expected a number of MiB or a size such as \"11G\" or \"3700M\", "
                                 f"got {v!r}") from None
            v = int(mb) if mb == int(mb) else -1
            if v < 0:
                raise ValueError(f"expected a whole number of MiB, got {mb:g} MiB")
        return check(v)
    return parse


def _memory_max(v):
    if v in ("auto", "off"):
        return v
    if isinstance(v, str):
        try:
            v = mib(1)(v)
        except ValueError:
            pass
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MIB_MAX:
        return v
    raise ValueError(f"expected \"auto\", \"off\" or a number of MiB from 1 to {MIB_MAX} (or \"11G\"), "
                     f"got {_show(v)}")


_ENV_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_ENV_REST = _ENV_FIRST | frozenset("0123456789")


def _env(v):
    """Environment for the job: names as a shell takes them ([A-Za-z_][A-Za-z0-9_]*: no '=', no NUL, which
    execve would refuse only when the job starts), values without NUL."""
    if not isinstance(v, dict) or len(v) > 256:
        raise ValueError("expected a table of at most 256 strings")
    for k, x in v.items():
        if not isinstance(k, str) or not k or len(k) > 256 or k[0] not in _ENV_FIRST or not set(k) <= _ENV_REST:
            raise ValueError(f"variable name {_show(k)} is not a valid name (letters, digits, '_'; not a digit "
                             f"first)")
        if not isinstance(x, str) or "\0" in x or len(x) > 32768:
            raise ValueError(f"the value of {k} must be a string without NUL (at most 32 KiB)")
    return dict(v)


ROUTER = {
    "lock_dir": (_abspath, "/run/gpu-router/locks"),
    "retry_exit_code": (_int(1, 255), 75),
    "wait": (_bounded_duration(0, 86400), 0.0),
    "probe_error_exit_code": (_int(1, 255), 65),
}
HOST = {
    "gpu_vram_mb": (_optional(mib(1)), None),
    "ram_mb": (_optional(mib(1)), None),
    "other_ram_mb": (mib(0), 3072),
    "gpus": (_optional(_int(0, 64)), None),
}
GPU = {
    "backend": (_choice("auto", "nvml", "nvidia-smi", "none"), "auto"),
    "sample_interval": (_bounded_duration(0.01, 3600), 1.0),
    "snapshot": (_abspath, "/run/gpu-router/gpus.json"),
    "snapshot_max_age": (_bounded_duration(0.01, 86400), 5.0),
    "call_timeout": (_bounded_duration(0.01, 3600), 5.0),
    "xid_holdoff": (_bounded_duration(0, 7 * 86400), 300.0),
    "ignored_xids": (_intlist, [13, 31, 43, 45, 68]),
    "reserve_mb": (mib(0), 0),
    "visible_devices": (_choice("uuid", "index"), "uuid"),
    "accounting": (_choice("auto", "off"), "auto"),
}
AGENT = {
    "socket": (_abspath, "/run/gpu-router/agent.sock"),
    "group": (_string, "gpu-router"),
    "state_dir": (_abspath, "/var/lib/gpu-router"),
    "metrics_dir": (_optional(_abspath), None),
}
_REQUIRED = object()
WORKLOAD = {
    "binary": (_abspath, _REQUIRED),
    "probe": (_probes, ["file-size"]),
    "probe_command": (_strlist, []),
    "probe_timeout": (_bounded_duration(0.001, 3600), 10.0),
    "combine": (_choice("all", "product"), "all"),
    "input": (_input, "last-file"),
    "threshold": (_thresholds, _REQUIRED),
    "threshold_unit": (_units, None),
    "on_probe_error": (_choice("cpu", "fail"), "cpu"),
    "admission": (_choice("slots", "vram", "gpu-first"), "slots"),
    # the retry of an input whose GPU attempt ran out of memory (agent/oom_memory.py): the CPU, a GPU with room for
    # its measured need, or refused (exit 65)
    "on_gpu_oom": (_choice("cpu", "gpu-with-room", "fail"), "cpu"),
    "gpu_vram_mb": (mib(0), 0),
    "vram_model": (_choice("constant", "linear", "calibrated"), "constant"),
    "vram_base_mb": (_number(positive=False, hi=MIB_MAX), 0),
    "vram_per_unit_mb": (_number(positive=False, hi=MIB_MAX), 0),
    "cpu_ram_mb": (mib(0), 0),
    "gpu_ram_mb": (_optional(mib(0)), None),
    "max_gpu_jobs": (_optional(_int(0, 4096)), None),  # slots: 1 when unset; vram: no cap (VRAM decides)
    "blind_max_gpu_jobs": (_optional(_int(1, 4096)), None),
    "max_cpu_jobs": (_int(0, 4096), 1),
    "gpu_args": (_strlist, []),
    "cpu_args": (_strlist, []),
    "spill_to_cpu": (_bool, False),
    "retry_exit_code": (_optional(_int(1, 255)), None),
    "wait": (_optional(_bounded_duration(0, 86400)), None),
    "scope": (_choice("required", "best-effort", "off"), "best-effort"),
    "gpu_memory_max": (_memory_max, "auto"),
    "cpu_memory_max": (_memory_max, "auto"),
    "memory_margin": (_number(positive=False, hi=10), 0.2),
    "runtime_max": (_optional(_bounded_duration(0.001, MAX_DURATION_S)), None),
    "bind_to_caller": (_bool, False),
    "env": (_env, {}),
}


# `gpu-router init`'s questions, each also its flag (in this order in --help): profile key → (its flags, the flag's
# help, the question, or None for a flag that is not asked). "name" is the profile's own name.
# {fields} are the figures init fills in (detected GPUs, CPUs, the chosen probes); {{ }} is a literal brace.
INIT_QUESTIONS = {
    "name": (("--workload", "-w"), "the workload's name (names the profile file NAME.toml)",
             "Workload name (names the profile, its lock files and scopes)"),
    "binary": (("--binary",), "the real binary (absolute path)",
               "Real binary of the workload (absolute path; after `gpu-router wrap` its .distrib/.real)"),
    "probe": (("--probe",), "probe(s), comma-separated: {probes}",
              "Probe measuring the input ({probes}; several: comma-separated)"),
    "probe_command": (("--probe-command",), "for --probe command: the command line, with {{input}}",
                      "Probe command printing one number (\"{{input}}\" is the input's path)"),
    "input": (("--input",), "which argument is the input: last-file, arg:N, option:--name",
              "Which argument is the input (last-file, arg:N, option:--name)"),
    "threshold": (("--threshold",), "threshold(s), comma-separated, one per probe",
                  "Threshold in {units}: inputs under it go to the GPU, the others to the CPU{count}{hint}"),
    "threshold_unit": (("--unit",), "unit(s) of the threshold(s)", "Unit of the threshold{hint}"),
    "gpu_vram_mb": (("--gpu-vram-mb",), "VRAM per GPU job, MiB",
                    "VRAM per GPU job, MiB or e.g. 3.5G (its measured peak plus a little)"),
    "cpu_ram_mb": (("--cpu-ram-mb",), "RAM per CPU job, MiB",
                   "RAM per CPU job, MiB or e.g. 11G (its peak on a long input)"),
    "admission": (("--admission",), "vram (default where the GPU's VRAM is known) or slots",
                  "Admission: vram (as many GPU jobs as fit the GPU's free VRAM) or slots (a fixed count per GPU)"),
    "max_gpu_jobs": (("--max-gpu-jobs",), "jobs per GPU (default: as many as fit in the GPU's memory)",
                     "Max GPU jobs per GPU{fits}"),
    "max_cpu_jobs": (("--max-cpu-jobs",), "CPU jobs in all (default: as many as fit in RAM)",
                     "Max CPU jobs in all ({cpus} CPUs)"),
    "gpu_args": (("--gpu-args",), "arguments appended on the GPU, one string (shell quoting)",
                 "Arguments appended on the GPU (e.g. --device cuda)"),
    "cpu_args": (("--cpu-args",), "arguments appended on the CPU, one string (shell quoting)",
                 "Arguments appended on the CPU (e.g. --device cpu)"),
    "retry_exit_code": (("--retry-exit-code",), "exit code of a BLOCKED job (default: [router] retry_exit_code)",
                        "Exit code of a BLOCKED job (the caller retries on it)"),
    "wait": (("--wait",), "bounded wait for a slot, e.g. 30s (default: [router] wait)",
             "Wait for a slot before giving up (0s, 30s, 5m)"),
    "scope": (("--scope",), "required, best-effort (default) or off",
              "Systemd scope per job (required, best-effort, off)"),
    "on_probe_error": (("--on-probe-error",), "cpu (default) or fail; not asked", None),
}


# ---- the records: their fields are the schema's keys (one table), plus what validation derives ----------------

WORKLOAD_DERIVED = ("name", "source", "vram_calibration")  # set by _workload, not keys of the file


class Router(Record):
    __slots__ = tuple(ROUTER)


class Host(Record):
    __slots__ = tuple(HOST)


class Gpu(Record):
    __slots__ = tuple(GPU)


class Agent(Record):
    __slots__ = tuple(AGENT)


class Workload(Record):
    __slots__ = WORKLOAD_DERIVED + tuple(WORKLOAD)


class Config(Record):
    __slots__ = ("path", "router", "host", "gpu", "agent", "workloads")

    def workload(self, name):
        try:
            return self.workloads[name]
        except KeyError:
            known = ", ".join(sorted(self.workloads)) or "none"
            raise ConfigError(f"no workload profile named {name!r} (configured: {known})", self.path) from None


def _section(schema, raw, path, prefix):
    if not isinstance(raw, dict):
        raise ConfigError("expected a table", path, prefix)
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        import difflib

        key = _short(unknown[0])
        near = difflib.get_close_matches(key, schema, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else f"; allowed: {', '.join(sorted(schema))}"
        raise ConfigError(f"unknown key{hint}", path, f"{prefix}.{key}")
    out = {}
    for key, (check, default) in schema.items():
        if key not in raw:
            if default is _REQUIRED:
                raise ConfigError("required key is missing", path, f"{prefix}.{key}")
            out[key] = list(default) if isinstance(default, list) else (
                dict(default) if isinstance(default, dict) else default)
            continue
        try:
            out[key] = check(raw[key])
        except ValueError as exc:
            raise ConfigError(str(exc), path, f"{prefix}.{key}") from None
    return out


def _workload(name, raw, path, router, agent, read_calibration):
    prefix = f"workloads.{name}"
    w = _section(WORKLOAD, raw, path, prefix)
    w["vram_calibration"] = None
    if w["vram_model"] == "calibrated":
        _calibrated(w, raw, name, path, prefix, agent, read_calibration)
    n = 1 if w["combine"] == "product" else len(w["probe"])
    if len(w["threshold"]) != n:
        what = "one threshold (combine = \"product\")" if w["combine"] == "product" else \
            f"{n} thresholds, one per probe"
        raise ConfigError(f"expected {what}, got {len(w['threshold'])}", path, f"{prefix}.threshold")
    if w["threshold_unit"] is not None and len(w["threshold_unit"]) != n:
        raise ConfigError(f"expected {n} unit(s) to match the thresholds", path, f"{prefix}.threshold_unit")
    _normalize_thresholds(w, path, prefix)
    _check_binary(w["binary"], name, path, prefix)
    if "command" in w["probe"]:
        if not w["probe_command"]:
            raise ConfigError("probe = \"command\" needs probe_command, an argv list using \"{input}\"",
                              path, f"{prefix}.probe_command")
    elif w["probe_command"]:
        raise ConfigError("probe_command is only used with probe = \"command\"", path, f"{prefix}.probe_command")
    if w["admission"] == "vram":
        if w["vram_model"] == "constant" and w["gpu_vram_mb"] <= 0:
            raise ConfigError("admission = \"vram\" with vram_model = \"constant\" needs gpu_vram_mb > 0",
                              path, f"{prefix}.gpu_vram_mb")
        if w["vram_model"] == "linear" and w["vram_base_mb"] <= 0 and w["vram_per_unit_mb"] <= 0:
            if w["vram_calibration"]:
                raise ConfigError("the calibrated model predicts 0 MiB (vram_base_mb and vram_per_unit_mb are 0): "
                                  f"run gpu-router calibrate --workload {name} again", w["vram_calibration"])
            raise ConfigError("vram_model = \"linear\" needs vram_base_mb or vram_per_unit_mb > 0",
                              path, f"{prefix}.vram_per_unit_mb")
    if w["max_gpu_jobs"] is None and w["admission"] in ("slots", "gpu-first"):
        w["max_gpu_jobs"] = 1
    if w["max_gpu_jobs"] == 0 and w["max_cpu_jobs"] == 0:
        raise ConfigError("max_gpu_jobs and max_cpu_jobs are both 0: no job could ever run", path,
                          f"{prefix}.max_cpu_jobs")
    if w["retry_exit_code"] is None:
        w["retry_exit_code"] = router["retry_exit_code"]
    if w["wait"] is None:
        w["wait"] = router["wait"]
    for key in ("gpu_args", "cpu_args"):
        if any("\0" in a for a in w[key]):
            raise ConfigError("arguments cannot contain NUL", path, f"{prefix}.{key}")
    w["name"] = name
    w["source"] = path
    return w


def _normalize_thresholds(w, path, prefix):
    """Each threshold in its probe's own unit: "1h" → 3600 (seconds), 90 with threshold_unit = "minutes" → 5400,
    "11G" → bytes; a unit the probe does not measure in is refused by name. The record keeps the probe's units."""
    probes = w["probe"]
    if w["combine"] == "product":
        units = w["threshold_unit"][0].split("*") if w["threshold_unit"] else [None] * len(probes)
        if len(units) != len(probes):
            raise ConfigError(f"combine = \"product\": write one unit per probe joined by '*', e.g. "
                              f"{'*'.join(default_unit(p) for p in probes)!r}", path, f"{prefix}.threshold_unit")
        factor, own = 1, []
        for probe, unit in zip(probes, units):
            try:
                factor *= unit_factor(probe, unit) if unit is not None else 1
            except ValueError as exc:
                raise ConfigError(str(exc), path, f"{prefix}.threshold_unit") from None
            own.append(unit if probe == "command" and unit is not None else default_unit(probe))
        value = w["threshold"][0]
        if isinstance(value, str):
            raise ConfigError("with combine = \"product\" the threshold is a plain number", path,
                              f"{prefix}.threshold")
        w["threshold"] = [_scaled(value, factor)]
        w["threshold_unit"] = ["*".join(own)]
        return
    units = w["threshold_unit"] or [None] * len(probes)
    values, own = [], []
    for probe, unit, value in zip(probes, units, w["threshold"]):
        try:
            factor = unit_factor(probe, unit) if unit is not None else 1
        except ValueError as exc:
            raise ConfigError(str(exc), path, f"{prefix}.threshold_unit") from None
        try:
            number = threshold_value(probe, value) if isinstance(value, str) else _scaled(value, factor)
        except ValueError as exc:
            raise ConfigError(str(exc), path, f"{prefix}.threshold") from None
        values.append(number)
        own.append(unit if probe == "command" and unit is not None else default_unit(probe))
    w["threshold"], w["threshold_unit"] = values, own


def _scaled(value, factor):
    if factor == 1:
        return value
    number = value * factor
    return int(number) if float(number).is_integer() else number


# What the wrapper must never exec as a workload's real binary: itself. After `gpu-router wrap`, the wrapped path
# is a symlink to the launcher, so a profile still naming that path would route, then call the router again.
LAUNCHER_NAMES = ("gpu-router",)


def wraps_router(binary):
    """True when ``binary`` resolves to the gpu-router launcher (the wrapped name itself)."""
    try:
        real = os.path.realpath(binary)
    except (OSError, ValueError):
        return False
    return os.path.basename(real) in LAUNCHER_NAMES or os.path.basename(real).startswith("gpu-router-")


def _check_binary(binary, name, path, prefix):
    if wraps_router(binary):
        real = None
        for suffix in (".distrib", ".real"):
            if os.path.lexists(binary + suffix):
                real = binary + suffix
                break
        fix = f"set binary = \"{real}\" (the real binary, which `gpu-router wrap` moved there)" if real else \
            "set binary to the real program, not the wrapped name (`gpu-router wrap` moves it to NAME.distrib " \
            "or NAME.real)"
        raise ConfigError(f"{binary} is gpu-router itself (a wrapped name): every job would route, then call the "
                          f"router again; {fix}", path, f"{prefix}.binary")


CALIBRATION = {
    "vram_base_mb": (_number(positive=False, hi=MIB_MAX), _REQUIRED),
    "vram_per_unit_mb": (_number(positive=False, hi=MIB_MAX), _REQUIRED),
}


# What a read_calibration function returns to load a calibrated profile without its model (`gpu-router calibrate`
# does, to make a missing calibration or replace a broken one): the record keeps vram_model = "calibrated" and
# vram_calibration = None. Never used for a config that routes jobs.
SKIP_CALIBRATION = object()


def calibration_path(state_dir, name):
    """Where `gpu-router calibrate` keeps the fitted VRAM model of workload ``name``."""
    return os.path.join(state_dir, CALIBRATION_DIR, f"{name}.toml")


def _trusted_calibration(cal_path):
    """A calibration file is root's own state: in a folder only root can change (atomicfile.open_dir), a regular
    file of one link that no other account owns or may write. Anything else is an error, never read (issue 17)."""
    from . import atomicfile

    try:
        fd = atomicfile.open_dir(os.path.dirname(cal_path))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"calibration folder not usable: {exc.strerror or exc}", cal_path) from None
    try:
        st = os.stat(os.path.basename(cal_path), dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot stat: {exc.strerror}", cal_path) from None
    finally:
        os.close(fd)
    if not _stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or not _trusted_dir(st):
        raise ConfigError("not root's own calibration (a symlink, a hard link, or a file another account owns or "
                          "may write): remove it and run gpu-router calibrate again", cal_path)


def _calibrated(w, raw_profile, name, path, prefix, agent, read_calibration):
    """vram_model = "calibrated": take vram_base_mb / vram_per_unit_mb from the calibration file (a tool's file under
    [agent] state_dir, never the admin's conffile); the record then carries the linear model and the file's path."""
    for key in CALIBRATION:
        if key in raw_profile:
            raise ConfigError("with vram_model = \"calibrated\" this comes from the calibration file: remove it "
                              "here, or use vram_model = \"linear\"", path, f"{prefix}.{key}")
    cal_path = calibration_path(agent["state_dir"], name)
    try:
        _trusted_calibration(cal_path)
    except ConfigError:
        if read_calibration is not None and read_calibration(cal_path) is SKIP_CALIBRATION:
            return  # `gpu-router calibrate` replacing it
        raise
    raw = (read_calibration or read_toml)(cal_path)
    if raw is SKIP_CALIBRATION:
        return
    if raw is None:
        raise ConfigError(f"vram_model = \"calibrated\" but there is no calibration for {name!r} ({cal_path}): run "
                          f"gpu-router calibrate --workload {name} INPUT..., or use vram_model = \"linear\"",
                          path, f"{prefix}.vram_model")
    if not isinstance(raw, dict):
        raise ConfigError("expected a TOML document", cal_path)
    if raw.get("workload", name) != name:
        raise ConfigError(f"this calibration is for workload {raw.get('workload')!r}, not {name!r}", cal_path,
                          "workload")
    for key, (check, _default) in CALIBRATION.items():
        if key not in raw:
            raise ConfigError(f"required key is missing (run gpu-router calibrate --workload {name} again)",
                              cal_path, key)
        try:
            w[key] = check(raw[key])
        except ValueError as exc:
            raise ConfigError(str(exc), cal_path, key) from None
    w["vram_model"] = "linear"
    w["vram_calibration"] = cal_path
    if "admission" not in raw_profile and raw.get("admission") == "vram":
        # calibrate writes admission = "vram" when the fit is good: the model then decides, not a threshold.
        w["admission"] = "vram"


def default_unit(probe):
    return {"ffprobe-duration": "seconds", "mediainfo-duration": "seconds", "media-duration": "seconds",
            "file-size": "bytes", "image-pixels": "pixels", "video-pixels": "pixels",
            "line-count": "lines"}.get(probe, "units")


def validate(main_raw, main_path, dropins, read_calibration=None):
    """One place that checks everything: (main file dict, its path, [(path, dict), …]) → plain dict config.

    ``read_calibration(path) -> dict | None`` reads the calibration file of a profile with vram_model =
    "calibrated" (default: the TOML file itself; ``parse`` passes one that also records the file's stat identity).
    """
    allowed = {"router", "host", "gpu", "agent", "workloads"}
    unknown = sorted(set(main_raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown section; allowed: {', '.join(sorted(allowed))}", main_path, _short(unknown[0]))
    out = {"path": main_path}
    out["router"] = _section(ROUTER, main_raw.get("router", {}), main_path, "router")
    out["host"] = _section(HOST, main_raw.get("host", {}), main_path, "host")
    out["gpu"] = _section(GPU, main_raw.get("gpu", {}), main_path, "gpu")
    out["agent"] = _section(AGENT, main_raw.get("agent", {}), main_path, "agent")
    workloads, seen = {}, {}
    for path, raw in [(main_path, main_raw)] + list(dropins):
        if path != main_path:
            extra = sorted(set(raw) - {"workloads"})
            if extra:
                raise ConfigError("a drop-in holds only [workloads.NAME] tables", path, _short(extra[0]))
        tables = raw.get("workloads", {})
        if not isinstance(tables, dict):
            raise ConfigError("expected [workloads.NAME] tables", path, "workloads")
        for name, table in tables.items():
            if not name or name.startswith(".") or not all(c.isascii() and (c.isalnum() or c in "_.-")
                                                             for c in name):
                raise ConfigError("a workload name is letters, digits, '_', '.' and '-' (it names lock files "
                                  "and systemd scopes)", path, f"workloads.{_short(name)}")
            if len(name) > 64:
                raise ConfigError("a workload name is at most 64 characters", path, f"workloads.{_short(name)}")
            if name in seen:
                raise ConfigError(f"workload defined twice (also in {seen[name]})", path, f"workloads.{name}")
            seen[name] = path
            workloads[name] = _workload(name, table, path, out["router"], out["agent"], read_calibration)
    out["workloads"] = workloads
    return out


def build(plain):
    """Records from a validated plain dict (a cache hit goes straight here)."""
    return Config(
        path=plain["path"], router=Router(**plain["router"]), host=Host(**plain["host"]),
        gpu=Gpu(**plain["gpu"]), agent=Agent(**plain["agent"]),
        workloads={name: Workload(**w) for name, w in plain["workloads"].items()},
    )


# ---- loading, with the cache ----------------------------------------------------------------------------------

def config_path(explicit=None):
    return os.path.abspath(explicit or os.environ.get("GPU_ROUTER_CONFIG") or DEFAULT_PATH)


def dropin_dir(main_path):
    return os.path.join(os.path.dirname(main_path), "workloads.d")


def is_dropin(name):
    """A drop-in is read only when named *.toml, never a hidden file (an editor's)."""
    return name.endswith(".toml") and not name.startswith(".")


def dropin_names(ddir):
    """The drop-ins read from `ddir`, sorted (os.listdir's OSError when it cannot be listed)."""
    return sorted(n for n in os.listdir(ddir) if is_dropin(n))


def _identity(path):
    """(path, mtime, size, inode, ctime) of a file, or (path, None) when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return (path, None)
    return (path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)


def _sources(main_path):
    """Stat identity of every conffile source: any edit, addition or removal changes it.

    The calibration files of profiles with vram_model = "calibrated" are sources too, but their paths depend on
    the parsed config ([agent] state_dir, the profiles): the cache records them (``extra``) and ``_read_cache``
    adds their identities to the key, so a new, changed or removed calibration is seen on the next load.
    """
    out = []
    for path in (main_path, dropin_dir(main_path)):
        out.append(_identity(path))
    ddir = dropin_dir(main_path)
    try:
        names = dropin_names(ddir)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        out.append(_identity(os.path.join(ddir, name)))  # a dangling one is (path, None): parse names it
    return out


def _cache_file(main_path):
    cache_dir = os.environ.get("GPU_ROUTER_CACHE_DIR") or DEFAULT_CACHE_DIR
    return os.path.join(cache_dir, "config" + main_path.replace("%", "%25").replace("/", "%2F") + ".marshal")


def _trusted(st):
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH) \
        and _stat.S_ISREG(st.st_mode)


def _read_cache(cache_file, sources):
    try:
        fd = os.open(cache_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _trusted(os.fstat(fd)):
            return None
        data = b""
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    try:
        blob = marshal.loads(data)
    except (EOFError, ValueError, TypeError):
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        return None
    extra = blob.get("extra")
    if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
        return None
    if extra:
        try:
            sources = sources + [_identity(p) for p in extra]
        except OSError:
            return None
    if blob.get("sources") != sources:
        return None
    return blob.get("config")


def _write_cache(cache_file, sources, plain, extra=()):
    """Best effort: only where this process may write the cache dir (root in production)."""
    cache_dir = os.path.dirname(cache_file)
    try:
        st = os.lstat(cache_dir)
    except OSError:
        return False
    if not _stat.S_ISDIR(st.st_mode) or not _trusted_dir(st) or not os.access(cache_dir, os.W_OK):
        return False
    tmp = f"{cache_file}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, marshal.dumps({"format": CACHE_FORMAT, "sources": sources, "config": plain,
                                        "extra": list(extra)}))
            written = os.fstat(fd).st_ctime_ns
        finally:
            os.close(fd)
        # Racy sources (as git's index has them): timestamps are kernel ticks on many kernels (Debian 12's 6.1),
        # so a same-size edit in the tick of this load would leave every stat field as recorded. Cache only
        # sources changed strictly before the cache itself; a later edit then always differs from the key.
        if any(s[1] is not None and s[4] >= written for s in sources):
            os.unlink(tmp)
            return False
        os.rename(tmp, cache_file)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _trusted_dir(st):
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (_stat.S_IWGRP | _stat.S_IWOTH)


def read_toml(path):
    """The TOML document at ``path``, or None when there is none. Only a regular file is read (a directory, FIFO
    or device is refused by name, never opened for reading: a FIFO would hang, /dev/zero never end), at most
    MAX_CONFIG_BYTES, nested at most MAX_DEPTH deep."""
    import tomllib

    try:
        st = os.stat(path)  # before open: opening a FIFO or a socket is already too much
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path) from None
    _regular(st, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path) from None
    try:
        st = os.fstat(fd)
        _regular(st, path)  # again on what was opened: the name may have been swapped in between
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"is {st.st_size} bytes; a config file is at most {MAX_CONFIG_BYTES}", path)
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_CONFIG_BYTES:
                raise ConfigError(f"is larger than {MAX_CONFIG_BYTES} bytes; refusing it", path)
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", path) from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"nested too deeply (at most {MAX_DEPTH} levels)", path) from None
    key = _too_deep(doc)
    if key is not None:
        raise ConfigError(f"nested too deeply (at most {MAX_DEPTH} levels of tables and arrays)", path, key)
    return doc




def _regular(st, path):
    if not _stat.S_ISREG(st.st_mode):
        kind = "a directory" if _stat.S_ISDIR(st.st_mode) else "a FIFO" if _stat.S_ISFIFO(st.st_mode) else \
            "a socket" if _stat.S_ISSOCK(st.st_mode) else \
            "a device" if _stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode) else "something else"
        raise ConfigError(f"is {kind}, not a regular file; refusing it", path)


def _too_deep(doc):
    """The dotted key where ``doc`` nests deeper than MAX_DEPTH, or None (iterative: no recursion to exhaust)."""
    stack = [(doc, "", 0)]
    while stack:
        value, key, depth = stack.pop()
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((f"[{i}]", v) for i, v in enumerate(value))
        else:
            continue
        if depth >= MAX_DEPTH:
            return key or None
        for k, v in items:
            if isinstance(v, (dict, list)):
                stack.append((v, f"{key}.{k}" if key and not k.startswith("[") else f"{key}{k}" if key else k,
                              depth + 1))
    return None


def parse(main_path, read_calibration=None, candidate=None):
    """The slow path: read and validate every source (no cache).

    ``candidate`` = (file, target): validate the configuration as it would be with ``file`` in place of ``target``
    (the main file or a drop-in, existing or new), without touching either: `gpu-router check -f FILE`. Errors
    in the candidate name the candidate file.
    """
    cand_file, cand_target = candidate if candidate else (None, None)
    if cand_target == main_path:
        main_raw = read_toml(cand_file)
        if main_raw is None:
            raise ConfigError("no such file", cand_file)
        return validate(main_raw, cand_file, _read_dropins(main_path, None, None), read_calibration)
    main_raw = read_toml(main_path)
    if main_raw is None:
        if main_path != DEFAULT_PATH:
            raise ConfigError("no such config file", main_path)
        main_raw = {}
    return validate(main_raw, main_path, _read_dropins(main_path, cand_file, cand_target), read_calibration)


def _read_dropins(main_path, cand_file, cand_target):
    ddir = dropin_dir(main_path)
    dropins = []
    try:
        names = dropin_names(ddir)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError as exc:
        raise ConfigError(f"cannot list: {exc.strerror}", ddir) from None
    paths = [os.path.join(ddir, name) for name in names]
    if cand_target and cand_target not in paths:
        paths = sorted(paths + [cand_target])
    for path in paths:
        if path == cand_target:
            raw = read_toml(cand_file)
            if raw is None:
                raise ConfigError("no such file", cand_file)
            dropins.append((cand_file, raw))
        else:
            doc = read_toml(path)
            if doc is None:
                raise ConfigError("is listed but cannot be found (a dangling symlink?); refusing it", path)
            dropins.append((path, doc))
    return dropins


def load(explicit=None, use_cache=True):
    """The config as records; from the cache when every source is unchanged."""
    main_path = config_path(explicit)
    if not use_cache:
        return build(parse(main_path))
    try:
        sources = _sources(main_path)
    except OSError as exc:
        raise ConfigError(f"cannot stat config sources: {exc}", main_path) from None
    cache_file = _cache_file(main_path)
    plain = _read_cache(cache_file, sources)
    if plain is None:
        calibrations = []

        def read_calibration(path):
            try:
                calibrations.append(_identity(path))  # before reading: a later change then differs from the key
            except OSError as exc:
                raise ConfigError(f"cannot stat: {exc.strerror}", path) from None
            return read_toml(path)

        plain = parse(main_path, read_calibration)
        _write_cache(cache_file, sources + calibrations, plain, [c[0] for c in calibrations])
    return build(plain)
