"""`gpu-router init` through the real launcher: by flags (--yes) and interactively (answers on stdin).

GPU memory comes from a fake 16 GiB GPU through the unmodified pynvml binding, or from an agent snapshot; the
written profile must load with config.load and pass `gpu-router check`.
"""

import json
import os
import pathlib
import subprocess
import tomllib

import pytest

import helpers
from fakenvml import fake_gpus  # noqa: F401  (a fixture)
from gpu_router import config as gr_config

FLAGS = ["--workload", "whisper", "--binary", "/usr/bin/python3", "--probe", "media-duration", "--threshold",
         "3600", "--gpu-vram-mb", "3700", "--cpu-ram-mb", "11000", "--gpu-args", "--device cuda --compute_type "
         "float16", "--cpu-args", "--device cpu --compute_type int8", "--max-cpu-jobs", "1",
         "--admission", "slots"]  # the runbook's worksheet; the vram default has its own test


class Etc:
    """A config dir (config.toml + workloads.d/) of a test's own, with a snapshot path that does not exist."""

    def __init__(self, root, gr_bin, env, main=None):
        self.root = pathlib.Path(root)
        self.gr_bin = str(gr_bin)
        self.config = self.root / "config.toml"
        self.dropins = self.root / "workloads.d"
        self.snapshot = self.root / "gpus.json"
        doc = {"router": {"lock_dir": str(self.root / "locks")}, "gpu": {"snapshot": str(self.snapshot)},
               "host": {"ram_mb": 32768}}
        for section, table in (main or {}).items():
            doc.setdefault(section, {}).update(table)
        helpers.write_toml(self.config, doc)
        self.env = dict(env, GPU_ROUTER_CACHE_DIR=str(self.root / "no-cache"), GPU_ROUTER_CONFIG=str(self.config))

    def init(self, *args, stdin=None, env=None):
        return subprocess.run([self.gr_bin, "init"] + [str(a) for a in args], env=env or self.env,
                              input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=60)

    def profile(self, name):
        return tomllib.loads((self.dropins / f"{name}.toml").read_text())["workloads"][name]

    def check(self, name):
        return subprocess.run([self.gr_bin, "check", "--json", "--workload", name], env=self.env,
                              capture_output=True, text=True, timeout=60)


@pytest.fixture
def etc(tmp_path, gr_bin, fake_gpus):
    fake_gpus.add_gpu(16384, name="NVIDIA Fake 16GB")
    return Etc(tmp_path, gr_bin, fake_gpus.env)


def test_flags_and_yes_write_a_valid_profile(etc):
    p = etc.init(*FLAGS, "--yes", "--json", "--wait", "30s")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    path = etc.dropins / "whisper.toml"
    assert d["path"] == str(path) and d["written"] and d["workload"] == "whisper"
    assert etc.profile("whisper") == d["profile"] == {
        "binary": "/usr/bin/python3", "probe": "media-duration", "input": "last-file", "threshold": 3600,
        "threshold_unit": "seconds", "gpu_vram_mb": 3700, "cpu_ram_mb": 11000, "admission": "slots",
        "max_gpu_jobs": 4,                     # default: as many as fit in the detected 16384 MiB
        "max_cpu_jobs": 1, "gpu_args": ["--device", "cuda", "--compute_type", "float16"],
        "cpu_args": ["--device", "cpu", "--compute_type", "int8"], "wait": "30s", "scope": "best-effort"}
    assert d["detected"]["gpu_vram_mb"] == 16384 and d["detected"]["gpu_source"] == "nvml"
    assert d["detected"]["gpus"][0]["name"] == "NVIDIA Fake 16GB"
    assert d["budget"]["vram_headroom_mb"] == 16384 - 4 * 3700
    assert d["budget"]["ram_headroom_mb"] == 32768 - 3072 - 11000 and d["problems"] == []
    assert "== whisper" in p.stderr and "Headroom:" in p.stderr  # the worksheet, before writing (stderr with --json)
    assert path.read_text().startswith("# Workload profile written by `gpu-router init`")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [n for n in os.listdir(etc.dropins)] == ["whisper.toml"]  # no temp file left
    w = gr_config.load(str(etc.config), use_cache=False).workload("whisper")
    assert (w.threshold, w.max_gpu_jobs, w.wait, w.retry_exit_code) == ([3600], 4, 30.0, 75)
    c = etc.check("whisper")
    assert c.returncode == 0 and json.loads(c.stdout)["ok"]


def test_vram_admission_is_the_default_where_the_gpu_memory_is_known(etc, tmp_path, gr_bin, clean_env):
    """With the GPU's VRAM known, init writes admission = "vram" and no slot cap (VRAM decides); --max-gpu-jobs
    stays available as an explicit cap. Without a known GPU size: slots, one per GPU, as before."""
    flags = [f for f in FLAGS[:-2]]  # no --admission: the default
    d = json.loads(etc.init(*flags, "--yes", "--json").stdout)
    assert d["profile"]["admission"] == "vram" and "max_gpu_jobs" not in d["profile"], d["profile"]
    w = gr_config.load(str(etc.config), use_cache=False).workload("whisper")
    assert (w.admission, w.max_gpu_jobs) == ("vram", None)
    assert json.loads(etc.check("whisper").stdout)["workloads"]["whisper"]["max_gpu_jobs"] is None
    d = json.loads(etc.init(*flags, "--yes", "--json", "--force", "--max-gpu-jobs", "3").stdout)
    assert (d["profile"]["admission"], d["profile"]["max_gpu_jobs"]) == ("vram", 3)
    (tmp_path / "nogpu").mkdir()
    bare = Etc(tmp_path / "nogpu", gr_bin, clean_env)
    d = json.loads(bare.init(*flags, "--yes", "--json").stdout)
    assert (d["profile"]["admission"], d["profile"]["max_gpu_jobs"]) == ("slots", 1)


def test_text_output_and_defaults(etc):
    p = etc.init(*FLAGS, "--yes", "--retry-exit-code", "75", "--scope", "required")
    assert p.returncode == 0, p.stderr
    assert "GPU VRAM:         16384 MB [detected, smallest GPU (nvml)]" in p.stdout
    assert f"wrote {etc.dropins / 'whisper.toml'}" in p.stdout and "gpu-router check --workload whisper" in p.stdout
    prof = etc.profile("whisper")
    assert "retry_exit_code" not in prof and "wait" not in prof  # same as [router]: not pinned in the profile
    assert prof["scope"] == "required"


def test_existing_profile_needs_force(etc):
    assert etc.init(*FLAGS, "--yes").returncode == 0
    before = (etc.dropins / "whisper.toml").read_text()
    p = etc.init(*FLAGS, "--yes", "--threshold", "99")
    assert p.returncode == 1 and "exists: --force replaces it" in p.stderr
    assert (etc.dropins / "whisper.toml").read_text() == before
    p = etc.init(*FLAGS, "--yes", "--force", "--threshold", "99", "--on-probe-error", "fail")
    assert p.returncode == 0, p.stderr
    assert etc.profile("whisper")["threshold"] == 99 and etc.profile("whisper")["on_probe_error"] == "fail"
    # --force replaces even a file that no longer parses; another broken drop-in is fatal (the wrapper rejects it)
    (etc.dropins / "whisper.toml").write_text("[workloads.whisper\n")
    assert etc.init(*FLAGS, "--yes", "--force").returncode == 0 and etc.profile("whisper")["threshold"] == 3600
    (etc.dropins / "other.toml").write_text("[workloads.other\n")
    p = etc.init(*FLAGS, "--yes", "--force")
    assert p.returncode == 2 and "other.toml: TOML syntax error" in p.stderr
    (etc.dropins / "other.toml").unlink()
    p = etc.init(*FLAGS, "--yes", "--force", "--on-probe-error", "maybe")
    assert p.returncode == 2 and "--on-probe-error: expected one of 'cpu', 'fail'" in p.stderr


@pytest.mark.parametrize("flags, message", [
    (["--yes", "--workload", "x"], "--binary is needed"),
    ([*FLAGS[:2], "--binary", "/usr/bin/python3", "--yes"], "--threshold is needed"),
    ([*FLAGS, "--probe", "bogus", "--yes"], "--probe: unknown probe 'bogus'"),
    ([*FLAGS, "--input", "third", "--yes"], "--input: expected \"last-file\""),
    ([*FLAGS, "--threshold", "1,2", "--yes"], "--threshold: expected 1 value(s)"),
    ([*FLAGS, "--binary", "relative-nowhere", "--yes"], "--binary: expected an absolute path"),
    ([*FLAGS, "--workload", "a b", "--yes"], "a workload name is letters"),
    ([*FLAGS, "--probe", "command", "--yes"], "--probe-command is needed"),
    ([*FLAGS, "--scope", "maybe", "--yes"], "--scope: expected one of"),
    ([*FLAGS, "--wait", "soon", "--yes"], "--wait:"),
])
def test_bad_or_missing_flags_write_nothing(etc, flags, message):
    p = etc.init(*flags)
    assert p.returncode == 2 and message in p.stderr, p.stderr
    assert not etc.dropins.exists()


def test_never_writes_what_the_wrapper_would_reject(tmp_path, gr_bin, fake_gpus):
    """The profile is validated with the whole config: a name another file defines is refused."""
    fake_gpus.add_gpu(16384)
    etc = Etc(tmp_path, gr_bin, fake_gpus.env, main={"workloads": {"whisper": {"binary": "/bin/true",
                                                                                "threshold": 1}}})
    p = etc.init(*FLAGS, "--yes")
    assert p.returncode == 2 and "workload defined twice" in p.stderr
    assert not etc.dropins.exists()


def test_interactive(etc):
    answers = "\n".join([
        "whisper",                 # name
        "/usr/bin/python3",        # binary
        "",                        # probe: default file-size
        "option:--audio",          # input
        "",                        # unit: default bytes (asked before the number)
        "lots",                    # threshold: not a number → asked again
        "5000000",                 # threshold
        "2000",                    # VRAM per GPU job
        "4000",                    # RAM per CPU job
        "slots",                   # admission (default vram: the GPU's VRAM is known)
        "",                        # max GPU jobs: default (16384 // 2000 = 8)
        "2",                       # max CPU jobs
        "--device cuda",           # GPU args
        "",                        # CPU args: none
        "",                        # retry exit code: [router]'s
        "30s",                     # wait
        "off",                     # scope
        "y",                       # write it
    ]) + "\n"
    p = etc.init(stdin=answers)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "GPU 0: NVIDIA Fake 16GB, 16384 MiB [nvml]" in out and "system RAM: 32768 MiB" in out
    assert "Probe measuring the input" in out and "[file-size]" in out
    assert "expected a number of bytes (or with a unit: 11G, 500M), got 'lots'" in out
    assert "Max GPU jobs per GPU (that many fit in 16384 MiB) [8]" in out
    assert out.index("== whisper") < out.index("Write ") < out.index("wrote ")  # worksheet, question, write
    assert etc.profile("whisper") == {
        "binary": "/usr/bin/python3", "probe": "file-size", "input": "option:--audio", "threshold": 5000000,
        "threshold_unit": "bytes", "gpu_vram_mb": 2000, "cpu_ram_mb": 4000, "admission": "slots",
        "max_gpu_jobs": 8, "max_cpu_jobs": 2,
        "gpu_args": ["--device", "cuda"], "cpu_args": [], "wait": "30s", "scope": "off"}
    assert etc.check("whisper").returncode == 0


def test_interactive_with_flags_and_probe_command(etc):
    """Flags answer their questions; the rest are asked, probe_command only for probe = command."""
    p = etc.init("--workload", "tx", "--binary", "/usr/bin/python3", "--gpu-vram-mb", "1000", "--cpu-ram-mb", "500",
                 stdin="command\nwc -l {input}\n\nlines\n10\nslots\n1\n1\n\n\n\n\n\ny\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Workload name" not in p.stdout and "VRAM per GPU job" not in p.stdout
    prof = etc.profile("tx")
    assert (prof["probe"], prof["probe_command"], prof["threshold"], prof["threshold_unit"]) == (
        "command", ["wc", "-l", "{input}"], 10, "lines")


def test_interactive_decline_and_eof_write_nothing(etc):
    p = etc.init(*FLAGS, stdin="\n" * 6 + "n\n")  # input, unit, max GPU jobs, retry, wait, scope; then no
    assert p.returncode == 1 and "nothing written" in p.stderr
    assert not (etc.dropins / "whisper.toml").exists()
    p = etc.init(stdin="whisper\n/usr/bin/python3\n")
    assert p.returncode == 2 and "standard input ended" in p.stderr
    assert not etc.dropins.exists()


def test_negative_headroom_defaults_to_no(etc):
    p = etc.init(*FLAGS, "--max-gpu-jobs", "5", stdin="\n" * 6)  # five questions, then the default: no
    assert "VRAM headroom is negative" in p.stdout and "[y/N]" in p.stdout
    assert p.returncode == 1 and not etc.dropins.exists()
    p = etc.init(*FLAGS, "--max-gpu-jobs", "5", "--yes")  # asked for: written, and the finding is the exit status
    assert p.returncode == 1 and (etc.dropins / "whisper.toml").exists()


def test_gpu_memory_from_the_agent_snapshot(tmp_path, gr_bin, clean_env):
    """No NVML here: the agent's snapshot says what the GPUs have."""
    etc = Etc(tmp_path, gr_bin, clean_env)
    from gpu_router import snapshot
    import time

    snapshot.write(str(etc.snapshot), {"version": 1, "time": time.time(), "source": "nvml", "error": None,
                                       "driver": "x", "gpus": [helpers.gpu_entry(0, total_mb=24576),
                                                              helpers.gpu_entry(1, total_mb=24576)]})
    p = etc.init(*FLAGS, "--yes", "--json")
    d = json.loads(p.stdout)
    assert d["detected"]["gpu_source"] == "agent snapshot (nvml)" and d["detected"]["gpu_vram_mb"] == 24576
    assert d["profile"]["max_gpu_jobs"] == 6 and d["budget"]["gpus"] == 2


def test_no_gpu_detected(tmp_path, gr_bin, clean_env):
    etc = Etc(tmp_path, gr_bin, clean_env)
    p = etc.init(*FLAGS, "--yes", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["detected"]["gpus"] == [] and d["detected"]["gpu_vram_mb"] is None
    assert d["profile"]["max_gpu_jobs"] == 1
    assert any("GPU VRAM unknown" in x for x in d["problems"])
    (tmp_path / "b").mkdir()
    etc2 = Etc(tmp_path / "b", gr_bin, clean_env, main={"host": {"gpu_vram_mb": 8192}})
    d = json.loads(etc2.init(*FLAGS, "--yes", "--json").stdout)
    assert d["detected"]["gpu_vram_source"] == "config [host] gpu_vram_mb" and d["profile"]["max_gpu_jobs"] == 2


def test_then_calibrate_the_written_profile(etc, fake_gpus):
    """init's profile is one calibrate can run: the two commands meet in the config."""
    from fakenvml import JOB

    state = etc.root / "state"
    text = etc.config.read_text() + f'\n[agent]\nstate_dir = "{state}"\n'
    etc.config.write_text(text)
    p = etc.init("--workload", "fake", "--binary", JOB, "--probe", "command", "--probe-command", "cat {input}",
                 "--threshold", "9000", "--gpu-vram-mb", "3000", "--cpu-ram-mb", "100", "--scope", "off", "--yes",
                 "--admission", "slots")
    assert p.returncode == 0, p.stderr
    data = etc.root / "in"
    data.write_text("2500\n")
    c = subprocess.run([etc.gr_bin, "calibrate", "-w", "fake", "--json", data, "--", "--seconds", "0.4", "--vram",
                        "{metric}"], env=etc.env, capture_output=True, text=True, timeout=60)
    assert c.returncode == 0, c.stderr
    d = json.loads(c.stdout)
    assert d["runs"][0]["peak_vram_mb"] == 2500 and d["budget"]["per_job_mb"] == 16384 // 5


# ---- issue 10: units before numbers, values with units, the real binary after wrap, VRAM others use ----------

def test_unit_is_asked_before_the_number_and_values_take_units(etc):
    answers = "minutes\n90\n"
    p = etc.init("--workload", "w", "--binary", "/usr/bin/python3", "--probe", "ffprobe-duration",
                 "--gpu-vram-mb", "3.5G", "--cpu-ram-mb", "11G", "--input", "last-file", "--admission", "slots", "--max-gpu-jobs", "1",
                 "--max-cpu-jobs", "1", "--gpu-args", "", "--cpu-args", "", "--retry-exit-code", "75",
                 "--wait", "0s", "--scope", "off", stdin=answers + "y\n")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.index("Unit of the threshold") < p.stdout.index("Threshold in minutes")
    prof = etc.profile("w")
    assert (prof["threshold"], prof["threshold_unit"], prof["gpu_vram_mb"], prof["cpu_ram_mb"]) == (
        90, "minutes", 3584, 11264)
    w = gr_config.load(str(etc.config), use_cache=False).workload("w")
    assert (w.threshold, w.threshold_unit) == ([5400], ["seconds"])


def test_a_duration_with_its_unit_and_a_unit_the_probe_cannot_take(etc):
    base = ["--workload", "w", "--binary", "/usr/bin/python3", "--gpu-vram-mb", "1000", "--cpu-ram-mb", "1000",
            "--yes"]
    p = etc.init(*base, "--probe", "ffprobe-duration", "--threshold", "1h")
    assert p.returncode == 0, p.stderr
    assert gr_config.load(str(etc.config), use_cache=False).workload("w").threshold == [3600]
    p = etc.init(*base, "--probe", "file-size", "--unit", "minutes", "--threshold", "5", "--force")
    assert p.returncode == 2
    assert "--unit: probe 'file-size' measures in bytes; threshold_unit 'minutes' is not a unit of it" in p.stderr


def test_after_wrap_init_proposes_the_real_binary_and_refuses_the_wrapped_name(etc, tmp_path):
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "whisper-ctranslate2.toml").write_text(
        'version = 1\nname = "whisper-ctranslate2"\npath = "/usr/local/bin/whisper-ctranslate2"\n'
        'workload = "whisper"\nmethod = "rename"\nreal = "/usr/local/bin/whisper-ctranslate2.real"\n')
    env = dict(etc.env, GPU_ROUTER_WRAPPED_DIR=str(wrapped))
    p = etc.init("--workload", "whisper", stdin="", env=env)
    assert "[/usr/local/bin/whisper-ctranslate2.real]" in p.stdout
    launcher = tmp_path / "bin" / "gpu-router"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "tool").symlink_to(launcher)
    (tmp_path / "bin" / "tool.real").write_text("#!/bin/sh\n")
    p = etc.init("--workload", "tool", "--binary", tmp_path / "bin" / "tool", "--yes", env=env)
    assert p.returncode == 2
    assert f"is gpu-router itself (it is wrapped): the real binary is {tmp_path}/bin/tool.real" in p.stderr


def test_jobs_that_fit_leave_out_vram_other_processes_hold(tmp_path, gr_bin, clean_env):
    etc = Etc(tmp_path, gr_bin, clean_env)
    from gpu_router import snapshot
    import time

    snapshot.write(str(etc.snapshot), {"version": 1, "time": time.time(), "source": "nvml", "error": None,
                                       "driver": "x", "gpus": [dict(helpers.gpu_entry(0, total_mb=16384),
                                                                    foreign_mb=4000)]})
    p = etc.init(*FLAGS, stdin="\n" * 6 + "n\n")
    assert "that many fit in 12384 MiB: 16384 MiB less 4000 MiB other processes use now) [3]" in p.stdout


def test_a_user_who_cannot_write_profiles_is_told_before_any_question(gr_bin, clean_env):
    root = helpers.public_tmpdir()
    etc = Etc(root, gr_bin, clean_env)
    etc.config.chmod(0o644)
    p = subprocess.run(helpers.as_user() + [etc.gr_bin, "init"], env=etc.env, input="", capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert f"cannot write profiles in {etc.dropins} as this user: run gpu-router init as root" in p.stderr
    assert "Workload name" not in p.stdout


# ---- the schema's table: init's flags and questions come from config.INIT_QUESTIONS ---------------------------------

def _init_parser():
    import argparse

    from gpu_router.ops import cli

    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["init"]


def test_init_flags_are_the_schema_tables_and_its_keys_are_profile_keys():
    table = gr_config.INIT_QUESTIONS
    assert set(table) <= set(gr_config.WORKLOAD) | {"name"}
    flags = {o for a in _init_parser()._actions for o in a.option_strings}
    assert flags == {f for fl, _h, _q in table.values() for f in fl} | {
        "--yes", "-y", "--force", "--json", "--config", "--help", "-h"}
    helps = {a.option_strings[0]: a.help for a in _init_parser()._actions if a.option_strings}
    assert all(helps[fl[0]] == h.format(probes=", ".join(gr_config.PROBES)) for fl, h, _q in table.values())


def test_init_asks_the_schema_tables_questions(tmp_path, monkeypatch, capsys):
    """The wording lives in the table: change it there and init asks the new words (in-process, real stdin read)."""
    import io

    from gpu_router.ops import cli

    (tmp_path / "config.toml").write_text("[host]\ngpu_vram_mb = 16384\nram_mb = 32000\n[gpu]\nbackend = \"none\"\n")
    monkeypatch.setenv("GPU_ROUTER_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setitem(gr_config.INIT_QUESTIONS, "scope", (("--scope",), "h", "Which scope, {{really}}"))
    monkeypatch.setitem(gr_config.INIT_QUESTIONS, "max_cpu_jobs",
                        (("--max-cpu-jobs",), "h", "CPU jobs for {cpus} CPUs"))
    monkeypatch.setattr("sys.stdin", io.StringIO("off\n"))
    assert cli.main(["init", "-w", "w", "--binary", "/bin/true", "--threshold", "5", "--gpu-vram-mb", "100",
                     "--cpu-ram-mb", "100", "--max-gpu-jobs", "1", "--max-cpu-jobs", "1", "--admission", "slots",
                     "--gpu-args", "", "--cpu-args", "", "--retry-exit-code", "75", "--wait", "0s", "--probe",
                     "file-size", "--input", "last-file", "--unit", "bytes", "--yes"]) == 0
    # --yes: nothing asked; without it only the question left (scope) is, in the table's words
    assert "Which scope" not in capsys.readouterr().out
    (tmp_path / "workloads.d/w.toml").unlink()
    monkeypatch.setattr("sys.stdin", io.StringIO("3\noff\n"))
    assert cli.main(["init", "-w", "w", "--binary", "/bin/true", "--threshold", "5", "--gpu-vram-mb", "100",
                     "--cpu-ram-mb", "100", "--max-gpu-jobs", "1", "--admission", "slots",
                     "--gpu-args", "", "--cpu-args", "", "--retry-exit-code", "75", "--wait", "0s", "--probe",
                     "file-size", "--input", "last-file", "--unit", "bytes"]) == 2  # stdin ends at "write it?"
    out = capsys.readouterr().out
    assert "Which scope, {really} [best-effort]: " in out and "CPU jobs for" in out


def test_init_and_check_count_the_same_gpus_when_none_are_listed(tmp_path, gr_bin, clean_env):
    """One home for the host's figures (issue 20, ops/host.py): the agent's snapshot lists no GPU, and `init` and
    `check` count the same GPUs (0, as the wrapper routes every job to CPU then), VRAM and RAM. `init` counted 1."""
    from gpu_router import snapshot
    import time

    etc = Etc(tmp_path, gr_bin, clean_env, main={"gpu": {"backend": "none"}})
    snapshot.write(str(etc.snapshot), {"version": 1, "time": time.time(), "source": "none", "error": None,
                                       "driver": None, "gpus": []})
    p = etc.init(*FLAGS, "--yes", "--json")
    assert p.returncode == 0, p.stderr
    made = json.loads(p.stdout)["budget"]
    c = etc.check("whisper")
    checked = json.loads(c.stdout)["workloads"]["whisper"]
    figures = ("gpus", "gpu_vram_mb", "ram_mb", "ram_source")
    assert [made[k] for k in figures] == [checked[k] for k in figures] == [0, None, 32768, "config [host] ram_mb"]
