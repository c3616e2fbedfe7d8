"""Put gpu-router in place of a workload binary, and take it away again leaving exactly what was there.

``gpu-router wrap BINARY --workload NAME`` and ``gpu-router unwrap BINARY`` / ``unwrap --all`` (cli.py) call
:func:`wrap` and :func:`unwrap`; the package's prerm calls ``python3 -I -B -m gpu_router.wrap unwrap --all`` on
``remove`` (see debian/gpu-router.prerm for why there and not in postrm).

Two methods, chosen by who owns the file:

* **dpkg-divert** when a package owns it (``dpkg-query -S``): the diversion
  ``BINARY → BINARY.distrib by gpu-router`` makes every later upgrade of that package install its new binary as
  ``BINARY.distrib``, so the wrap survives upgrades. On merged-/usr systems the package may know the file by its
  other name (``/bin/x`` for ``/usr/bin/x``); each name dpkg knows is diverted.
* **rename** otherwise: ``BINARY → BINARY.real``.

Either way ``BINARY`` becomes a symlink to ``/usr/bin/gpu-router``, which runs the workload profile named after
the name it was called by (main.py), or the one recorded in ``<name>.workload``.

The swap never leaves a moment without a file at ``BINARY``: the original is hard-linked to its new name and a
symlink is renamed over ``BINARY`` (so the diversion is added with ``--no-rename``; dpkg-divert's own ``--rename``
would move the file away first). Unwrap renames the original back over the symlink, then removes the diversion.

Records, one pair per wrapped binary, in ``/var/lib/gpu-router/wrapped/`` (``GPU_ROUTER_WRAPPED_DIR`` overrides):

* ``<name>.workload``: the workload name, one line; read on the hot path by ``wrapmap.lookup``.
* ``<name>.toml``: what unwrap needs to restore the binary (see :func:`_record`); written before anything is
  touched, so a crash half-way leaves a record that unwrap can finish from.

Unwrap also repairs without a record (a diversion by gpu-router, or a symlink to gpu-router beside ``.real``) and
accepts every half-done state a crash can leave. Errors are :class:`WrapError`, phrased for the operator.
"""

import errno
import os
import stat
import sys

from .. import atomicfile, wrapmap

PACKAGE = "gpu-router"
LAUNCHER = "/usr/bin/gpu-router"
DIVERT_SUFFIX = ".distrib"
RENAME_SUFFIX = ".real"
RECORD_VERSION = 1
# gpu-router's own executables: wrapping them would make the launcher exec itself.
OWN_FILES = ("/usr/bin/gpu-router", "/usr/sbin/gpu-router-agent")
# The launcher's interpreter: a symlink to gpu-router there would recurse in the kernel's #! handling.
INTERPRETERS = ("/usr/bin/python3",)
# Top-level directories that merged /usr turns into symlinks to their /usr twins.
MERGED_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class WrapError(Exception):
    """A refusal or failure, phrased for the operator. ``exit_code``: 2 for a bad argument, 1 otherwise."""

    def __init__(self, message, path=None, exit_code=1):
        super().__init__(message)
        self.path = path
        self.exit_code = exit_code


class UnwrapIncomplete(WrapError):
    """``unwrap --all`` restored some binaries but not all: ``done`` (result dicts) and ``failures`` (WrapErrors)."""

    def __init__(self, message, done, failures):
        super().__init__(message)
        self.done = done
        self.failures = failures


# ---- the filesystem and dpkg, seen from a root ------------------------------------------------------------------

class _Host:
    """Paths inside ``root`` (``/`` in production, a temporary tree in tests) and dpkg's view of them."""

    def __init__(self, root="/", admindir=None, state_dir=None, launcher=LAUNCHER):
        self.root = os.path.abspath(root or "/")
        self.admindir = admindir
        self.launcher = launcher
        if state_dir is None:
            state_dir = os.environ.get(wrapmap.ENV) or self.real(wrapmap.WRAPPED_DIR)
        self.state_dir = os.path.abspath(state_dir)

    def real(self, path):
        """Where an in-root absolute path is on this machine."""
        return path if self.root == "/" else self.root + path

    def exists(self, path):
        return os.path.lexists(self.real(path))

    def resolve(self, path, follow_last=True):
        """Canonical in-root path: symlinks followed inside root (an absolute link target restarts at root)."""
        parts = [p for p in path.split("/") if p and p != "."]
        done = "/"
        links = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                done = os.path.dirname(done)
                continue
            candidate = os.path.join(done, part)
            if not parts and not follow_last:
                done = candidate
                break
            try:
                st = os.lstat(self.real(candidate))
            except OSError:
                done = os.path.normpath(os.path.join(candidate, *parts)) if parts else candidate
                break
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise WrapError(f"{path}: too many levels of symbolic links", path)
                target = os.readlink(self.real(candidate))
                if target.startswith("/"):
                    done = "/"
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done = candidate
        return done

    def aliases(self, path):
        """``path`` and its merged-/usr twin (``/usr/bin/x`` ↔ ``/bin/x``) where the root has merged /usr."""
        names = [path]
        for top in MERGED_DIRS:
            usr = f"/usr/{top}/"
            if path.startswith(usr) and self.resolve("/" + top) == "/usr/" + top:
                names.append("/" + top + "/" + path[len(usr):])
        return names

    def is_launcher_link(self, path, launcher=None):
        """Whether ``path`` is a symlink that leads to the gpu-router launcher."""
        try:
            if not stat.S_ISLNK(os.lstat(self.real(path)).st_mode):
                return False
        except OSError:
            return False
        launcher = launcher or self.launcher
        if os.readlink(self.real(path)) == launcher:
            return True
        return self.resolve(path) == self.resolve(launcher)

    # -- dpkg --

    def _dpkg_options(self):
        opts = []
        if self.root != "/":
            opts.append(f"--root={self.root}")
        if self.admindir:
            opts.append(f"--admindir={self.admindir}")
        return opts

    def dpkg(self, tool, *args, check=True):
        import subprocess

        env = dict(os.environ, LC_ALL="C")
        env["PATH"] = env.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"
        cmd = [tool] + self._dpkg_options() + list(args)
        try:
            proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="surrogateescape", timeout=120)
        except FileNotFoundError:
            raise WrapError(f"{tool} not found: gpu-router wrap needs dpkg") from None
        except subprocess.TimeoutExpired:
            raise WrapError(f"{' '.join(cmd)} did not finish in 120 s (is dpkg's database locked?)") from None
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().replace("\n", "; ")
            raise WrapError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {detail}")
        return proc

    def diversions(self):
        """Every diversion as (from, to, package); package is None for a local one."""
        out = []
        for line in self.dpkg("dpkg-divert", "--list").stdout.splitlines():
            local = line.startswith("local diversion of ")
            if local:
                body, package = line[len("local diversion of "):], None
            elif line.startswith("diversion of ") and " by " in line:
                body, _, package = line[len("diversion of "):].rpartition(" by ")
            else:
                continue
            frm, sep, to = body.partition(" to ")
            if sep:
                out.append((frm, to, package))
        return out

    def owners(self, path):
        """Packages whose file list holds exactly ``path`` (dpkg-query -S), architecture qualifiers dropped."""
        proc = self.dpkg("dpkg-query", "-S", path, check=False)
        if proc.returncode not in (0, 1):
            detail = proc.stderr.strip().replace("\n", "; ")
            raise WrapError(f"dpkg-query -S {path} failed (exit {proc.returncode}): {detail}", path)
        owners = []
        for line in proc.stdout.splitlines():
            if line.startswith("diversion by "):
                continue
            packages, sep, name = line.partition(": ")
            if sep and name == path:
                owners += [p.strip().partition(":")[0] for p in packages.split(",") if p.strip()]
        return owners

    def essential(self, package):
        proc = self.dpkg("dpkg-query", "-W", "-f=${Essential}", package, check=False)
        return proc.returncode == 0 and proc.stdout.strip() == "yes"

    def divert(self, name, to):
        self.dpkg("dpkg-divert", "--package", PACKAGE, "--no-rename", "--divert", to, "--add", name)

    def undivert(self, name, to):
        self.dpkg("dpkg-divert", "--package", PACKAGE, "--no-rename", "--divert", to, "--remove", name)

    # -- records --

    def _open_state(self, create=False):
        """The records' folder, only if root alone can change it (atomicfile.open_dir); WrapError otherwise."""
        try:
            return atomicfile.open_dir(self.state_dir, create=create, mode=0o755)
        except atomicfile.Refused as exc:
            raise WrapError(f"wrap records: {exc.strerror}; touching nothing", self.state_dir) from None

    def lock(self):
        import fcntl

        dfd = self._open_state(create=True)
        try:
            fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
        finally:
            os.close(dfd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def record_path(self, name, suffix=".toml"):
        return os.path.join(self.state_dir, name + suffix)

    def read_record(self, name):
        import tomllib

        path = self.record_path(name)
        if not _record_name_ok(name):
            return None
        try:
            text = atomicfile.read_state(self.state_dir, name + ".toml", 1 << 16)
        except atomicfile.Refused as exc:
            raise WrapError(f"{exc.strerror}: not a wrap record gpu-router wrote; touching nothing", path) from None
        except OSError as exc:
            raise WrapError(f"{path}: unreadable wrap record ({exc}); fix or remove it by hand", path) from None
        if text is None:
            return None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise WrapError(f"{path}: unreadable wrap record ({exc}); fix or remove it by hand", path) from None
        missing = [k for k in ("path", "workload", "method", "real") if not isinstance(data.get(k), str)]
        if missing or data["method"] not in ("dpkg-divert", "rename"):
            raise WrapError(f"{path}: not a wrap record gpu-router understands (missing or bad: "
                            f"{', '.join(missing) or 'method'})", path)
        _check_record(data, name, path)
        return data

    def records(self, errors=None):
        """Every record; with ``errors`` (a list) one that is not a record wrap wrote is left out and its WrapError
        appended there, so the others can still be restored."""
        try:
            dfd = self._open_state()
        except FileNotFoundError:
            return []
        try:
            names = sorted(n[:-5] for n in os.listdir(dfd) if n.endswith(".toml") and not n.startswith("."))
        finally:
            os.close(dfd)
        out = []
        for n in names:
            try:
                r = self.read_record(n)
            except WrapError as exc:
                if errors is None:
                    raise
                errors.append(exc)
                continue
            if r is not None:
                out.append(r)
        return out

    def write_record(self, record):
        import tomli_w

        header = ("# Written by `gpu-router wrap`; `gpu-router unwrap` restores the binary from it.\n"
                  "# Do not edit. The workload name the wrapper reads is in the .workload file beside it.\n")
        dfd = self._open_state(create=True)
        try:
            atomicfile.write_at(dfd, record["name"] + ".toml", header + tomli_w.dumps(record), durable=True)
            atomicfile.write_at(dfd, record["name"] + ".workload", record["workload"] + "\n", durable=True)
        finally:
            os.close(dfd)

    def drop_record(self, name):
        try:
            dfd = self._open_state()
        except FileNotFoundError:
            return
        try:
            for suffix in (".workload", ".toml"):
                try:
                    os.unlink(name + suffix, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            try:
                os.fsync(dfd)
            except OSError:
                pass  # best effort, as atomicfile.fsync_dir
        finally:
            os.close(dfd)


def _record_name_ok(name):
    return isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".") \
        and set(name) <= _NAME_CHARS | set("+@,:=~")


def _clean_abs(path):
    return isinstance(path, str) and path.startswith("/") and os.path.normpath(path) == path \
        and ".." not in path.split("/") and _printable(path)


def _check_record(record, name, file):
    """A record restores only what wrap made: its own name, an absolute normalized path, and the real binary
    exactly where wrap puts it for that method (BINARY.distrib / BINARY.real); anything else was not written by
    wrap, and unwrap would move a file it never moved (issue 17)."""
    path, real = record["path"], record["real"]
    suffix = DIVERT_SUFFIX if record["method"] == "dpkg-divert" else RENAME_SUFFIX
    launcher = record.get("launcher")
    problem = None
    if not _clean_abs(path):
        problem = f"path {path!r} is not an absolute, normalized path"
    elif record.get("name", name) != name or os.path.basename(path) != name:
        problem = f"path {path!r} and name {record.get('name')!r} do not match the record's file name {name!r}"
    elif real != path + suffix:
        problem = f"real {real!r} is not where wrap puts it ({path + suffix})"
    elif launcher is not None and not _clean_abs(launcher):
        problem = f"launcher {launcher!r} is not an absolute, normalized path"
    if problem:
        raise WrapError(f"{file}: not a wrap record gpu-router wrote ({problem}); touching nothing", file)


def _unlock(fd):
    os.close(fd)


# ---- arguments -------------------------------------------------------------------------------------------------

def _check_workload(name):
    if not isinstance(name, str) or not name or name.startswith(".") or not set(name) <= _NAME_CHARS \
            or len(name) > 200:
        raise WrapError(f"workload name {name!r}: use letters, digits, '_', '.' and '-' (it names lock files and "
                        f"systemd scopes), not starting with '.'", exit_code=2)


def _printable(path):
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return path.isprintable()


def _locate(host, binary):
    """The absolute in-root path of BINARY, its directory canonical, its last component not followed."""
    if not isinstance(binary, str) or not binary:
        raise WrapError("name the binary to wrap", exit_code=2)
    if "/" not in binary:
        search = os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
        for d in search.split(":") + ["/usr/local/sbin", "/usr/sbin", "/sbin"]:
            if d.startswith("/") and host.exists(os.path.join(d, binary)):
                binary = os.path.join(d, binary)
                break
        else:
            raise WrapError(f"{binary}: not found on PATH; give its full path", binary, exit_code=2)
    elif not binary.startswith("/"):
        if host.root != "/":
            raise WrapError(f"{binary}: give an absolute path", binary, exit_code=2)
        binary = os.path.abspath(binary)
    binary = os.path.normpath(binary)
    if not _printable(binary):
        raise WrapError(f"{binary!r}: only printable UTF-8 paths can be wrapped", exit_code=2)
    directory, name = os.path.split(binary)
    if not name or name in (".", ".."):
        raise WrapError(f"{binary}: not a file path", binary, exit_code=2)
    return os.path.join(host.resolve(directory), name)


# ---- wrap ------------------------------------------------------------------------------------------------------

def _refuse_unless_root(host):
    if host.root == "/" and host.admindir is None and os.geteuid() != 0:
        raise WrapError("wrapping and unwrapping change /usr and dpkg's database: run as root")


def wrap(binary, workload=None, *, root="/", admindir=None, state_dir=None, launcher=LAUNCHER):
    """Put gpu-router in place of ``binary``; jobs started through it run workload profile ``workload``.

    Returns a dict: ``action`` ("wrapped", "updated" when only the workload changed, "unchanged"), ``binary``,
    ``name`` (the symlink's name, the key of the records), ``workload``, ``method`` ("dpkg-divert" | "rename"),
    ``real`` (where the real binary now is: the profile's ``binary`` should name it), ``packages``,
    ``diverted`` (the names diverted), ``record`` and ``message`` (one line for the operator).
    Raises WrapError (refusals: missing target, already diverted or moved aside by something else, gpu-router
    itself or its interpreter, a binary of the same name already wrapped, a file of an Essential package).
    """
    host = _Host(root, admindir, state_dir, launcher)
    path = _locate(host, binary)
    name = os.path.basename(path)
    workload = name if workload is None else workload
    _check_workload(workload)
    if name.startswith(".") or not set(name) <= _NAME_CHARS | set("+@,:=~"):
        raise WrapError(f"{path}: a wrapped binary's name must be letters, digits and '_.-+@,:=~' (it names "
                        f"its record file)", path, exit_code=2)
    _refuse_unless_root(host)
    lock = host.lock()
    try:
        record = host.read_record(name)
        if record is not None:
            return _rewrap(host, record, path, workload)
        checked = _check_wrappable(host, path)
        return _do_wrap(host, path, name, workload, checked)
    finally:
        _unlock(lock)


def _rewrap(host, record, path, workload):
    name = record["name"] if "name" in record else os.path.basename(path)
    if record["path"] != path:
        raise WrapError(f"{path}: another binary named {name!r} is already wrapped ({record['path']}, workload "
                        f"{record['workload']!r}); the wrapper tells workloads apart by the name it is called by, "
                        f"so only one binary of each name can be wrapped", path)
    if not host.is_launcher_link(path, record.get("launcher")):
        raise WrapError(f"{path}: recorded as wrapped, but it is no longer a symlink to gpu-router (was it "
                        f"reinstalled or replaced?); run `gpu-router unwrap {path}` first", path)
    if record["workload"] == workload:
        return _result("unchanged", record, f"{path} is already wrapped for workload {workload!r}")
    old = record["workload"]
    record["workload"] = workload
    host.write_record(record)
    return _result("updated", record, f"{path} now runs workload {workload!r} (was {old!r})")


def _check_wrappable(host, path):
    """Every refusal, before anything is touched. Returns (aliases, {name: packages}) for the owned names."""
    if not host.exists(path):
        raise WrapError(f"{path}: no such file", path)
    target = host.resolve(path)
    if host.is_launcher_link(path):
        raise WrapError(f"{path} already leads to gpu-router, but gpu-router has no record of wrapping it; "
                        f"run `gpu-router unwrap {path}` to repair, or remove the symlink", path)
    own = {host.resolve(p) for p in OWN_FILES + (host.launcher,)}
    if target in own or path in OWN_FILES:
        raise WrapError(f"{path} is gpu-router itself (it resolves to {target}); refusing to wrap it", path)
    interpreters = {host.resolve(p) for p in INTERPRETERS}
    if target in interpreters or path in INTERPRETERS:
        raise WrapError(f"{path} is the Python interpreter gpu-router itself runs on ({target}); wrapping it "
                        f"would make every job recurse", path)
    try:
        st = os.stat(host.real(target))
    except OSError:
        raise WrapError(f"{path} is a dangling symlink (to {target}); nothing to wrap", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise WrapError(f"{path} is not a regular file ({target}); only executables can be wrapped", path)
    if not st.st_mode & 0o111:
        raise WrapError(f"{path} is not executable (mode {stat.filemode(st.st_mode)}); nothing could run it", path)
    for suffix, what in ((DIVERT_SUFFIX, "a diversion"), (RENAME_SUFFIX, "a wrapper")):
        if host.exists(path + suffix):
            raise WrapError(f"{path}{suffix} already exists: {what} (another tool, or an earlier wrap done by "
                            f"hand) has moved a binary aside there; refusing to overwrite it", path)
    names = host.aliases(path)
    for frm, to, package in host.diversions():
        who = f"package {package}" if package else "a local diversion (dpkg-divert --local)"
        if frm in names:
            raise WrapError(f"{frm} is already diverted to {to} by {who}; only one diversion of a file can exist "
                            f"(see dpkg-divert --list)", path)
        if to in names:
            raise WrapError(f"{path} is the diverted copy of {frm} (diverted by {who}); wrap {frm} instead", path)
        if to in (n + DIVERT_SUFFIX for n in names):
            raise WrapError(f"{to} is already the target of a diversion of {frm} by {who}", path)
    owned = {}
    for n in names:
        packages = host.owners(n)
        if packages:
            owned[n] = packages
    for n, packages in owned.items():
        if PACKAGE in packages:
            raise WrapError(f"{n} belongs to gpu-router itself; refusing to wrap it", path)
        for package in packages:
            if host.essential(package):
                raise WrapError(f"{n} belongs to {package}, an Essential package; diverting it could break "
                                f"dpkg and the system, so gpu-router refuses", path)
    return names, owned


def _record(path, name, workload, method, real, owned, launcher):
    import time

    record = {
        "version": RECORD_VERSION,
        "name": name,                    # the symlink's name: what argv[0] says when a job runs through it
        "path": path,                    # the wrapped path, now a symlink to the launcher
        "workload": workload,            # the profile jobs through this name run
        "method": method,                # dpkg-divert | rename
        "real": real,                    # where the real binary is while wrapped
        "launcher": launcher,            # the symlink's target
        "packages": sorted({p for packages in owned.values() for p in packages}),
        "diverted": sorted(owned),       # the names dpkg knows the file by, each diverted to NAME.distrib
        "wrapped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record


def _do_wrap(host, path, name, workload, checked):
    names, owned = checked
    method = "dpkg-divert" if owned else "rename"
    real = path + (DIVERT_SUFFIX if owned else RENAME_SUFFIX)
    record = _record(path, name, workload, method, real, owned, host.launcher)
    host.write_record(record)
    diverted = []
    try:
        for n in sorted(owned):
            host.divert(n, n + DIVERT_SUFFIX)
            diverted.append(n)
        _swap_in(host, path, real)
    except BaseException as exc:
        problems = []
        for n in reversed(diverted):
            try:
                host.undivert(n, n + DIVERT_SUFFIX)
            except WrapError as undo:
                problems.append(str(undo))
        if not problems:
            host.drop_record(name)
        if isinstance(exc, WrapError):
            raise
        if isinstance(exc, OSError):
            raise WrapError(f"{path}: cannot wrap: {exc.strerror or exc}" + (
                f"; rollback also failed: {'; '.join(problems)}" if problems else "; nothing was changed"),
                path) from None
        raise
    if owned:
        how = (f"owned by {', '.join(record['packages'])}: diverted with dpkg-divert, so upgrades of the package "
               f"install the real binary as {real}")
    else:
        how = f"not owned by any package: the real binary was renamed to {real}"
    message = f"wrapped {path} for workload {workload!r} ({how}); the profile's binary should be {real}"
    return _result("wrapped", record, message)


def _swap_in(host, path, real):
    """Original → ``real`` and a launcher symlink → ``path``, with a file at ``path`` at every moment."""
    p, r = host.real(path), host.real(real)
    directory = os.path.dirname(p)
    tmp = os.path.join(directory, f".{os.path.basename(p)}.gpu-router-{os.getpid()}")
    os.symlink(host.launcher, tmp)
    moved = None
    try:
        try:
            os.link(p, r, follow_symlinks=False)
            moved = "link"
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise WrapError(f"{real} appeared while wrapping; refusing to overwrite it", path) from None
            if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOTSUP, errno.ENOSYS):
                raise
            # No hard links here: fall back to a rename (a moment without the binary at ``path``).
            os.rename(p, r)
            moved = "rename"
        os.rename(tmp, p)
        tmp = None
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        if moved == "link":
            _unlink_quietly(r)
        elif moved == "rename":
            try:
                os.rename(r, p)
            except OSError:
                pass
        raise
    atomicfile.fsync_dir(directory)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _result(action, record, message, notes=()):
    out = {
        "action": action, "binary": record["path"], "name": record["name"], "workload": record["workload"],
        "method": record["method"], "real": record["real"], "packages": list(record.get("packages", [])),
        "diverted": list(record.get("diverted", [])), "message": message,
    }
    if notes:
        out["notes"] = list(notes)
    return out


# ---- unwrap ----------------------------------------------------------------------------------------------------

def unwrap(binary=None, all=False, *, root="/", admindir=None, state_dir=None, launcher=LAUNCHER, force=False):
    """Restore ``binary`` (a path, the wrapped name, or a workload wrapped once) exactly as it was before wrap.

    ``all=True`` restores every binary gpu-router wrapped, plus any diversion by gpu-router without a record.
    ``force=True``: where the wrapped path was replaced by someone else since (so restoring would overwrite
    their file), drop gpu-router's diversion and record and leave both files as they are.
    Returns a dict with ``action`` "unwrapped" (and the keys of :func:`wrap`'s result, plus ``notes``), or for
    ``all`` ``{"action": "unwrapped-all", "unwrapped": [results], "message": …}``.
    Raises WrapError; with ``all``, UnwrapIncomplete after trying every binary when some could not be restored.
    """
    if all and binary:
        raise WrapError("give a BINARY or --all, not both", exit_code=2)
    if not all and not binary:
        raise WrapError("name a BINARY to unwrap, or give --all", exit_code=2)
    host = _Host(root, admindir, state_dir, launcher)
    _refuse_unless_root(host)
    if all and not os.path.isdir(host.state_dir) and not _diverted_by_us(host):
        return {"action": "unwrapped-all", "unwrapped": [], "message": "nothing is wrapped"}
    lock = host.lock()
    try:
        if all:
            return _unwrap_all(host, force)
        path, record = _find(host, binary)
        return _unwrap_one(host, path, record, force)
    finally:
        _unlock(lock)


def _diverted_by_us(host):
    return [(frm, to) for frm, to, package in host.diversions() if package == PACKAGE]


def _find(host, binary):
    if "/" in binary:
        path = _locate(host, binary)
        record = host.read_record(os.path.basename(path))
        if record is not None and record["path"] != path and path not in host.aliases(record["path"]):
            record = None
        return path, record
    record = host.read_record(binary) if set(binary) <= _NAME_CHARS | set("+@,:=~") else None
    if record is not None:
        return record["path"], record
    records = host.records()
    matches = [r for r in records if r["workload"] == binary]
    if len(matches) == 1:
        return matches[0]["path"], matches[0]
    if matches:
        raise WrapError(f"{binary!r}: several binaries run that workload ("
                        f"{', '.join(r['path'] for r in matches)}); name one", exit_code=2)
    wrapped = ", ".join(r["path"] for r in records) or "none"
    raise WrapError(f"{binary!r}: no wrapped binary or workload of that name (wrapped: {wrapped})", exit_code=2)


def _unwrap_all(host, force):
    bad = []
    targets = [(r["path"], r) for r in host.records(bad)]
    covered = {n for path, r in targets for n in host.aliases(path) + list(r.get("diverted", []))}
    for frm, _to in _diverted_by_us(host):
        if frm not in covered:
            path = os.path.join(host.resolve(os.path.dirname(frm)), os.path.basename(frm))
            targets.append((path, None))
            covered.update(host.aliases(path) + [frm])
    done, failures = [], list(bad)
    for path, record in targets:
        try:
            done.append(_unwrap_one(host, path, record, force))
        except WrapError as exc:
            failures.append(exc)
    if failures:
        raise UnwrapIncomplete(
            f"restored {len(done)} of {len(targets) + len(bad)} wrapped binaries; left as they are: "
            + "; ".join(str(f) for f in failures), done, failures)
    message = "\n".join(d["message"] for d in done) if done else "nothing is wrapped"
    return {"action": "unwrapped-all", "unwrapped": done, "message": message}


def _unwrap_one(host, path, record, force):
    names = host.aliases(path)
    ours = [(frm, to) for frm, to, package in host.diversions() if package == PACKAGE and frm in names]
    if record is not None:
        method, real, name = record["method"], record["real"], record.get("name", os.path.basename(path))
        launcher = record.get("launcher") or host.launcher
    else:
        name, launcher = os.path.basename(path), host.launcher
        if ours:
            method = "dpkg-divert"
            real = next((to for frm, to in ours if frm == path), ours[0][1])
            real = os.path.join(os.path.dirname(path), os.path.basename(real))
        elif host.is_launcher_link(path) and host.exists(path + RENAME_SUFFIX):
            method, real = "rename", path + RENAME_SUFFIX
        else:
            raise WrapError(f"{path} is not wrapped by gpu-router (no record, no diversion by gpu-router)", path,
                            exit_code=2)
        record = _record(path, name, name, method, real, {frm: [] for frm, _to in ours}, launcher)
    _check_restorable(host, path, method, real, ours)
    notes = []
    is_ours = host.is_launcher_link(path, launcher)
    present = host.exists(path)
    if host.exists(real):
        if present and not is_ours:
            if not force:
                raise WrapError(f"{path} is no longer gpu-router's symlink (it was replaced since it was wrapped) "
                                f"and the original is still at {real}; move one of them away yourself, or unwrap "
                                f"with --force to drop gpu-router's records and leave both files as they are", path)
            notes.append(f"left {path} and {real} as they are (--force)")
        else:
            os.rename(host.real(real), host.real(path))
            atomicfile.fsync_dir(os.path.dirname(host.real(path)))
            notes.append(f"restored {path} from {real}")
    elif is_ours:
        os.unlink(host.real(path))
        notes.append(f"{real} is gone (was its package removed?): removed the symlink, nothing to restore")
    else:
        notes.append(f"{real} is gone and {path} is not gpu-router's symlink: left {path} as it is")
    for frm, to in ours:
        host.undivert(frm, to)
        notes.append(f"removed the diversion of {frm}")
    host.drop_record(name)
    return _result("unwrapped", record, f"unwrapped {path}: " + "; ".join(notes), notes)


def _check_restorable(host, path, method, real, ours):
    """Before anything is moved: the record, dpkg's diversions and the files agree on what wrap made. The folder
    holding ``path`` is root's alone; ``real`` is where wrap puts it, owned by root and writable by no one else; a
    diverted ``real`` is the one ``dpkg-divert --list`` reports for ``path``. Otherwise WrapError, nothing touched."""
    def refuse(why):
        raise WrapError(f"{path}: {why}; not restoring (nothing touched)", path)

    if not _clean_abs(path) or not _clean_abs(real):
        refuse(f"{path!r} / {real!r} is not an absolute, normalized path")
    if os.path.dirname(real) != os.path.dirname(path):
        refuse(f"{real} is not beside {path}, where wrap puts it")
    try:
        os.close(atomicfile.open_dir(host.real(os.path.dirname(path))))
    except atomicfile.Refused as exc:
        refuse(exc.strerror)
    except OSError:
        pass  # a folder that is gone holds nothing to move
    diverted_to = {os.path.join(host.resolve(os.path.dirname(to)), os.path.basename(to)) for _frm, to in ours}
    if method == "dpkg-divert" and ours and real not in diverted_to:
        refuse(f"dpkg reports its diversion to {', '.join(to for _frm, to in ours)}, not to {real}")
    try:
        st = os.lstat(host.real(real))
    except OSError:
        return
    if method == "dpkg-divert" and not ours:
        refuse(f"{real} exists but dpkg has no diversion of {path} by gpu-router (dpkg-divert --list)")
    if st.st_uid != 0 and st.st_uid != os.geteuid():
        refuse(f"{real} is owned by uid {st.st_uid}, not root: wrap did not put it there")
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        refuse(f"{real} is writable by group or others (mode {stat.filemode(st.st_mode)})")


def list_wrapped(*, root="/", state_dir=None):
    """The wrap records (dicts as written), for ``gpu-router status``."""
    return _Host(root, None, state_dir).records([])  # a record wrap did not write is not listed


# ---- maintainer scripts and tests: python3 -m gpu_router.wrap ------------------------------------------------

def main(argv=None):
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python3 -m gpu_router.wrap",
                                description="wrap/unwrap workload binaries (what `gpu-router wrap` does)")
    p.add_argument("--root", default=os.environ.get("DPKG_ROOT") or "/")
    p.add_argument("--admindir")
    p.add_argument("--state-dir")
    p.add_argument("--launcher", default=LAUNCHER)
    p.add_argument("--json", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wrap")
    w.add_argument("binary")
    w.add_argument("--workload", "-w")
    u = sub.add_parser("unwrap")
    u.add_argument("binary", nargs="?")
    u.add_argument("--all", action="store_true")
    u.add_argument("--force", action="store_true")
    sub.add_parser("list")
    args = p.parse_args(argv)
    common = dict(root=args.root, admindir=args.admindir, state_dir=args.state_dir, launcher=args.launcher)
    try:
        if args.command == "wrap":
            result = wrap(args.binary, args.workload, **common)
        elif args.command == "unwrap":
            result = unwrap(args.binary, all=args.all, force=args.force, **common)
        else:
            result = {"wrapped": list_wrapped(root=args.root, state_dir=args.state_dir)}
            result["message"] = "\n".join(f"{r['path']} -> workload {r['workload']} ({r['method']}, real binary "
                                          f"{r['real']})" for r in result["wrapped"]) or "nothing is wrapped"
    except WrapError as exc:
        sys.stderr.write(f"gpu-router: {exc}\n")
        return exc.exit_code
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"{result['message']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
