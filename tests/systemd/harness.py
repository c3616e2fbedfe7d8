"""Real-systemd test lane: Debian bookworm's systemd booted in systemd-nspawn.

The host's PID 1 is not systemd and its cgroups are v1/hybrid, so the things gpu-router does with systemd
(transient scopes with MemoryMax, the agent service, journald fields, installing the .deb) are tested inside a
container that boots a real systemd:

* a base rootfs made by ``debootstrap --variant=minbase``, cached under ``/var/cache/gpu-router-tests/`` keyed by a
  hash of the package list and built in a temporary directory that is renamed into place (atomic: a directory with
  the final name is always complete);
* per container a fresh overlayfs (lower = the cached rootfs, upper/work in a state directory under
  ``/var/tmp/gpu-router-tests/``), so nothing a test does reaches the cache;
* the launching process in dedicated child cgroups (memory, pids, name=systemd, unified) of the caller's own, with a
  memory and a pids cap, so a runaway test cannot hurt the host;
* PID 1 is ``/bin/sh -c 'mount -o remount,rw,bind …memory; …pids; exec /lib/systemd/systemd'``: without the
  remount systemd accepts MemoryMax= but cannot write the v1 limit;
* commands run inside through ``nsenter -t LEADER -a`` (placed first in the container's own cgroups, so they count
  against its caps and systemd inside may move them into scopes), or as units through
  ``systemd-run --wait --pipe --collect``.

Every step is undone by ``stop()``; a state directory whose owner died without cleaning up (SIGKILL) is reaped by
the next ``start()`` or by ``python3 tests/systemd/harness.py clean``.

Command line (run as root, with Debian's /usr/bin/python3)::

    /usr/bin/python3 tests/systemd/harness.py build     # build (or find) the cached rootfs, print its path
    /usr/bin/python3 tests/systemd/harness.py shell     # boot a container and open a shell inside it
    /usr/bin/python3 tests/systemd/harness.py clean [--cache]   # reap leftovers (and drop cached rootfs)
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Iterable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("GPU_ROUTER_TEST_MIRROR", "http://deb.debian.org/debian")
CACHE_DIR = pathlib.Path(os.environ.get("GPU_ROUTER_TEST_CACHE", "/var/cache/gpu-router-tests"))
STATE_DIR = pathlib.Path(os.environ.get("GPU_ROUTER_TEST_STATE", "/var/tmp/gpu-router-tests"))

# Bump when _finish_rootfs() changes what a cached rootfs contains: it is part of the cache key.
RECIPE_VERSION = 2

# What the base rootfs holds. The gpu-router .deb depends on python3-pystemd, python3-structlog, python3-tomli-w,
# python3-sdnotify and python3-systemd: all here, so `apt install ./gpu-router_*.deb` needs no network. adduser is
# here because Debian maintainer scripts commonly call it (system user/group creation); python3-pytest so tests can
# also be run inside (`python3 -m pytest /src/...`).
PACKAGES: tuple[str, ...] = (
    "adduser",
    "apt",
    "ca-certificates",
    "dbus",
    "passwd",
    "procps",
    "python3",
    "python3-pystemd",
    "python3-pytest",
    "python3-sdnotify",
    "python3-structlog",
    "python3-systemd",
    "python3-tomli-w",
    "systemd",
    "systemd-sysv",
    "util-linux",
)

# PACKAGES plus what the .deb depends on beyond them (python3-prometheus-client, for the agent's metrics): the
# lanes that install the .deb or export metrics use this set, so the other lanes' cached rootfs stays valid.
PACKAGES_WITH_METRICS: tuple[str, ...] = PACKAGES + ("python3-prometheus-client",)

# Units that only get in a test's way: periodic apt runs would take the dpkg lock under an `apt install` test.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
)

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
# The hierarchies the container gets its own child cgroup in ("" is the cgroup2/unified one).
HIERARCHIES = ("memory", "pids", "name=systemd", "")

# systemd-nspawn makes /run/systemd/nspawn/propagate/NAME on the host and refuses to remove it where /run is no
# tmpfs (as on these machines): the harness removes it.
PROPAGATE_DIR = pathlib.Path("/run/systemd/nspawn/propagate")

PID1_COMMAND = (
    "mount -o remount,rw,bind /sys/fs/cgroup/memory; "
    "mount -o remount,rw,bind /sys/fs/cgroup/pids; "
    "exec /lib/systemd/systemd"
)


class HarnessError(RuntimeError):
    """The lane itself could not do its job (build, boot, clean-up): not a failure of the code under test."""


class CommandError(subprocess.CalledProcessError):
    """A command inside the container failed; str() shows its output, which is what a failing test needs."""

    def __str__(self) -> str:
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        return (f"command {cmd!r} exited with {self.returncode}\n"
                f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}")


# ----------------------------------------------------------------------------------------------------------------
# Why the lane cannot run here


def build_deb(base: pathlib.Path, version: str | None = None) -> pathlib.Path:
    """dpkg-buildpackage in a copy of the tree (tracked + untracked-not-ignored files); version bumps changelog."""
    out = base / (version or "as-is")
    src = out / "src"
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for raw in filter(None, names):
        name = os.fsdecode(raw)
        if (REPO / name).is_symlink() or (REPO / name).exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name, follow_symlinks=False)
    if version:
        changelog = src / "debian/changelog"
        changelog.write_text(
            f"gpu-router ({version}) unstable; urgency=medium\n\n  * Test upgrade.\n\n"
            f" -- gpu-router tests <tests@example.org>  Thu, 27 Nov 2025 10:00:00 +0000\n\n"
            + changelog.read_text())
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                                            "LC_ALL": "C.UTF-8"})
    if proc.returncode:
        raise AssertionError(f"dpkg-buildpackage -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return next(out.glob("gpu-router_*_all.deb"))


def unavailable_reason() -> str | None:
    """None when this machine can run the lane, else why not (for pytest.skip / a loud CI failure)."""
    if sys.platform != "linux":
        return "the systemd lane needs Linux"
    if os.geteuid() != 0:
        return "the systemd lane needs root (overlay mounts, cgroups, systemd-nspawn)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "mount", "umount"):
        if shutil.which(tool, path=PATH) is None:
            return f"{tool} is not installed (apt-get install systemd-container debootstrap util-linux)"
    try:
        _own_cgroups()
    except HarnessError as exc:
        return str(exc)
    return None


def lane_required() -> bool:
    """In CI (env CI set) or with GPU_ROUTER_REQUIRE_SYSTEMD=1 the lane must run: unavailable is a failure."""
    return bool(os.environ.get("CI")) or os.environ.get("GPU_ROUTER_REQUIRE_SYSTEMD") == "1"


def require_lane() -> None:
    """For pytest: skip with the reason when this machine cannot run the lane, or fail where it is required."""
    import pytest

    why = unavailable_reason()
    if why is None:
        return
    if lane_required():
        pytest.fail(f"the systemd lane is required here (CI / GPU_ROUTER_REQUIRE_SYSTEMD=1) but cannot run: {why}",
                    pytrace=False)
    pytest.skip(f"systemd lane: {why}")


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    if extra:
        env.update(extra)
    return env


def _log(msg: str) -> None:
    if os.environ.get("GPU_ROUTER_TEST_VERBOSE"):
        print(f"[systemd-lane] {msg}", file=sys.stderr, flush=True)


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of each mount in this process's namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            out.append((_unescape_mount(fields[3]), _unescape_mount(fields[4]), rfields[0],
                        rfields[2] if len(rfields) > 2 else ""))
    return out


def _mounts_under(path: pathlib.Path) -> list[str]:
    """Mount points at or below path, deepest first."""
    p = str(path).rstrip("/")
    found = [mp for _, mp, _, _ in _mountinfo() if mp == p or mp.startswith(p + "/")]
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def _unmount_all_under(path: pathlib.Path) -> None:
    for _ in range(3):
        mounts = _mounts_under(path)
        if not mounts:
            return
        for mp in mounts:
            r = subprocess.run(["umount", mp], capture_output=True, text=True, env=_clean_env())
            if r.returncode != 0 and mp in _mounts_under(path):
                time.sleep(0.2)
                subprocess.run(["umount", "-l", mp], capture_output=True, env=_clean_env())
    left = _mounts_under(path)
    if left:
        raise HarnessError(f"could not unmount {left}")


def _rmtree(path: pathlib.Path) -> None:
    """rm -rf that refuses to descend into anything still mounted below path."""
    if not os.path.lexists(path):
        return
    _unmount_all_under(path)
    shutil.rmtree(path, ignore_errors=False, onerror=_rmtree_onerror)


def _rmtree_onerror(func, path, exc_info):  # chattr'ed or vanished files: retry once, then ignore vanished ones
    exc = exc_info[1]
    if isinstance(exc, FileNotFoundError):
        return
    raise exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_dead(pid: int | None, timeout: float = 5.0) -> bool:
    """Wait until pid is gone or a zombie (a container's PID 1 lingers while its namespace is torn down)."""
    if not pid:
        return True
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"bad size {size!r} (e.g. 4G, 512M, 1073741824)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


# ----------------------------------------------------------------------------------------------------------------
# The cached base rootfs


def rootfs_key(packages: Iterable[str] = PACKAGES, suite: str = SUITE) -> str:
    spec = {"suite": suite, "variant": "minbase", "packages": sorted(set(packages)),
            "masked": sorted(MASKED_UNITS), "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_path(packages: Iterable[str] = PACKAGES, suite: str = SUITE,
                cache_dir: pathlib.Path = CACHE_DIR) -> pathlib.Path:
    return cache_dir / f"{suite}-{rootfs_key(packages, suite)}"


def ensure_rootfs(packages: Iterable[str] = PACKAGES, suite: str = SUITE, cache_dir: pathlib.Path = CACHE_DIR,
                  mirror: str = MIRROR, timeout: float = 1800) -> pathlib.Path:
    """Path of a complete base rootfs for (suite, packages), building it first if the cache has none.

    Builders of the same key serialise on a lock file; the rootfs is made in ``.tmp-KEY-*`` and renamed to its
    final name only when complete, so a directory with the final name is always whole. Leftovers of aborted builds
    are removed by the next builder.
    """
    packages = sorted(set(packages))
    final = rootfs_path(packages, suite, cache_dir)
    if (final / "usr/lib/systemd/systemd").exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = final.name
    with open(cache_dir / f".lock-{key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "usr/lib/systemd/systemd").exists():
            return final
        for stale in cache_dir.glob(f".tmp-{key}-*"):
            _log(f"removing aborted build {stale}")
            _end_build_cgroup(stale)  # its builder died: what it started may still be writing there
            _rmtree(stale)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        try:
            _debootstrap(tmp, packages, suite, mirror, timeout)
            _finish_rootfs(tmp / "rootfs", packages, suite)
            if os.path.lexists(final):  # incomplete yet named as done (made by hand?): replace it
                _rmtree(final)
            os.sync()  # the contents are on disk before the name says "complete"
            os.rename(tmp / "rootfs", final)
            dir_fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            _end_build_cgroup(tmp)
            _rmtree(tmp)
    return final


def _build_cgroup(tmp: pathlib.Path) -> pathlib.Path | None:
    """A pids cgroup per build (at the hierarchy's top, so any later builder finds it by the build's name)."""
    mount = _cgroup_mounts().get("pids")
    return mount[1] / f"gpu-router-build-{tmp.name}" if mount else None


def _end_build_cgroup(tmp: pathlib.Path) -> None:
    cg = _build_cgroup(tmp)
    if cg is not None and cg.exists():
        _kill_cgroup_trees([cg])
        _remove_cgroup_tree(cg)


def _debootstrap(tmp: pathlib.Path, packages: Sequence[str], suite: str, mirror: str, timeout: float) -> None:
    target = tmp / "rootfs"
    log_path = tmp / "debootstrap.log"
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite, str(target), mirror]
    _log(f"building rootfs: {shlex.join(cmd)}")
    t0 = time.monotonic()
    cg = _build_cgroup(tmp)
    procs = None
    if cg is not None:
        cg.mkdir(exist_ok=True)
        procs = str(cg / "cgroup.procs")

    def enter_cgroup() -> None:  # debootstrap and all it starts, so an aborted build can be ended whole
        with open(procs, "w") as f:
            f.write("0")

    with open(log_path, "w") as log:
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               env=_clean_env({"DEBIAN_FRONTEND": "noninteractive"}), timeout=timeout,
                               preexec_fn=enter_cgroup if procs else None)
        except subprocess.TimeoutExpired:
            _end_build_cgroup(tmp)
            _unmount_all_under(target)
            raise HarnessError(f"debootstrap took more than {timeout:.0f} s") from None
        except BaseException:
            _end_build_cgroup(tmp)
            raise
    _unmount_all_under(target)  # debootstrap unmounts /proc, /sys on exit; be sure before any rm -rf
    if r.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        inner = target / "debootstrap/debootstrap.log"
        if inner.exists():
            tail += "\n--- debootstrap/debootstrap.log ---\n" + inner.read_text(errors="replace")[-4000:]
        raise HarnessError(f"debootstrap failed with {r.returncode}: {shlex.join(cmd)}\n{tail}")
    _log(f"debootstrap took {time.monotonic() - t0:.1f} s")


def _finish_rootfs(root: pathlib.Path, packages: Sequence[str], suite: str) -> None:
    # An empty machine-id: every boot gets a fresh transient id (systemd writes it to /run and bind-mounts it).
    (root / "etc/machine-id").write_text("")
    # debootstrap copies the host's /etc/hostname; without one the hostname is the machine name (-M).
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/hostname").unlink()
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_symlink() or dbus_id.exists():
        dbus_id.unlink()
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(link):
            link.unlink()
        link.symlink_to("/dev/null")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "src").mkdir(exist_ok=True)
    (root / "scratch").mkdir(exist_ok=True)
    (root / "etc/gpu-router-test-rootfs.json").write_text(json.dumps(
        {"suite": suite, "packages": list(packages), "recipe": RECIPE_VERSION, "built": time.time()}, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# cgroups (v1/hybrid host)


def _cgroup_mounts() -> dict[str, tuple[str, pathlib.Path]]:
    """For each hierarchy in HIERARCHIES that is mounted: (the mount's root cgroup, its mount point)."""
    mounts: dict[str, tuple[str, pathlib.Path]] = {}
    for root, mp, fstype, opts in _mountinfo():
        if fstype == "cgroup2":
            mounts.setdefault("", (root, pathlib.Path(mp)))
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt in HIERARCHIES:
                    mounts.setdefault(opt, (root, pathlib.Path(mp)))
    return mounts


def _parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/PID/cgroup as {hierarchy: path} ("" for the cgroup2 one)."""
    d = {}
    for line in text.splitlines():
        if line:
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                d[c] = path
    return d


def _cgroup_dirs(pid: int | str = "self") -> dict[str, pathlib.Path]:
    """For each hierarchy in HIERARCHIES: the host directory of pid's cgroup (as this process sees it)."""
    mounts = _cgroup_mounts()
    with open(f"/proc/{pid}/cgroup") as f:
        paths = _parse_proc_cgroup(f.read())
    if "memory" not in mounts or "memory" not in paths:
        if "" in mounts and mounts[""][1] == CGROUP_ROOT:
            raise HarnessError("this host has a pure cgroup v2 hierarchy; the lane is written for the v1/hybrid "
                               "hosts of DESIGN.md (see tests/systemd/README.md)")
        raise HarnessError("no cgroup v1 memory hierarchy mounted")
    out = {}
    for h in HIERARCHIES:
        if h not in mounts or h not in paths:
            raise HarnessError(f"cgroup hierarchy {h or 'unified'!r} is not mounted or {pid} is not in it")
        mroot, mp = mounts[h]
        rel = paths[h]
        if mroot != "/" and (rel == mroot or rel.startswith(mroot + "/")):
            rel = rel[len(mroot):]
        out[h] = mp / rel.lstrip("/")
    return out


def _own_cgroups() -> dict[str, pathlib.Path]:
    return _cgroup_dirs("self")


def _cgroup_procs(top: pathlib.Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, _ in os.walk(top):
        with contextlib.suppress(OSError):
            pids.update(int(x) for x in pathlib.Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _remove_cgroup_tree(top: pathlib.Path) -> list[str]:
    """rmdir top and every cgroup below it (deepest first); returns what could not be removed."""
    failed = []
    if not top.exists():
        return failed
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
        for attempt in range(20):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 19:
                    failed.append(f"{dirpath}: {exc.strerror}")
                    break
                time.sleep(0.05)
    return failed


def _kill_cgroup_trees(tops: Iterable[pathlib.Path], timeout: float = 5.0) -> set[int]:
    """SIGKILL every process in the given cgroup trees until they are empty; returns survivors."""
    deadline = time.monotonic() + timeout
    while True:
        pids = set()
        for top in tops:
            pids |= _cgroup_procs(top)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _in_other_pidns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _kill_inside(list_pids: Callable[[], list[int]], timeout: float = 3.0, sig: int = signal.SIGKILL) -> None:
    """Signal the processes list_pids() names that live in another pid namespace (the container's) until none
    is left (SIGKILL after timeout); processes of ours (nsenter) are left to reap their child and exit. Killing
    nsenter first would hand its child to the host's init, and a zombie nobody reaps stalls systemd's
    shutdown (it waits 10-90 s for processes that are not its children)."""
    deadline = time.monotonic() + timeout
    signalled: set[int] = set()
    while True:
        try:
            pids = [pid for pid in list_pids() if _in_other_pidns(pid)]
        except OSError:
            return
        if not pids:
            return
        late = time.monotonic() > deadline
        if late and sig == signal.SIGKILL:
            return
        for pid in pids:
            if late or pid not in signalled or sig == signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if late else sig)
                signalled.add(pid)
        if late:
            sig = signal.SIGKILL
            deadline = time.monotonic() + 2.0
        time.sleep(0.02)


def _process_group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rpartition(")")[2].split()[2]) == pgid:
                    members.append(int(entry))
    return members


def _kill_process_group(p: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 2.0) -> None:
    """End an nsenter started with its own process group: first what runs inside (sig, SIGKILL after
    timeout), then nsenter itself, which normally has exited by then."""
    deadline = time.monotonic() + 1.0  # just started? let nsenter fork its child first, or it is missed
    while p.poll() is None and time.monotonic() < deadline:
        if any(_in_other_pidns(pid) for pid in _process_group(p.pid)):
            break
        time.sleep(0.01)
    _kill_inside(lambda: _process_group(p.pid), timeout=timeout, sig=sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(1.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# Stale state from owners that died without cleaning up


def reap_stale(state_dir: pathlib.Path = STATE_DIR) -> list[str]:
    """Clean up containers whose owner process is gone (its lock on owner.lock is free). Returns what was reaped."""
    reaped = []
    if not state_dir.is_dir():
        return reaped
    for d in sorted(state_dir.iterdir()):
        lock_path = d / "owner.lock"
        if not d.is_dir() or not lock_path.exists():
            continue
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            state = {}
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((d / "state.json").read_text())
            cgroups = [pathlib.Path(p) for p in state.get("cgroups", [])]
            _kill_cgroup_trees(cgroups)
            _wait_dead(state.get("leader"))
            _unmount_all_under(d)
            for cg in cgroups:
                _remove_cgroup_tree(cg)
            if state.get("name"):
                with contextlib.suppress(OSError, HarnessError):
                    _rmtree(PROPAGATE_DIR / state["name"])
            _rmtree(d)
            reaped.append(str(d))
        finally:
            os.close(fd)
    return reaped


# ----------------------------------------------------------------------------------------------------------------
# The container

_LIVE: "set[Container]" = set()


def _stop_all_at_exit() -> None:
    for c in list(_LIVE):
        with contextlib.suppress(Exception):
            c.stop()


atexit.register(_stop_all_at_exit)


class Container:
    """A booted Debian bookworm systemd in systemd-nspawn on a throw-away overlay.

    ``root``: host path of the merged rootfs (writes there are visible inside); ``leader``: host PID of the
    container's PID 1 (systemd); ``scratch``: host path of the directory bound writable at ``/scratch``;
    ``name``: the machine name (also its hostname). Use as a context manager, or call ``start()``/``stop()``.
    """

    def __init__(self, name: str | None = None, *, repo: os.PathLike | str = REPO,
                 packages: Iterable[str] = PACKAGES, memory_max: str | int = "4G", pids_max: int = 4096,
                 capabilities: Sequence[str] = ("CAP_NET_ADMIN",), boot_timeout: float = 60.0,
                 binds: Sequence[str] = (), binds_ro: Sequence[str] = (), nspawn_args: Sequence[str] = (),
                 state_dir: os.PathLike | str = STATE_DIR, cache_dir: os.PathLike | str = CACHE_DIR,
                 keep_state: bool | None = None):
        self.name = name or f"gr-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", self.name):
            raise ValueError(f"bad machine name {self.name!r}")
        self.repo = pathlib.Path(repo).resolve()
        self.packages = tuple(sorted(set(packages)))
        self.memory_max = _parse_size(memory_max)
        self.pids_max = pids_max
        self.capabilities = tuple(capabilities)
        self.boot_timeout = boot_timeout
        self.binds, self.binds_ro, self.nspawn_args = tuple(binds), tuple(binds_ro), tuple(nspawn_args)
        self.state_dir = pathlib.Path(state_dir)
        self.cache_dir = pathlib.Path(cache_dir)
        self.keep_state = (os.environ.get("GPU_ROUTER_TEST_KEEP") == "1") if keep_state is None else keep_state

        self.dir: pathlib.Path | None = None  # state directory: upper/, work/, merged/, scratch/, console.log
        self.root: pathlib.Path | None = None
        self.scratch: pathlib.Path | None = None
        self.rootfs: pathlib.Path | None = None
        self.leader: int | None = None
        self.nspawn: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._cgroups: dict[str, pathlib.Path] = {}  # hierarchy -> the container's host cgroup (ours)
        self._inner_cgroups: dict[str, pathlib.Path] = {}  # hierarchy -> cgroup that is "/" inside
        self._console = None
        self._stopping = False

    # -- context manager ----------------------------------------------------------------------------------------

    def __enter__(self) -> "Container":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Container {self.name} leader={self.leader} root={self.root}>"

    # -- start --------------------------------------------------------------------------------------------------

    def start(self) -> "Container":
        if self.nspawn is not None:
            raise HarnessError(f"{self.name} is already started")
        why = unavailable_reason()
        if why:
            raise HarnessError(why)
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for d in reap_stale(self.state_dir):
            _log(f"reaped stale container state {d}")
        self.rootfs = ensure_rootfs(self.packages, cache_dir=self.cache_dir)
        self.timings["rootfs_s"] = time.monotonic() - t0

        self.dir = pathlib.Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=self.state_dir))
        self._lock_fd = os.open(self.dir / "owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        for sub in ("upper", "work", "merged", "scratch"):
            (self.dir / sub).mkdir()
        (self.dir / "scratch").chmod(0o1777)
        self.root, self.scratch = self.dir / "merged", self.dir / "scratch"
        self._save_state()

        t1 = time.monotonic()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}",
                        str(self.root)], check=True, capture_output=True, text=True, env=_clean_env())

        own = _own_cgroups()
        cg_name = f"gpu-router-test-{self.name}"
        for h, parent in own.items():
            cg = parent / cg_name
            cg.mkdir()
            self._cgroups[h] = cg
            self._save_state()
        (self._cgroups["memory"] / "memory.limit_in_bytes").write_text(str(self.memory_max))
        (self._cgroups["pids"] / "pids.max").write_text(str(self.pids_max))

        cmd = ["systemd-nspawn", "-D", str(self.root), "-M", self.name, "--register=no", "--keep-unit",
               "--kill-signal=SIGRTMIN+3", "--console=read-only",
               f"--bind-ro={self.repo}:/src", f"--bind={self.scratch}:/scratch"]
        cmd += [f"--bind={b}" for b in self.binds] + [f"--bind-ro={b}" for b in self.binds_ro]
        if self.capabilities:
            cmd.append(f"--capability={','.join(self.capabilities)}")
        cmd += [*self.nspawn_args, "/bin/sh", "-c", PID1_COMMAND]
        self.nspawn_cmd = cmd
        procs_files = [str(cg / "cgroup.procs") for cg in self._cgroups.values()]

        def enter_cgroups() -> None:  # runs in the child between fork and exec
            for f in procs_files:
                with open(f, "w") as fh:
                    fh.write("0")

        self._console = open(self.dir / "console.log", "wb")
        self.nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._console,
                                       stderr=subprocess.STDOUT, env=_clean_env(), preexec_fn=enter_cgroups,
                                       start_new_session=True)  # Ctrl-C goes to pytest, which stops us cleanly
        self._save_state()
        self.leader = self._find_leader(deadline=time.monotonic() + 15)
        self._save_state()
        self._wait_booted(deadline=time.monotonic() + self.boot_timeout)
        self.timings["boot_s"] = time.monotonic() - t1
        self._inner_cgroups = self._find_inner_cgroups()
        self.timings["start_s"] = time.monotonic() - t0
        _log(f"{self.name} up: {self.timings}")

    def _save_state(self) -> None:
        if self.dir is None:
            return
        state = {"name": self.name, "owner": os.getpid(), "root": str(self.root),
                 "cgroups": [str(p) for p in self._cgroups.values()],
                 "nspawn": self.nspawn.pid if self.nspawn else None, "leader": self.leader}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.dir / "state.json")

    def _find_leader(self, deadline: float) -> int:
        """The host PID of the container's PID 1: the process in our cgroup whose innermost pid is 1."""
        own_pidns = os.readlink("/proc/self/ns/pid")
        while time.monotonic() < deadline:
            for pid in sorted(_cgroup_procs(self._cgroups["pids"])):
                try:
                    if os.readlink(f"/proc/{pid}/ns/pid") == own_pidns:
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
                except OSError:
                    continue
                if len(nspid) >= 2 and nspid[-1] == "1":
                    return pid
            if self.nspawn.poll() is not None:
                raise HarnessError(f"systemd-nspawn exited with {self.nspawn.returncode} before the container "
                                   f"started\n{self.console_output()}")
            time.sleep(0.02)
        raise HarnessError(f"no container PID 1 appeared within 15 s\n{self.console_output()}")

    def _wait_booted(self, deadline: float) -> None:
        state = "?"
        while True:
            if self.nspawn.poll() is not None:
                raise HarnessError(f"the container exited ({self.nspawn.returncode}) while booting "
                                   f"(last state {state!r})\n{self.console_output()}")
            try:
                r = subprocess.run(self._nsenter() + ["systemctl", "is-system-running"], capture_output=True,
                                   text=True, env=_clean_env(), timeout=10, stdin=subprocess.DEVNULL)
                state = r.stdout.strip() or r.stderr.strip()
            except subprocess.TimeoutExpired:
                state = "(systemctl is-system-running timed out)"
            if state in ("running", "degraded"):
                self.boot_state = state
                return
            if state in ("maintenance", "stopping"):
                raise HarnessError(f"the container's systemd is {state!r}\n{self._boot_diagnostics()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"the container did not reach running/degraded within {self.boot_timeout:.0f} "
                                   f"s (last state {state!r})\n{self._boot_diagnostics()}")
            time.sleep(0.05)

    def _boot_diagnostics(self) -> str:
        out = [self.console_output()]
        for cmd in (["systemctl", "--no-pager", "--failed"], ["systemctl", "--no-pager", "list-jobs"]):
            with contextlib.suppress(Exception):
                r = subprocess.run(self._nsenter() + cmd, capture_output=True, text=True, env=_clean_env(),
                                   timeout=10, stdin=subprocess.DEVNULL)
                out.append(f"--- {' '.join(cmd)} ---\n{r.stdout}{r.stderr}")
        return "\n".join(out)

    def _find_inner_cgroups(self) -> dict[str, pathlib.Path]:
        """Host directory of the cgroup that is the container's "/" in each hierarchy (its cgroup namespace root).

        Commands entered with nsenter are put there, so they count against the container's caps and the systemd
        inside may move them into scopes (moves across a cgroup namespace's root are refused)."""
        inside = _parse_proc_cgroup(self.run(["cat", "/proc/1/cgroup"], timeout=30, _place=False).stdout)
        outside = _cgroup_dirs(self.leader)
        result = {}
        for h, cg in self._cgroups.items():
            host, rel_in = outside[h], inside.get(h, "/")
            if rel_in not in ("", "/"):
                if not host.as_posix().endswith(rel_in):
                    raise HarnessError(f"cannot place {h or 'unified'} cgroup {rel_in} (inside) in {host}")
                host = pathlib.Path(host.as_posix()[: -len(rel_in)])
            if not (host == cg or cg in host.parents):
                raise HarnessError(f"the container's {h or 'unified'} cgroup root {host} is not below {cg}")
            result[h] = host
        return result

    # -- commands inside ----------------------------------------------------------------------------------------

    def _nsenter(self) -> list[str]:
        if not self.leader:
            raise HarnessError("the container is not started")
        return ["nsenter", "-t", str(self.leader), "-a", "-r", "-w"]

    def _user_env(self, user: str | int | None) -> dict[str, str]:
        name, home, shell, uid, gid = "root", "/root", "/bin/sh", 0, 0
        if user is not None:
            entry = self._passwd_entry(user)
            if entry is None:
                raise HarnessError(f"no user {user!r} in the container (add it with add_user())")
            name, uid, gid, home, shell = entry[0], int(entry[2]), int(entry[3]), entry[5], entry[6]
        return {"PATH": PATH, "LANG": "C.UTF-8", "HOME": home, "USER": name, "LOGNAME": name, "SHELL": shell}

    def _passwd_entry(self, user: str | int) -> list[str] | None:
        for line in self.host_path("/etc/passwd").read_text().splitlines():
            f = line.split(":")
            if len(f) >= 7 and (f[0] == str(user) or f[2] == str(user)):
                return f
        return None

    @staticmethod
    def _argv(cmd: str | Sequence[str]) -> list[str]:
        if isinstance(cmd, str):
            return ["/bin/sh", "-c", cmd]
        return [str(c) for c in cmd]

    def popen(self, cmd: str | Sequence[str], *, user: str | int | None = None,
              env: Mapping[str, str] | None = None, cwd: str = "/", _place: bool = True,
              **kwargs) -> subprocess.Popen:
        """Start cmd inside (like run()) and return its Popen (nsenter's): for daemons and interactive use.

        Keyword arguments go to subprocess.Popen (stdin, stdout, text, ...). The command has its own process
        group (start_new_session). End it with ``container.kill(p)``, not p.kill(): killing nsenter before its
        child orphans the child to the host's init, and its zombie stalls the container's shutdown.
        """
        argv = self._argv(cmd)
        full_env = self._user_env(user)
        if env:
            full_env.update(env)
        inner = argv
        if user is not None:
            inner = ["setpriv", f"--reuid={full_env['USER']}", f"--regid={self._passwd_entry(user)[3]}",
                     "--init-groups", "--", *argv]
        if cwd != "/":
            inner = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd, *inner]
        procs_files = [str(p / "cgroup.procs") for p in self._inner_cgroups.values()] if _place else []

        def place() -> None:  # between fork and exec: into the container's own cgroups
            for f in procs_files:
                with open(f, "w") as fh:
                    fh.write("0")

        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self._nsenter() + inner, env=full_env, preexec_fn=place if procs_files else None,
                                **kwargs)

    def kill(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int:
        """End a popen(): sig to what it runs inside (its process group), SIGKILL after timeout; returns the
        returncode of nsenter (which passes on the command's)."""
        _kill_process_group(p, sig, timeout)
        return p.wait()

    def run(self, cmd: str | Sequence[str], *, user: str | int | None = None, check: bool = True,
            timeout: float = 120, input: str | None = None, env: Mapping[str, str] | None = None,
            cwd: str = "/", _place: bool = True) -> subprocess.CompletedProcess:
        """Run cmd inside (all namespaces of the container, its cgroups; a list, or a string for /bin/sh -c).

        ``user=`` (name or uid) runs it unprivileged through setpriv (real/effective uid and gid, supplementary
        groups, capabilities dropped as for any non-root uid). The environment is clean (PATH, HOME, USER,
        LOGNAME, SHELL, LANG) plus ``env``. Text mode; stdout and stderr captured; stdin is ``input`` or empty.
        A command still running after ``timeout`` seconds is killed with its process group (TimeoutExpired).
        A failure with ``check`` raises CommandError (a CalledProcessError whose str() shows the output).
        Caveat: a root command entered this way holds the host's full capability set, not the container's
        bounding set; use run_unit() to run with exactly what the container's services get.
        """
        p = self.popen(cmd, user=user, env=env, cwd=cwd, _place=_place,
                       stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except BaseException as exc:  # timeout, Ctrl-C: kill what it started inside (its group), then nsenter
            _kill_process_group(p)
            out, err = p.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
            raise
        result = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and p.returncode != 0:
            raise CommandError(p.returncode, cmd, out, err)
        return result

    def run_unit(self, cmd: str | Sequence[str], *, user: str | int | None = None, properties: Sequence[str] = (),
                 check: bool = True, timeout: float = 120, input: str | None = None,
                 env: Mapping[str, str] | None = None, unit: str | None = None) -> subprocess.CompletedProcess:
        """Run cmd as a transient service of the container's systemd (``systemd-run --wait --pipe --collect``).

        The process gets exactly what a service gets (the container's capability bounding set, the journal's
        _SYSTEMD_UNIT attribution, the unit's cgroup). ``properties`` are ``-p`` assignments ("MemoryMax=200M");
        ``unit`` names the unit (``--unit=``). The return code is the service's exit status (systemd-run --wait),
        255 when it was killed by a signal. cmd is passed literally (systemd's $VAR expansion is escaped).
        """
        argv = ["systemd-run", "--wait", "--pipe", "--collect", "--quiet", "--service-type=exec"]
        if unit:
            argv.append(f"--unit={unit}")
        if user is not None:
            argv.append(f"--uid={user}")
        for prop in properties:
            argv += ["-p", prop]
        for k, v in (env or {}).items():
            argv.append(f"--setenv={k}={v}")
        # systemd expands $VAR/${VAR} in ExecStart= (252 has no --expand-environment=no): pass argv literally.
        argv += ["--", *(a.replace("$", "$$") for a in self._argv(cmd))]
        try:
            r = self.run(argv, check=False, timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            if unit:
                self.run(["systemctl", "kill", "--signal=SIGKILL", unit], check=False, timeout=30)
            raise
        r.args = cmd
        if check and r.returncode != 0:
            raise CommandError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def add_user(self, name: str, *, groups: Sequence[str] = (), system: bool = False) -> int:
        """Create a user (with a home) inside, unless it exists; returns its uid."""
        if self._passwd_entry(name) is None:
            argv = ["useradd", "--create-home", "--shell", "/bin/bash"]
            if system:
                argv.append("--system")
            if groups:
                argv += ["--groups", ",".join(groups)]
            self.run([*argv, name], timeout=60)
        elif groups:
            self.run(["usermod", "--append", "--groups", ",".join(groups), name], timeout=60)
        return int(self._passwd_entry(name)[2])

    def host_path(self, container_path: str | os.PathLike) -> pathlib.Path:
        """A host path for container_path as the container sees it now: through /proc/LEADER/root, so mounts
        made inside (the tmpfs on /tmp, /run, /scratch) count, and resolving symlinks as the container would
        (an absolute link stays inside). ``root`` alone is only the overlay, without those mounts."""
        if not self.leader:
            raise HarnessError("the container is not started")
        base = pathlib.Path(f"/proc/{self.leader}/root")
        parts = list(pathlib.PurePosixPath("/", container_path).parts[1:])
        resolved: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            candidate = base.joinpath(*resolved, part)
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    raise HarnessError(f"too many symlinks resolving {container_path}")
                target = os.readlink(candidate)
                if target.startswith("/"):
                    resolved = []
                parts = [p for p in pathlib.PurePosixPath(target).parts if p != "/"] + parts
                continue
            resolved.append(part)
        return base.joinpath(*resolved)

    def cgroup_path(self, inner_path: str, hierarchy: str = "memory") -> pathlib.Path:
        """Host directory of the container's cgroup inner_path (as the container names it, e.g. a unit's
        ControlGroup "/system.slice/x.scope") in hierarchy ("memory", "pids", "name=systemd", "" = unified)."""
        return self._inner_cgroups[hierarchy] / inner_path.lstrip("/")

    def copy_in(self, host_path: str | os.PathLike, container_path: str | os.PathLike, *,
                mode: int | None = None) -> None:
        """Copy a file or a directory tree from the host to container_path (owner root, modes kept)."""
        src = pathlib.Path(host_path)
        dst = self.host_path(container_path)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
        else:
            if dst.is_dir():
                dst = self.host_path(pathlib.PurePosixPath(container_path) / src.name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        if mode is not None:
            os.chmod(dst, mode)

    def write_file(self, container_path: str | os.PathLike, content: str | bytes, *, mode: int = 0o644) -> None:
        dst = self.host_path(container_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        (dst.write_bytes if isinstance(content, bytes) else dst.write_text)(content)
        os.chmod(dst, mode)

    def journal(self, *matches: str, output: str = "json", args: Sequence[str] = (),
                sync: bool = True) -> list[dict] | str:
        """journalctl inside with the given matches ("FIELD=value", "_SYSTEMD_UNIT=x", "+" for OR).

        With output "json" (the default) a list of entries (dicts, as journalctl -o json writes them); with any
        other output mode its text. ``sync`` first makes journald write what it has received
        (``journalctl --sync``), so an entry sent before the call is found. ``args`` go before the matches
        ("--since=-1min", "-u", "unit", "-b").
        """
        if sync:
            self.run(["journalctl", "--sync"], check=False, timeout=30)
        r = self.run(["journalctl", "--no-pager", "-q", "-o", output, *args, *matches], timeout=60, check=False)
        if r.returncode != 0 and r.stderr.strip():
            raise CommandError(r.returncode, r.args, r.stdout, r.stderr)
        if output != "json":
            return r.stdout
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_for(self, predicate: str | Sequence[str] | Callable[[], object], timeout: float = 30,
                 interval: float = 0.1, user: str | int | None = None):
        """Poll until predicate holds: a command (exits 0; returns its CompletedProcess) or a callable (truthy;
        returns its value). Raises TimeoutError with the last output."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if callable(predicate):
                last = predicate()
                if last:
                    return last
            else:
                last = self.run(predicate, check=False, user=user, timeout=max(1.0, min(60.0, timeout)))
                if last.returncode == 0:
                    return last
            if time.monotonic() > deadline:
                detail = (f"exit {last.returncode}\n{last.stdout}{last.stderr}"
                          if isinstance(last, subprocess.CompletedProcess) else repr(last))
                raise TimeoutError(f"{predicate!r} did not hold within {timeout} s: {detail}")
            time.sleep(interval)

    def console_output(self, tail: int = 8000) -> str:
        """What the container wrote to its console (systemd's boot messages), the last `tail` characters."""
        if self.dir is None or not (self.dir / "console.log").exists():
            return "(no console output)"
        text = (self.dir / "console.log").read_bytes().decode(errors="replace")
        return "--- container console ---\n" + text[-tail:]

    # -- stop ---------------------------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Power the container off (SIGRTMIN+3 to its systemd, SIGKILL after timeout), unmount the overlay,
        remove its cgroups and its state directory. Safe to call twice, after a failed start, under Ctrl-C."""
        if self._stopping or (self.dir is None and self.nspawn is None and not self._cgroups):
            _LIVE.discard(self)
            return
        self._stopping = True
        old_mask = None
        if threading.current_thread() is threading.main_thread():
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        errors: list[str] = []
        try:
            t0 = time.monotonic()
            self._stop_processes(timeout, errors)
            self.timings["stop_s"] = time.monotonic() - t0
            if self._console:
                self._console.close()
                self._console = None
            if self.dir is not None:
                try:
                    _unmount_all_under(self.dir)
                except HarnessError as exc:
                    errors.append(str(exc))
            for cg in self._cgroups.values():
                errors += _remove_cgroup_tree(cg)
            with contextlib.suppress(OSError, HarnessError):
                _rmtree(PROPAGATE_DIR / self.name)
            if self.dir is not None and not errors:
                if self.keep_state:
                    _log(f"kept {self.dir}")
                    with contextlib.suppress(OSError):
                        (self.dir / "owner.lock").unlink()
                else:
                    _rmtree(self.dir)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if not errors:
                self.dir = None
                self._cgroups = {}
        finally:
            self.leader = None
            self.nspawn = None
            self._inner_cgroups = {}
            self._stopping = False
            _LIVE.discard(self)
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise HarnessError("clean-up incomplete (the next start() or `harness.py clean` retries):\n"
                               + "\n".join(errors))

    def _kill_entered(self, timeout: float = 3.0) -> None:
        """SIGKILL what commands entered with nsenter left in the container's root cgroup (not units, whose
        processes systemd stops itself). Their parents are outside the container: systemd-shutdown gets no
        SIGCHLD for them and would wait 10-90 s before it notices they died of its SIGTERM."""
        inner = self._inner_cgroups.get("name=systemd")
        if inner is None:
            return
        _kill_inside(lambda: [int(x) for x in (inner / "cgroup.procs").read_text().split()], timeout)

    def _stop_processes(self, timeout: float, errors: list[str]) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self._kill_entered()
            if self.leader and _pid_alive(self.leader):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGRTMIN + 3)  # systemd: halt, which ends a container
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                _log(f"{self.name} did not halt within {timeout} s: SIGKILL")
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)  # PID 1 of a pid namespace takes the rest with it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.nspawn.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.nspawn.wait(10)
        survivors = _kill_cgroup_trees(list(self._cgroups.values()))
        if not _wait_dead(self.leader):
            errors.append(f"the container's PID 1 ({self.leader}) would not die")
        if survivors:
            errors.append(f"processes that would not die: {sorted(survivors)}")
        if self.nspawn is not None and self.nspawn.poll() is None:
            errors.append(f"systemd-nspawn ({self.nspawn.pid}) still running")


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="harness.py", description="gpu-router real-systemd test lane")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached base rootfs and print its path")
    sh = sub.add_parser("shell", help="boot a container and run a shell (or CMD) inside it; stops it after")
    sh.add_argument("command", nargs="*")
    cl = sub.add_parser("clean", help="reap leftovers of killed runs and cached rootfs of other package lists; "
                                      "with --cache drop every cached rootfs")
    cl.add_argument("--cache", action="store_true")
    args = ap.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)  # a plain kill stops the container as Ctrl-C does
    if args.cmd == "build":
        t0 = time.monotonic()
        path = ensure_rootfs()
        print(f"{path}  ({time.monotonic() - t0:.1f} s)")
    elif args.cmd == "shell":
        with Container() as c:
            print(f"booted {c.name} in {c.timings['boot_s']:.2f} s: leader={c.leader} dir={c.dir}",
                  file=sys.stderr, flush=True)
            p = c.popen(args.command or ["/bin/bash", "-l"], start_new_session=False)
            try:
                return p.wait()
            except BaseException:
                c._kill_entered()
                p.kill()
                raise
    elif args.cmd == "clean":
        for d in reap_stale():
            print(f"reaped {d}")
        running = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    argv = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                    if argv and argv[0].endswith(b"systemd-nspawn") and b"-M" in argv:
                        running.add(argv[argv.index(b"-M") + 1].decode())
        for d in sorted(PROPAGATE_DIR.glob("gr-test-*")) if PROPAGATE_DIR.is_dir() else []:
            if d.name not in running:
                _rmtree(d)
                print(f"removed {d}")
        current = rootfs_path()
        in_use = " ".join(opts for _, _, fstype, opts in _mountinfo() if fstype == "overlay")
        for entry in sorted(CACHE_DIR.iterdir()) if CACHE_DIR.is_dir() else []:
            if entry.name.startswith(".lock-") or (entry == current and not args.cache):
                continue
            if entry.name.startswith(("vm-", ".tmp-vm-")) and not args.cache:
                continue  # the cgroup v2 lanes' images (tests/vm/vm.py, which has a clean of its own), not a rootfs
            if f"lowerdir={entry}," in in_use or f"lowerdir={entry}:" in in_use:
                print(f"keeping {entry}: a running container uses it")
                continue
            print(f"removing {entry}")
            _rmtree(entry) if entry.is_dir() else entry.unlink()
            with contextlib.suppress(FileNotFoundError):
                (CACHE_DIR / f".lock-{entry.name}").unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
