#!/usr/bin/python3
"""A burst of jobs through the broker against `systemd-run --scope`, in a booted container (root; the lane's harness).

    sudo /usr/bin/python3 bench/bench_burst.py [--sizes 8,32,128,512] [--rounds 3] [--old 939dc14]
                                                [--agent-setting Nice=-5]

N jobs are started at once; each one's latency is from its launch (just before the fork) to its first instruction
(the job is `/bin/sh stamp.sh`, which writes `date +%s.%N`). Sides, interleaved round by round:
  systemd-run   `systemd-run --scope --quiet --slice=gpu-router-cpu.slice` as root (a member may not: polkit);
  gpu-router    `gpu-router run` launched by a member of group gpu-router, the workload with scope = "required";
  old           the same with the code of --old (git archive of that commit), when given;
  no-scope      the same workload with scope = "off" (--floor): what the wrapper costs without the broker;
  setting       gpu-router with the agent's unit given --agent-setting (a drop-in, e.g. Nice=-5), when given;
  restarted     gpu-router with its agent restarted a second before each round, no job in between (--restarted):
                the first burst after a start or an upgrade (with --old, also old-restarted).
Reported: p50 / p99 per side, the ratio of gpu-router's p99 to systemd-run's, and every job that failed (a job
refused a scope exits 69/75 and writes no stamp).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "systemd"), str(REPO / "tests")]

CONFIG = """
[gpu]
backend = "none"

[workloads.burst]
binary = "/bin/sh"
probe = "file-size"
threshold = 1                 # every input is over: CPU
max_cpu_jobs = 1024
max_gpu_jobs = 1
scope = "required"

[workloads.bare]                # the same without a scope: the wrapper's own floor, no broker
binary = "/bin/sh"
probe = "file-size"
threshold = 1
max_cpu_jobs = 1024
max_gpu_jobs = 1
scope = "off"
"""

# The checkout's agent copied and byte-compiled (old/ too, when given), linked where the launchers look.
COMPILED = r"""
rm -rf /opt/gpu-router/agent && cp -a /src/agent /opt/gpu-router/agent
for t in /opt/gpu-router/agent /old/agent; do if test -d $t; then python3 -m compileall -q $t >/dev/null; fi; done
ln -sfn /opt/gpu-router/agent /opt/gpu-router/lib/gpu_router
"""

STAMP = 'exec date +%s.%N > "$1"\n'

# Runs inside the container as root: launches N at once, waits for all, prints "latency exit" per job.
DRIVER = r"""
import os, subprocess, sys, time
side, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(out, exist_ok=True)
os.chmod(out, 0o1777)
if side == "systemd-run":
    argv = ["systemd-run", "--scope", "--quiet", "--collect", "--slice=gpu-router-cpu.slice", "--",
            "/bin/sh", "/srv/stamp.sh"]
else:
    argv = ["gpu-router", "run", "--workload", "bare" if side == "no-scope" else "burst", "--", "/srv/stamp.sh"]
procs = []
for i in range(n):
    path = f"{out}/{i}"
    t = time.time()
    procs.append((t, path, subprocess.Popen(argv + [path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
for t, path, p in procs:
    err = p.communicate()[1].decode(errors="replace").strip().splitlines()
    try:
        stamp = float(open(path).read())
    except (OSError, ValueError):
        stamp = None
    print(f"{stamp - t if stamp else -1:.6f} {p.returncode} {err[-1] if err and p.returncode else ''}")
"""


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def old_tree(commit, dest):
    data = subprocess.run(["git", "-C", str(REPO), "archive", commit, "agent"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)
    return dest / "agent"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,32,128,512")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size (512: one)")
    ap.add_argument("--old", help="a commit to measure side by side (e.g. 939dc14)")
    ap.add_argument("--floor", action="store_true", help="also gpu-router without a scope (no broker)")
    ap.add_argument("--dump", metavar="FILE", help="also write every latency, per size, side and round, as JSON")
    ap.add_argument("--restarted", action="store_true",
                    help="also gpu-router with its agent restarted just before each round (the first burst after it)")
    ap.add_argument("--agent-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="also gpu-router with this [Service] setting in the agent's unit (repeatable)")
    args = ap.parse_args(argv)
    import harness
    import srcinstall

    if harness.unavailable_reason():
        sys.exit(f"no container lane here: {harness.unavailable_reason()}")
    # systemd-run last in each round: at N = 512 it can leave systemd busy for a while (each process its own bus
    # connection); every side starts with systemd's job queue empty.
    sides = ["gpu-router"] + (["old"] if args.old else []) + (["setting"] if args.agent_setting else []) + \
        (["no-scope"] if args.floor else []) + (["restarted"] if args.restarted else []) + \
        (["old-restarted"] if args.restarted and args.old else []) + ["systemd-run"]
    dropin = "/etc/systemd/system/gpu-router-agent.service.d/bench.conf"
    c = harness.Container()
    c.start()
    try:
        c.write_file("/etc/gpu-router/config.toml", CONFIG)
        c.write_file("/srv/stamp.sh", STAMP)
        c.write_file("/srv/driver.py", DRIVER)
        if args.old:
            with tempfile.TemporaryDirectory() as tmp:
                c.copy_in(old_tree(args.old, pathlib.Path(tmp)), "/old/agent")
        # Byte-compiled as the package's postinst does (py3compile): /src is read-only in the container, so run
        # from there every wrapper would compile every module it imports, a cost no installed host pays.
        c.run(srcinstall.TREE + COMPILED + srcinstall.START, timeout=120)
        c.add_user("runner", groups=["gpu-router"])
        c.wait_for("systemctl is-active --quiet gpu-router-agent.service", timeout=30)
        current = ("/opt/gpu-router/agent", False)

        def use(tree, setting=False):
            nonlocal current
            if (tree, setting) != current:
                if setting:
                    c.write_file(dropin, "[Service]\n" + "".join(f"{x}\n" for x in args.agent_setting))
                c.run(f"{'' if setting else f'rm -f {dropin}; '}systemctl daemon-reload; "
                      f"ln -sfn {tree} /opt/gpu-router/lib/gpu_router && "
                      f"systemctl reset-failed gpu-router-agent.service; systemctl restart gpu-router-agent.service"
                      f" && systemctl is-active --quiet gpu-router-agent.service", timeout=60)
                # one job first: a restarted agent's first request pays its start (the bus, imports), which no
                # round of the side that did not restart pays
                c.run(["gpu-router", "run", "--workload", "burst", "--", "/srv/stamp.sh", "/tmp/warm-up"],
                      user="runner", timeout=60)
                current = (tree, setting)

        results = {}
        rounds = {}  # "N side" -> [[latency per job, -1 for a failed one] per round], for --dump
        for n in [int(x) for x in args.sizes.split(",")]:
            for r in range(1 if n >= 512 else args.rounds):
                for side in sides:
                    use("/old/agent" if side.startswith("old") else "/opt/gpu-router/agent", side == "setting")
                    if side.endswith("restarted"):  # what it starts with (its connection, its holders) a second later
                        c.run("systemctl restart gpu-router-agent.service && "
                              "systemctl is-active --quiet gpu-router-agent.service && sleep 1", timeout=60)
                    # The member's jobs are launched by a process of the member, as a job runner launches them
                    # (root dropping privileges per job made subprocess fork instead of vfork: ~1 ms more per
                    # launch under load, on the gpu-router sides alone); systemd-run by root (polkit).
                    out = c.run(["/usr/bin/python3", "/srv/driver.py", side, str(n), f"/tmp/burst-{side}-{n}-{r}"],
                                user=None if side == "systemd-run" else "runner", timeout=600).stdout.splitlines()
                    c.wait_for('test -z "$(systemctl list-jobs --no-legend)"', timeout=300, interval=0.2)
                    lat, failed = results.setdefault((n, side), ([], []))
                    rounds.setdefault(f"{n} {side}", []).append([float(line.split(" ", 1)[0]) for line in out])
                    for line in out:
                        value, code, *why = line.split(" ", 2)
                        if float(value) < 0 or code != "0":
                            failed.append(f"exit {code} {' '.join(why)}".strip())
                        else:
                            lat.append(float(value))
        if args.dump:
            pathlib.Path(args.dump).write_text(json.dumps(rounds))
        print(f"{'N':>5} | {'side':<13} | {'p50 s':>7} | {'p90 s':>7} | {'p99 s':>7} | {'max s':>7} | "
              f"{'p99 / systemd-run':>17} | failed")
        for n in sorted({k[0] for k in results}):
            base = results[(n, "systemd-run")][0]
            for side in sides[-1:] + sides[:-1]:
                lat, failed = results[(n, side)]
                p50, p90, p99, top = ([percentile(lat, q) for q in (50, 90, 99)] + [max(lat)] if lat
                                      else [float("nan")] * 4)
                ratio = p99 / percentile(base, 99) if lat and base else float("nan")
                print(f"{n:>5} | {side:<13} | {p50:7.3f} | {p90:7.3f} | {p99:7.3f} | {top:7.3f} | {ratio:16.2f}x | "
                      f"{len(failed)}{' (' + failed[0] + ')' if failed else ''}")
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
