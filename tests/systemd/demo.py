#!/usr/bin/python3
"""The README's first command: gpu-router from package to journal on a fresh Debian 12, no GPU needed.

Builds the .deb, boots systemd in a container (tests/systemd/harness.py), installs the package and a packaged fake
workload (/usr/bin/fake-transcribe), wraps it, then a retrying caller runs a mixed batch — small inputs for the
GPU, large ones for the CPU, more jobs than slots — as an unprivileged runner, and the journal shows every
decision and outcome. The GPU is a stand-in nvidia-smi reporting one 16 GiB card (the agent's real nvidia-smi
backend reads it); nothing else is faked.

    /usr/bin/python3 tests/systemd/demo.py [--keep]     (as root; --keep leaves the container running)
"""

import argparse
import pathlib
import sys
import tempfile
import textwrap

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402
from test_deb import build_fake, build_gpu_router  # noqa: E402
from test_scopes import FAKE_SMI  # noqa: E402  (the stand-in nvidia-smi: one 16 GiB GPU)


PROFILE = """# The demo's workload: small inputs (< 1 MB) to the GPU, large ones to the CPU.
[workloads.transcribe]
binary = "/usr/bin/fake-transcribe.distrib"
probe = "file-size"
threshold = 1000000
threshold_unit = "bytes"
gpu_vram_mb = 3700
cpu_ram_mb = 2000
max_gpu_jobs = 2
max_cpu_jobs = 1
gpu_args = ["--device", "cuda", "--compute_type", "float16"]
cpu_args = ["--device", "cpu", "--compute_type", "int8"]
scope = "required"
"""

CALLER = r"""
# A job runner in miniature: runs each job, re-queues it after 1 s when gpu-router says "retry later" (75).
run_job() {
    tries=0
    while :; do
        tries=$((tries + 1))
        FAKE_SLEEP=2 fake-transcribe --model medium "$1" >/dev/null 2>&1; rc=$?
        [ "$rc" -ne 75 ] && break
        sleep 1
    done
    echo "  $(basename "$1"): exit $rc after $tries tr$([ $tries -eq 1 ] && echo y || echo ies)"
}
for f in /srv/media/*; do run_job "$f" & done
wait
"""


def step(text):
    print(f"\n== {text}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the container running (stop it with Ctrl-C)")
    args = p.parse_args()
    why = harness.unavailable_reason()
    if why:
        sys.exit(f"demo: cannot boot the container: {why} (run as root after `bash .ci/deps`)")
    with tempfile.TemporaryDirectory(prefix="gpu-router-demo-") as tmp:
        base = pathlib.Path(tmp)
        step("building gpu-router and a packaged fake workload")
        deb = build_gpu_router(base)
        fake = build_fake(base, "1.0", "v1")
        print(f"  {deb.name}, {fake.name}")
        step("booting Debian 12 with systemd (systemd-nspawn)")
        box = harness.Container(packages=harness.PACKAGES_WITH_METRICS)  # what the .deb depends on, cached
        box.start()
        try:
            demo(box, deb, fake)
            if args.keep:
                print(f"\ncontainer {box.name} is running: nsenter -t {box.leader} -a bash   (Ctrl-C or SIGTERM "
                      f"stops it)", flush=True)
                import signal
                import time

                # SIGTERM too (kill, a background job's SIGINT is ignored): the container is stopped, never left.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            box.stop()


def demo(box, deb, fake):
    box.copy_in(deb, "/root/")
    box.copy_in(fake, "/root/")
    box.write_file("/usr/local/bin/nvidia-smi", FAKE_SMI, mode=0o755)
    sh = lambda script, **kw: box.run(textwrap.dedent(script), timeout=300, **kw)  # noqa: E731
    step("apt install ./gpu-router_*.deb ./fake-workload_*.deb")
    sh(f"""
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends /root/{deb.name} /root/{fake.name} >/tmp/apt.log 2>&1 \
            || {{ tail -30 /tmp/apt.log; exit 1; }}
        mkdir -p /etc/systemd/system/gpu-router-agent.service.d
        printf '[Service]\\nEnvironment=PATH=/usr/local/bin:/usr/bin:/bin\\n' \
            > /etc/systemd/system/gpu-router-agent.service.d/demo.conf
        systemctl daemon-reload && systemctl restart gpu-router-agent.service
    """)
    print(sh("systemctl is-active gpu-router-agent.socket gpu-router-agent.service; "
             "systemctl show -p StatusText --value gpu-router-agent.service").stdout.rstrip())
    step("gpu-router wrap /usr/bin/fake-transcribe --workload transcribe (first: the README's order)")
    print("  " + sh("gpu-router wrap /usr/bin/fake-transcribe --workload transcribe").stdout.strip())
    print("  " + sh("dpkg-divert --list /usr/bin/fake-transcribe; ls -l /usr/bin/fake-transcribe | "
                    "awk '{print $9, $10, $11}'").stdout.strip().replace("\n", "\n  "))
    step("a profile in /etc/gpu-router/workloads.d/ naming the real binary, then `gpu-router check`")
    box.write_file("/etc/gpu-router/workloads.d/transcribe.toml", PROFILE)
    print(textwrap.indent(sh("gpu-router check", check=False).stdout.rstrip(), "  "))
    step("inputs: four small (GPU), two large (CPU); `gpu-router explain` on one of each")
    sh("""
        mkdir -p /srv/media
        for i in 1 2 3 4; do head -c 200000 /dev/urandom > /srv/media/small-$i.wav; done
        for i in 1 2; do head -c 5000000 /dev/urandom > /srv/media/large-$i.wav; done
        chmod 644 /srv/media/*
    """)
    for name in ("small-1.wav", "large-1.wav"):
        out = sh(f"gpu-router explain /srv/media/{name}").stdout
        print(textwrap.indent(out.rstrip(), "  "))
        print()
    step("a retrying caller runs all six at once as user `runner` (group gpu-router); slots: 2 GPU + 1 CPU")
    box.add_user("runner", groups=["gpu-router"])
    print(box.run_unit(CALLER, user="runner", timeout=300).stdout.rstrip())
    step("the journal: every decision (journalctl GPU_ROUTER_EVENT=routed + GPU_ROUTER_EVENT=blocked)")
    box.run(["sleep", "1"])
    for e in box.journal("GPU_ROUTER_EVENT=routed", "+", "GPU_ROUTER_EVENT=blocked"):
        where = f"GPU {e['GPU_ROUTER_DEVICE']}" if e["GPU_ROUTER_MODE"] == "GPU" else \
            ("CPU" if e["GPU_ROUTER_MODE"] == "CPU" else "-")
        print(f"  {e['GPU_ROUTER_MODE']:<7} {e['GPU_ROUTER_REASON']:<15} {where:<6} "
              f"{pathlib.Path(e.get('GPU_ROUTER_INPUT', '?')).name:<12} metric {e['GPU_ROUTER_METRIC']:>8} "
              f"{e.get('GPU_ROUTER_SCOPE', '')}")
    step("the journal: every outcome, written by the agent (journalctl GPU_ROUTER_EVENT=job-finished)")
    for e in box.journal("GPU_ROUTER_EVENT=job-finished"):
        print(f"  {e['GPU_ROUTER_JOB']:<28} {e['GPU_ROUTER_MODE']:<4} {e['GPU_ROUTER_RESULT']:<8} "
              f"exit {e.get('GPU_ROUTER_EXIT_STATUS', '?'):<3} {float(e['GPU_ROUTER_DURATION_S']):5.1f} s "
              f"peak RAM {e.get('GPU_ROUTER_PEAK_RAM_MB', '?')} MB")
    print("  (exit ?/unknown: inside a container the kernel's proc connector is silent, so the agent learns an exit\n"
          "   status only when it catches the job before its caller reaps it; on a host every status is known)")
    step("gpu-router stats --since=-1h")
    print(textwrap.indent(sh("gpu-router stats --since=-1h").stdout.rstrip(), "  "))
    step("gpu-router jobs --since=-1h (like sacct: the events of each job joined by its id)")
    print(textwrap.indent(sh("gpu-router jobs --since=-1h").stdout.rstrip(), "  "))


if __name__ == "__main__":
    main()
