"""The operator's day-one traps (issue 10), through the real launcher: a profile that leads back to the router,
`wrap` fixing the profile it wraps for, explain's options anywhere, candidate files validated before going live."""

import json
import os
import subprocess

import pytest

import helpers
from gpu_router.ops import profile_edit

PROFILE = {"probe": "file-size", "threshold": 1000, "max_gpu_jobs": 1, "max_cpu_jobs": 1,
           "gpu_args": ["--device", "cuda"], "cpu_args": ["--device", "cpu"], "gpu_vram_mb": 3700,
           "cpu_ram_mb": 11000}


@pytest.fixture
def rig(tmp_path, gr_bin, clean_env):
    return helpers.Rig(tmp_path, gr_bin, clean_env, {"w": dict(PROFILE)},
                       host={"gpu_vram_mb": 8192, "ram_mb": 32768, "other_ram_mb": 3072})


def cli(rig, *args):
    return subprocess.run([rig.gr_bin] + [str(a) for a in args], env=rig.env, capture_output=True, text=True,
                          timeout=60)


def data(tmp_path, size):
    path = tmp_path / f"in-{size}.bin"
    path.write_bytes(b"x" * size)
    return path


# ---- trap 1 --------------------------------------------------------------------------------------------------

def test_a_binary_that_execs_the_router_again_exits_2_at_once_instead_of_blocking(rig, tmp_path):
    """A script named as the real binary that execs the wrapper (the PID stays the same) is the loop the operator
    met: without the guard the second round finds the slot taken and exits 75 for ever."""
    script = tmp_path / "loops"
    script.write_text(f"#!/bin/sh\nexec {rig.gr_bin} run --workload w -- \"$@\"\n")
    script.chmod(0o755)
    rig.doc["workloads"]["w"]["binary"] = str(script)
    rig.rewrite()
    res = rig.run("w", data(tmp_path, 100))
    assert res.rc == 2, res
    assert "leads back to gpu-router" in res.err and "set binary to the real program" in \
        res.err


def test_profile_edit_keeps_the_file_and_changes_one_line(tmp_path):
    f = tmp_path / "whisper.toml"
    f.write_text('# mine\n[workloads.other]\nbinary = "/usr/bin/x"\n\n[workloads.whisper]\n'
                 'binary = "/usr/local/bin/whisper"   # the real one\nthreshold = 3600\n')
    text = profile_edit.plan(str(f), "whisper", "/usr/local/bin/whisper.real")
    assert text == ('# mine\n[workloads.other]\nbinary = "/usr/bin/x"\n\n[workloads.whisper]\n'
                    'binary = "/usr/local/bin/whisper.real"   # the real one\nthreshold = 3600\n')
    f.chmod(0o640)
    profile_edit.apply(str(f), text)
    assert oct(f.stat().st_mode & 0o777) == "0o640"


def test_profile_edit_refuses_with_what_to_change_by_hand(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text('[workloads]\nwhisper = { binary = "/usr/bin/w", threshold = 1 }\n')
    with pytest.raises(profile_edit.EditRefused) as info:
        profile_edit.plan(str(f), "whisper", "/usr/bin/w.distrib")
    assert 'set binary = "/usr/bin/w.distrib" in [workloads.whisper]' in str(info.value)


# ---- trap 5 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["options-after", "options-before", "mixed"])
def test_explain_takes_options_anywhere_before_the_double_dash(rig, tmp_path, order):
    big = data(tmp_path, 5000)
    argv = {"options-after": ["explain", big, "-w", "w", "--json"],
            "options-before": ["explain", "--json", "-w", "w", big],
            "mixed": ["explain", "-w", "w", big, "--json"]}[order]
    p = cli(rig, *argv)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert (d["input"], d["decision"], d["workload"]) == (str(big), "CPU", "w")


def test_explain_job_arguments_after_double_dash_keep_their_options(rig, tmp_path):
    rig.doc["workloads"]["w"]["input"] = "option:--audio"
    rig.rewrite()
    big = data(tmp_path, 5000)
    p = cli(rig, "explain", "-w", "w", "--json", "--", "--audio", big, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["input"] == str(big) and d["command"][1:4] == ["--audio", str(big), "--json"]


# ---- trap 3: check fails on a profile that cannot run ----------------------------------------------------------

def test_check_fails_on_a_missing_binary_naming_the_fix(rig, tmp_path):
    assert cli(rig, "check").returncode == 0
    rig.doc["workloads"]["w"]["binary"] = str(tmp_path / "nope")
    rig.rewrite()
    p = cli(rig, "check")
    assert p.returncode == 1
    assert f"binary {tmp_path / 'nope'} does not exist: every job would exit 127" in p.stdout
    assert "NOT OK" in p.stdout
    d = json.loads(cli(rig, "check", "--json").stdout)
    assert d["ok"] is False and d["workloads"]["w"]["ok"] is False


def test_check_fails_on_a_non_executable_binary_and_a_missing_probe_command(rig, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("not a program\n")
    rig.doc["workloads"]["w"].update(binary=str(plain), probe="command", probe_command=["/nonexistent/x", "{input}"],
                                     threshold_unit="units")
    rig.rewrite()
    p = cli(rig, "check")
    assert p.returncode == 1
    assert "is not an executable file: every job would exit 126" in p.stdout
    assert "probe_command '/nonexistent/x' is not an executable" in p.stdout


def test_negative_headroom_fails_check_and_explain_says_so(rig, tmp_path):
    rig.doc["workloads"]["w"]["max_gpu_jobs"] = 3  # 3 x 3700 > 8192
    rig.rewrite()
    assert cli(rig, "check").returncode == 1
    p = cli(rig, "explain", data(tmp_path, 10))
    assert "! VRAM headroom is negative" in p.stdout
    d = json.loads(cli(rig, "explain", "--json", data(tmp_path, 10)).stdout)
    assert any("VRAM headroom is negative" in x for x in d["problems"])


# ---- trap 4: validate a candidate before going live -----------------------------------------------------------

def test_check_f_validates_a_candidate_drop_in_without_activating_it(rig, tmp_path):
    cand = tmp_path / "edit" / "extra.toml"
    cand.parent.mkdir()
    cand.write_text(f'[workloads.extra]\nbinary = "{rig.job}"\nthreshold = 10\nmax_gpu_job = 1\n')
    p = cli(rig, "check", "-f", cand)
    assert p.returncode == 2
    assert f"{cand}: workloads.extra.max_gpu_job: unknown key (did you mean 'max_gpu_jobs'?)" in p.stderr
    cand.write_text(f'[workloads.extra]\nbinary = "{rig.job}"\nthreshold = 10\nmax_gpu_jobs = 1\n')
    p = cli(rig, "check", "-f", cand, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["candidate"] == {"file": str(cand), "as": str(rig.root / "workloads.d" / "extra.toml"), "valid": True}
    assert set(d["workloads"]) == {"w", "extra"}
    assert not (rig.root / "workloads.d").exists()  # nothing activated
    assert cli(rig, "explain", "-w", "extra", data(tmp_path, 1)).returncode == 2  # the live config has no extra


def test_check_f_sees_a_clash_with_the_live_config(rig, tmp_path):
    cand = tmp_path / "w.toml"
    cand.write_text(f'[workloads.w]\nbinary = "{rig.job}"\nthreshold = 10\n')
    p = cli(rig, "check", "-f", cand)
    assert p.returncode == 2 and "workload defined twice" in p.stderr


def test_check_f_of_the_main_file(rig, tmp_path):
    cand = tmp_path / "new-config.toml"
    cand.write_text(rig.config.read_text().replace("retry_exit_code", "x") + '\n[router]\nwait = "soon"\n')
    p = cli(rig, "check", "-f", cand, "--as", rig.config)
    assert p.returncode == 2 and str(cand) in p.stderr


# ---- trap 8: small things in explain's text and JSON -----------------------------------------------------------

def test_explain_text_has_no_python_reprs(rig, tmp_path):
    p = cli(rig, "explain", data(tmp_path, 5000))  # CPU-routed: no GPU slots line
    assert "free slots CPU 1 of 1" in p.stdout and "GPU none" not in p.stdout
    p = cli(rig, "explain", data(tmp_path, 10))
    assert "free slots GPU 0 (of 1 per GPU); CPU 1 of 1" in p.stdout and "[0]" not in p.stdout
    p = cli(rig, "explain", "-w", "w", "--", "--nothing")
    assert "None" not in p.stdout and "(none found among the arguments)" in p.stdout
    p = cli(rig, "explain", "--json", data(tmp_path, 10))
    assert "\\u2026" not in p.stdout and "…" in p.stdout


def test_explain_says_whose_view_it_gives(rig, tmp_path):
    p = cli(rig, "explain", data(tmp_path, 10))
    assert "probed as  root (uid 0); the job probes as its caller" in p.stdout


def test_explain_as_the_runner_sees_an_unreadable_input(rig, tmp_path):
    secret = data(tmp_path, 10)
    secret.chmod(0o600)
    assert json.loads(cli(rig, "explain", "--json", secret).stdout)["decision"] == "GPU"
    d = json.loads(cli(rig, "explain", "--json", "--user", "nobody", secret).stdout)
    assert (d["decision"], d["probe_error"]["reason"], d["probed_as"]["user"]) == ("CPU", "input-unreadable",
                                                                                 "nobody")


def test_explain_prints_numbers_as_written_not_in_exponent_form(rig, tmp_path):
    rig.doc["workloads"]["w"]["threshold"] = 1000000
    rig.rewrite()
    p = cli(rig, "explain", data(tmp_path, 5000))
    assert "metric     5000 bytes" in p.stdout and "threshold  1000000 bytes" in p.stdout
    assert "e+06" not in p.stdout


def test_journal_metric_and_threshold_fields_are_plain_numbers(rig, tmp_path):
    """GPU_ROUTER_METRIC=5000000 must match: the field was written 5e+06 for a 5 MB input."""
    rig.doc["workloads"]["w"]["threshold"] = 1000000
    rig.rewrite()
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 5000000)
    routed = rig.run("w", big).event("routed")
    assert (routed["GPU_ROUTER_METRIC"], routed["GPU_ROUTER_THRESHOLD"]) == ("5000000", "1000000")
