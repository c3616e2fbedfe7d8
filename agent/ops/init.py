"""`gpu-router init`: write a workload profile by asking what the original runbook asks.

    gpu-router init [--workload NAME] [--binary PATH] [--probe P[,P]] [--probe-command ARGV] [--input SPEC]
                    [--threshold N[,N]] [--unit U[,U]] [--gpu-vram-mb MB] [--cpu-ram-mb MB]
                    [--max-gpu-jobs N] [--max-cpu-jobs N] [--gpu-args ARGS] [--cpu-args ARGS]
                    [--retry-exit-code N] [--wait DURATION] [--scope MODE] [--on-probe-error cpu|fail]
                    [--yes] [--force] [--json]

Each question has a flag; a question whose flag is given is not asked, and ``--yes`` takes the default of every
question left (and the final "write it?"), so the command runs without a terminal. Questions without a default (name,
binary, threshold, VRAM per GPU job, RAM per CPU job) must then be given as flags.

GPU memory comes from the agent's snapshot, else from NVML / nvidia-smi (``gpu.open_backend``), unless ``[host]
gpu_vram_mb`` says; system RAM from ``[host] ram_mb`` or /proc/meminfo. They give the defaults of the job counts
and the memory budget worksheet shown before writing. The new profile is validated together with the whole
configuration by ``config.validate`` — the wrapper's own validation — so init never writes a profile the wrapper
would reject. It goes to ``workloads.d/NAME.toml`` beside the main config file, written atomically with tomli-w, and
an existing file is replaced only with ``--force``.

Not on the hot path: imports freely.
"""

import os
import shlex
import sys
import time

from .. import config as _config
from .. import atomicfile, policy
from . import host

_NONE = object()  # a question without a default


class InitRefused(Exception):
    """Nothing written, on purpose (the file exists, the operator said no): exit 1."""


# ---- the current configuration (everything but the new profile) ------------------------------------------------

def _sources(main_path):
    """(main dict, [(path, dict or the ConfigError reading it)] of the drop-ins) — as config.parse reads them.

    A drop-in that does not parse is kept as its error: it is fatal unless it is the file --force replaces.
    """
    main_raw = _config.read_toml(main_path)
    if main_raw is None:
        if main_path != _config.DEFAULT_PATH:
            raise _config.ConfigError("no such config file", main_path)
        main_raw = {}
    ddir = _config.dropin_dir(main_path)
    try:
        names = _config.dropin_names(ddir)
    except (FileNotFoundError, NotADirectoryError):
        names = []
    except OSError as exc:
        raise _config.ConfigError(f"cannot list: {exc.strerror}", ddir) from None
    dropins = []
    for name in names:
        path = os.path.join(ddir, name)
        try:
            dropins.append((path, _config.read_toml(path) or {}))
        except _config.ConfigError as exc:
            dropins.append((path, exc))
    return main_raw, dropins


# ---- answers: text → value (each checked by the schema's own checker) ------------------------------------------

def _check(key, value):
    check = _config.WORKLOAD[key][0]
    return check(value)


def _number_text(text):
    text = text.strip()
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    return value


def _list(text):
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _int_text(lo=None, hi=None):
    def parse(text):
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"expected a whole number from {lo} to {hi}" if hi is not None
                             else f"expected a whole number >= {lo}")
        return value
    return parse


def _name(text):
    name = str(text).strip()
    # the one validation decides what a name may be: a minimal profile under that name
    _config.validate({"workloads": {name: {"binary": "/bin/true", "threshold": 1}}}, "init", [])
    return name


def _args(text):
    try:
        return shlex.split(str(text))
    except ValueError as exc:
        raise ValueError(f"cannot split into arguments: {exc}") from None


def _dest(key):
    """The argparse name of question ``key``'s flag (--max-gpu-jobs → max_gpu_jobs, --unit → unit)."""
    return _config.INIT_QUESTIONS[key][0][0][2:].replace("-", "_")


class Asker:
    """Asks on the terminal (or whatever stdin is), or takes the flag, or (with --yes) the default. The question
    and its flag are the schema's (``config.INIT_QUESTIONS``); ``fields`` fill in its figures."""

    def __init__(self, args, out):
        self.args = args
        self.out = out
        self.answers = {}

    def __call__(self, key, default=_NONE, parse=str, show=None, **fields):
        flags, _help, question = _config.INIT_QUESTIONS[key]
        flag, dest, prompt = flags[0], _dest(key), question.format(**fields)
        given = getattr(self.args, dest, None)
        if given is not None:
            try:
                value = parse(given)
            except (ValueError, _config.ConfigError) as exc:
                raise _config.ConfigError(f"{flag}: {exc}") from None
        elif self.args.yes:
            if default is _NONE:
                raise _config.ConfigError(f"{flag} is needed: this question has no default")
            value = default
        else:
            value = self._ask(prompt, default, parse, show)
        self.answers[dest] = value
        return value

    def _ask(self, prompt, default, parse, show):
        shown = show if show is not None else ("" if default is _NONE else str(default))
        while True:
            self.out.write(f"{prompt}" + (f" [{shown}]" if shown else "") + ": ")
            self.out.flush()
            line = sys.stdin.readline()
            if not line:
                self.out.write("\n")
                raise _config.ConfigError("standard input ended before every question was answered: give the "
                                          "answers as flags (gpu-router init --help), with --yes for the defaults")
            text = line.strip()
            if not text:
                if default is not _NONE:
                    return default
                self.out.write("  an answer is needed\n")
                continue
            try:
                return parse(text)
            except (ValueError, _config.ConfigError) as exc:
                self.out.write(f"  {exc}\n")

    def confirm(self, prompt, default):
        if self.args.yes:
            return True
        return self._ask(prompt, "yes" if default else "no", _yes_no, "Y/n" if default else "y/N") == "yes"


def _yes_no(text):
    t = str(text).strip().lower()
    if t in ("y", "yes"):
        return "yes"
    if t in ("n", "no"):
        return "no"
    raise ValueError("answer y or n")


def _wrapped_real(name):
    """The real binary recorded by `gpu-router wrap` for workload NAME (or a binary named NAME), or None."""
    import tomllib

    from .. import wrapmap

    folder = wrapmap.folder()
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".toml"))
    except OSError:
        return None
    for n in names:
        try:
            with open(os.path.join(folder, n), "rb") as f:
                record = tomllib.load(f)
        except (OSError, ValueError):
            continue
        if name in (record.get("workload"), record.get("name")) and isinstance(record.get("real"), str):
            return record["real"]
    return None


def _default_binary(name):
    """The real binary of NAME: what `gpu-router wrap` recorded, its .distrib / .real, else NAME on PATH (never a
    wrapped name: that is gpu-router itself)."""
    from ..executables import USER_PATH, which

    real = _wrapped_real(name)
    if real:
        return real

    found = which(name, fallback=USER_PATH)
    folders = [os.path.dirname(found)] if found else []
    folders += [d for d in ("/usr/local/bin", "/usr/bin", "/usr/sbin", "/bin") if d not in folders]
    for folder in folders:
        for suffix in (".distrib", ".real"):
            candidate = os.path.join(folder, name + suffix)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                return candidate
    if found and _config.wraps_router(found):
        return _NONE
    return found or _NONE


def _binary(text):
    path = str(text).strip()
    if not path.startswith("/"):
        from ..executables import which

        found = which(path)
        if found is None:
            raise ValueError(f"expected an absolute path (or a command on PATH), got {path!r}")
        path = found
    if _config.wraps_router(path):
        real = _wrapped_real(os.path.basename(path))
        real = real or next((path + s for s in (".distrib", ".real") if os.path.exists(path + s)), None)
        raise ValueError(f"{path} is gpu-router itself (it is wrapped)" + (
            f": the real binary is {real}" if real else ": give the real program"))
    return _check("binary", path)


def _fmt_num(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---- the command ------------------------------------------------------------------------------------------------

def cmd_init(args):
    from .common import emit, worksheet

    out = sys.stderr if args.json else sys.stdout
    main_path = _config.config_path(args.config)
    main_raw, dropins = _sources(main_path)
    cfg = _config.build(_config.validate(main_raw, main_path, []))  # the settings; the profiles are checked below

    gpus, gpu_source = host.detect_gpus(cfg)
    h = host.figures(cfg, gpus, gpu_source)
    vram, vram_source, ram, ram_source, count = h.vram_mb, h.vram_source, h.ram_mb, h.ram_source, h.gpus
    detected = {"gpus": [{k: g.get(k) for k in ("index", "name", "total_mb", "free_mb")} for g in gpus],
                "gpu_source": gpu_source, "gpu_vram_mb": vram, "gpu_vram_source": vram_source, "ram_mb": ram,
                "ram_source": ram_source}
    if not args.yes:
        out.write(f"gpu-router init: a workload profile for {_config.dropin_dir(main_path)}/\n")
        if gpus:
            for g in gpus:
                out.write(f"  GPU {g.get('index')}: {g.get('name') or '?'}, {g.get('total_mb')} MiB "
                          f"[{gpu_source}]\n")
        else:
            out.write(f"  no GPU detected ({gpu_source})" + (f"; [host] gpu_vram_mb = {vram}" if vram else "")
                      + "\n")
        out.write(f"  system RAM: {ram if ram is not None else 'unknown'} MiB [{ram_source}]\n")

    folder = _config.dropin_dir(main_path)
    existing = folder if os.path.isdir(folder) else os.path.dirname(folder)
    if not os.access(existing, os.W_OK):  # say it before asking anything, not after the last answer
        raise InitRefused(f"cannot write profiles in {folder} as this user: run gpu-router init as root")
    ask = Asker(args, out)
    name = ask("name", parse=_name)
    target = os.path.join(_config.dropin_dir(main_path), f"{name}.toml")
    if os.path.lexists(target) and not args.force:
        raise InitRefused(f"{target} exists: --force replaces it")
    others = [(path, raw) for path, raw in dropins if path != target]  # --force: the new file replaces the old
    for _path, raw in others:
        if isinstance(raw, _config.ConfigError):
            raise raw  # the wrapper would reject the whole configuration: fix that first
    binary = ask("binary", _default_binary(name), _binary)
    probes = ask("probe", ["file-size"], lambda t: _check("probe", _list(t)), show="file-size",
                 probes=", ".join(_config.PROBES))
    table = {"binary": binary, "probe": probes[0] if len(probes) == 1 else probes}
    if "command" in probes:
        command = ask("probe_command", parse=_probe_command)
        table["probe_command"] = command
    table["input"] = ask("input", "last-file", lambda t: _check("input", str(t).strip()))
    n = len(probes)
    default_unit = [_config.default_unit(p) for p in probes]
    units = ask("threshold_unit", default_unit, _units(probes), show=",".join(default_unit),
                hint=_unit_hint(probes))
    thresholds = ask("threshold", parse=_thresholds(probes, units), units=",".join(units),
                     count=f" ({n} values, comma-separated)" if n > 1 else "", hint=_value_hint(probes))
    table["threshold"] = thresholds[0] if n == 1 else thresholds
    table["threshold_unit"] = units[0] if n == 1 else units
    if getattr(args, _dest("on_probe_error")) is not None:  # a flag only: the runbook does not ask it
        try:
            table["on_probe_error"] = _check("on_probe_error", getattr(args, _dest("on_probe_error")))
        except ValueError as exc:
            raise _config.ConfigError(f"{_config.INIT_QUESTIONS['on_probe_error'][0][0]}: {exc}") from None
    table["gpu_vram_mb"] = ask("gpu_vram_mb", parse=_mib_text)
    table["cpu_ram_mb"] = ask("cpu_ram_mb", parse=_mib_text)
    gpu_default = 1
    room, foreign = vram, _foreign_mb(gpus)
    if room is not None and foreign and cfg.host.gpu_vram_mb is None:
        room = max(0, vram - foreign)  # VRAM other processes hold now is not ours to give out
    if room is not None and table["gpu_vram_mb"] > 0:
        gpu_default = max(1, (room - cfg.gpu.reserve_mb) // table["gpu_vram_mb"])
    fits = ""
    if room is not None and table["gpu_vram_mb"] > 0:
        fits = f" (that many fit in {room} MiB" + (f": {vram} MiB less {foreign} MiB other processes use now"
                                                   if room != vram else "") + ")"
    # VRAM decides where VRAM is known: admission = "vram" admits a job whenever its VRAM fits the GPU's room, so
    # the GPU is never idle for want of a slot nor overcommitted by one (bench/README.md: the runbook's trace).
    vram_default = "vram" if vram is not None and table["gpu_vram_mb"] > 0 else "slots"
    table["admission"] = ask("admission", vram_default, lambda t: _check("admission", str(t).strip()))
    if table["admission"] == "vram":
        cap = ask("max_gpu_jobs", None,
                  lambda t: None if str(t).strip().lower() in ("", "none") else _int_text(0, 4096)(t), show="none",
                  fits=" as an extra cap (none: VRAM alone decides)")
        if cap is not None:
            table["max_gpu_jobs"] = cap
    else:
        table["max_gpu_jobs"] = ask("max_gpu_jobs", gpu_default, _int_text(0, 4096), fits=fits)
    cpu_default, cpus = 1, os.cpu_count() or 1
    if ram is not None and table["cpu_ram_mb"] > 0:  # as many as fit in RAM, but no more than the CPUs
        cpu_default = max(1, min((ram - cfg.host.other_ram_mb) // table["cpu_ram_mb"], cpus))
    table["max_cpu_jobs"] = ask("max_cpu_jobs", cpu_default, _int_text(0, 4096), cpus=cpus)
    table["gpu_args"] = ask("gpu_args", [], _args, show="none")
    table["cpu_args"] = ask("cpu_args", [], _args, show="none")
    retry = ask("retry_exit_code", cfg.router.retry_exit_code, _int_text(1, 255))
    if retry != cfg.router.retry_exit_code:
        table["retry_exit_code"] = retry
    wait = ask("wait", None, _wait, show=_fmt_num(cfg.router.wait) + "s")
    if wait is not None and _config.parse_duration(wait) != cfg.router.wait:
        table["wait"] = wait
    table["scope"] = ask("scope", "best-effort", lambda t: _check("scope", str(t).strip()))

    # The one validation, over the whole configuration as it will be: never a profile the wrapper rejects.
    plain = _config.validate(main_raw, main_path, others + [(target, {"workloads": {name: table}})])
    w = _config.build(plain).workload(name)
    b = policy.budget(w, vram, count, ram, cfg.host.other_ram_mb)
    b["gpu_vram_source"], b["ram_source"], b["gpus"] = vram_source, ram_source, count
    problems = policy.budget_problems(w, b)
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        problems.append(f"{binary} is not an executable file (yet): jobs would exit 127/126")
    b["problems"] = problems
    out.write("\n".join(worksheet(w, b)) + "\n")
    negative = any("negative" in p for p in problems)
    if not ask.confirm(f"Write {target}", default=not negative):
        raise InitRefused("nothing written")
    _write_profile(target, name, table, args.force)
    data = {"path": target, "workload": name, "profile": table, "written": True, "budget": b,
            "detected": detected, "problems": problems}
    text = [f"wrote {target}",
            f"next: gpu-router check --workload {name}; gpu-router wrap BINARY --workload {name} (the name callers "
            f"use, e.g. /usr/bin/{name}); gpu-router explain --workload {name} FILE"]
    emit(args, data, "\n".join(text))
    return 1 if negative else 0


def _probe_command(text):
    argv = _args(text) if isinstance(text, str) else list(text)
    if not argv:
        raise ValueError("expected a command, e.g. \"mediainfo --Output=General;%Duration% {input}\"")
    return _check("probe_command", argv)


def _thresholds(probes, units):
    """Numbers in the chosen unit, or values with their own unit ("1h", "90min", "11G"), checked per probe."""
    def parse(text):
        values = []
        for probe, unit, t in zip(probes, units, _list(text)):
            try:
                values.append(_number_text(t))
                continue
            except ValueError:
                pass
            try:
                _config.threshold_value(probe, t)
            except ValueError:
                hint = _value_hint([probe]).strip(" ()") or "a number"
                raise ValueError(f"expected a number of {unit} ({hint}), got {t!r}") from None
            values.append(t)
        if len(_list(text)) != len(probes):
            raise ValueError(f"expected {len(probes)} value(s), one per probe, got {len(_list(text))}")
        return _check("threshold", values)
    return parse


def _units(probes):
    def parse(text):
        values = _list(text) if isinstance(text, str) else list(text)
        if len(values) != len(probes):
            raise ValueError(f"expected {len(probes)} unit(s), one per probe, got {len(values)}")
        for probe, unit in zip(probes, values):
            _config.unit_factor(probe, unit)  # ValueError naming the units the probe measures in
        return _check("threshold_unit", values)
    return parse


def _unit_hint(probes):
    kinds = {_config.PROBE_UNITS[p][0] for p in probes if p in _config.PROBE_UNITS}
    hints = {"seconds": "minutes and hours convert", "bytes": "K, M, G (1024s) and kB, MB, GB convert",
             "pixels": "megapixels converts"}
    said = [hints[k] for k in sorted(kinds) if k in hints]
    return f" ({'; '.join(said)})" if said else ""


def _value_hint(probes):
    if any(p in _config.PROBE_UNITS and _config.PROBE_UNITS[p][0] == "seconds" for p in probes):
        return " (or with a unit: 1h, 90min)"
    if "file-size" in probes:
        return " (or with a unit: 11G, 500M)"
    return ""


def _mib_text(text):
    try:
        return _config.mib(0)(text if not str(text).strip().isdigit() else int(str(text).strip()))
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _foreign_mb(gpus):
    """The most VRAM other processes hold on any GPU now (from the agent's snapshot), or 0."""
    used = [g.get("foreign_mb") or 0 for g in gpus if isinstance(g, dict)]
    return max(used) if used else 0


def _wait(text):
    text = str(text).strip()
    _config.parse_duration(text)  # ValueError with what is wrong
    return text


def _write_profile(target, name, table, force):
    import tomli_w

    folder = os.path.dirname(target)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    data = (f"# Workload profile written by `gpu-router init` on {time.strftime('%Y-%m-%d')}.\n"
            f"# Every key: gpu-router.toml(5). Check it with: gpu-router check --workload {name}\n\n"
            + tomli_w.dumps({"workloads": {name: table}})).encode()
    try:
        atomicfile.write(target, data, durable=True, exclusive=not force)  # dot-named temp: config never reads it
    except FileExistsError:
        raise InitRefused(f"{target} exists: --force replaces it") from None


def _run(args):
    try:
        return cmd_init(args)
    except InitRefused as exc:
        sys.stderr.write(f"gpu-router: init: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"gpu-router: init: {exc}\n")
        return 1


def register(sub, command):
    c = command("init", "write a workload profile by asking what the runbook asks (every question has a flag)")
    probes = ", ".join(_config.PROBES)
    for flags, help_text, _question in _config.INIT_QUESTIONS.values():  # the schema's table: one flag a question
        c.add_argument(*flags, help=help_text.format(probes=probes))
    c.add_argument("--yes", "-y", action="store_true", help="ask nothing: defaults for what is not given")
    c.add_argument("--force", action="store_true", help="replace an existing workloads.d/NAME.toml")
    c.set_defaults(func=_run)
