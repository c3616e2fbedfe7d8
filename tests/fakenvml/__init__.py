"""Fake GPUs for tests: a fake libnvidia-ml.so.1 built from C, its state directory, a fake nvidia-smi and a fake job.

The real NVML binding (nvidia-ml-py or python3-pynvml, unmodified) loads ``libnvidia-ml.so.1`` by soname, and no
variable overrides that. So either a subprocess starts with ``LD_LIBRARY_PATH`` naming the built library's folder
(``FakeGpus.env``), or this process loads it by absolute path before pynvml does (``FakeGpus.preload()``): glibc then
hands the already-loaded object to the binding's ``CDLL("libnvidia-ml.so.1")`` because the soname matches.

The library re-reads the state folder ($FAKE_NVML_STATE) on every call; the format is described at the top of
fakenvml.c, and its Python side lives in fake_gpu_job.py (imported here) so the three agree.

    gpus = FakeGpus(tmp_path / "nvml")
    gpus.add_gpu(16384, name="NVIDIA Fake 16GB")   # -> 0
    gpus.set_foreign(0, 1024)
    subprocess.run([...], env=gpus.env)
"""

import ctypes
import hashlib
import os
import pathlib
import subprocess
import uuid as _uuid

import pytest

from .fake_gpu_job import accounted, gpu_dirs, gpu_info, live_claims, set_claim, try_claim  # noqa: F401

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "fakenvml.c"
JOB = HERE / "fake_gpu_job.py"
REPO = HERE.parent.parent
BUILD = REPO / ".build" / "fakenvml"
PYTHON = "/usr/bin/python3"
CFLAGS = ["-shared", "-fPIC", "-O2", "-Wall", "-Wl,-soname,libnvidia-ml.so.1"]

NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build_lib():
    """Compile fakenvml.c once per source/flags hash; returns the folder holding libnvidia-ml.so.1."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    folder = BUILD / digest
    lib = folder / "libnvidia-ml.so.1"
    if lib.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".libnvidia-ml.so.1.{os.getpid()}.tmp"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], check=True)
    os.replace(tmp, lib)  # atomic: parallel test processes never load a half-written library
    return folder


def _write(path, text):
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _switch(path, on, text=""):
    path = pathlib.Path(path)
    if on:
        _write(path, text)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class FakeGpus:
    """One fake GPU host: a state folder plus the built library. Every method changes the live state."""

    def __init__(self, state_dir):
        self.state = pathlib.Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "claims").mkdir(exist_ok=True)
        self.lib_dir = build_lib()
        self.lib_path = self.lib_dir / "libnvidia-ml.so.1"
        self.smi_dir = None

    # -------------------------------------------------------------- GPUs and faults

    def add_gpu(self, total_mb, name="NVIDIA Fake GPU", uuid=None):
        """Append a GPU; returns its index."""
        index = len(gpu_dirs(str(self.state)))
        folder = self.state / f"gpu{index}"
        folder.mkdir(exist_ok=True)
        uuid = uuid or f"GPU-{_uuid.uuid4()}"
        _write(folder / "info", f"{int(total_mb)}\n{uuid}\n{name}\n")  # info last: it makes the GPU exist
        return index

    def count(self):
        return len(gpu_dirs(str(self.state)))

    def uuid(self, gpu):
        return gpu_info(str(self.state), gpu)[1]

    def set_foreign(self, gpu, mb):
        """VRAM used on `gpu` by nothing NVML can show as a process (another container, driver overhead)."""
        _write(self.state / f"gpu{gpu}" / "foreign_mb", f"{int(mb)}\n")

    def set_utilization(self, gpu, percent):
        """What nvmlDeviceGetUtilizationRates reports as the GPU's busy percentage."""
        _write(self.state / f"gpu{gpu}" / "utilization", f"{int(percent)}\n")

    def fail_init(self, on=True, code=NVML_ERROR_DRIVER_NOT_LOADED):
        """nvmlInit* fail with `code` (and the fake nvidia-smi fails like a missing driver)."""
        _switch(self.state / "init_error", on, f"{code}\n")

    def lose(self, gpu, on=True):
        """The GPU fell off the bus: its calls answer NVML_ERROR_GPU_IS_LOST."""
        _switch(self.state / f"gpu{gpu}" / "lost", on)

    def reset_required(self, gpu, on=True):
        _switch(self.state / f"gpu{gpu}" / "reset", on)

    def hang(self, seconds, gpu=None):
        """Every call (gpu=None: init and all) or every call on `gpu` sleeps `seconds` first; 0 turns it off."""
        path = self.state / "hang" if gpu is None else self.state / f"gpu{gpu}" / "hang"
        _switch(path, seconds > 0, f"{seconds}\n")

    def xid(self, gpu, code):
        """Raise Xid `code` on `gpu`: event sets registered for Xid events deliver it once each."""
        with open(self.state / f"gpu{gpu}" / "xid", "a") as f:
            f.write(f"{int(code)}\n")

    # -------------------------------------------------------------- the driver's per-process accounting

    def set_accounting(self, gpu, on=True):
        """Accounting mode as the driver holds it (off by default, as after a driver load); off clears the ring."""
        _write(self.state / f"gpu{gpu}" / "accounting", "1\n" if on else "0\n")
        if not on:
            for f in (self.state / f"gpu{gpu}" / "accounted").glob("*"):
                f.unlink()

    def accounting_mode(self, gpu):
        path = self.state / f"gpu{gpu}" / "accounting"
        return path.exists() and path.read_text().strip() == "1"

    def deny_accounting(self, gpu, on=True):
        """nvmlDeviceSetAccountingMode answers NO_PERMISSION (what a non-root agent always gets)."""
        _switch(self.state / f"gpu{gpu}" / "accounting_denied", on)

    def accounting_unsupported(self, gpu, on=True):
        """Every accounting call answers NOT_SUPPORTED (MIG, vGPU, GPUs before Kepler)."""
        _switch(self.state / f"gpu{gpu}" / "accounting_unsupported", on)

    def set_accounting_buffer(self, gpu, size):
        _write(self.state / f"gpu{gpu}" / "accounting_buffer", f"{int(size)}\n")

    def accounted(self, gpu):
        """{pid: max_mb} of the accounting ring (newest record per PID), as the driver would answer."""
        return {pid: mb for _seq, pid, _start, mb, _b, _l in accounted(str(self.state), gpu)}

    def set_driver(self, version):
        _write(self.state / "driver", version + "\n")

    # -------------------------------------------------------------- memory

    def claims(self):
        """[(gpu, pid, mb)] of live claims (dead or recycled holders are not listed)."""
        return live_claims(str(self.state))

    def claim(self, gpu, mb, pid=None):
        """Claim VRAM for an existing process (default: this one), as the fake job does; returns True if it fit."""
        return try_claim(str(self.state), gpu, mb, pid)[0]

    def used_mb(self, gpu):
        foreign = gpu_info(str(self.state), gpu)[3]
        return foreign + sum(mb for g, _pid, mb in self.claims() if g == gpu)

    # -------------------------------------------------------------- processes that use it

    @property
    def env(self):
        """Environment for a subprocess that must load the fake library (PATH without pyenv shims)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ROUTER_")}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env["PATH"] = (f"{self.smi_dir}:" if self.smi_dir else "") + CLEAN_PATH
        env["LD_LIBRARY_PATH"] = str(self.lib_dir)
        env["FAKE_NVML_STATE"] = str(self.state)
        return env

    @property
    def env_smi_only(self):
        """Environment with the fake nvidia-smi on PATH and no loadable libnvidia-ml (the fallback path)."""
        if not self.smi_dir:
            self.install_smi()
        env = self.env
        del env["LD_LIBRARY_PATH"]
        return env

    def preload(self):
        """Load the fake library into this process (before pynvml loads anything) and point it at this state.

        The library stays loaded for the process's life (a later test's pynvml gets it too); the `fake_gpus`
        fixture puts $FAKE_NVML_STATE back afterwards, and without it the fake answers DRIVER_NOT_LOADED.
        """
        ctypes.CDLL(str(self.lib_path), mode=ctypes.RTLD_GLOBAL)
        os.environ["FAKE_NVML_STATE"] = str(self.state)
        return self

    def install_smi(self, folder=None):
        """Write a fake `nvidia-smi` into `folder` (default STATE/../smi-bin); `env` then puts it on PATH."""
        folder = pathlib.Path(folder or self.state.parent / f"{self.state.name}-smi-bin")
        folder.mkdir(parents=True, exist_ok=True)
        script = folder / "nvidia-smi"
        _write(script, SMI_TEMPLATE.replace("@FAKEDIR@", repr(str(HERE))).replace("@STATE@", repr(str(self.state))))
        script.chmod(0o755)
        self.smi_dir = folder
        return script

    def job_cmd(self, vram, seconds, *extra, log=None, device=None):
        """argv of a fake job (see fake_gpu_job.py)."""
        cmd = [PYTHON, str(JOB), "--vram", str(vram), "--seconds", str(seconds)]
        if device:
            cmd += ["--device", device]
        if log:
            cmd += ["--log", str(log)]
        return cmd + [str(e) for e in extra]

    def start_job(self, vram, seconds, gpu=0, log=None, wait_claim=True, **popen):
        """Start a fake job on `gpu` (CUDA_VISIBLE_DEVICES=gpu) and, by default, wait until its claim shows."""
        env = dict(popen.pop("env", None) or self.env)
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        proc = subprocess.Popen(self.job_cmd(vram, seconds, log=log), env=env, **popen)
        if wait_claim:
            self.wait_for(lambda: any(p == proc.pid for _g, p, _m in self.claims()) or proc.poll() is not None)
        return proc

    @staticmethod
    def wait_for(predicate, timeout=10.0, step=0.02):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(step)
        raise AssertionError("condition not reached in time")


# The fake nvidia-smi: answers the two queries gpu-router's fallback makes, from the same state folder.
SMI_TEMPLATE = r'''#!/usr/bin/python3
"""Fake nvidia-smi (tests/fakenvml): --query-gpu / --query-compute-apps with --format=csv,noheader,nounits."""
import os, sys, time
sys.path.insert(0, @FAKEDIR@)
import fake_gpu_job as s

state = os.environ.get("FAKE_NVML_STATE") or @STATE@


def hang(path):
    try:
        with open(path) as f:
            time.sleep(float(f.read().strip() or 0))
    except (OSError, ValueError):
        pass


def set_accounting(argv):
    """nvidia-smi [-i N] -am 0|1: root only; prints what the real one prints."""
    value = argv[argv.index("-am") + 1] if argv.index("-am") + 1 < len(argv) else ""
    ids = [argv[argv.index(o) + 1] for o in ("-i", "--id") if o in argv]
    targets = range(len(s.gpu_dirs(state))) if not ids else [int(x) for x in ids[0].split(",")]
    rc = 0
    for i in targets:
        folder = os.path.join(state, f"gpu{i}")
        bus = "00000000:%02X:00.0" % (i + 1)
        if os.path.exists(os.path.join(folder, "accounting_unsupported")):
            print(f"Setting accounting mode is not supported for GPU {bus}.")
            rc = 3
        elif os.geteuid() != 0 or os.path.exists(os.path.join(folder, "accounting_denied")):
            print(f"Unable to set the accounting mode for GPU {bus}: Insufficient Permissions")
            rc = 4
        else:
            with open(os.path.join(folder, "accounting"), "w") as f:
                f.write(("1" if value == "1" else "0") + "\n")
            os.makedirs(os.path.join(folder, "accounted"), exist_ok=True)
            os.chmod(os.path.join(folder, "accounted"), 0o1777)  # every user's jobs write their records
            word = "Enabled" if value == "1" else "Disabled"
            print(f"{word} Accounting Mode for GPU {bus}.")
    return rc


def main(argv):
    hang(os.path.join(state, "hang"))
    if "-am" in argv:
        return set_accounting(argv)
    if os.path.exists(os.path.join(state, "init_error")):
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
              "Make sure that the latest NVIDIA driver is installed and running.")
        return 9
    query = next((a.split("=", 1)[1] for a in argv if a.startswith("--query-")), None)
    kind = next((a.split("=", 1)[0] for a in argv if a.startswith("--query-")), None)
    if not query:
        print("fake nvidia-smi: only --query-gpu / --query-compute-apps are provided", file=sys.stderr)
        return 2
    fields = [f.strip() for f in query.split(",")]
    units = "nounits" not in "".join(argv)
    rc = 0
    rows = []
    uuids = {}
    for i, folder in enumerate(s.gpu_dirs(state)):
        hang(os.path.join(folder, "hang"))
        total, uuid, name, foreign = s.gpu_info(state, i)
        uuids[i] = uuid
        bus = "00000000:%02X:00.0" % (i + 1)
        if os.path.exists(os.path.join(folder, "lost")):
            print("Unable to determine the device handle for GPU%s: GPU is lost.  "
                  "Reboot the system to recover this GPU" % bus, file=sys.stderr)
            rc = 15
            uuids.pop(i)
            continue
        reset = os.path.exists(os.path.join(folder, "reset"))
        if kind != "--query-gpu":
            continue
        used = foreign + sum(m for g, _p, m in s.live_claims(state) if g == i)
        mib = (lambda v: "[GPU requires reset]" if reset else (f"{v} MiB" if units else str(v)))
        unsupported = os.path.exists(os.path.join(folder, "accounting_unsupported"))
        mode = "[N/A]" if unsupported else ("Enabled" if s.accounting_on(state, i) else "Disabled")
        values = {"index": str(i), "uuid": uuid, "name": name, "memory.total": mib(total),
                  "accounting.mode": mode, "accounting.buffer_size": "[N/A]" if unsupported else "4000",
                  "memory.used": mib(used), "memory.free": mib(max(total - used, 0)),
                  "driver_version": "550.54.15", "pci.bus_id": bus, "count": str(len(s.gpu_dirs(state)))}
        rows.append([values.get(f, "[Not Supported]") for f in fields])
    if kind == "--query-compute-apps":
        for gpu, pid, mb in s.live_claims(state):
            if gpu not in uuids:
                continue
            values = {"pid": str(pid), "used_memory": f"{mb} MiB" if units else str(mb),
                      "gpu_uuid": uuids[gpu], "gpu_bus_id": "00000000:%02X:00.0" % (gpu + 1),
                      "process_name": "python3"}
            rows.append([values.get(f, "[Not Supported]") for f in fields])
    if kind == "--query-accounted-apps":
        odd = os.path.join(state, "smi_accounted_odd")  # a test's verbatim rows: [N/A], [Not Supported], junk
        if os.path.exists(odd):
            with open(odd) as f:
                sys.stdout.write(f.read())
        for gpu in sorted(uuids):
            if not s.accounting_on(state, gpu):
                continue  # the real one lists nothing for a GPU whose accounting mode is off
            for _seq, pid, _start, mb, _began, _last in s.accounted(state, gpu):
                values = {"pid": str(pid), "max_memory_usage": f"{mb} MiB" if units else str(mb),
                          "gpu_uuid": uuids[gpu], "gpu_bus_id": "00000000:%02X:00.0" % (gpu + 1),
                          "gpu_name": "Fake", "time": "0"}
                rows.append([values.get(f, "[Not Supported]") for f in fields])
    for row in rows:
        print(", ".join(row))
    return rc


sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture
def fake_gpus(tmp_path):
    """A FakeGpus with an empty state under tmp_path (add GPUs with add_gpu)."""
    saved = os.environ.get("FAKE_NVML_STATE")
    gpus = FakeGpus(tmp_path / "nvml-state")
    yield gpus
    if saved is None:  # preload() points this process's fake library here; undo that
        os.environ.pop("FAKE_NVML_STATE", None)
    else:
        os.environ["FAKE_NVML_STATE"] = saved


def have_pynvml():
    """Whether Debian's /usr/bin/python3 can import a pynvml binding (tests that need it skip otherwise)."""
    return subprocess.run([PYTHON, "-c", "import pynvml"], capture_output=True).returncode == 0


__all__ = ["FakeGpus", "build_lib", "fake_gpus", "have_pynvml", "JOB", "PYTHON", "SMI_TEMPLATE"]
