"""`gpu-router slurm-conf`: the lines that make Slurm count this host's slots, through the real launcher.

The lines themselves are proven in tests/systemd/test_slurm.py, where a real slurmctld/slurmd is configured with
them; here: the figures they are made of (check's GPUs and slots), names Slurm accepts, --request, --json, and the
exit status check would give.
"""

import json
import subprocess

import pytest

import helpers
from gpu_router.ops import cli, slurm

PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 4, "max_cpu_jobs": 2, "gpu_vram_mb": 3700,
           "cpu_ram_mb": 11000}


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    return helpers.Rig(tmp_path, gr_bin, clean_env, {"Whisper-Large": dict(PROFILE)},
                       host={"gpus": 2, "gpu_vram_mb": 16384, "ram_mb": 65536, "other_ram_mb": 3072})


def run(rig, *args):
    return subprocess.run([rig.gr_bin, "slurm-conf", *map(str, args)], env=rig.env, capture_output=True, text=True,
                          timeout=60)


def test_gres_counts_are_the_slots_of_every_gpu_and_the_cpu_pool(rig):
    p = run(rig, "--json", "--node", "gpu07")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["gpus"] == 2 and d["gpu_vram_mb"] == 16384
    assert d["gres_conf"] == ["NodeName=gpu07 Name=gr_whisper_large_gpu Count=8",
                              "NodeName=gpu07 Name=gr_whisper_large_cpu Count=2"]
    assert "NodeName=gpu07 Gres=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2" in d["slurm_conf"]
    assert "GresTypes=gr_whisper_large_gpu,gr_whisper_large_cpu" in d["slurm_conf"]
    assert "RequeueExit=75" in d["slurm_conf"] and "AuthInfo=cred_expire=5" in d["slurm_conf"]
    assert d["licenses"] == "Licenses=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2"
    text = run(rig, "--node", "gpu07").stdout
    assert "NodeName=gpu07 Gres=gr_whisper_large_gpu:8,gr_whisper_large_cpu:2\n" in text


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
    d = json.loads(run(rig, "--request", tmp_path / "missing", "--json").stdout)
    assert d["pool"] == "cpu" and d["reason"] == "probe-failed"   # unknown goes to the safe side, as the wrapper


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
