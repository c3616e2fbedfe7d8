"""gpu.py against the fake libnvidia-ml.so.1, through the real, unmodified pynvml binding; and the fake job itself.

In-process tests load the fake library by absolute path first (FakeGpus.preload), so the binding's
CDLL("libnvidia-ml.so.1") gets it; tests of a fresh load, of the nvidia-smi fallback and of the shim refusal run a
fresh /usr/bin/python3 whose LD_LIBRARY_PATH / PATH / PYTHONPATH were set before it started.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fakenvml import PYTHON, FakeGpus, fake_gpus, have_pynvml  # noqa: F401  (fake_gpus is a fixture)
from gpu_router.daemon import gpu_backends as gpu

from helpers import LIB  # noqa: E402 - .build/lib, made by conftest.py

HAVE_PYNVML = have_pynvml()
needs_pynvml = pytest.mark.skipif(not HAVE_PYNVML, reason="no pynvml binding for /usr/bin/python3 "
                                  "(pip install --break-system-packages nvidia-ml-py)")


@pytest.fixture
def nvml(fake_gpus):
    """Fake GPUs whose library is loaded into this process; backends made here are closed afterwards."""
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding")
    fake_gpus.preload()
    made = []
    fake_gpus.backend = lambda **kw: made.append(gpu.NvmlBackend(**kw).open()) or made[-1]
    yield fake_gpus
    for b in made:
        if b._stuck is not None:
            b._stuck.join(10)
        b.close()


def by_index(sample):
    return {g["index"]: g for g in sample["gpus"]}


def run_py(code, env, check=True):
    """Run code in a fresh Debian python3 with the checkout's package; returns the JSON it prints last."""
    proc = subprocess.run([PYTHON, "-c", f"import sys; sys.path.insert(0, {str(LIB)!r})\n{code}"], env=env,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


SAMPLE = """
import json
from gpu_router.daemon import gpu_backends as gpu
b = gpu.open_backend({prefer!r}, call_timeout_s={timeout})
s = b.sample()
s["backend"] = type(b).__name__
s["note"] = getattr(b, "note", None)
b.close()
print(json.dumps(s))
"""


# ---------------------------------------------------------------- NVML backend, in process

def test_two_gpus_of_different_sizes(nvml):
    nvml.add_gpu(81559, name="NVIDIA H100 80GB HBM3")
    nvml.add_gpu(16384, name="NVIDIA Fake 16GB")
    nvml.set_foreign(1, 1024)
    nvml.set_driver("550.54.15")
    s = nvml.backend().sample()
    assert s["source"] == "nvml" and s["error"] is None and s["driver"] == "550.54.15"
    g = by_index(s)
    assert (g[0]["name"], g[0]["total_mb"], g[0]["used_mb"], g[0]["free_mb"]) == ("NVIDIA H100 80GB HBM3", 81559, 0,
                                                                                  81559)
    assert (g[1]["name"], g[1]["total_mb"], g[1]["used_mb"], g[1]["free_mb"]) == ("NVIDIA Fake 16GB", 16384, 1024,
                                                                                  15360)
    assert g[0]["uuid"] == nvml.uuid(0) and g[1]["uuid"] == nvml.uuid(1)
    assert all(x["health"] == "ok" and x["processes"] == [] for x in g.values())


def test_processes_and_sigkill_frees_the_claim(nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(8192)
    backend = nvml.backend()
    job = nvml.start_job(3000, 60, gpu=1)
    try:
        g = by_index(backend.sample())
        assert g[1]["processes"] == [{"pid": job.pid, "used_mb": 3000}]
        assert (g[1]["used_mb"], g[1]["free_mb"]) == (3000, 5192)
        assert g[0]["processes"] == [] and g[0]["used_mb"] == 0
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    g = by_index(backend.sample())
    assert g[1]["processes"] == [] and g[1]["used_mb"] == 0
    assert nvml.claims() == []


def test_gpu_lost_and_back(nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(16384)
    backend = nvml.backend()
    assert [g["health"] for g in backend.sample()["gpus"]] == ["ok", "ok"]
    nvml.lose(1)
    g = by_index(backend.sample())
    assert g[0]["health"] == "ok"
    assert g[1]["health"] == "gpu-lost" and g[1]["used_mb"] is None and g[1]["free_mb"] is None
    assert g[1]["uuid"] == nvml.uuid(1) and g[1]["total_mb"] == 16384  # still named from what was seen before
    nvml.lose(1, False)
    assert [g["health"] for g in backend.sample()["gpus"]] == ["ok", "ok"]


def test_reset_required(nvml):
    nvml.add_gpu(16384)
    backend = nvml.backend()
    nvml.reset_required(0)
    assert backend.sample()["gpus"][0]["health"] == "reset-required"
    nvml.reset_required(0, False)
    assert backend.sample()["gpus"][0]["health"] == "ok"


def test_init_failure_is_a_typed_state_and_recovers(nvml):
    nvml.add_gpu(16384)
    nvml.fail_init()
    backend = nvml.backend()
    s = backend.sample()
    assert s["source"] == "nvml" and s["error"] == "init-failed: Driver Not Loaded" and s["gpus"] == []
    nvml.fail_init(False)
    s = backend.sample()
    assert s["error"] is None and s["gpus"][0]["health"] == "ok"


def test_reinit_failure_keeps_known_gpus_as_init_failed(nvml):
    nvml.add_gpu(16384)
    backend = nvml.backend(reinit_after=1)
    assert backend.sample()["gpus"][0]["health"] == "ok"
    nvml.lose(0)
    assert backend.sample()["gpus"][0]["health"] == "gpu-lost"  # one bad sample: NVML is restarted next time
    nvml.fail_init(code=18)  # NVML_ERROR_LIB_RM_VERSION_MISMATCH: a driver upgrade without reboot
    s = backend.sample()
    assert s["error"].startswith("init-failed: ") and s["gpus"][0]["health"] == "init-failed"
    assert s["gpus"][0]["uuid"] == nvml.uuid(0)
    nvml.fail_init(False)
    nvml.lose(0, False)
    assert backend.sample()["gpus"][0]["health"] == "ok"


def test_hung_call_times_out_keeps_finished_gpus_and_recovers(nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(8192)
    backend = nvml.backend(call_timeout_s=0.3)
    backend.sample()
    nvml.hang(1.5, gpu=1)
    t0 = time.monotonic()
    s = backend.sample()
    assert time.monotonic() - t0 < 1.0
    g = by_index(s)
    assert s["error"].startswith("timeout:")
    assert g[0]["health"] == "ok" and g[0]["used_mb"] == 0           # finished before the deadline: kept
    assert g[1]["health"] == "error:timeout" and g[1]["uuid"] == nvml.uuid(1)
    t0 = time.monotonic()
    s = backend.sample()  # the call is still stuck: answered at once, no second thread
    assert time.monotonic() - t0 < 0.1 and "still hung" in s["error"]
    assert {g["health"] for g in s["gpus"]} == {"error:timeout"}
    nvml.hang(0, gpu=1)
    backend._stuck.join(5)
    s = backend.sample()
    assert s["error"] is None and [g["health"] for g in s["gpus"]] == ["ok", "ok"]


def test_hung_init_times_out(nvml):
    nvml.add_gpu(16384)
    nvml.hang(1.0)
    backend = nvml.backend(call_timeout_s=0.2)
    assert backend.open_error == "timeout"
    assert backend.sample()["error"].startswith("timeout:")
    nvml.hang(0)
    backend._stuck.join(5)
    assert backend.sample()["gpus"][0]["health"] == "ok"


def test_xid_events_are_delivered_once_and_only_new_ones(nvml):
    nvml.add_gpu(16384)
    nvml.add_gpu(16384)
    nvml.xid(0, 48)  # raised before anyone registered: not delivered
    backend = nvml.backend()
    assert backend.sample()["xid_events"] == []  # first sample registers the event set
    nvml.xid(1, 79)
    nvml.xid(0, 13)
    events = backend.sample()["xid_events"]
    assert sorted(events) == [(0, 13), (1, 79)]
    assert backend.sample()["xid_events"] == []


def test_health_of_codes():
    assert gpu.health_of_code(15) == "gpu-lost"
    assert gpu.health_of_code(16) == "reset-required"
    assert gpu.health_of_code(3) == "error:not-supported"
    assert gpu.health_of_code(12345) == "error:nvml-12345"


# ---------------------------------------------------------------- fresh processes

@needs_pynvml
def test_fresh_process_loads_fake_through_ld_library_path(fake_gpus):
    fake_gpus.add_gpu(24576, name="NVIDIA Fake 24GB")
    fake_gpus.set_foreign(0, 500)
    s = run_py(SAMPLE.format(prefer="auto", timeout=5), fake_gpus.env)
    assert s["backend"] == "NvmlBackend" and s["source"] == "nvml"
    assert [(g["name"], g["total_mb"], g["used_mb"]) for g in s["gpus"]] == [("NVIDIA Fake 24GB", 24576, 500)]


def test_smi_fallback_without_nvml_library(fake_gpus):
    fake_gpus.add_gpu(16384, name="NVIDIA Fake 16GB")
    fake_gpus.add_gpu(8192, name="NVIDIA Fake 8GB")
    fake_gpus.set_foreign(0, 700)
    env = fake_gpus.env_smi_only
    job = fake_gpus.start_job(1500, 60, gpu=1)
    try:
        s = run_py(SAMPLE.format(prefer="auto", timeout=5), env)
        assert s["backend"] == "SmiBackend" and s["source"] == "nvidia-smi" and s["error"] is None
        g = by_index(s)
        assert (g[0]["name"], g[0]["total_mb"], g[0]["used_mb"], g[0]["free_mb"]) == ("NVIDIA Fake 16GB", 16384,
                                                                                      700, 15684)
        assert g[1]["processes"] == [{"pid": job.pid, "used_mb": 1500}] and g[1]["used_mb"] == 1500
        assert g[1]["uuid"] == fake_gpus.uuid(1)
        assert s["driver"] == "550.54.15"
        if HAVE_PYNVML:
            assert "libnvidia-ml.so.1 not found" in s["note"]
        fake_gpus.lose(0)
        g = by_index(run_py(SAMPLE.format(prefer="nvidia-smi", timeout=5), env))
        assert g[0]["health"] == "gpu-lost" and g[1]["health"] == "ok"
    finally:
        job.kill()
        job.wait()


def test_smi_backend_states_in_process(fake_gpus, monkeypatch):
    """One SmiBackend across samples: reset required, init failure, a hang that times out, recovery."""
    fake_gpus.add_gpu(16384)
    script = fake_gpus.install_smi()
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_gpus.state))
    backend = gpu.SmiBackend(str(script), call_timeout_s=0.5)
    assert backend.sample()["gpus"][0]["health"] == "ok"
    fake_gpus.reset_required(0)
    assert backend.sample()["gpus"][0]["health"] == "reset-required"
    fake_gpus.reset_required(0, False)
    fake_gpus.fail_init()
    s = backend.sample()
    assert s["error"].startswith("init-failed: NVIDIA-SMI has failed") and s["gpus"][0]["health"] == "init-failed"
    fake_gpus.fail_init(False)
    fake_gpus.hang(3)
    t0 = time.monotonic()
    s = backend.sample()
    assert time.monotonic() - t0 < 2 and s["error"].startswith("timeout:")
    assert s["gpus"][0]["health"] == "error:timeout"
    fake_gpus.hang(0)
    s = backend.sample()
    assert s["error"] is None and s["gpus"][0]["health"] == "ok"


def test_no_gpu_is_a_normal_state(fake_gpus, tmp_path):
    env = fake_gpus.env
    del env["LD_LIBRARY_PATH"]
    env["PATH"] = str(tmp_path)  # no nvidia-smi either
    s = run_py(SAMPLE.format(prefer="auto", timeout=5), env)
    assert (s["backend"], s["source"], s["error"], s["gpus"]) == ("NoGpuBackend", "none", None, [])
    s = run_py(SAMPLE.format(prefer="nvidia-smi", timeout=5), env)
    assert s["source"] == "none" and s["error"].startswith("nvidia-smi-missing")
    s = run_py(SAMPLE.format(prefer="none", timeout=5), fake_gpus.env)
    assert (s["source"], s["error"], s["gpus"]) == ("none", None, [])


def test_nvml_preferred_but_missing_library_is_an_error(fake_gpus):
    if not HAVE_PYNVML:
        pytest.skip("no pynvml binding")
    env = fake_gpus.env
    del env["LD_LIBRARY_PATH"]
    s = run_py(SAMPLE.format(prefer="nvml", timeout=5), env)
    assert s["source"] == "nvml" and s["error"] == "init-failed: NVML Shared Library Not Found"


def test_pypi_pynvml_package_is_refused(fake_gpus, tmp_path):
    """The old PyPI 'pynvml' is a package with its own copy of the binding: refused, nvidia-smi used instead."""
    fake_gpus.add_gpu(16384)
    shim = tmp_path / "site" / "pynvml"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("from .nvml import *\n")
    (shim / "nvml.py").write_text("def nvmlInit():\n    raise SystemExit('the shim was used')\n")
    fake_gpus.install_smi()
    env = fake_gpus.env
    env["PYTHONPATH"] = str(tmp_path / "site")
    s = run_py(SAMPLE.format(prefer="nvml", timeout=5), env)
    assert s["source"] == "none" and s["error"].startswith("pynvml-refused:") and "nvidia-ml-py" in s["error"]
    s = run_py(SAMPLE.format(prefer="auto", timeout=5), env)
    assert s["backend"] == "SmiBackend" and s["gpus"][0]["health"] == "ok" and "pynvml-refused" in s["note"]


def test_pynvml_redirector_hook_is_refused_before_import(fake_gpus):
    """The newer shim installs an import hook (_pynvml_redirector) that warns on import: detected, never fired."""
    code = """
import json, sys, warnings
class PynvmlFinder:
    def find_spec(self, name, path, target=None):
        if name.startswith("pynvml"):
            warnings.warn("The pynvml package is deprecated", FutureWarning)
        return None
sys.meta_path.insert(0, PynvmlFinder())
from gpu_router.daemon import gpu_backends as gpu
module, reason = gpu.import_pynvml()
print(json.dumps([module is None, reason, "pynvml" in sys.modules]))
"""
    refused, reason, imported = run_py(code, fake_gpus.env)
    assert refused and reason.startswith("pynvml-refused:") and not imported


# ---------------------------------------------------------------- the fake job

def job(fake, vram, seconds=0, visible="0", log=None, *extra, device=None):
    env = fake.env
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return subprocess.run(fake.job_cmd(vram, seconds, *extra, log=log, device=device), env=env,
                          capture_output=True, text=True, timeout=30)


def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_fake_job_oom_when_it_does_not_fit(fake_gpus, tmp_path):
    fake_gpus.add_gpu(8192)
    fake_gpus.set_foreign(0, 4096)
    log = tmp_path / "jobs.log"
    ok = job(fake_gpus, 4096, 0, "0", log)
    assert ok.returncode == 0, ok.stderr  # exactly fits: foreign + mine == total
    oom = job(fake_gpus, 4097, 0, "0", log)
    assert oom.returncode == 1
    assert "CUDA out of memory. Tried to allocate 4097 MiB" in oom.stderr
    assert [e["event"] for e in read_log(log)] == ["start", "finish", "oom"]


def test_fake_job_device_selection(fake_gpus, tmp_path):
    fake_gpus.add_gpu(8192)
    fake_gpus.add_gpu(4096)
    log = tmp_path / "jobs.log"
    assert job(fake_gpus, 4000, 0, fake_gpus.uuid(1), log).returncode == 0       # by UUID
    assert job(fake_gpus, 4000, 0, "1", log).returncode == 0                     # by index
    assert job(fake_gpus, 1000, 0, "", log).returncode == 0                      # empty: CPU, claims nothing
    assert job(fake_gpus, 1000, 0, "0", log, device="cpu").returncode == 0       # --device cpu
    r = job(fake_gpus, 1000, 0, "GPU-nope", log)
    assert r.returncode == 1 and "no CUDA-capable device" in r.stderr
    events = read_log(log)
    assert [(e["event"], e["gpu"]) for e in events[:4]] == [("start", 1), ("finish", 1), ("start", 1), ("finish", 1)]
    assert [(e["event"], e["gpu"], e["vram_mb"]) for e in events[4:8]] == [
        ("start", None, 0), ("finish", None, 0), ("start", None, 0), ("finish", None, 0)]
    assert events[8]["event"] == "no-device"


def test_fake_job_sigkill_frees_claim(fake_gpus):
    fake_gpus.add_gpu(8192)
    proc = fake_gpus.start_job(6000, 60, gpu=0)
    assert fake_gpus.claims() == [(0, proc.pid, 6000)] and fake_gpus.used_mb(0) == 6000
    assert job(fake_gpus, 4000, 0, "0").returncode == 1  # held: no room
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fake_gpus.claims() == [] and fake_gpus.used_mb(0) == 0
    assert job(fake_gpus, 4000, 0, "0").returncode == 0


def test_fake_job_sigterm_releases_claim(fake_gpus):
    fake_gpus.add_gpu(8192)
    proc = fake_gpus.start_job(6000, 60, gpu=0)
    proc.terminate()
    assert proc.wait(10) == 143
    assert os.listdir(fake_gpus.state / "claims") == []


def test_zombie_and_recycled_pid_do_not_hold_claims(fake_gpus):
    """A dead-but-unreaped job frees its VRAM (as the driver does at exit); a reused PID inherits nothing."""
    fake_gpus.add_gpu(8192)
    proc = fake_gpus.start_job(5000, 60, gpu=0)
    os.kill(proc.pid, signal.SIGKILL)
    FakeGpus.wait_for(lambda: fake_gpus.claims() == [])  # not reaped yet: a zombie, claim already gone
    proc.wait()
    # A claim file naming a live PID with another start time (what a recycled PID looks like)
    (fake_gpus.state / "claims" / f"0.{os.getpid()}.1").write_text("5000\n")
    assert fake_gpus.claims() == [] and fake_gpus.used_mb(0) == 0


def test_concurrent_jobs_claim_atomically(fake_gpus, tmp_path):
    fake_gpus.add_gpu(16384)
    log = tmp_path / "jobs.log"
    env = fake_gpus.env
    env["CUDA_VISIBLE_DEVICES"] = "0"
    procs = [subprocess.Popen(fake_gpus.job_cmd(4000, 1.0, log=log), env=env, stderr=subprocess.DEVNULL)
             for _ in range(6)]
    codes = sorted(p.wait(30) for p in procs)
    assert codes == [0, 0, 0, 0, 1, 1]
    events = [e["event"] for e in read_log(log)]
    assert events.count("start") == 4 and events.count("oom") == 2 and events.count("finish") == 4


def test_fake_job_accepts_profile_arguments(fake_gpus, tmp_path):
    fake_gpus.add_gpu(8192)
    log = tmp_path / "jobs.log"
    r = job(fake_gpus, 100, 0, "0", log, "--compute_type", "float16", "input.wav", device="cuda")
    assert r.returncode == 0, r.stderr
    start = read_log(log)[0]
    assert start["inputs"] == ["float16", "input.wav"] and start["gpu"] == 0


def test_fake_library_answers_first_process_query_with_insufficient_size(nvml):
    """The binding's two-call pattern: without INSUFFICIENT_SIZE on the buffer-less call it would return []."""
    import ctypes

    nvml.add_gpu(8192)
    proc = nvml.start_job(100, 60, gpu=0)
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")  # the already-loaded fake, found by soname
        assert lib.nvmlInit_v2() == 0
        handle = ctypes.c_void_p()
        assert lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) == 0
        count = ctypes.c_uint(0)
        assert lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), None) == 7
        assert count.value == 1
        assert lib.nvmlShutdown() == 0
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_utilization_reaches_the_snapshot_and_the_metrics(nvml, tmp_path):
    """GPU utilisation (issue 14): NVML's busy percentage → snapshot → gpu_router_gpu_utilization_ratio."""
    from gpu_router.daemon import metrics, monitor

    nvml.add_gpu(16384)
    nvml.set_utilization(0, 37)
    m = monitor.Monitor(nvml.backend(), snapshot_path=None)
    snap = m.sample_once()
    assert snap["gpus"][0]["utilization"] == 37
    exported = metrics.Metrics(str(tmp_path / "state"))
    exported.update(None, snap, [])
    line = f'gpu_router_gpu_utilization_ratio{{gpu="0",uuid="{nvml.uuid(0)}"}} 0.37'
    assert line in exported.text()


def test_gpu_health_changes_are_counted_from_the_monitors_events(nvml, tmp_path):
    """The monitor's gpu-health events (a lost GPU, then back) as journald stores them → a counter per health."""
    from gpu_router import journal
    from gpu_router.daemon import metrics, monitor

    nvml.add_gpu(16384)
    got = []
    mon = monitor.Monitor(nvml.backend(), snapshot_path=None,
                          emit=lambda event, message, fields: got.append(journal.build_fields(event, message, fields)))
    mon.sample_once()
    nvml.lose(0)
    mon.sample_once()
    nvml.lose(0, on=False)
    mon.sample_once()
    exported = metrics.Metrics(str(tmp_path / "state"))
    for pairs in got:  # as journald hands them back: text fields (build_fields gives bytes)
        exported.count_event(journal.decode_native(journal.encode_native(pairs)))
    text = exported.text()
    assert 'gpu_router_gpu_health_changes_total{gpu="0",health="gpu-lost"} 1.0' in text
    assert 'gpu_router_gpu_health_changes_total{gpu="0",health="ok"} 1.0' in text
