"""wrap/unwrap against REAL dpkg, in a throw-away root with its own dpkg database (never this host's).

Each test gets a root tree with merged /usr (bin → usr/bin), an empty dpkg database, a fake gpu-router package
(so "belongs to gpu-router" is dpkg's own answer) and a fake workload package, installed, upgraded and removed
with `dpkg --root`: what a package upgrade does to a diverted file is dpkg's behaviour, not a simulation of it.
"""

import errno
import os
import subprocess
import sys
import tomllib

import pytest

from gpu_router.ops import wrap as W
from gpu_router import wrapmap

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
LAUNCHER = "#!/usr/bin/python3 -IS\n# stand-in for the gpu-router launcher\n"


def run(*cmd, check=True):
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class Sysroot:
    def __init__(self, base):
        self.base = base
        self.path = base / "root"
        self.debs = base / "debs"
        self.debs.mkdir()
        admin = self.path / "var/lib/dpkg"
        for d in ("info", "updates", "triggers"):
            (admin / d).mkdir(parents=True)
        (admin / "status").write_text("")
        for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/local/bin"):
            (self.path / d).mkdir(parents=True)
        (self.path / "bin").symlink_to("usr/bin")
        (self.path / "sbin").symlink_to("usr/sbin")
        self.write("/usr/bin/python3.11", "#!/bin/false\n", 0o755)
        (self.path / "usr/bin/python3").symlink_to("python3.11")
        self.install("gpu-router", "0.1", {"/usr/bin/gpu-router": LAUNCHER,
                                            "/usr/sbin/gpu-router-agent": LAUNCHER,
                                            "/usr/lib/gpu-router/helper": "#!/bin/sh\n"})

    def p(self, path):
        return self.path / path.lstrip("/")

    def write(self, path, text, mode=0o644):
        f = self.p(path)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        f.chmod(mode)
        return f

    def deb(self, name, version, files, essential=False):
        tree = self.base / f"build-{name}-{version}"
        (tree / "DEBIAN").mkdir(parents=True)
        control = (f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.org>\n"
                   + ("Essential: yes\n" if essential else "") + f"Description: {name}\n test package\n")
        (tree / "DEBIAN/control").write_text(control)
        for path, text in files.items():
            f = tree / path.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
            f.chmod(0o755)
        out = self.debs / f"{name}_{version}_all.deb"
        run("dpkg-deb", "--root-owner-group", "-Znone", "-b", str(tree), str(out))
        return out

    def dpkg(self, *args, check=True):
        return run("dpkg", f"--root={self.path}", "--log=/dev/null", "--force-script-chrootless", *args,
                   check=check)

    def install(self, name, version, files, essential=False):
        self.dpkg("-i", str(self.deb(name, version, files, essential)))

    def remove(self, name):
        self.dpkg("-r", name)

    def diversions(self):
        return run("dpkg-divert", f"--root={self.path}", "--list").stdout.splitlines()

    def owner(self, path):
        return run("dpkg-query", f"--root={self.path}", "-S", path, check=False).stdout

    def wrap(self, binary, workload=None, **kw):
        return W.wrap(binary, workload, root=str(self.path), **kw)

    def unwrap(self, binary=None, **kw):
        return W.unwrap(binary, root=str(self.path), **kw)

    @property
    def state(self):
        return self.p("/var/lib/gpu-router/wrapped")


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_ROUTER_WRAPPED_DIR", raising=False)
    monkeypatch.delenv("DPKG_ROOT", raising=False)
    monkeypatch.delenv("DPKG_ADMINDIR", raising=False)
    return Sysroot(tmp_path)


@pytest.fixture
def workload(root):
    root.install("fake-workload", "1.0", {"/usr/bin/fake-transcribe": "#!/bin/sh\necho v1 \"$@\"\n"})
    return root


def untouched(root, path, text):
    """The refused binary is exactly as it was, and gpu-router left no trace."""
    f = root.p(path)
    assert not f.is_symlink() and f.read_text() == text
    assert not [d for d in root.diversions() if "gpu-router" in d]
    assert not root.state.exists() or not [n for n in os.listdir(root.state) if not n.startswith(".")]


# ---- dpkg-divert ------------------------------------------------------------------------------------------------

def test_wrap_packaged_binary_diverts_and_links(workload, monkeypatch):
    root = workload
    f = root.p("/usr/bin/fake-transcribe")
    before = f.stat()
    result = root.wrap("/usr/bin/fake-transcribe", "transcribe")
    assert result["action"] == "wrapped" and result["method"] == "dpkg-divert"
    assert result["real"] == "/usr/bin/fake-transcribe.distrib"
    assert result["packages"] == ["fake-workload"] and result["diverted"] == ["/usr/bin/fake-transcribe"]
    assert "fake-transcribe.distrib" in result["message"]
    assert os.readlink(f) == "/usr/bin/gpu-router"
    real = root.p("/usr/bin/fake-transcribe.distrib")
    assert real.stat().st_ino == before.st_ino and real.read_text() == "#!/bin/sh\necho v1 \"$@\"\n"
    assert root.diversions() == [
        "diversion of /usr/bin/fake-transcribe to /usr/bin/fake-transcribe.distrib by gpu-router"]
    assert "diversion by gpu-router from: /usr/bin/fake-transcribe" in root.owner("/usr/bin/fake-transcribe")
    record = tomllib.loads((root.state / "fake-transcribe.toml").read_text())
    assert {k: record[k] for k in ("version", "name", "path", "workload", "method", "real", "launcher",
                                   "packages", "diverted")} == {
        "version": 1, "name": "fake-transcribe", "path": "/usr/bin/fake-transcribe", "workload": "transcribe",
        "method": "dpkg-divert", "real": "/usr/bin/fake-transcribe.distrib", "launcher": "/usr/bin/gpu-router",
        "packages": ["fake-workload"], "diverted": ["/usr/bin/fake-transcribe"]}
    hot = root.state / "fake-transcribe.workload"
    assert hot.read_text() == "transcribe\n" and hot.stat().st_mode & 0o777 == 0o644
    monkeypatch.setenv("GPU_ROUTER_WRAPPED_DIR", str(root.state))
    assert wrapmap.lookup("fake-transcribe") == "transcribe"  # the wrapper's hot-path reader agrees


def test_package_upgrade_keeps_the_wrap_and_unwrap_restores_the_new_binary(workload):
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.install("fake-workload", "1.1", {"/usr/bin/fake-transcribe": "#!/bin/sh\necho v2\n"})
    assert os.readlink(root.p("/usr/bin/fake-transcribe")) == "/usr/bin/gpu-router"
    assert root.p("/usr/bin/fake-transcribe.distrib").read_text() == "#!/bin/sh\necho v2\n"
    result = root.unwrap("/usr/bin/fake-transcribe")
    assert result["action"] == "unwrapped"
    f = root.p("/usr/bin/fake-transcribe")
    assert not f.is_symlink() and f.read_text() == "#!/bin/sh\necho v2\n"
    assert not root.p("/usr/bin/fake-transcribe.distrib").exists()
    assert root.diversions() == []
    assert root.owner("/usr/bin/fake-transcribe").strip() == "fake-workload: /usr/bin/fake-transcribe"
    assert sorted(os.listdir(root.state)) == [".lock"]
    root.dpkg("--verify", "fake-workload")  # dpkg finds its file exactly as shipped


def test_unwrap_restores_the_same_inode_mode_and_time(workload):
    root = workload
    f = root.p("/usr/bin/fake-transcribe")
    f.chmod(0o750)
    os.utime(f, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = f.stat()
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.unwrap("/usr/bin/fake-transcribe")
    after = f.stat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns, after.st_uid, after.st_gid) == \
        (before.st_ino, before.st_mode, before.st_mtime_ns, before.st_uid, before.st_gid)


def test_workload_package_removed_while_wrapped(workload):
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.remove("fake-workload")
    assert not root.p("/usr/bin/fake-transcribe.distrib").exists()  # dpkg removed the diverted file
    assert root.p("/usr/bin/fake-transcribe").is_symlink()          # ours: not dpkg's to remove
    result = root.unwrap("fake-transcribe")
    assert any("is gone" in n for n in result["notes"])
    assert not os.path.lexists(root.p("/usr/bin/fake-transcribe"))
    assert root.diversions() == []


def test_merged_usr_alias_is_diverted_under_the_name_dpkg_knows(root):
    root.install("old-layout", "1.0", {"/bin/fake-old": "#!/bin/sh\necho old1\n"})
    result = root.wrap("/bin/fake-old", "old")                      # given by its alias, stored canonically
    assert result["binary"] == "/usr/bin/fake-old"
    assert result["diverted"] == ["/bin/fake-old"]
    assert root.diversions() == ["diversion of /bin/fake-old to /bin/fake-old.distrib by gpu-router"]
    root.install("old-layout", "1.1", {"/bin/fake-old": "#!/bin/sh\necho old2\n"})
    assert os.readlink(root.p("/usr/bin/fake-old")) == "/usr/bin/gpu-router"
    assert root.p("/usr/bin/fake-old.distrib").read_text() == "#!/bin/sh\necho old2\n"
    root.unwrap("/usr/bin/fake-old")
    assert root.p("/usr/bin/fake-old").read_text() == "#!/bin/sh\necho old2\n"
    assert root.diversions() == []


# ---- rename -----------------------------------------------------------------------------------------------------

def test_unowned_binary_is_renamed_to_real(root):
    f = root.write("/usr/local/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
    ino = f.stat().st_ino
    result = root.wrap("/usr/local/bin/tool", "tool-gpu")
    assert result["method"] == "rename" and result["real"] == "/usr/local/bin/tool.real"
    assert result["packages"] == [] and result["diverted"] == []
    assert os.readlink(f) == "/usr/bin/gpu-router"
    assert root.p("/usr/local/bin/tool.real").stat().st_ino == ino
    assert root.diversions() == []
    root.unwrap("tool-gpu")                                          # by workload name
    assert not f.is_symlink() and f.stat().st_ino == ino and not root.p("/usr/local/bin/tool.real").exists()
    assert sorted(os.listdir(root.state)) == [".lock"]


def test_without_hard_links_the_swap_falls_back_to_rename(root, monkeypatch):
    f = root.write("/usr/local/bin/tool", "#!/bin/sh\n", 0o755)

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    root.wrap("/usr/local/bin/tool")
    assert os.readlink(f) == "/usr/bin/gpu-router" and root.p("/usr/local/bin/tool.real").read_text() == "#!/bin/sh\n"


def test_a_failed_swap_rolls_back_diversion_and_records(workload, monkeypatch):
    root = workload

    def broken_link(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    with pytest.raises(W.WrapError, match="Input/output error.*nothing was changed"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")
    untouched(root, "/usr/bin/fake-transcribe", "#!/bin/sh\necho v1 \"$@\"\n")
    assert not [n for n in os.listdir(root.p("/usr/bin")) if n.startswith(".")]


# ---- refusals ---------------------------------------------------------------------------------------------------

def test_refuses_a_missing_binary(root):
    with pytest.raises(W.WrapError, match="no such file"):
        root.wrap("/usr/bin/nothing-here", "x")


@pytest.mark.parametrize("suffix", [".distrib", ".real"])
def test_refuses_when_something_already_moved_the_binary_aside(workload, suffix):
    root = workload
    root.write("/usr/bin/fake-transcribe" + suffix, "#!/bin/sh\n", 0o755)
    with pytest.raises(W.WrapError, match=f"fake-transcribe{suffix} already exists"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")
    untouched(root, "/usr/bin/fake-transcribe", "#!/bin/sh\necho v1 \"$@\"\n")


def test_refuses_a_file_diverted_by_another_package(workload):
    root = workload
    run("dpkg-divert", f"--root={root.path}", "--package", "other", "--no-rename", "--divert",
        "/usr/bin/fake-transcribe.other", "--add", "/usr/bin/fake-transcribe")
    with pytest.raises(W.WrapError, match="already diverted to /usr/bin/fake-transcribe.other by package other"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")
    assert root.diversions() == [
        "diversion of /usr/bin/fake-transcribe to /usr/bin/fake-transcribe.other by other"]


def test_refuses_a_locally_diverted_file(workload):
    root = workload
    run("dpkg-divert", f"--root={root.path}", "--local", "--no-rename", "--add", "/usr/bin/fake-transcribe")
    with pytest.raises(W.WrapError, match="local diversion"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")


@pytest.mark.parametrize("path, pattern", [
    ("/usr/bin/gpu-router", "gpu-router itself"),
    ("/usr/sbin/gpu-router-agent", "gpu-router itself"),
    ("/usr/lib/gpu-router/helper", "belongs to gpu-router itself"),
    ("/usr/bin/python3", "Python interpreter"),
    ("/usr/bin/python3.11", "Python interpreter"),
])
def test_refuses_gpu_router_and_its_interpreter(root, path, pattern):
    with pytest.raises(W.WrapError, match=pattern):
        root.wrap(path, "x")
    assert root.diversions() == []


def test_refuses_a_symlink_that_already_leads_to_gpu_router(root):
    (root.p("/usr/local/bin/gr")).symlink_to("../../bin/gpu-router")
    with pytest.raises(W.WrapError, match="already leads to gpu-router"):
        root.wrap("/usr/local/bin/gr", "x")
    (root.p("/usr/local/bin/gr2")).symlink_to("/bin/gpu-router")     # absolute, through the /bin alias
    with pytest.raises(W.WrapError, match="already leads to gpu-router"):
        root.wrap("/usr/local/bin/gr2", "x")


def test_refuses_non_executables_and_dangling_links(root):
    root.write("/usr/local/bin/data", "x", 0o644)
    with pytest.raises(W.WrapError, match="not executable"):
        root.wrap("/usr/local/bin/data", "x")
    root.p("/usr/local/bin/dir").mkdir()
    with pytest.raises(W.WrapError, match="not a regular file"):
        root.wrap("/usr/local/bin/dir", "x")
    root.p("/usr/local/bin/dangling").symlink_to("/nowhere")
    with pytest.raises(W.WrapError, match="dangling symlink"):
        root.wrap("/usr/local/bin/dangling", "x")


def test_refuses_a_file_of_an_essential_package(root):
    root.install("coreish", "1.0", {"/usr/bin/coreish": "#!/bin/sh\n"}, essential=True)
    with pytest.raises(W.WrapError, match="Essential package"):
        root.wrap("/usr/bin/coreish", "x")


@pytest.mark.parametrize("name", ["", ".hidden", "has space", "a/b", "ünï"])
def test_refuses_bad_workload_names(workload, name):
    with pytest.raises(W.WrapError) as info:
        workload.wrap("/usr/bin/fake-transcribe", name)
    assert info.value.exit_code == 2


def test_two_binaries_with_one_name_cannot_both_be_wrapped(workload):
    root = workload
    root.write("/usr/local/bin/fake-transcribe", "#!/bin/sh\n", 0o755)
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    with pytest.raises(W.WrapError, match="another binary named 'fake-transcribe' is already wrapped"):
        root.wrap("/usr/local/bin/fake-transcribe", "other")
    assert not root.p("/usr/local/bin/fake-transcribe").is_symlink()


def test_refuses_as_non_root_before_touching_anything(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(W.WrapError, match="run as root"):
        W.wrap("/nonexistent/gpu-router-test-binary", "x")
    with pytest.raises(W.WrapError, match="run as root"):
        W.unwrap(all=True)


# ---- idempotence, lookups, repairs ----------------------------------------------------------------------------

def test_wrap_again_is_unchanged_or_updates_the_workload(workload, monkeypatch):
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    assert root.wrap("/usr/bin/fake-transcribe", "transcribe")["action"] == "unchanged"
    result = root.wrap("/bin/fake-transcribe", "whisper")
    assert result["action"] == "updated" and "was 'transcribe'" in result["message"]
    monkeypatch.setenv("GPU_ROUTER_WRAPPED_DIR", str(root.state))
    assert wrapmap.lookup("fake-transcribe") == "whisper"
    assert len(root.diversions()) == 1
    assert root.wrap("fake-transcribe", "whisper")["action"] == "unchanged"  # found on PATH, inside the root


def test_default_workload_is_the_binary_name(workload):
    result = workload.wrap("/usr/bin/fake-transcribe")
    assert result["workload"] == "fake-transcribe"
    assert (workload.state / "fake-transcribe.workload").read_text() == "fake-transcribe\n"


def test_unwrap_names(workload):
    root = workload
    with pytest.raises(W.WrapError, match="no wrapped binary or workload") as info:
        root.unwrap("fake-transcribe")
    assert info.value.exit_code == 2
    with pytest.raises(W.WrapError, match="not wrapped by gpu-router"):
        root.unwrap("/usr/bin/fake-transcribe")
    with pytest.raises(W.WrapError, match="name a BINARY to unwrap, or give --all"):
        root.unwrap()
    with pytest.raises(W.WrapError, match="not both"):
        root.unwrap("x", all=True)


def test_unwrap_repairs_a_wrap_whose_records_were_lost(workload):
    root = workload
    root.write("/usr/local/bin/tool", "#!/bin/sh\n", 0o755)
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.wrap("/usr/local/bin/tool")
    for n in os.listdir(root.state):
        if not n.startswith("."):
            os.unlink(root.state / n)
    root.unwrap("/usr/local/bin/tool")            # found by its symlink and .real
    assert root.p("/usr/local/bin/tool").read_text() == "#!/bin/sh\n"
    result = root.unwrap(all=True)                # found by gpu-router's diversion alone
    assert [r["binary"] for r in result["unwrapped"]] == ["/usr/bin/fake-transcribe"]
    assert root.p("/usr/bin/fake-transcribe").read_text() == "#!/bin/sh\necho v1 \"$@\"\n"
    assert root.diversions() == []


def test_unwrap_finishes_a_wrap_interrupted_after_the_diversion(workload):
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    # as if the process had died between dpkg-divert and the swap: the original is still in place
    os.rename(root.p("/usr/bin/fake-transcribe.distrib"), root.p("/usr/bin/fake-transcribe"))
    result = root.unwrap("fake-transcribe")
    assert "left /usr/bin/fake-transcribe as it is" in result["message"]
    assert root.p("/usr/bin/fake-transcribe").read_text() == "#!/bin/sh\necho v1 \"$@\"\n"
    assert root.diversions() == [] and sorted(os.listdir(root.state)) == [".lock"]


def test_unwrap_refuses_to_overwrite_a_replaced_binary_unless_forced(workload):
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    f = root.p("/usr/bin/fake-transcribe")
    f.unlink()
    root.write("/usr/bin/fake-transcribe", "#!/bin/sh\necho admin\n", 0o755)
    with pytest.raises(W.WrapError, match="no longer gpu-router's symlink"):
        root.unwrap("/usr/bin/fake-transcribe")
    with pytest.raises(W.WrapError, match="no longer a symlink to gpu-router"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")
    result = root.unwrap("/usr/bin/fake-transcribe", force=True)
    assert "(--force)" in result["message"]
    assert f.read_text() == "#!/bin/sh\necho admin\n"
    assert root.p("/usr/bin/fake-transcribe.distrib").exists()
    assert root.diversions() == []


def test_unwrap_all_tries_everything_and_reports_what_it_left(workload):
    root = workload
    root.install("second", "1.0", {"/usr/bin/second": "#!/bin/sh\necho 2\n"})
    root.write("/usr/local/bin/third", "#!/bin/sh\necho 3\n", 0o755)
    for path in ("/usr/bin/fake-transcribe", "/usr/bin/second", "/usr/local/bin/third"):
        root.wrap(path)
    root.p("/usr/bin/second").unlink()
    root.write("/usr/bin/second", "#!/bin/sh\necho admin\n", 0o755)
    with pytest.raises(W.UnwrapIncomplete) as info:
        root.unwrap(all=True)
    assert sorted(r["binary"] for r in info.value.done) == ["/usr/bin/fake-transcribe", "/usr/local/bin/third"]
    assert len(info.value.failures) == 1 and "/usr/bin/second" in str(info.value)
    assert root.diversions() == ["diversion of /usr/bin/second to /usr/bin/second.distrib by gpu-router"]
    assert root.unwrap(all=True, force=True)["unwrapped"][0]["binary"] == "/usr/bin/second"
    assert root.unwrap(all=True) == {"action": "unwrapped-all", "unwrapped": [], "message": "nothing is wrapped"}


def test_unwrap_all_with_nothing_wrapped(root):
    assert root.unwrap(all=True)["unwrapped"] == []
    assert not root.state.exists()


def test_module_entry_point_as_the_prerm_runs_it(workload):
    """prerm: python3 -I -B -m gpu_router.ops.wrap --root "${DPKG_ROOT:-/}" unwrap --all (-I would drop PYTHONPATH)."""
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    lib = os.path.dirname(os.path.dirname(os.path.dirname(W.__file__)))  # the folder that holds gpu_router
    env = dict(ENV, PYTHONPATH=str(lib))
    listed = subprocess.run(["/usr/bin/python3", "-B", "-m", "gpu_router.ops.wrap", "--root", str(root.path), "list"],
                            env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "/usr/bin/fake-transcribe -> workload transcribe" in listed.stdout
    env["DPKG_ROOT"] = str(root.path)
    proc = subprocess.run(["/usr/bin/python3", "-B", "-m", "gpu_router.ops.wrap", "unwrap", "--all"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "unwrapped /usr/bin/fake-transcribe" in proc.stdout
    assert root.diversions() == []
    proc = subprocess.run(["/usr/bin/python3", "-B", "-m", "gpu_router.ops.wrap", "unwrap", "nothing"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("gpu-router: ")


# ---- records root did not write as wrap writes them (issue 17) ---------------------------------------------------

def _forge(root, name, **fields):
    """A record in gpu-router's folder, root's own file (root was tricked into writing it: issue 17 saw one come
    from a calibration sample appended through a member's symlink), saying what wrap never did."""
    import tomli_w

    root.state.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "name": name, "workload": "w", "launcher": "/usr/bin/gpu-router", "packages": [],
           "diverted": [], "wrapped_at": "2026-12-06T00:00:00Z"}
    doc.update(fields)
    (root.state / f"{name}.toml").write_text(tomli_w.dumps(doc))
    (root.state / f"{name}.workload").write_text("w\n")


def _members_script(root, path):
    f = root.write(path, "#!/bin/sh\nid -u\n", 0o755)
    os.chown(f, 4001, 100)
    return f


def test_unwrap_never_moves_a_file_wrap_did_not_put_there(workload):
    """The reproduced escalation: a record saying path /usr/local/sbin/apt, real = a member's script; `apt-get
    remove gpu-router` (prerm: unwrap --all) renamed the script over /usr/local/sbin/apt, and root's next `apt`
    ran it. Now unwrap refuses that record, touches nothing, and still restores what wrap did make."""
    root = workload
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.p("/usr/local/sbin").mkdir(parents=True)
    evil = _members_script(root, "/run/gpu-router/locks/evil")
    _forge(root, "apt", path="/usr/local/sbin/apt", method="rename", real="/run/gpu-router/locks/evil")
    with pytest.raises(W.UnwrapIncomplete, match="not a wrap record gpu-router wrote") as info:
        root.unwrap(all=True)
    assert [d["binary"] for d in info.value.done] == ["/usr/bin/fake-transcribe"]
    assert root.p("/usr/bin/fake-transcribe").read_text() == "#!/bin/sh\necho v1 \"$@\"\n"
    assert not os.path.lexists(root.p("/usr/local/sbin/apt"))
    assert evil.read_text() == "#!/bin/sh\nid -u\n"
    with pytest.raises(W.WrapError, match="not a wrap record gpu-router wrote"):
        root.unwrap("apt")
    # as prerm runs it: exit 1 with the reason, still nothing moved
    lib = os.path.dirname(os.path.dirname(os.path.dirname(W.__file__)))
    proc = subprocess.run(["/usr/bin/python3", "-B", "-m", "gpu_router.ops.wrap", "--root", str(root.path), "unwrap",
                           "--all"], env=dict(ENV, PYTHONPATH=lib), capture_output=True, text=True)
    assert proc.returncode == 1 and "not a wrap record gpu-router wrote" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.lexists(root.p("/usr/local/sbin/apt"))


@pytest.mark.parametrize("case", ["member-owned-real", "member-writable-folder", "no-diversion", "other-path"])
def test_unwrap_restores_only_when_record_diversion_and_owner_agree(root, case):
    """Records that look like wrap's own but the files or dpkg disagree: nothing is moved."""
    root.p("/usr/local/sbin").mkdir(parents=True)
    if case == "member-owned-real":
        _members_script(root, "/usr/local/sbin/apt.real")
        _forge(root, "apt", path="/usr/local/sbin/apt", method="rename", real="/usr/local/sbin/apt.real")
    elif case == "member-writable-folder":
        root.write("/usr/local/sbin/apt.real", "#!/bin/sh\n", 0o755)
        os.chown(root.p("/usr/local/sbin"), 0, 100)
        os.chmod(root.p("/usr/local/sbin"), 0o2775)
        _forge(root, "apt", path="/usr/local/sbin/apt", method="rename", real="/usr/local/sbin/apt.real")
    elif case == "no-diversion":
        root.write("/usr/local/sbin/apt.distrib", "#!/bin/sh\n", 0o755)
        _forge(root, "apt", path="/usr/local/sbin/apt", method="dpkg-divert", real="/usr/local/sbin/apt.distrib")
    else:  # the right real for its path, but a path that is not the record's name
        root.write("/usr/local/sbin/apt.real", "#!/bin/sh\n", 0o755)
        _forge(root, "tool", path="/usr/local/sbin/apt", method="rename", real="/usr/local/sbin/apt.real")
    before = sorted(os.listdir(root.p("/usr/local/sbin")))
    with pytest.raises(W.WrapError):
        root.unwrap(all=True)
    assert sorted(os.listdir(root.p("/usr/local/sbin"))) == before
    assert not os.path.lexists(root.p("/usr/local/sbin/apt"))


def test_wrap_records_are_refused_in_a_folder_others_can_write(workload):
    root = workload
    root.state.mkdir(parents=True)
    os.chown(root.state, 0, 100)
    os.chmod(root.state, 0o2775)
    with pytest.raises(W.WrapError, match="others can write"):
        root.wrap("/usr/bin/fake-transcribe", "transcribe")
    untouched(root, "/usr/bin/fake-transcribe", "#!/bin/sh\necho v1 \"$@\"\n")


def test_postrm_safety_net_moves_only_what_wrap_made(root):
    """postrm purge's shell net (gpu-router's Python is gone by then) read `real` and `path` from any record: a
    record naming a wrapped binary's path and a member's script as `real` put the script in its place."""
    root.write("/usr/local/bin/tool", "#!/bin/sh\necho tool\n", 0o755)
    root.wrap("/usr/local/bin/tool")
    evil = _members_script(root, "/home/m/evil")  # purge removes /run/gpu-router: a place that stays
    _forge(root, "a", path="/usr/local/bin/tool", method="rename", real="/home/m/evil")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "debian", "gpu-router.postrm")
    # #DEBHELPER# is a comment in the source; DPKG_ROOT keeps every step inside the test root
    proc = subprocess.run(["sh", script, "purge"], env=dict(ENV, DPKG_ROOT=str(root.path)), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert root.p("/usr/local/bin/tool").read_text() == "#!/bin/sh\necho tool\n"
    assert evil.read_text() == "#!/bin/sh\nid -u\n"
