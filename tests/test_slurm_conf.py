"""`gpu-router slurm-conf`: the lines that make Slurm count this host's slots, through the real launcher.

The lines themselves are proven in tests/systemd/test_slurm.py, where a real slurmctld/slurmd is configured with
them; here: the figures they are made of (check's GPUs and slots), names Slurm accepts, --request, --json, and the
exit status check would give.
"""

import json
import os
import pathlib
import subprocess

import pytest

import helpers
from gpu_router.ops import cli, host, slurm

PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 4, "max_cpu_jobs": 2, "gpu_vram_mb": 3700,
           "cpu_ram_mb": 11000}


SITE = """ClusterName=site
SlurmctldHost=ctl
SchedulerParameters=bf_interval=30
# the site's own node line
NodeName=gpu07 NodeAddr=10.0.0.7 Features=fast State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES
"""


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    r = helpers.Rig(tmp_path, gr_bin, clean_env, {"Whisper-Large": dict(PROFILE)},
                    host={"gpus": 2, "gpu_vram_mb": 16384, "ram_mb": 65536, "other_ram_mb": 3072})
    r.env["SLURM_CONF"] = str(tmp_path / "slurm" / "slurm.conf")   # absent unless a test writes it
    return r


def run(rig, *args):
    return subprocess.run([rig.gr_bin, "slurm-conf", *map(str, args)], env=rig.env, capture_output=True, text=True,
                          timeout=60)


def site(rig, text=SITE, gres=None):
    path = pathlib.Path(rig.env["SLURM_CONF"])
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    if gres is not None:
        (path.parent / "gres.conf").write_text(gres)
    return path


NODE = f"NodeName=gpu07 CPUs={os.cpu_count()} RealMemory={host.system_ram_mb()}"


def test_gres_counts_are_the_slots_of_every_gpu_and_the_cpu_pool(rig):
    p = run(rig, "--json", "--node", "gpu07")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["gpus"] == 2 and d["gpu_vram_mb"] == 16384
    assert d["gres_conf"] == ["NodeName=gpu07 Name=gr_whisper_large_gpu Count=8",
                              "NodeName=gpu07 Name=gr_whisper_large_cpu Count=2"]
    # no live slurm.conf: a whole node line, with the CPUs and memory slurmd finds (without CPUs=, one job at once)
    assert d["slurm_conf"][0] == f"{NODE} Gres=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2 State=UNKNOWN"
    assert "GresTypes=gr_whisper_large_gpu,gr_whisper_large_cpu" in d["slurm_conf"]
    assert "RequeueExit=75" in d["slurm_conf"] and "AuthInfo=cred_expire=5" in d["slurm_conf"]
    assert d["licenses"] == "Licenses=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2"
    text = run(rig, "--node", "gpu07").stdout
    assert "REPLACES the node's own NodeName line" in text and "MERGE them into the site's own lines" in text


def test_lines_are_merged_with_the_live_slurm_conf(rig):
    """The site's node line and SchedulerParameters are kept and merged: never a second line for either."""
    site(rig)
    d = json.loads(run(rig, "--json", "--node", "gpu07").stdout)
    assert d["slurm_conf"][0] == ("NodeName=gpu07 NodeAddr=10.0.0.7 Features=fast State=UNKNOWN "
                                  f"CPUs={os.cpu_count()} RealMemory={host.system_ram_mb()} "
                                  "Gres=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2")
    assert "SchedulerParameters=bf_interval=30,sched_interval=2" in d["slurm_conf"]


def test_print_slurm_conf_is_the_live_file_merged(rig):
    path = site(rig, SITE.replace("SchedulerParameters=bf_interval=30", "SchedulerParameters=bf_interval=30,"
                                  "sched_interval=5\nRequeueExit=1-3\nGresTypes=gpu"))
    p = run(rig, "--print", "slurm.conf", "--node", "gpu07")
    assert p.returncode == 0, p.stderr
    kept = [x for x in p.stdout.splitlines() if x and not x.startswith("#")]
    assert sum(x.startswith("NodeName=gpu07") for x in kept) == 1
    assert [x for x in kept if x.startswith("SchedulerParameters")] == ["SchedulerParameters=bf_interval=30,"
                                                                       "sched_interval=5"]   # the site's choice
    assert "RequeueExit=1-3,75" in kept and "GresTypes=gpu,gr_whisper_large_gpu,gr_whisper_large_cpu" in kept
    assert "AuthInfo=cred_expire=5" in kept and "ClusterName=site" in kept
    path.write_text(p.stdout)                      # applied as it is: --check is content, and printing is stable
    site(rig, p.stdout, gres=run(rig, "--print", "gres.conf", "--node", "gpu07").stdout)
    c = run(rig, "--check", "--node", "gpu07")
    assert c.returncode == 0, c.stdout
    assert run(rig, "--print", "slurm.conf", "--node", "gpu07").stdout == p.stdout


def test_print_refuses_an_empty_file(rig):
    """`--print slurm.conf > slurm.conf` empties the file before it is read: not merged into nothing."""
    site(rig, "")
    p = run(rig, "--print", "slurm.conf")
    assert p.returncode == 1 and p.stdout == "" and "empty" in p.stderr


def test_print_gres_conf_keeps_the_sites_lines(rig):
    site(rig, gres="NodeName=gpu07 Name=gpu File=/dev/nvidia0\nNodeName=gpu07 Name=gr_whisper_large_gpu Count=3\n")
    out = run(rig, "--print", "gres.conf", "--node", "gpu07").stdout.splitlines()
    assert out == ["NodeName=gpu07 Name=gpu File=/dev/nvidia0", "NodeName=gpu07 Name=gr_whisper_large_gpu Count=8",
                   "NodeName=gpu07 Name=gr_whisper_large_cpu Count=2"]


def test_check_names_what_is_missing_or_repeated(rig):
    conf = site(rig, SITE + "NodeName=gpu07 Gres=gr_whisper_large_gpu:8\nSchedulerParameters=sched_interval=2\n"
                "RequeueExit=1\n", gres="")
    p = run(rig, "--check", "--node", "gpu07")
    assert p.returncode == 1
    out = p.stdout
    assert "Duplicated NodeHostName" in out and f"{conf}:5" in out and f"{conf}:7" in out
    assert "SchedulerParameters is set 2 times" in out
    assert "GresTypes lacks gr_whisper_large_gpu,gr_whisper_large_cpu" in out
    assert "RequeueExit does not contain the retry code 75" in out
    assert "no line Name=gr_whisper_large_cpu Count=2" in out
    site(rig, SITE.replace(" NodeAddr", " Gres=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2 NodeAddr")
         + "GresTypes=gr_whisper_large_gpu,gr_whisper_large_cpu\nRequeueExit=75\n",
         gres="Name=gr_whisper_large_gpu Count=8\nName=gr_whisper_large_cpu Count=2\n")
    p = run(rig, "--check", "--node", "gpu07")
    assert p.returncode == 1 and "has no CPUs=" in p.stdout and p.stdout.count("! ") == 1, p.stdout


def test_check_follows_include_lines(rig):
    conf = site(rig, SITE.replace("NodeName=gpu07", "NodeName=gpu[01-08]") + "Include extra.conf\n")
    (conf.parent / "extra.conf").write_text("SchedulerParameters=sched_interval=2\n")
    out = run(rig, "--check", "--node", "gpu07").stdout
    assert "SchedulerParameters is set 2 times" in out and "extra.conf:1" in out


def test_print_names_an_included_file_it_cannot_merge_into(rig):
    conf = site(rig, SITE.replace("SchedulerParameters=bf_interval=30\n", "") + "Include sched.conf\n")
    (conf.parent / "sched.conf").write_text("SchedulerParameters=bf_interval=30\n")
    p = run(rig, "--print", "slurm.conf", "--node", "gpu07")
    assert p.returncode == 1 and p.stdout == "" and "sched.conf:1 (included)" in p.stderr, p


def test_check_notes_more_cpus_than_the_host_only_without_config_overrides(rig):
    line = SITE.replace(" State=UNKNOWN", " CPUs=4096 State=UNKNOWN")
    site(rig, line)
    assert "CPUs=4096 but this host has" in run(rig, "--check", "--node", "gpu07").stdout
    site(rig, line + "SlurmdParameters=config_overrides\n")
    assert "CPUs=4096" not in run(rig, "--check", "--node", "gpu07").stdout


def test_check_without_a_readable_slurm_conf_fails(rig):
    p = run(rig, "--check")
    assert p.returncode == 1 and "cannot read" in p.stdout


def test_retry_codes_of_every_profile_go_into_requeue_exit(rig):
    rig.doc["workloads"]["other"] = dict(PROFILE, binary=str(rig.job), retry_exit_code=76, max_cpu_jobs=0)
    rig.rewrite()
    d = json.loads(run(rig, "--json").stdout)
    assert "RequeueExit=75,76" in d["slurm_conf"]
    assert sorted(p["gres"] for p in d["pools"]) == ["gr_other_gpu", "gr_whisper_large_cpu", "gr_whisper_large_gpu"]


def test_request_names_the_pool_the_input_is_routed_to(rig, tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(b"x" * 10)
    big.write_bytes(b"x" * 5000)
    assert run(rig, "--request", small).stdout == "--gres=gr_whisper_large_gpu:1\n"
    assert run(rig, "--request", big).stdout == "--gres=gr_whisper_large_cpu:1\n"
    assert run(rig, "--request", big, "--licenses").stdout == "-L gr_whisper_large_cpu:1\n"


def refused(p):
    assert p.returncode == 2 and p.stdout == slurm.REFUSED + "\n", p
    return p.stderr


def test_request_fails_closed(rig, tmp_path):
    """No decision → an option sbatch refuses, exit 2, the reason on stderr (never a job without a place)."""
    assert "no such input" in refused(run(rig, "--request", tmp_path / "missing"))
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    rig.doc["workloads"]["Whisper-Large"]["probe"] = "media-duration"
    rig.rewrite()
    assert "cannot measure it here" in refused(run(rig, "--request", secret))
    rig.doc["workloads"]["other"] = dict(PROFILE, binary=str(rig.job))
    rig.rewrite()
    assert "name one with --workload" in refused(run(rig, "--request", secret))
    rig.config.write_text("[workloads.x\n")
    assert "config error" in refused(run(rig, "--request", secret, "--licenses"))


def test_request_with_several_workloads(rig, tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    rig.doc["workloads"]["other"] = dict(PROFILE, binary="/usr/bin/other.distrib")
    rig.rewrite()
    assert run(rig, "--request", small, "-w", "other").stdout == "--gres=gr_other_gpu:1\n"
    assert run(rig, "--request", small, "--command", "/usr/bin/other").stdout == "--gres=gr_other_gpu:1\n"
    assert "no workload profiles run 'nothing'" in refused(run(rig, "--request", small, "--command", "nothing"))


def test_negative_headroom_exits_1_as_check_does(rig):
    rig.doc["workloads"]["Whisper-Large"]["max_gpu_jobs"] = 5   # 5 x 3700 > 16384
    rig.rewrite()
    p = run(rig)
    assert p.returncode == 1 and "VRAM headroom is negative" in p.stdout


def test_gres_names_are_what_slurm_accepts():
    for name in ("whisper", "Whisper-Large.v3", "a--b", "x_y"):
        gres = slurm.gres_name(name, "gpu")
        assert gres.startswith("gr_") and gres.endswith("_gpu")
        assert gres.replace("_", "").isalnum() and gres == gres.lower()


def test_completion_offers_every_command():
    """The bash completion's command list is the parser's: a new command without completion fails here."""
    import argparse
    import re

    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = (helpers.REPO / "packaging/completion/gpu-router").read_text()
    listed = re.search(r'local commands="([^"]*)"', text).group(1).split()
    assert sorted(listed) == sorted(sub.choices)
