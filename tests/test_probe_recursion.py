"""A probe tool that is itself wrapped by gpu-router (ffprobe wrapped, say) must not recurse: the inner wrapper,
started by the outer one's probe, runs the tool as it is."""

import json
import os
import subprocess


def test_wrapped_probe_tool_runs_straight_and_an_exported_marker_does_not_bypass(tmp_path, gr_bin, clean_env):
    tool = tmp_path / "measure.real"
    tool.write_text("#!/bin/sh\necho 42\n")
    tool.chmod(0o755)
    job = tmp_path / "job.real"
    job.write_text("#!/bin/sh\necho \"ran $*\"\n")
    job.chmod(0o755)
    link = tmp_path / "measure"
    link.symlink_to(gr_bin)
    (tmp_path / "locks").mkdir(mode=0o700)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"""
[router]
lock_dir = "{tmp_path}/locks"
[gpu]
snapshot = "{tmp_path}/gpus.json"
[workloads.measure]
binary = "{tool}"
probe = "command"
probe_command = ["{link}", "{{input}}"]   # its own probe is itself: recursion if the guard failed
threshold = 1
scope = "off"
[workloads.transcribe]
binary = "{job}"
probe = "command"
probe_command = ["{link}", "{{input}}"]
probe_timeout = "5s"
threshold = 100
scope = "off"
""")
    (tmp_path / "in").write_text("x")
    env = dict(clean_env, GPU_ROUTER_CONFIG=str(cfg), GPU_ROUTER_CACHE_DIR=str(tmp_path), GPU_ROUTER_LOG="stderr")
    r = subprocess.run([str(gr_bin), "run", "--workload", "transcribe", "--", str(tmp_path / "in")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    routed = [json.loads(x) for x in r.stderr.splitlines() if '"routed"' in x][0]
    assert routed["GPU_ROUTER_METRIC"] == "42" and routed["GPU_ROUTER_MODE"] == "GPU"
    # A marker inherited from elsewhere (not our parent's pid) does not skip routing.
    env["GPU_ROUTER_PROBING"] = "1"
    r = subprocess.run([str(gr_bin), "run", "--workload", "transcribe", "--", str(tmp_path / "in")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and '"routed"' in r.stderr
