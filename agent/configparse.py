"""Reading and validating the config's sources: what a cache miss runs (TOML, drop-ins, calibrations).

Split from config.py, which keeps the schema, the records and the cache: a job that hits the cache (every job
but the first after an edit) never loads this module (~0.2 ms of every job's start). ``config.validate``,
``config.parse`` and ``config.read_toml`` still name these functions.
"""

import marshal
import _stat

from . import fastos as os  # os without its import cost (fastos.py)
from .config import (AGENT, CACHE_FORMAT, CALIBRATION, DEFAULT_PATH, GPU, HOST, MAX_CONFIG_BYTES, MAX_DEPTH,
                     REQUIRED, ROUTER, SKIP_CALIBRATION, WORKLOAD, ConfigError, calibration_path, default_unit,
                     dropin_dir, dropin_names, threshold_value, unit_factor, wraps_router)


def _short(key, limit=64):
    """A key as an error message names it (a hostile 1 MB key is cut)."""
    key = str(key)
    return key if len(key) <= limit else key[:limit] + "…"


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
            if default is REQUIRED:
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


def write_cache(cache_file, sources, plain, extra=()):
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
