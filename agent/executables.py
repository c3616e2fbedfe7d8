"""Finding a program on a search path: one way for the wrapper's probes, the agent's nvidia-smi and ops' checks.

shutil.which without importing shutil (the hot path and the agent's start-up both count). Where PATH is unset or
empty, each caller names what it falls back to, from the folders below.
"""

import os

DEFAULT_PATH = "/usr/bin:/bin"                  # the wrapper and the agent: a job's or a unit's minimal PATH
USER_PATH = "/usr/local/bin:/usr/bin:/bin"      # a command an operator types (init, wrap's checks)
ADMIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # tools an admin installs (preflight)


def which(name, path=None, fallback=DEFAULT_PATH):
    """The first executable file `name` in `path` (default $PATH, else `fallback`), or None."""
    for folder in (path or os.environ.get("PATH") or fallback).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
