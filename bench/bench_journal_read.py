#!/usr/bin/python3
"""`jobs`/`stats` reading the journal: journal_read (python3-systemd's Reader, each field decoded and each entry's
author checked) next to what stats did before (a `journalctl -o json` subprocess and json.loads per line).

Runs in a booted Debian container of the real-systemd lane (root; tests/systemd/README.md): N routed events are
written to its journald, then both readers read them back, interleaved, ROUNDS times each; medians and the ratio.

    sudo /usr/bin/python3 bench/bench_journal_read.py --events 20000 --rounds 5
"""

import argparse
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "systemd"), str(REPO / "tests")]

import harness  # noqa: E402
import srcinstall  # noqa: E402

GEN = r'''
import sys
sys.path.insert(0, "/opt/gpu-router/lib")
from systemd import journal
from gpu_router.journal import MESSAGE_IDS
for i in range(int(sys.argv[1])):
    journal.send(f"routed {i}", MESSAGE_ID=MESSAGE_IDS["routed"], SYSLOG_IDENTIFIER="gpu-router",
                 GPU_ROUTER_EVENT="routed", GPU_ROUTER_JOB=f"w-{i}-aa", GPU_ROUTER_WORKLOAD="w", GPU_ROUTER_MODE="GPU",
                 GPU_ROUTER_REASON="under-threshold", GPU_ROUTER_INPUT=f"/d/{i}.mp3", GPU_ROUTER_METRIC="12")
'''
SUBPROCESS = r'''
import json, subprocess, sys, time
sys.path.insert(0, "/opt/gpu-router/lib")
from gpu_router.journal import MESSAGE_IDS
t = time.perf_counter()
out = subprocess.run(["journalctl", "-o", "json", "--no-pager", "--since", "-1d",
                      "MESSAGE_ID=" + MESSAGE_IDS["routed"]], capture_output=True, text=True)
n = len([json.loads(line) for line in out.stdout.splitlines()])
print(n, time.perf_counter() - t)
'''
READER = r'''
import sys, time
sys.path.insert(0, "/opt/gpu-router/lib")
from gpu_router import journal_read
t = time.perf_counter()
entries, ignored = journal_read.read("-1d", events=("routed",))
print(len(entries) + ignored, time.perf_counter() - t)
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    harness.require_lane()
    box = harness.Container()
    box.start()
    try:
        box.run(srcinstall.TREE, timeout=120)
        for name, text in (("gen", GEN), ("subprocess", SUBPROCESS), ("reader", READER)):
            box.write_file(f"/srv/bench_{name}.py", text)
        box.run(["python3", "/srv/bench_gen.py", str(args.events)], timeout=600)
        box.run(["journalctl", "--sync"])
        times = {"subprocess": [], "reader": []}
        for _ in range(args.rounds):
            for name in times:
                n, seconds = box.run(["python3", f"/srv/bench_{name}.py"], timeout=600).stdout.split()
                assert int(n) == args.events, (name, n)
                times[name].append(float(seconds))
    finally:
        box.stop()
    old, new = statistics.median(times["subprocess"]), statistics.median(times["reader"])
    print(f"{args.events} entries, {args.rounds} rounds each, medians:")
    print(f"  journalctl -o json + json.loads   {old:.3f} s")
    print(f"  journal_read.read                 {new:.3f} s   ({new / old:.2f}x)")


if __name__ == "__main__":
    main()
