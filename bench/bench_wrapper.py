#!/usr/bin/python3
"""What the wrapper costs per job, next to the shell router it replaces and to the bare binary.

    /usr/bin/python3 bench/bench_wrapper.py [--rounds 300] [--old COMMIT[,COMMIT…]] [--write-readme]

Each variant starts a fresh process exactly as a job runner would (posix_spawn + waitpid, wall clock), all of them
interleaved round by round in a shuffled order, so drift and noise from the rest of the machine hit them alike;
the figures are medians.

  true            /bin/true directly
  bash            the original shell router: `exec 9>LOCK; flock -n 9 || exit 75; exec /bin/true` (a #!/bin/bash file)
  python-floor    /usr/bin/python3 -IS -c pass: the interpreter's start-up, paid by any Python wrapper
  warm/journald   gpu-router run through the real launcher (.build/bin/gpu-router, #!/usr/bin/python3 -IS) of
                  /bin/true: probe = "file-size", scope = "off", warm config cache, a fresh GPU snapshot (marshal
                  twin), the decision event sent to a journald-protocol socket of this script's own
  warm/stderr     the same with GPU_ROUTER_LOG=stderr (JSON line to /dev/null), as where journald is absent
  cold/journald   the same as warm/journald with no usable config cache: TOML parsed and validated every run
  warm@COMMIT     with --old: warm/journald run by the code of COMMIT (git archive of its agent/ and its launcher,
                  laid out as .build/ is), same config, snapshot and socket, a cache folder of its own; measured in
                  the same interleaved rounds, so "its own work above python-floor" compares side by side

Then `python3 -X importtime` of one warm run lists where the interpreter's import time goes on the hot path.
--write-readme replaces the "## Wrapper overhead" section of bench/README.md with the results.
"""

import argparse
import os
import pathlib
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
LAUNCHER = REPO / ".build" / "bin" / "gpu-router"
README = REPO / "bench" / "README.md"
HEADING = "## Wrapper overhead"
TARGET_RATIO = 4.0


def ensure_launcher():
    """The tests' conftest builds .build/ (launcher + package symlink); do the same here if it is missing."""
    if LAUNCHER.exists():
        return
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: F401  (its import prepares .build)


class Drain:
    """A journald-protocol socket: AF_UNIX datagrams, read as fast as they come (journald's part)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.count = 0
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop:
            try:
                self.sock.recv(1 << 20)
                self.count += 1
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return

    def close(self):
        self.stop = True
        self.thread.join(1)
        self.sock.close()


def old_build(commit, root):
    """The launcher of ``commit``'s wrapper, laid out as tests/conftest.py lays out .build/: its agent/ (git archive)
    as lib/gpu_router, its packaging/bin/gpu-router with the package path put first."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", commit], check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = pathlib.Path(root) / f"old-{sha}"
    (dest / "lib").mkdir(parents=True)
    data = subprocess.run(["git", "-C", str(REPO), "archive", sha, "agent"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)
    (dest / "lib" / "gpu_router").symlink_to("../agent")
    text = subprocess.run(["git", "-C", str(REPO), "show", f"{sha}:packaging/bin/gpu-router"], check=True,
                          capture_output=True, text=True).stdout
    lib = str(dest / "lib")
    patched = text.replace('sys.path.append("/usr/lib/python3/dist-packages")',
                           f'sys.path.insert(0, {lib!r})\nsys.path.append("/usr/lib/python3/dist-packages")')
    if patched == text:
        raise SystemExit(f"{sha}: its launcher has no dist-packages line to point at the archived tree")
    (dest / "bin").mkdir()
    launcher = dest / "bin" / "gpu-router"
    launcher.write_text(patched)
    launcher.chmod(0o755)
    return sha, launcher


def setup(root):
    sys.path.insert(0, str(REPO / ".build" / "lib"))
    from gpu_router import snapshot

    root = pathlib.Path(root)
    (root / "cache").mkdir(mode=0o755)
    lock_dir = root / "locks"
    config = root / "config.toml"
    config.write_text(f'''[router]
lock_dir = "{lock_dir}"
[gpu]
snapshot = "{root / 'gpus.json'}"
snapshot_max_age = "1d"
[workloads.noop]
binary = "/bin/true"
probe = "file-size"
threshold = 1e12
scope = "off"
max_gpu_jobs = 2
max_cpu_jobs = 1
gpu_args = ["--device", "cuda"]
cpu_args = ["--device", "cpu"]
''')
    t = time.time() - 60
    os.utime(config, (t, t))
    snap = {"version": 1, "time": time.time(), "source": "nvml", "error": None, "driver": "550.54.15",
            "gpus": [{"index": 0, "uuid": "GPU-00000000-aaaa-bbbb-cccc-000000000000", "name": "bench",
                      "total_mb": 16384, "used_mb": 0, "free_mb": 16384, "healthy": True, "health": "ok",
                      "ours_mb": 0, "foreign_mb": 0, "processes": []}]}
    snapshot.write(str(root / "gpus.json"), snap)
    (root / "input.bin").write_bytes(b"x" * 4096)
    script = root / "router.sh"
    script.write_text(f"#!/bin/bash\nexec 9>{root / 'shell.lock'}\nflock -n 9 || exit 75\nexec /bin/true \"$@\"\n")
    script.chmod(0o755)
    return root, config, script


def variants(root, config, script, journal_socket, olds=()):
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "GPU_ROUTER_CONFIG": str(config),
            "GPU_ROUTER_JOURNAL_SOCKET": journal_socket}
    job = ["run", "--workload", "noop", "--", str(root / "input.bin")]
    wrapper = [str(LAUNCHER)] + job
    warm = dict(base, GPU_ROUTER_CACHE_DIR=str(root / "cache"))
    table = {
        "true": (["/bin/true"], base),
        "bash": ([str(script), str(root / "input.bin")], base),
        "python-floor": ([PYTHON, "-IS", "-c", "pass"], base),
        "warm/journald": (wrapper, warm),
        "warm/stderr": (wrapper, dict(warm, GPU_ROUTER_LOG="stderr")),
        "cold/journald": (wrapper, dict(base, GPU_ROUTER_CACHE_DIR=str(root / "no-cache-here"))),
    }
    for sha, launcher in olds:  # a cache folder each: an older cache format must not make either side cold
        (root / f"cache-{sha}").mkdir(mode=0o755)
        table[f"warm@{sha}"] = ([str(launcher)] + job, dict(base, GPU_ROUTER_CACHE_DIR=str(root / f"cache-{sha}")))
    return table


def spawn_once(argv, env, devnull):
    started = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1),
                                                           (os.POSIX_SPAWN_DUP2, devnull, 2)])
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter_ns() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv} exited {code}")
    return elapsed / 1e6


def measure(table, rounds):
    devnull = os.open(os.devnull, os.O_WRONLY)
    samples = {name: [] for name in table}
    names = list(table)
    for name in names:  # warm-up: page cache, .pyc files, the config cache
        for _ in range(3):
            spawn_once(*table[name], devnull)
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            samples[name].append(spawn_once(*table[name], devnull))
    os.close(devnull)
    return samples


def importtime(table, runs=15):
    """Median self/cumulative µs per module imported by one warm wrapper run (python3 -X importtime)."""
    argv, env = table["warm/journald"]
    per = {}
    for _ in range(runs):
        p = subprocess.run([PYTHON, "-X", "importtime", "-IS"] + argv, env=env, capture_output=True, text=True)
        for line in p.stderr.splitlines():
            if not line.startswith("import time:") or line.endswith("imported package"):
                continue
            _, self_us, cum_us, name = (x.strip() for x in line.replace("import time:", "|").split("|"))
            per.setdefault(name.strip(), ([], []))
            per[name.strip()][0].append(int(self_us))
            per[name.strip()][1].append(int(cum_us))
    rows = [(name, statistics.median(s), statistics.median(c)) for name, (s, c) in per.items()]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return rows, total


def report(samples, rounds, imports, import_total, drained):
    med = {k: statistics.median(v) for k, v in samples.items()}
    q = {k: statistics.quantiles(v, n=10) for k, v in samples.items()}
    true = med["true"]
    lines = []
    lines.append(f"{'variant':<15} {'median ms':>10} {'p10':>7} {'p90':>7} {'over /bin/true':>15} {'x bash':>7}"
                 f" {'over floor':>11}")
    for name in samples:
        lines.append(f"{name:<15} {med[name]:>10.2f} {q[name][0]:>7.2f} {q[name][-1]:>7.2f} "
                     f"{med[name] - true:>15.2f} {med[name] / med['bash']:>7.2f} "
                     f"{med[name] - med['python-floor']:>11.2f}")
    ratio = med["warm/journald"] / med["bash"]
    over_ratio = (med["warm/journald"] - true) / (med["bash"] - true)
    verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
    summary = [
        f"python (warm/journald) / bash: {ratio:.2f}x of the wall time ({verdict} the {TARGET_RATIO:g}x target); "
        f"{over_ratio:.2f}x of the overhead over /bin/true",
        f"interpreter floor (python3 -IS -c pass) is {med['python-floor']:.2f} ms = "
        f"{med['python-floor'] / med['bash']:.2f}x bash on its own; the router's own work on top of it: "
        f"{med['warm/journald'] - med['python-floor']:.2f} ms",
        f"cold config cache (TOML parse + validation) adds {med['cold/journald'] - med['warm/journald']:.2f} ms; "
        f"stderr instead of the journald socket: {med['warm/stderr'] - med['warm/journald']:+.2f} ms",
        f"{rounds} rounds, interleaved; journald socket received {drained} datagrams",
    ]
    own = med["warm/journald"] - med["python-floor"]
    for name in (n for n in samples if n.startswith("warm@")):
        old_own = med[name] - med["python-floor"]
        summary.append(f"side by side with {name[5:]}: wall {med['warm/journald']:.2f} vs {med[name]:.2f} ms "
                       f"(new/old {med['warm/journald'] / med[name]:.2f}x); own work above python-floor "
                       f"{own:.2f} vs {old_own:.2f} ms (new/old {own / old_own:.2f}x)")
    imp = [f"{'module':<34} {'self µs':>8} {'cumul. µs':>10}"]
    for name, s, c in imports[:15]:
        imp.append(f"{name:<34} {s:>8.0f} {c:>10.0f}")
    imp.append(f"{'(all imports, sum of self)':<34} {import_total:>8.0f}")
    return lines, summary, imp, med


HISTORY = [
    "History, issue 20 (same machine, `--rounds 100 --old 020ffd9,939dc14`, 2026-12-06, load average 1.97): at "
    "8fc9400 the wrapper's own work above python-floor was 4.60 ms against 020ffd9's 3.20 (1.44x) and 939dc14's"
    " 3.88 (1.19x): the hot path had gained drainstate, atomicfile, errno, oom_memory, trust, procstat, the "
    "wrapper package and scope (GPU jobs with scope = \"off\" are tracked), a config.py grown to a 77 KB .pyc, "
    "and it paid `import os` (1.1 ms: os.environ's class builds _collections_abc's ABCs). Now: os from "
    "agent/fastos.py (posix's functions), the ledger's and queue's readers, the drain file's trusted reader, "
    "the probe guardian and TOML/validation (configparse.py) imported only where used, the built-in _stat for "
    "stat.py.",
    "",
    "History (same machine, same script): before 2026-11-27 the hot path imported `signal` (in probe.py; it pulls "
    "in `enum`, ~3 ms) and `json` for the stderr fallback (~2 ms): warm/journald was 12.6 ms = 3.84x bash, "
    "warm/stderr 14.4 ms = 4.38x (missing the 4x target). probe.py now uses the built-in `_signal`, and "
    "journal.py writes its JSON line itself (byte-identical to `json.dumps(..., ensure_ascii=False)`, tested).",
    "",
]


def write_readme(lines, summary, imp, rounds, olds=(), load=""):
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    section = [
        HEADING, "",
        "What one job pays for going through `gpu-router run` instead of exec'ing its binary, next to the shell "
        "router it replaces. Reproduce (no GPU needed; under a minute on 2 cores):", "",
        "```", f"/usr/bin/python3 bench/bench_wrapper.py --rounds {rounds}"
        + (f" --old {','.join(olds)}" if olds else "") + " --write-readme", "```", "",
        "Variants (each a fresh process, spawned and reaped like a job; interleaved, shuffled per round; medians):",
        "`true` is /bin/true; `bash` the original router (`exec 9>lock; flock -n 9 || exit 75; exec /bin/true`); "
        "`python-floor` is `python3 -IS -c pass`; `warm/journald` the wrapper through the real launcher with a "
        "warm config cache, a fresh GPU snapshot, `probe = \"file-size\"`, `scope = \"off\"`, its event sent to a "
        "journald-protocol socket; `warm/stderr` the same with `GPU_ROUTER_LOG=stderr`; `cold/journald` with no "
        "usable config cache (TOML parsed every run); `warm@COMMIT` (with `--old`) is warm/journald run by the code "
        "of an older commit (git archive of its agent/ and launcher), in the same rounds; \"over floor\" is the "
        "wrapper's own work above the interpreter's start-up.", "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu}, {os.cpu_count()} cores, Python {platform.python_version()} "
        f"(/usr/bin/python3), kernel {platform.release()}, load average {load}:", "",
        "```", *lines, "```", "", *[f"- {s}" for s in summary], "",
        "Import time of one warm run (`python3 -X importtime`, median of 15 runs, largest self time first):", "",
        "```", *imp, "```", "",
        "Where the time goes: the interpreter's own start-up (`python-floor`) is most of the wrapper's time and "
        "sets its floor; the package's imports and work (config cache hit ~0.2 ms, snapshot twin, one flock, one "
        "datagram, exec) are the rest: each module ~0.06 ms plus ~3 µs per KiB of its .pyc. The hot-path rules in "
        "HACKING.md keep heavy modules out: a test (`tests/test_wrapper.py::test_cached_run_imports_nothing_heavy`) "
        "fails if json, enum, re, socket, subprocess, tomllib, signal, argparse or os come back on a cached GPU or "
        "CPU run, or the ledger's reader (trust, procstat), atomicfile, the probe guardian, select or stat.py.", "",
        *HISTORY,
    ]
    text = README.read_text() if README.exists() else "# Benchmarks\n\n"
    start = text.find(HEADING)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + "\n".join(section).rstrip("\n") + "\n\n" + (text[end + 1:] if end != -1 else "")
    README.write_text(text.rstrip("\n") + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--old", action="append", default=[], metavar="COMMIT",
                    help="also measure the wrapper of COMMIT side by side (repeatable, or a comma list)")
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args()
    ensure_launcher()
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="gr-bench-")
    sock_dir = tempfile.mkdtemp(prefix="grb-", dir="/tmp")
    drain = Drain(os.path.join(sock_dir, "journal"))
    try:
        root, config, script = setup(tmp)
        olds = [old_build(c, tmp) for arg in args.old for c in arg.split(",") if c]
        table = variants(root, config, script, os.path.join(sock_dir, "journal"), olds)
        samples = measure(table, args.rounds)
        for cache in ["cache"] + [f"cache-{sha}" for sha, _ in olds]:
            if not any((root / cache).iterdir()):
                raise SystemExit(f"a warm variant never wrote its config cache ({cache}): the figures would be cold")
        imports, total = importtime(table)
        lines, summary, imp, _ = report(samples, args.rounds, imports, total, drain.count)
        print("\n".join(lines))
        print()
        print("\n".join(summary))
        print()
        print("\n".join(imp))
        load_after = os.getloadavg()
        load = f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)"
        print(f"\nload average: {load}")
        if args.write_readme:
            write_readme(lines, summary, imp, args.rounds, [sha for sha, _ in olds], load)
            print(f"\nwrote {README.relative_to(REPO)} ({HEADING})")
    finally:
        drain.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
