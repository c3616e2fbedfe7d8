"""Can this profile run at all? The checks `check` fails on and `explain` warns about, each naming the fix:
the real binary missing or not executable, a probe tool not installed, the memory budget negative."""

import os

from .. import policy

# The programs each built-in probe calls (image-pixels falls back to ffprobe for what it cannot read itself).
PROBE_TOOLS = {"ffprobe-duration": [("ffprobe", "ffmpeg")], "mediainfo-duration": [("mediainfo", "mediainfo")],
               "media-duration": [("mediainfo", "mediainfo"), ("ffprobe", "ffmpeg")],
               "video-pixels": [("ffprobe", "ffmpeg")]}
from ..executables import ADMIN_PATH as SEARCH


def _which(name):
    from ..executables import which

    return which(name, fallback=SEARCH) or which(name, SEARCH)


def binary_problems(w):
    if not os.path.lexists(w.binary) or not os.path.exists(w.binary):
        return [f"binary {w.binary} does not exist: every job would exit 127; set binary (in {w.source}) to the "
                f"real program"]
    if os.path.isdir(w.binary) or not os.access(w.binary, os.X_OK):
        return [f"binary {w.binary} is not an executable file: every job would exit 126; chmod +x it or set "
                f"binary to the real program"]
    return []


def probe_problems(w):
    out = []
    for probe in w.probe:
        tools = PROBE_TOOLS.get(probe)
        if tools and not any(_which(tool) for tool, _package in tools):
            names = " or ".join(t for t, _p in tools)
            packages = " or ".join(sorted({p for _t, p in tools}))
            out.append(f"probe {probe!r} needs {names}, which is not installed: every input would be unknown "
                       f"(on_probe_error = {w.on_probe_error!r}); apt install {packages}")
    if "command" in w.probe and w.probe_command:
        tool = w.probe_command[0]
        found = tool if tool.startswith("/") else _which(tool)
        if not found or not os.access(found, os.X_OK):
            out.append(f"probe_command {tool!r} is not an executable on PATH: every input would be unknown; "
                       f"install it or give its absolute path")
    return out


def budget_problems(w, budget):
    return [p for p in policy.budget_problems(w, budget) if "negative" in p]


def problems(w, budget=None):
    """Everything that stops this profile from running as configured ([] when it can)."""
    out = binary_problems(w) + probe_problems(w)
    if budget is not None:
        out += budget_problems(w, budget)
    return out
