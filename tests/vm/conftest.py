"""The cgroup v2 VM lane (see README.md here): skipped without root/qemu, a failure instead where CI is set."""
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(str(getattr(item, "path", item.fspath))).resolve().parents:
            item.add_marker(pytest.mark.vm)


def pytest_ignore_collect(collection_path, config):
    # guest/ runs inside the VM only (it needs the installed .deb and root on a cgroup v2 systemd).
    return HERE / "guest" in [collection_path, *collection_path.parents]
