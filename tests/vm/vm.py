"""cgroup v2 lane: Debian bookworm booted in a qemu VM (TCG), gpu-router's .deb installed, a payload run inside.

This machine's kernel mounts cgroup v1, and a container shares the host's kernel, so the real cgroup v2 behaviour
(the one Debian 12 hosts run) needs a kernel of its own (DESIGN.md §5, "cgroup v2 in a VM"):

* the image: the nspawn lane's cached debootstrapped rootfs (``harness.ensure_rootfs``), copied, plus Debian's cloud
  kernel, initramfs-tools and udev installed in a chroot (network needed once), an fstab, and a payload unit; made
  into an ext4 image with ``mkfs.ext4 -d``. Cached in ``/var/cache/gpu-router-tests/vm-<key>/`` (kernel, initrd,
  root.img), keyed by the rootfs key and this recipe; built in a temporary folder and renamed into place;
* per run: a qcow2 overlay on the cached image (nothing reaches the cache), and a second virtio disk made with
  ``mkfs.ext4 -d PAYLOAD`` holding the .deb and the payload; the guest runs ``/work/run.sh`` as a oneshot unit
  after multi-user.target with ``SuccessAction=``/``FailureAction=poweroff``, writes under ``/work/out``, and
  the host reads that back with ``debugfs -R "rdump /out DEST"``;
* qemu: ``-accel tcg,thread=multi -cpu max`` (/dev/kvm here is PVM and hangs stock kernels), direct kernel boot.

Command line (root, Debian's /usr/bin/python3)::

    /usr/bin/python3 tests/vm/vm.py build            # build (or find) the cached image, print its folder
    /usr/bin/python3 tests/vm/vm.py clean            # drop cached images
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "systemd"))
import harness  # noqa: E402  (the nspawn lane's rootfs cache: one debootstrap for both lanes)

REPO = harness.REPO
CACHE_DIR = harness.CACHE_DIR
STATE_DIR = harness.STATE_DIR
VM_RECIPE = 1
# The rootfs the .deb installs into offline: the nspawn lane's package set plus what the .deb depends on beyond it.
ROOTFS_PACKAGES = harness.PACKAGES_WITH_METRICS
VM_PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "udev")
HOST_TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs", "chroot", "dpkg-buildpackage", "gcc")
ENV = {"PATH": harness.PATH, "LANG": "C.UTF-8", "HOME": "/root"}
# quiet/loglevel: an OOM kill's report on a serial console costs seconds under emulation.
CMDLINE = ("root=/dev/vda rw console=ttyS0 panic=-1 quiet loglevel=3 systemd.unified_cgroup_hierarchy=1 "
           "systemd.show_status=error net.ifnames=0")

PAYLOAD_UNIT = """[Unit]
Description=gpu-router VM lane payload
After=multi-user.target
RequiresMountsFor=/work
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh /work/run.sh
StandardOutput=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""

FSTAB = """/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1
/dev/vdb /work ext4 rw,noatime 0 0
"""


class VMError(RuntimeError):
    """The lane itself failed (build, boot, read-back): not a failure of the code under test."""


def unavailable_reason() -> str | None:
    why = harness.unavailable_reason()
    if why:
        return why
    for tool in HOST_TOOLS:
        if shutil.which(tool, path=harness.PATH) is None:
            return f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils e2fsprogs dpkg-dev)"
    return None


def lane_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("GPU_ROUTER_REQUIRE_VM") == "1"


def require_lane() -> None:
    import pytest

    why = unavailable_reason()
    if why is None:
        return
    if lane_required():
        pytest.fail(f"the cgroup v2 VM lane is required here (CI / GPU_ROUTER_REQUIRE_VM=1) but cannot run: {why}",
                    pytrace=False)
    pytest.skip(f"VM lane: {why}")


def _run(cmd, *, timeout=600, **kw):
    r = subprocess.run(cmd, env=kw.pop("env", ENV), capture_output=True, text=True, timeout=timeout, **kw)
    if r.returncode:
        raise VMError(f"{cmd} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def image_key(rootfs_packages=ROOTFS_PACKAGES) -> str:
    spec = {"rootfs": harness.rootfs_key(rootfs_packages), "packages": sorted(VM_PACKAGES), "recipe": VM_RECIPE,
            "unit": PAYLOAD_UNIT, "fstab": FSTAB}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def image_path(rootfs_packages=ROOTFS_PACKAGES) -> pathlib.Path:
    return CACHE_DIR / f"vm-{image_key(rootfs_packages)}"


def ensure_image(log=print, rootfs_packages=ROOTFS_PACKAGES) -> pathlib.Path:
    """Folder with vmlinuz, initrd.img and root.img (raw ext4), building it from the cached rootfs if needed
    (``rootfs_packages``: another lane's package set, e.g. the Slurm lane's, gets an image of its own)."""
    final = image_path(rootfs_packages)
    if (final / "root.img").exists():
        return final
    rootfs = harness.ensure_rootfs(rootfs_packages)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "root.img").exists():
            return final
        for stale in CACHE_DIR.glob(f".tmp-{final.name}-*"):
            harness._unmount_all_under(stale)
            harness._rmtree(stale)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=CACHE_DIR))
        try:
            t0 = time.monotonic()
            root = tmp / "root"
            _run(["cp", "-a", str(rootfs), str(root)])
            _install_kernel(root)
            (root / "etc/fstab").write_text(FSTAB)
            (root / "work").mkdir(exist_ok=True)
            unit = root / "etc/systemd/system/gpu-router-vm-payload.service"
            unit.write_text(PAYLOAD_UNIT)
            wants = root / "etc/systemd/system/multi-user.target.wants"
            wants.mkdir(parents=True, exist_ok=True)
            (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
            (root / "etc/hostname").write_text("gpu-router-vm\n")
            boot = sorted((root / "boot").glob("vmlinuz-*"))[-1]
            shutil.copy2(boot, tmp / "vmlinuz")
            shutil.copy2(root / "boot" / boot.name.replace("vmlinuz", "initrd.img"), tmp / "initrd.img")
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "gpurouter", "-d", str(root),
                  str(tmp / "root.img"), "1600M"])
            harness._rmtree(root)
            os.sync()
            os.rename(tmp, final)
            log(f"VM image built in {time.monotonic() - t0:.1f} s: {final}")
        finally:
            if tmp.exists():
                harness._unmount_all_under(tmp)
                harness._rmtree(tmp)
    return final


def _install_kernel(root: pathlib.Path) -> None:
    mounts = [("proc", "proc"), ("sysfs", "sys")]
    done = []
    try:
        for fstype, where in mounts:
            _run(["mount", "-t", fstype, fstype, str(root / where)])
            done.append(root / where)
        _run(["mount", "--bind", "/dev", str(root / "dev")])
        done.append(root / "dev")
        chroot = ["chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive"]
        _run(chroot + ["apt-get", "-q", "update"], timeout=300)
        _run(chroot + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *VM_PACKAGES], timeout=900)
        _run(chroot + ["rm", "-rf", "/var/lib/apt/lists/"], timeout=60)
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-l", str(path)], env=ENV, capture_output=True)


def compile_static(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A static binary for the guest (its image has no compiler)."""
    _run(["gcc", "-O2", "-static", "-o", str(target), str(source)])
    return target


class Run:
    """One boot of the VM with a payload folder; ``out`` is the guest's /work/out after it powered off."""

    def __init__(self, payload: pathlib.Path, *, memory="3G", cpus=2, timeout=480, work_size="512M",
                 rootfs_packages=ROOTFS_PACKAGES):
        self.payload = pathlib.Path(payload)
        self.rootfs_packages = rootfs_packages
        self.memory = memory
        self.cpus = cpus
        self.timeout = timeout
        self.work_size = work_size
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="vm-", dir=STATE_DIR))
        self.out = self.dir / "out"
        self.console = self.dir / "console.log"
        self.timings = {}

    def boot(self) -> "Run":
        image = ensure_image(rootfs_packages=self.rootfs_packages)
        (self.payload / "out").mkdir(exist_ok=True)
        overlay = self.dir / "root.qcow2"
        work = self.dir / "work.img"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image / "root.img"), "-F", "raw",
              str(overlay)])
        _run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(self.payload), str(work), self.work_size])
        cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.cpus),
               "-m", self.memory, "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}",
               "-no-reboot", "-nic", "none", "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
               "-append", CMDLINE,
               "-drive", f"file={overlay},if=virtio,format=qcow2",
               "-drive", f"file={work},if=virtio,format=raw"]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            qemu_out, _ = p.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            qemu_out, _ = p.communicate()
            timed_out = True
        self.timings["vm_s"] = time.monotonic() - t0
        # Read back what there is even after a timeout (the guest syncs as it goes): it says how far it got.
        r = subprocess.run(["debugfs", "-R", f"rdump /out {self.dir}", str(work)], env=ENV, capture_output=True,
                           text=True, timeout=120)
        if timed_out:
            raise VMError(f"the VM did not power off within {self.timeout} s\n--- payload.log ---\n"
                          f"{self.read('payload.log')[-3000:]}\n--- pytest.log ---\n{self.read('pytest.log')[-6000:]}"
                          f"\n--- console ---\n{self.console_tail(3000)}")
        if p.returncode:
            raise VMError(f"qemu exited {p.returncode}: {qemu_out.decode(errors='replace')[-2000:]}")
        if r.returncode or not self.out.is_dir():
            raise VMError(f"cannot read /out back from the work disk: {r.stderr[-2000:]}")
        overlay.unlink()
        work.unlink()
        return self

    def console_tail(self, n=6000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def read(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.exists() else ""

    def clean(self) -> None:
        if os.environ.get("GPU_ROUTER_TEST_KEEP") != "1":
            harness._rmtree(self.dir)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        print(ensure_image())
        return 0
    if argv[:1] == ["clean"]:
        for path in CACHE_DIR.glob("vm-*"):
            harness._rmtree(path)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
