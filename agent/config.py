"""The configuration model, its one validation, and the cache that keeps TOML parsing off the hot path.

Sources, in order: the main file (/etc/gpu-router/config.toml, or --config / GPU_ROUTER_CONFIG), then the drop-ins
``workloads.d/*.toml`` beside it, each holding ``[workloads.NAME]`` tables. Defaults live here, in the schema. A
profile with ``vram_model = "calibrated"`` also reads ``<[agent] state_dir>/calibration/NAME.toml``, the model
``gpu-router calibrate`` fitted (a tool's file, never the admin's), at load; it becomes the linear model.

Every value goes through ``validate()`` (configparse.py, with the TOML reading: only a cache miss loads it); an
error names the file, the key and what is allowed, and is raised before anything runs, so a bad config never runs
a job on the wrong device.

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
REQUIRED = object()
WORKLOAD = {
    "binary": (_abspath, REQUIRED),
    "probe": (_probes, ["file-size"]),
    "probe_command": (_strlist, []),
    "probe_timeout": (_bounded_duration(0.001, 3600), 10.0),
    "combine": (_choice("all", "product"), "all"),
    "input": (_input, "last-file"),
    "threshold": (_thresholds, REQUIRED),
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


CALIBRATION = {
    "vram_base_mb": (_number(positive=False, hi=MIB_MAX), REQUIRED),
    "vram_per_unit_mb": (_number(positive=False, hi=MIB_MAX), REQUIRED),
}


# What a read_calibration function returns to load a calibrated profile without its model (`gpu-router calibrate`
# does, to make a missing calibration or replace a broken one): the record keeps vram_model = "calibrated" and
# vram_calibration = None. Never used for a config that routes jobs.
SKIP_CALIBRATION = object()


def calibration_path(state_dir, name):
    """Where `gpu-router calibrate` keeps the fitted VRAM model of workload ``name``."""
    return os.path.join(state_dir, CALIBRATION_DIR, f"{name}.toml")


def default_unit(probe):
    return {"ffprobe-duration": "seconds", "mediainfo-duration": "seconds", "media-duration": "seconds",
            "file-size": "bytes", "image-pixels": "pixels", "video-pixels": "pixels",
            "line-count": "lines"}.get(probe, "units")


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


def load(explicit=None, use_cache=True):
    """The config as records; from the cache when every source is unchanged."""
    main_path = config_path(explicit)
    if not use_cache:
        from . import configparse

        return build(configparse.parse(main_path))
    try:
        sources = _sources(main_path)
    except OSError as exc:
        raise ConfigError(f"cannot stat config sources: {exc}", main_path) from None
    cache_file = _cache_file(main_path)
    plain = _read_cache(cache_file, sources)
    if plain is None:
        from . import configparse  # a miss: TOML, validation (not every job's cost)

        calibrations = []

        def read_calibration(path):
            try:
                calibrations.append(_identity(path))  # before reading: a later change then differs from the key
            except OSError as exc:
                raise ConfigError(f"cannot stat: {exc.strerror}", path) from None
            return configparse.read_toml(path)

        plain = configparse.parse(main_path, read_calibration)
        configparse.write_cache(cache_file, sources + calibrations, plain, [c[0] for c in calibrations])
    return build(plain)


_IN_CONFIGPARSE = frozenset({"validate", "parse", "read_toml"})


def __getattr__(name):
    """config.validate, config.parse, config.read_toml: configparse.py's, loaded on first use (a cache miss's
    work, kept off every job's start)."""
    if name in _IN_CONFIGPARSE:
        from . import configparse

        return getattr(configparse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
