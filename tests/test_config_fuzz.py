"""Config fuzzing (issue 8, points 9-10): 600 mutated configs — wrong types, huge/NaN/inf values, unicode, NUL,
nesting, non-regular drop-ins, bytes that are not UTF-8 — each either loads or is a ConfigError naming its file (and
the key, where one is at fault); never another exception. `gpu-router check` (in-process, all of them) and
`gpu-router run` (a real process, every 12th) agree with the loader: exit 2 with one "config error" line naming the
file, never a traceback, never a job run."""

import io
import os
import random
import subprocess
import sys
import contextlib

import pytest

import helpers
from gpu_router import config

N = 600
BASE_MAIN = {
    "router": {"lock_dir": "LOCKS", "retry_exit_code": 75, "wait": "0s"},
    "gpu": {"snapshot": "SNAP", "sample_interval": "1s", "snapshot_max_age": "5s", "reserve_mb": 0},
    "host": {"gpu_vram_mb": 16384, "ram_mb": 65536},
    "agent": {"group": "gpu-router"},
    "workloads": {"w": {"binary": "JOB", "probe": "file-size", "threshold": 1000, "max_gpu_jobs": 1,
                        "max_cpu_jobs": 1, "gpu_args": ["--cuda"], "cpu_args": ["--cpu"], "scope": "off",
                        "admission": "slots", "gpu_vram_mb": 1000, "env": {"A": "b"}, "probe_timeout": "5s"}},
}
BASE_DROPIN = {"workloads": {"d": {"binary": "JOB", "threshold": 10, "scope": "off", "wait": "1s",
                                   "vram_model": "linear", "vram_base_mb": 100, "vram_per_unit_mb": 2.5,
                                   "admission": "vram", "runtime_max": "1h", "memory_margin": 0.2}}}

VALUES = [
    "", "x", "30s", "-5s", "1e999s", "9" * 400, "\u00e9\u00e8\u4e2d\u6587", "\U0001f600", "a\u0000b", "=", "A=B",
    0, -1, 1, 2 ** 63 - 1, -(2 ** 63), 10 ** 30, 1.5, -0.0, 1e308, -1e308, float("inf"), float("-inf"),
    float("nan"), True, False, [], [1], ["a", 1], ["x"] * 300, [[["x"]]], {}, {"k": "v"}, {"A=B": "x"},
    {"": "x"}, {"A": "\u0000"}, "x" * 5000, "/abs/path", "relative", "arg:" + "9" * 50, "option:", "option:--x",
]


def _toml_value(v):
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                             else f"\\U{ord(c):08x}" for c in v) + '"'
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _text(doc):
    out = []
    for section, table in doc.items():
        if section == "workloads":
            for name, w in table.items():
                out.append(f"[workloads.{_toml_value(name)}]")
                out += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in w.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def _mutate(rng, main, dropin):
    """One mutation of (main, drop-in) docs in place; returns a raw-bytes override or a special kind, or None."""
    kind = rng.random()
    doc = main if rng.random() < 0.6 else dropin
    tables = [t for section, t in doc.items() if section != "workloads"] + list(doc["workloads"].values())
    table = rng.choice(tables)
    if kind < 0.55:  # a known key gets a hostile value
        key = rng.choice(sorted(table))
        table[key] = rng.choice(VALUES)
    elif kind < 0.70:  # a schema key that was absent
        schema = list(config.WORKLOAD) if "binary" in table else list(config.GPU) + list(config.ROUTER)
        table[rng.choice(schema)] = rng.choice(VALUES)
    elif kind < 0.78:  # an unknown or unicode key, or a strange workload name
        if rng.random() < 0.5:
            table[rng.choice(["zz", "\u00e9t\u00e9", "k" * 300, "a.b", ""])] = 1
        else:
            doc["workloads"][rng.choice(["a/b", "", ".x", "\u00e9", "x" * 100, "ok-name"])] = \
                dict(BASE_DROPIN["workloads"]["d"])
    elif kind < 0.84:
        return ("nest", rng.choice([5, 50, 500, 2000]))
    elif kind < 0.90:
        return ("dropin-kind", rng.choice(["directory", "fifo", "dev-zero", "dangling", "huge"]))
    elif kind < 0.95:
        return ("bytes", rng.choice([b"\xff\xfe[workloads.x]\n", b"[workloads.w]\nbinary = \"/x\xff\"\n",
                                     b"[workloads", b"\x00" * 10, b"a = 1\na = 2\n"]))
    else:  # a value of many keys at once
        for key in rng.sample(sorted(table), k=min(3, len(table))):
            table[key] = rng.choice(VALUES)
    return None


def _build(folder, rng, job):
    import copy

    main, dropin = copy.deepcopy(BASE_MAIN), copy.deepcopy(BASE_DROPIN)
    for t in (main["workloads"]["w"], dropin["workloads"]["d"]):
        t["binary"] = str(job)
    main["router"]["lock_dir"] = str(folder / "locks")
    main["gpu"]["snapshot"] = str(folder / "gpus.json")
    special = _mutate(rng, main, dropin)
    ddir = folder / "workloads.d"
    ddir.mkdir()
    main_path, drop_path = folder / "config.toml", ddir / "50-d.toml"
    main_path.write_text(_text(main), encoding="utf-8", errors="surrogatepass")
    drop_path.write_text(_text(dropin), encoding="utf-8", errors="surrogatepass")
    if special and special[0] == "nest":
        depth = special[1]
        with open(drop_path, "a") as f:
            f.write("[workloads.n]\nbinary = \"/bin/true\"\nthreshold = 1\ngpu_args = " + "[" * depth + "]" * depth
                    + "\n")
    elif special and special[0] == "dropin-kind":
        bad = ddir / "60-bad.toml"
        what = special[1]
        if what == "directory":
            bad.mkdir()
        elif what == "fifo":
            os.mkfifo(bad)
        elif what == "dev-zero":
            bad.symlink_to("/dev/zero")
        elif what == "dangling":
            bad.symlink_to(folder / "nowhere")
        else:
            bad.write_text("# " + "x" * (2 << 20) + "\n")
    elif special and special[0] == "bytes":
        (ddir / "70-bytes.toml").write_bytes(special[1])
    return main_path


def _check_in_process(main_path):
    """`gpu-router check --config PATH` in this process: (exit code, stderr)."""
    from gpu_router.ops import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["check", "--config", str(main_path)])
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    job = helpers.install_fake_job(root)
    rng = random.Random(8)
    out = []
    for i in range(N):
        folder = root / f"c{i:03d}"
        folder.mkdir()
        out.append(_build(folder, rng, job))
    return root, out


def test_every_mutated_config_loads_or_names_its_file(cases):
    root, paths = cases
    failures, errors = [], 0
    for path in paths:
        try:
            config.load(str(path), use_cache=False)
        except config.ConfigError as exc:
            errors += 1
            if not exc.path or not str(exc.path).startswith(str(path.parent)):
                failures.append((path, f"no file named: {exc}"))
            elif len(str(exc)) > 2000:
                failures.append((path, "message too long"))
        except Exception as exc:  # noqa: BLE001 - this is what the test is looking for
            failures.append((path, f"{type(exc).__name__}: {exc}"[:300]))
    assert not failures, failures[:10]
    assert errors >= N // 2, "the fuzzer should mostly produce bad configs"


def test_check_agrees_with_the_loader_on_every_mutated_config(cases, monkeypatch):
    root, paths = cases
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(root / "no-cache"))
    disagreements = []
    for path in paths:
        try:
            config.load(str(path), use_cache=False)
            bad = False
        except config.ConfigError:
            bad = True
        code, err = _check_in_process(path)
        if "Traceback" in err or (code == 2) != bad or (bad and str(path.parent) not in err):
            disagreements.append((path, code, err[-300:]))
    assert not disagreements, disagreements[:5]


def test_run_agrees_with_check_and_never_runs_a_job_on_a_bad_config(cases, gr_bin, clean_env):
    root, paths = cases
    disagreements = []
    for path in paths[::12]:
        try:
            config.load(str(path), use_cache=False)
            bad = False
        except config.ConfigError:
            bad = True
        log = path.parent / "log"
        log.mkdir(exist_ok=True)
        env = dict(clean_env, GPU_ROUTER_CONFIG=str(path), GPU_ROUTER_LOG="stderr", JOB_LOG=str(log),
                   GPU_ROUTER_CACHE_DIR=str(root / "no-cache"))
        p = subprocess.run([str(gr_bin), "run", "--workload", "w", "--", str(path)], env=env, capture_output=True,
                           timeout=30)
        err = p.stderr.decode("utf-8", "replace")
        ran = any(log.iterdir())
        if "Traceback" in err or (bad and (p.returncode != 2 or ran or "config error" not in err)):
            disagreements.append((path, p.returncode, ran, err[-300:]))
        if not bad and p.returncode == 2 and "workload profile named 'w'" not in err:
            disagreements.append((path, p.returncode, ran, err[-300:]))
    assert not disagreements, disagreements[:5]
