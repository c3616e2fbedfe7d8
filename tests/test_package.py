"""The Debian package: build it from a copy of the tree, run lintian, and look inside the .deb.

The build runs once per session (~3 s) in a temporary copy of the tracked and untracked-but-not-ignored files,
so the checkout stays clean. Nothing here installs the package on this host: the maintainer scripts' own logic
(prerm's unwrap, postrm's purge safety net) runs against a throw-away root through DPKG_ROOT, and the real
install/upgrade/purge is tests/systemd/test_deb.py's job, inside a booted container.
"""

import os
import pathlib
import re
import shutil
import stat
import subprocess
import tomllib

import pytest

from gpu_router import config as _config
from gpu_router.journal import MESSAGE_IDS

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}

pytestmark = pytest.mark.package

UNITS = ["gpu-router-agent.service", "gpu-router-agent.socket", "gpu-router.slice", "gpu-router-gpu.slice",
         "gpu-router-cpu.slice"]
EXPECTED = [
    "./usr/bin/gpu-router",
    "./usr/sbin/gpu-router-agent",
    "./etc/gpu-router/config.toml",
    "./etc/gpu-router/workloads.d/",
    "./var/lib/gpu-router/",
    *[f"./lib/systemd/system/{u}" for u in UNITS],
    "./usr/lib/tmpfiles.d/gpu-router.conf",
    "./usr/lib/sysusers.d/gpu-router.conf",
    "./usr/lib/systemd/catalog/gpu-router.catalog",
    "./usr/share/man/man1/gpu-router.1.gz",
    "./usr/share/man/man8/gpu-router-agent.8.gz",
    "./usr/share/man/man5/gpu-router.toml.5.gz",
    "./usr/share/bash-completion/completions/gpu-router",
    "./usr/share/bash-completion/completions/gpu-router-agent",
    "./usr/share/doc/gpu-router/README.Debian",
    "./usr/share/doc/gpu-router/examples/example-whisper.toml.example",
    "./usr/share/doc/gpu-router/examples/gpu-router.rules.yml",
    "./usr/lib/python3/dist-packages/gpu_router/daemon/metrics.py",
    "./usr/share/doc/gpu-router/copyright",
    "./usr/lib/python3/dist-packages/gpu_router/__init__.py",
    "./usr/lib/python3/dist-packages/gpu_router/ops/wrap.py",
]


def run(*cmd, cwd=None, env=None, check=True, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> exit {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def copy_tree(dest):
    """Tracked files plus untracked files git does not ignore: what a clean checkout of this state holds."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for raw in names:
        if not raw:
            continue
        name = os.fsdecode(raw)
        src = REPO / name
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the work tree, not yet committed
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


class Built:
    def __init__(self, base):
        self.base = base
        self.deb = next(base.glob("gpu-router_*_all.deb"))
        self.changes = next(base.glob("gpu-router_*.changes"))
        self.root = base / "extracted"
        run("dpkg-deb", "-x", str(self.deb), str(self.root))
        self.control = base / "control"
        run("dpkg-deb", "-e", str(self.deb), str(self.control))
        self.listing = run("dpkg-deb", "-c", str(self.deb)).stdout.splitlines()
        self.paths = {line.split()[5] for line in self.listing}

    def mode(self, path):
        for line in self.listing:
            fields = line.split()
            if fields[5] == path:
                return fields[0]
        raise KeyError(path)

    def script(self, name):
        return (self.control / name).read_text()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    if not shutil.which("dpkg-buildpackage", path=ENV["PATH"]):
        pytest.skip("dpkg-dev is not installed")
    base = tmp_path_factory.mktemp("deb")
    src = base / "src"
    copy_tree(src)
    proc = run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src, check=False)
    (base / "build.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"dpkg-buildpackage failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return Built(base)


# ---- lintian ---------------------------------------------------------------------------------------------------

def test_lintian_reports_no_errors_and_no_warnings(built):
    proc = run("lintian", "--fail-on", "error,warning", str(built.changes), check=False)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


# ---- contents --------------------------------------------------------------------------------------------------

def test_deb_holds_units_tmpfiles_catalog_man_pages_and_completion(built):
    missing = [p for p in EXPECTED if p not in built.paths]
    assert not missing, f"not in the .deb: {missing}"
    assert built.mode("./usr/bin/gpu-router") == "-rwxr-xr-x"
    assert built.mode("./usr/sbin/gpu-router-agent") == "-rwxr-xr-x"


def test_every_module_is_packaged_and_nothing_else_leaks_in(built):
    prefix = "./usr/lib/python3/dist-packages/gpu_router/"
    shipped = {p[len(prefix):] for p in built.paths if p.startswith(prefix) and p.endswith(".py")}
    src = built.base / "src/agent"
    assert shipped == {str(p.relative_to(src)) for p in src.rglob("*.py")}
    leaks = [p for p in built.paths if re.search(r"__pycache__|\.pyc$|pytest_cache|/tests/|\.egg-info|/\.build/", p)]
    assert not leaks, leaks
    # No console_scripts: the launchers are ours, byte for byte.
    assert not [p for p in built.paths if p.startswith("./usr/bin/") and p != "./usr/bin/gpu-router"
                and not p.endswith("/")]


def test_launchers_are_installed_unchanged(built):
    for src, dest in (("packaging/bin/gpu-router", "usr/bin/gpu-router"),
                      ("packaging/bin/gpu-router-agent", "usr/sbin/gpu-router-agent")):
        assert (built.root / dest).read_bytes() == (REPO / src).read_bytes(), dest
    assert (built.root / "usr/bin/gpu-router").read_text().splitlines()[0] == "#!/usr/bin/python3 -IS"


def test_conffiles_are_exactly_the_config(built):
    assert (built.control / "conffiles").read_text().split() == ["/etc/gpu-router/config.toml"]


def test_control_fields(built):
    fields = {}
    for line in run("dpkg-deb", "-f", str(built.deb)).stdout.splitlines():
        if not line.startswith(" "):
            key, _, value = line.partition(": ")
            fields[key] = value
    assert fields["Package"] == "gpu-router" and fields["Architecture"] == "all"
    depends = {d.strip() for d in fields["Depends"].split(",")}
    for dep in ("python3-pystemd", "python3-structlog", "python3-tomli-w", "python3-sdnotify", "python3-systemd",
                "python3-prometheus-client"):
        assert dep in depends
    assert any(d.startswith("python3:any") for d in depends)
    # the probes' tools are Recommends (installed by default): without them every media input is unknown.
    # python3-pynvml is in contrib: a package in main may only Suggest it (Policy 2.2.1; README.Debian says why)
    assert fields["Recommends"] == "ffmpeg | mediainfo"
    assert fields["Suggests"] == "python3-pynvml, python3-matplotlib"
    assert "Policy 2.2.1" in (built.base / "src/debian/README.Debian").read_text().replace("\n", " ")


def test_autopkgtest_installs_the_package_and_runs_a_wrapped_job():
    """debian/tests/control names the test, depends on the package itself, and says what it needs (the .deb
    lane runs the script: tests/systemd/test_deb.py)."""
    control = (REPO / "debian/tests/control").read_text()
    fields = dict(line.split(": ", 1) for line in control.splitlines() if line and not line.startswith("#"))
    assert fields["Tests"] == "wrapped-job" and fields["Depends"] == "@"
    assert {"needs-root", "isolation-container"} <= {r.strip() for r in fields["Restrictions"].split(",")}
    script = REPO / "debian/tests/wrapped-job"
    assert os.access(script, os.X_OK)
    run("sh", "-n", str(script))
    assert "gpu-router run --workload autopkgtest" in script.read_text()


def test_both_launchers_say_their_version():
    """The launchers as built for the tests (.build/bin: packaging/bin with the checkout on the path)."""
    from gpu_router import __version__

    for launcher in ("gpu-router", "gpu-router-agent"):
        out = run(str(REPO / ".build/bin" / launcher), "--version", check=False)
        assert out.returncode == 0 and out.stdout.strip() == f"{launcher} {__version__}", out.stdout + out.stderr


def test_agent_bash_completion_offers_every_option_of_the_agent():
    def complete(*words):
        script = (f'source {REPO / "packaging/completion/gpu-router-agent"}; COMP_WORDS=("$@"); '
                  'COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _gpu_router_agent; printf "%s\\n" "${COMPREPLY[@]}"')
        return sorted(filter(None, run("bash", "-c", script, "x", *words).stdout.split("\n")))

    usage = run(str(REPO / ".build/bin/gpu-router-agent"), "--help").stdout
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage))
    assert {"--version", "--config", "--once", "--enable-accounting"} <= options
    assert complete("gpu-router-agent", "--") == sorted(options)
    assert complete("gpu-router-agent", "--ver") == ["--version"]


# ---- maintainer scripts ----------------------------------------------------------------------------------------

def test_maintainer_scripts_parse_and_debhelper_code_is_in_place(built):
    for name in ("postinst", "prerm", "postrm"):
        text = built.script(name)
        run("sh", "-n", str(built.control / name))
        assert "#DEBHELPER#" not in text and "Automatically added by" in text, name
        assert (built.control / name).stat().st_mode & 0o111
    postinst = built.script("postinst")
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles") < postinst.index("deb-systemd-")


def test_slices_are_never_stopped_or_restarted_and_the_socket_never_restarted(built):
    for name in ("postinst", "prerm", "postrm"):
        text = built.script(name)
        if name == "postrm":  # one exception: idle slices are stopped on remove/purge, never with a job inside
            func = text[text.index("gpu_router_stop_idle_slices() {"):text.index("\n}\n", text.index(
                "gpu_router_stop_idle_slices() {"))]
            assert func.index('[ -d "$scope" ] && return 0') < func.index("deb-systemd-invoke stop")
            calls = [line.strip() for line in text.splitlines() if line.strip() == "gpu_router_stop_idle_slices"]
            assert len(calls) == 2 and re.search(r"purge\)\n\s+gpu_router_stop_idle_slices", text) and \
                re.search(r"remove\)\n\s+gpu_router_stop_idle_slices", text)
            text = text.replace(func, "")
        assert ".slice" not in text, f"{name} touches a slice"
        for line in text.splitlines():
            if "deb-systemd-invoke" in line and "gpu-router-agent.socket" in line:
                assert "$_dh_action" not in line and "restart" not in line, line
    postinst = built.script("postinst")
    assert "deb-systemd-invoke $_dh_action 'gpu-router-agent.service' >/dev/null" in postinst
    assert "deb-systemd-invoke start 'gpu-router-agent.socket'" in postinst
    assert "_dh_action=restart" in postinst
    # stopped only on removal: prerm's stop snippets are guarded by "$1" = remove
    for block in built.script("prerm").split("# Automatically added by")[1:]:
        if "deb-systemd-invoke stop" in block:
            assert '"$1" = remove' in block


def test_prerm_unwraps_on_remove_before_py3clean(built):
    prerm = built.script("prerm")
    call = prerm.index("python3 -I -B -m gpu_router.ops.wrap")
    assert call < prerm.index("# Automatically added by dh_python3") < prerm.index("py3clean -p gpu-router")
    assert re.search(r"^\s+remove\)", prerm, re.M)


def maintscript_head(built, name):
    """The package's own part of a maintainer script (what precedes debhelper's generated code)."""
    text = built.script(name)
    head = text.split("# Automatically added by")[0]
    path = built.base / f"{name}.head"
    path.write_text(head)
    return path


def test_prerm_remove_restores_wrapped_binaries(built, tmp_path, monkeypatch):
    from test_wrap import Sysroot

    monkeypatch.delenv("GPU_ROUTER_WRAPPED_DIR", raising=False)
    root = Sysroot(tmp_path)
    root.install("fake-workload", "1.0", {"/usr/bin/fake-transcribe": "#!/bin/sh\necho v1\n"})
    root.write("/usr/local/bin/tool", "#!/bin/sh\n", 0o755)
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.wrap("/usr/local/bin/tool")
    shim = tmp_path / "shimbin"
    shim.mkdir()
    lib = pathlib.Path(_config.__file__).parent.parent  # .build/lib, where gpu_router is the checkout's agent/
    (shim / "python3").write_text(  # the checkout's gpu_router in place of the installed one (-I drops PYTHONPATH)
        f'#!/bin/sh\n[ "$1" = -I ] && shift\nexec env PYTHONPATH={lib} /usr/bin/python3 "$@"\n')
    (shim / "python3").chmod(0o755)
    env = dict(ENV, PATH=f"{shim}:{ENV['PATH']}", DPKG_ROOT=str(root.path))
    head = maintscript_head(built, "prerm")
    proc = run("sh", str(head), "upgrade", "0.1.0", env=env)
    assert os.readlink(root.p("/usr/bin/fake-transcribe")) == "/usr/bin/gpu-router"   # upgrade: untouched
    proc = run("sh", str(head), "remove", env=env)
    assert "unwrapped /usr/bin/fake-transcribe" in proc.stdout
    assert root.p("/usr/bin/fake-transcribe").read_text() == "#!/bin/sh\necho v1\n"
    assert root.p("/usr/local/bin/tool").read_text() == "#!/bin/sh\n"
    assert root.diversions() == []
    # A binary that cannot be restored safely stops the removal.
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.p("/usr/bin/fake-transcribe").unlink()
    root.write("/usr/bin/fake-transcribe", "#!/bin/sh\necho admin\n", 0o755)
    proc = run("sh", str(head), "remove", env=env, check=False)
    assert proc.returncode == 1 and "could not be restored" in proc.stderr


def test_postrm_purge_undoes_leftover_wraps_and_removes_state(built, tmp_path, monkeypatch):
    from test_wrap import Sysroot

    monkeypatch.delenv("GPU_ROUTER_WRAPPED_DIR", raising=False)
    root = Sysroot(tmp_path)
    root.install("fake-workload", "1.0", {"/usr/bin/fake-transcribe": "#!/bin/sh\necho v1\n"})
    root.write("/usr/local/bin/tool", "#!/bin/sh\n", 0o755)
    root.wrap("/usr/bin/fake-transcribe", "transcribe")
    root.wrap("/usr/local/bin/tool")
    os.unlink(root.state / "fake-transcribe.toml")   # as if prerm had never run: only dpkg knows the diversion
    (root.p("/run/gpu-router/locks")).mkdir(parents=True)
    env = dict(ENV, DPKG_ROOT=str(root.path))
    head = maintscript_head(built, "postrm")
    run("sh", str(head), "remove", env=env)
    assert root.p("/var/lib/gpu-router").exists()
    proc = run("sh", str(head), "purge", env=env)
    assert "removed the leftover diversion of /usr/bin/fake-transcribe" in proc.stderr
    assert root.p("/usr/bin/fake-transcribe").read_text() == "#!/bin/sh\necho v1\n"
    assert root.p("/usr/local/bin/tool").read_text() == "#!/bin/sh\n"
    assert not os.path.lexists(root.p("/usr/local/bin/tool.real"))
    assert root.diversions() == []
    assert not root.p("/var/lib/gpu-router").exists() and not root.p("/run/gpu-router").exists()


def test_postrm_remove_removes_the_metrics_file_wherever_metrics_dir_was(built, tmp_path):
    """Issue 14: `apt remove` left the file served forever (healthy=1), and a custom metrics_dir survived purge."""
    root = tmp_path / "root"
    prom = root / "srv/prom"
    prom.mkdir(parents=True)
    (prom / "gpu_router.prom").write_text("gpu_router_agent_up 0\n")
    (prom / "other.prom").write_text("x 1\n")
    (root / "etc").mkdir()
    (root / "etc/keep.conf").write_text("")
    state = root / "var/lib/gpu-router"
    state.mkdir(parents=True)
    # the agent's record: the file it exports; a line that is not a gpu_router.prom file is never removed
    (state / "metrics-file").write_text("/srv/prom/gpu_router.prom\n/etc/keep.conf\n")
    head = maintscript_head(built, "postrm")
    run("sh", str(head), "remove", env=dict(ENV, DPKG_ROOT=str(root)))
    assert not (prom / "gpu_router.prom").exists()
    assert (prom / "other.prom").exists() and (root / "etc/keep.conf").exists()
    assert (state / "metrics-file").exists()  # state stays until purge


# ---- what the files do -----------------------------------------------------------------------------------------

def test_catalog_compiles_with_one_entry_per_message_id(built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(built.root / "usr/lib/systemd/catalog", root / "usr/lib/systemd/catalog")
    run("journalctl", f"--root={root}", "--update-catalog")
    listed = run("journalctl", f"--root={root}", "--list-catalog").stdout.split("\n")
    ids = {line.split()[0] for line in listed if line.strip()}
    assert ids == set(MESSAGE_IDS.values())
    text = (built.root / "usr/lib/systemd/catalog/gpu-router.catalog").read_text()
    entries = re.split(r"^-- ([0-9a-f]{32})\n", text, flags=re.M)[1:]
    assert len(entries) == 2 * len(MESSAGE_IDS)
    for mid, body in zip(entries[::2], entries[1::2]):
        header, _, prose = body.partition("\n\n")
        keys = {line.split(":", 1)[0] for line in header.splitlines()}
        assert {"Subject", "Defined-By", "Support"} <= keys, mid
        assert "Defined-By: gpu-router" in header and len(prose.split()) > 20, mid


def test_sysusers_and_tmpfiles_create_the_group_and_directories(built, tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for d in ("usr/lib/sysusers.d", "usr/lib/tmpfiles.d"):
        shutil.copytree(built.root / d, root / d)
    run("systemd-sysusers", f"--root={root}", "gpu-router.conf")
    group = [line for line in (root / "etc/group").read_text().splitlines() if line.startswith("gpu-router:")]
    assert len(group) == 1
    gid = int(group[0].split(":")[2])
    assert gid < 1000  # a system group
    proc = run("systemd-tmpfiles", f"--root={root}", "--create", "gpu-router.conf")
    assert proc.stderr == ""
    expected = {"run/gpu-router": (0o755, 0), "run/gpu-router/locks": (0o3770, gid),
                "run/gpu-router/cache": (0o755, 0)}
    for path, (mode, owner_gid) in expected.items():
        st = (root / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 0, owner_gid), path


def test_units_verify(built):
    units = [str(built.root / "lib/systemd/system" / u) for u in UNITS]
    proc = run("systemd-analyze", "verify", "--man=no", *units, check=False)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip() and "/usr/sbin/gpu-router-agent is not executable" not in line]
    assert not problems, "\n".join(problems)
    service = (built.root / "lib/systemd/system/gpu-router-agent.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "ExecStart=/usr/sbin/gpu-router-agent", "KillMode=mixed"):
        assert re.search(rf"^{re.escape(line)}$", service, re.M), line
    socket = (built.root / "lib/systemd/system/gpu-router-agent.socket").read_text()
    for line in ("ListenStream=/run/gpu-router/agent.sock", "SocketMode=0660", "SocketGroup=gpu-router"):
        assert re.search(rf"^{re.escape(line)}$", socket, re.M), line


def test_man_pages_render_without_warnings(built):
    env = dict(ENV, MANROFFSEQ="", MANWIDTH="80")
    for page in ("man1/gpu-router.1.gz", "man8/gpu-router-agent.8.gz", "man5/gpu-router.toml.5.gz"):
        proc = run("man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                   str(built.root / "usr/share/man" / page), env=env)
        assert proc.stderr == "", f"{page}: {proc.stderr}"


# ---- the shipped config and example (no build needed) -----------------------------------------------------------

def test_shipped_config_is_all_comments_and_documents_real_defaults():
    text = (REPO / "packaging/config.toml").read_text()
    assert all(not v for v in tomllib.loads(text).values()), "the conffile must be safe to ship untouched"
    uncommented = tomllib.loads(re.sub(r"(?m)^#(?=[a-z_]+ = )", "", text))
    assert set(uncommented) == {"router", "host", "gpu", "agent"}
    plain = _config.validate(uncommented, "config.toml", [])      # every documented key exists and is valid
    defaults = _config.validate({}, "config.toml", [])
    for section in ("router", "gpu", "agent"):
        for key in uncommented[section]:
            if (section, key) != ("agent", "metrics_dir"):         # shown with the usual textfile directory
                assert plain[section][key] == defaults[section][key], f"[{section}] {key}"


def test_example_profile_uses_the_design_keys_and_validates():
    path = REPO / "packaging/workloads.d/example-whisper.toml.example"
    raw = tomllib.loads(path.read_text())
    assert set(raw["workloads"]["whisper"]) == {
        "binary", "probe", "probe_command", "input", "threshold", "threshold_unit", "on_probe_error",
        "gpu_vram_mb", "cpu_ram_mb", "max_gpu_jobs", "max_cpu_jobs", "gpu_args", "cpu_args"}
    plain = _config.validate({}, "config.toml", [(str(path), raw)])
    assert plain["workloads"]["whisper"]["binary"] == "/usr/bin/whisper-ctranslate2.distrib"


def test_bash_completion(tmp_path):
    (tmp_path / "workloads.d").mkdir()
    (tmp_path / "config.toml").write_text('[router]\n[workloads.alpha]\n[ workloads."beta.2" ]\n')
    (tmp_path / "workloads.d/g.toml").write_text("[workloads.gamma]\n[workloads.gamma.env]\n")
    (tmp_path / "wrapped").mkdir()
    (tmp_path / "wrapped/fake-transcribe.toml").write_text("")

    def complete(*words):
        script = (f'source {REPO / "packaging/completion/gpu-router"}; COMP_WORDS=("$@"); '
                  'COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _gpu_router; printf "%s\\n" "${COMPREPLY[@]}"')
        env = dict(ENV, GPU_ROUTER_WRAPPED_DIR=str(tmp_path / "wrapped"))
        return sorted(filter(None, run("bash", "-c", script, "x", *words, env=env).stdout.split("\n")))

    assert complete("gpu-router", "") == sorted(
        "run explain check status jobs stats drain resume wrap unwrap init calibrate slurm-conf".split())
    # every command's options as its parser has them (issue 10: --since and probe names were missing)
    assert {"--since", "--until", "--workload", "--result", "--mode", "--caller", "--json"} <= \
        set(complete("gpu-router", "jobs", "--"))
    assert {"--since", "--chart", "--json"} <= set(complete("gpu-router", "stats", "--"))
    assert {"--watch", "--count"} <= set(complete("gpu-router", "status", "--"))
    assert {"--block", "--reason", "--wait"} <= set(complete("gpu-router", "drain", "--"))
    assert {"--file", "--as"} <= set(complete("gpu-router", "check", "--"))
    assert "--user" in complete("gpu-router", "explain", "--")
    assert complete("gpu-router", "init", "--probe", "media") == ["media-duration", "mediainfo-duration"]
    assert complete("gpu-router", "jobs", "--result", "oom") == ["oom-kill"]
    assert "--version" in complete("gpu-router", "--")
    from gpu_router.ops import cli

    sub = next(a for a in cli.parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        if name == "run":
            continue
        wanted = {o for a in command._actions for o in a.option_strings if o.startswith("--") and o != "--help"
                  and a.help != "==SUPPRESS=="}
        missing = wanted - set(complete("gpu-router", name, "--"))
        assert not missing, f"completion of {name} lacks {sorted(missing)}"
    assert complete("gpu-router", "--config", str(tmp_path / "config.toml"), "check", "--workload", "") == \
        ["alpha", "beta.2", "gamma"]
    assert complete("gpu-router", "unwrap", "") == ["fake-transcribe"]
    assert "--all" in complete("gpu-router", "unwrap", "--")
