"""Shared fixtures: run the package from the checkout exactly as the installed launchers do.

The launchers in packaging/bin append /usr/lib/python3/dist-packages; here the same files are copied into .build/
with that path swapped for .build/lib, where gpu_router is a symlink to agent/. Tests therefore exercise the real
launcher (its interpreter flags, its argv[0] dispatch) with Debian's /usr/bin/python3.
"""
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
BUILD = REPO / ".build"
LIB = BUILD / "lib"
BIN = BUILD / "bin"


def _prepare_build():
    LIB.mkdir(parents=True, exist_ok=True)
    BIN.mkdir(parents=True, exist_ok=True)
    link = LIB / "gpu_router"
    if not link.is_symlink():
        if link.exists():
            raise RuntimeError(f"{link} exists and is not a symlink")
        link.symlink_to(os.path.relpath(REPO / "agent", LIB))  # relative: valid wherever the repo is mounted
    for launcher in (REPO / "packaging" / "bin").iterdir():
        text = launcher.read_text().replace('sys.path.append("/usr/lib/python3/dist-packages")',
                                            f'sys.path.insert(0, {str(LIB)!r})\n'
                                            'sys.path.append("/usr/lib/python3/dist-packages")')
        if launcher.name == "gpu-router-agent":
            text = text.replace("import sys\n", f"import sys\nsys.path.insert(0, {str(LIB)!r})\n", 1)
        target = BIN / launcher.name
        if not target.exists() or target.read_text() != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(target)


_prepare_build()
if str(LIB) not in sys.path:
    sys.path.insert(0, str(LIB))


@pytest.fixture(scope="session")
def gr_bin():
    """Path of the gpu-router launcher as tests run it."""
    return BIN / "gpu-router"


@pytest.fixture(scope="session")
def agent_bin():
    return BIN / "gpu-router-agent"


@pytest.fixture
def clean_env(tmp_path):
    """An environment without the developer's PATH quirks (no pyenv shims) or GPU_ROUTER_* leftovers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_ROUTER_")}
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env
