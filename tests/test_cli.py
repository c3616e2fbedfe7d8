"""The operator commands `explain` and `check`, text and --json, through the real launcher."""

import json
import signal
import subprocess
import time

import pytest

import helpers

PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 1, "max_cpu_jobs": 1,
           "gpu_args": ["--device", "cuda"], "cpu_args": ["--device", "cpu"], "gpu_vram_mb": 3700,
           "cpu_ram_mb": 11000}


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    return helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE)},
                       host={"gpu_vram_mb": 8192, "ram_mb": 32768, "other_ram_mb": 3072})


def cli(rig, *args, env=None):
    p = subprocess.run([rig.gr_bin] + [str(a) for a in args], env=dict(rig.env, **(env or {})), capture_output=True,
                       text=True, timeout=60)
    return p


def explain_json(rig, *args):
    p = cli(rig, "explain", "--json", *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def data(tmp_path, size, name=None):
    path = tmp_path / (name or f"in-{size}.bin")
    path.write_bytes(b"x" * size)
    return path


# ---- explain ----------------------------------------------------------------------------------------------------

def test_explain_gpu_text(rig, tmp_path):
    small = data(tmp_path, 100)
    p = cli(rig, "explain", small)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(None, 1) for line in p.stdout.splitlines() if line.strip() and not
                 line.startswith("free slots"))
    assert lines["workload"] == f"w ({rig.config})"
    assert lines["metric"] == "100 bytes"
    assert lines["threshold"].startswith("1000 bytes")
    assert lines["decision"] == "GPU 0  (under-threshold)"
    assert lines["would"] == f"run  {rig.job} … {small} --device cuda"
    assert "gpu state  unknown:no-snapshot" in p.stdout


def test_explain_json_runs_nothing_and_creates_nothing(rig, tmp_path):
    big = data(tmp_path, 5000)
    d = explain_json(rig, big)
    assert (d["decision"], d["reason"], d["device"], d["metric"]) == ("CPU", "over-threshold", "cpu", [5000.0])
    assert (d["threshold"], d["unit"], d["workload"], d["input"]) == ([1000], ["bytes"], "w", str(big))
    assert d["command"][-2:] == ["--device", "cpu"] and d["memory_max_mb"] == 13200
    assert d["probe_error"] is None and d["gpu_state"] == "unknown:no-snapshot"
    assert rig.starts() == []
    assert not rig.lock_dir.exists()


def test_explain_probe_failure(rig, tmp_path):
    d = explain_json(rig, tmp_path / "missing.wav")
    assert (d["decision"], d["reason"], d["metric"]) == ("CPU", "probe-failed", None)
    assert d["probe_error"]["reason"] == "input-missing"
    rig.doc["workloads"]["w"]["on_probe_error"] = "fail"
    rig.rewrite()
    d = explain_json(rig, tmp_path / "missing.wav")
    assert d["decision"] == "REFUSED" and "input-missing" in d["reason"]
    p = cli(rig, "explain", tmp_path / "missing.wav")
    assert "metric     unknown (input" in p.stdout and "REFUSED" in p.stdout


def test_explain_sees_held_slots(rig, tmp_path):
    small = data(tmp_path, 100)
    holder = subprocess.Popen(rig.argv("w", small), env=dict(rig.env, JOB_SLEEP="60"), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (rig.log / f"{holder.pid}.start").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        d = explain_json(rig, small)
        assert (d["decision"], d["reason"], d["free_gpu_slots"], d["free_cpu_slots"]) == \
            ("BLOCKED", "gpu-slots-full", [], 1)
        rig.doc["workloads"]["w"]["spill_to_cpu"] = True
        rig.rewrite()
        d = explain_json(rig, small)
        assert (d["decision"], d["reason"], d["device"]) == ("CPU", "spill:gpu-slots-full", "cpu")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert explain_json(rig, small)["decision"] == "GPU"  # freed with its holder


def test_explain_with_the_jobs_full_arguments(rig, tmp_path):
    rig.doc["workloads"]["w"]["input"] = "option:--audio"
    rig.rewrite()
    big = data(tmp_path, 5000)
    d = explain_json(rig, "ignored", "--", "--audio", big, "--out", "x")
    assert (d["input"], d["decision"]) == (str(big), "CPU")
    assert d["command"] == [str(rig.job), "--audio", str(big), "--out", "x", "--device", "cpu"]


def test_explain_multi_metric_and_snapshot(rig, tmp_path_factory):
    rig.doc["workloads"]["w"].update(probe=["ffprobe-duration", "video-pixels"], threshold=[10, 10000])
    rig.rewrite()
    rig.write_snapshot([helpers.gpu_entry(0, used_mb=15000), helpers.gpu_entry(1, used_mb=10)])
    d = explain_json(rig, helpers.media(tmp_path_factory, "2s-64x48.mkv"))
    assert d["metric"][1] == 3072.0 and d["metric"][0] == pytest.approx(2.0, abs=0.1)
    assert (d["decision"], d["device"], d["gpu_state"], d["unit"]) == ("GPU", 1, "ok", ["seconds", "pixels"])
    p = cli(rig, "explain", helpers.media(tmp_path_factory, "2s-320x240.mkv"))
    assert "76800 pixels" in p.stdout and "decision   CPU  (over-threshold)" in p.stdout


def test_explain_needs_a_workload_when_several(rig, tmp_path):
    rig.doc["workloads"]["v"] = dict(rig.doc["workloads"]["w"])
    rig.rewrite()
    p = cli(rig, "explain", data(tmp_path, 1))
    assert p.returncode == 2 and "name a workload with --workload (v, w)" in p.stderr
    assert explain_json(rig, "--workload", "v", data(tmp_path, 1))["workload"] == "v"


def test_config_option_before_or_after_the_command(rig, tmp_path):
    env = {"GPU_ROUTER_CONFIG": str(tmp_path / "absent.toml")}
    small = data(tmp_path, 1)
    for argv in (["--config", rig.config, "explain", "--json", small],
                 ["explain", "--config", rig.config, "--json", small]):
        p = cli(rig, *argv, env=env)
        assert p.returncode == 0 and json.loads(p.stdout)["workload"] == "w", p.stderr
    p = cli(rig, "explain", small, env=env)
    assert p.returncode == 2 and "absent.toml" in p.stderr and "no such config file" in p.stderr


def test_cli_config_error_exits_2(rig, tmp_path):
    rig.config.write_text('[workloads.w]\nbinary = "/bin/x"\nthreshold = 1\nslots = 2\n')
    for cmd in (["explain", data(tmp_path, 1)], ["check"]):
        p = cli(rig, *cmd)
        assert p.returncode == 2 and f"{rig.config}: workloads.w.slots: unknown key" in p.stderr


def test_no_command_prints_help_and_exits_2(rig):
    p = cli(rig)
    assert p.returncode == 2 and "explain" in p.stdout and "check" in p.stdout


# ---- check -------------------------------------------------------------------------------------------------------

def test_check_positive_headroom(rig):
    p = cli(rig, "check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Headroom:         4492 MB  ok" in p.stdout  # 8192 - 3700
    assert "Headroom:         18696 MB  ok" in p.stdout  # 32768 - 3072 - 11000
    assert "13200 MB suggested" in p.stdout
    d = json.loads(cli(rig, "check", "--json").stdout)
    w = d["workloads"]["w"]
    assert d["ok"] is True and w["problems"] == []
    assert (w["vram_headroom_mb"], w["ram_headroom_mb"], w["suggested_memory_max_mb"]) == (4492, 18696, 13200)
    assert (w["gpu_vram_source"], w["ram_source"]) == ("config [host] gpu_vram_mb", "config [host] ram_mb")


@pytest.mark.parametrize("change,problem", [({"max_gpu_jobs": 3}, "VRAM headroom is negative"),
                                             ({"max_cpu_jobs": 3}, "RAM headroom is negative")])
def test_check_negative_headroom_exits_nonzero(rig, change, problem):
    rig.doc["workloads"]["w"].update(change)
    rig.rewrite()
    p = cli(rig, "check")
    assert p.returncode == 1 and "NEGATIVE" in p.stdout and problem in p.stdout
    p = cli(rig, "check", "--json")
    d = json.loads(p.stdout)
    assert p.returncode == 1 and d["ok"] is False
    assert any(problem in x for x in d["workloads"]["w"]["problems"])


def test_check_one_workload_of_several(rig):
    rig.doc["workloads"]["bad"] = dict(rig.doc["workloads"]["w"], max_gpu_jobs=5)
    rig.rewrite()
    assert cli(rig, "check").returncode == 1
    p = cli(rig, "check", "--workload", "w", "--json")
    assert p.returncode == 0 and list(json.loads(p.stdout)["workloads"]) == ["w"]


def test_check_detects_vram_from_the_snapshot_and_ram_from_the_system(tmp_path, gr_bin, clean_env):
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE, cpu_ram_mb=1)})
    rig.write_snapshot([helpers.gpu_entry(0, total_mb=24000), helpers.gpu_entry(1, total_mb=12000)])
    d = json.loads(cli(rig, "check", "--json").stdout)
    w = d["workloads"]["w"]
    assert (w["gpu_vram_mb"], w["gpu_vram_source"], w["gpus"]) == (12000, "detected (smallest GPU)", 2)
    meminfo = int(open("/proc/meminfo").readline().split()[1]) // 1024
    assert (w["ram_mb"], w["ram_source"]) == (meminfo, "detected (/proc/meminfo)")


def test_check_unknown_vram_is_a_problem_but_not_a_failure(tmp_path, gr_bin, clean_env):
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE)}, host={"ram_mb": 65536})
    p = cli(rig, "check", "--json")
    d = json.loads(p.stdout)
    assert p.returncode == 0 and d["ok"] is True
    assert any("GPU VRAM unknown" in x for x in d["workloads"]["w"]["problems"])
