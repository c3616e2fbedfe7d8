"""The listing commands' output options (agent/ops/listing.py): ``-o/--output {table,json}`` with ``--json`` as its
alias, and ``--no-header``/``--noheader``, defined once and offered by every command that lists things; through
the real launcher, a real flock holder and /proc."""

import json
import signal
import subprocess
import time

import pytest

import helpers
from gpu_router.ops import cli as C
from gpu_router.ops import jobs as J

LISTING = ("status", "stats", "jobs")
WITH_HEADER = ("status", "jobs")


def subparsers():
    p = C.parser()
    [sub] = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


@pytest.mark.parametrize("command", LISTING)
def test_output_json_is_the_same_as_json_and_table_undoes_it(command):
    p = C.parser()
    assert p.parse_args([command, "-o", "json"]).json is True
    assert p.parse_args([command, "--output=json"]).json is True
    assert p.parse_args([command, "--json"]).json is True
    assert p.parse_args([command, "--json", "-o", "table"]).json is False
    assert p.parse_args([command]).json is False
    with pytest.raises(SystemExit):
        p.parse_args([command, "-o", "yaml"])


def test_every_listing_command_has_the_options_from_the_one_helper():
    for name, c in subparsers().items():
        options = {o for a in c._actions for o in a.option_strings}
        if name in LISTING:
            assert {"-o", "--output", "--json"} <= options, name
            assert ({"--no-header", "--noheader"} <= options) == (name in WITH_HEADER), name
            [output] = [a for a in c._actions if "--output" in a.option_strings]
            assert output.__class__.__module__.endswith("ops.listing"), name


def ev(kind, job, t, **fields):
    e = {"GPU_ROUTER_EVENT": kind, "GPU_ROUTER_JOB": job, "GPU_ROUTER_WORKLOAD": "w",
         "__REALTIME_TIMESTAMP": str(int(t * 1e6)), "MESSAGE": f"{kind} {job}"}
    e.update({f"GPU_ROUTER_{k}": v for k, v in fields.items()})
    return e


def test_jobs_table_without_its_header_row():
    jobs = J.join([ev("routed", "w-1", 100, MODE="GPU", DEVICE="0", INPUT="/d/a.mp3"),
                   ev("routed", "w-2", 101, MODE="CPU", DEVICE="cpu", INPUT="/d/b.mp3")])
    full, bare = J.table(jobs, now=120).splitlines(), J.table(jobs, now=120, header=False).splitlines()
    assert full[0].split()[:2] == ["START", "JOB"] and bare == full[1:]


def test_listing_commands_through_the_launcher(tmp_path, gr_bin, clean_env):
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"probe": "file-size", "threshold": 1000,
                                                          "max_gpu_jobs": 1, "max_cpu_jobs": 1,
                                                          "gpu_vram_mb": 3700, "cpu_ram_mb": 1000}},
                      host={"gpu_vram_mb": 8192, "ram_mb": 32768, "other_ram_mb": 3072})
    rig.doc["agent"] = {"state_dir": str(tmp_path / "state")}
    rig.rewrite()

    def cli(*args):
        p = subprocess.run([gr_bin] + list(args), env=rig.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    empty = helpers.public_tmpdir()
    for command in ("stats", "jobs"):
        assert json.loads(cli(command, "-o", "json", "-D", str(empty))).get("partial") is False
    small = tmp_path / "in.bin"
    small.write_bytes(b"x" * 10)
    holder = rig.spawn("w", small, env={"JOB_SLEEP": "60"})
    try:
        deadline = time.monotonic() + 20
        while not (rig.log / f"{holder.pid}.start").exists():
            assert time.monotonic() < deadline and holder.poll() is None
            time.sleep(0.01)
        assert json.loads(cli("status", "-o", "json"))["jobs"][0]["pid"] == holder.pid
        table = cli("status").splitlines()
        assert any(line.split()[:2] == ["PID", "WORKLOAD"] for line in table)
        for flag in ("--no-header", "--noheader"):
            bare = cli("status", flag).splitlines()
            assert len(bare) == len(table) - 1  # the RAM column moves between two reads: count the lines
            assert not any(line.split()[:2] == ["PID", "WORKLOAD"] for line in bare)
            assert any(line.split()[:1] == [str(holder.pid)] for line in bare)
        watched = cli("status", "--watch", "0.1", "--count", "1", "--noheader")
        assert not watched.startswith("every ") and "running jobs: 1" in watched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_bash_completion_offers_the_output_formats(tmp_path):
    import pathlib

    repo = pathlib.Path(__file__).resolve().parent.parent
    script = (f'source {repo / "packaging/completion/gpu-router"}; COMP_WORDS=("$@"); '
              'COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _gpu_router; printf "%s\\n" "${COMPREPLY[@]}"')

    def complete(*words):
        p = subprocess.run(["bash", "-c", script, "x", *words], capture_output=True, text=True, timeout=30)
        return sorted(filter(None, p.stdout.split("\n")))

    for command in LISTING:
        assert complete("gpu-router", command, "-o", "") == ["json", "table"]
        assert {"--output", "-o"} <= set(complete("gpu-router", command, "-"))
    for command in WITH_HEADER:
        assert {"--no-header", "--noheader"} <= set(complete("gpu-router", command, "--"))
