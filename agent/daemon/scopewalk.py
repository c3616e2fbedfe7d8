"""The gpu-router scopes alive now, found in systemd's own cgroup tree (adoption after a restart, `status`).

Read from the slices down (cgroup.procs of each ``gpu-router-*.scope``), never from a process's /proc/PID/cgroup:
that file has one parser, confinement.parse.
"""

import os

from . import accounting
from .. import scope


def unit_cgroup_root():
    """Where systemd's own hierarchy is mounted: v2, or the unified/name=systemd tree on a hybrid host."""
    base = accounting.CGROUP_ROOT
    if os.path.exists(os.path.join(base, "cgroup.controllers")):
        return base
    if os.path.exists(os.path.join(base, "unified", "cgroup.procs")):
        return os.path.join(base, "unified")
    return os.path.join(base, "systemd")


def running_scopes():
    """{scope name: (control group, [pids])} of gpu-router scopes alive now (for adoption after a restart)."""
    root = unit_cgroup_root()
    found = {}
    for slice_name in scope.SLICES.values():
        cg_dir = scope.slice_path(slice_name)
        try:
            names = os.listdir(root + cg_dir)
        except OSError:
            continue
        for name in names:
            if not (name.startswith("gpu-router-") and name.endswith(".scope")):
                continue
            try:
                with open(os.path.join(root + cg_dir, name, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            if pids:
                found[name] = (f"{cg_dir}/{name}", pids)
    return found
