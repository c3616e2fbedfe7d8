"""Point a workload profile's ``binary`` at a new path by editing the one line that sets it, keeping the rest of
the admin's file (comments, order, spacing) as it is. Used by `gpu-router wrap`, which moves the real binary aside
(NAME.distrib / NAME.real) and must not leave the profile naming the wrapped path: that would call the router again.
"""

import os
import re


class EditRefused(Exception):
    """The profile cannot be edited safely; the message says exactly what to change by hand."""


_HEADER = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
_BINARY = re.compile(r"""^(\s*binary\s*=\s*)("(?:[^"\\]|\\.)*"|'[^']*')(\s*(#.*)?)$""")


def _table_names(header):
    parts = [p.strip().strip('"').strip("'") for p in header.split(".")]
    return parts


def plan(path, workload, new_binary):
    """The file's new text with ``binary`` of [workloads.WORKLOAD] set to ``new_binary``; EditRefused otherwise."""
    manual = f"set binary = \"{new_binary}\" in [workloads.{workload}] of {path}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise EditRefused(f"cannot read {path} ({exc}); {manual}") from None
    inside, hits = False, []
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if m and not line.lstrip().startswith("[["):
            inside = _table_names(m.group(1)) == ["workloads", workload]
            continue
        if inside and _BINARY.match(line.rstrip("\n")):
            hits.append(i)
    if len(hits) != 1:
        raise EditRefused(f"no single `binary = \"…\"` line found in [workloads.{workload}]; {manual}")
    i = hits[0]
    m = _BINARY.match(lines[i].rstrip("\n"))
    quoted = '"' + new_binary.replace("\\", "\\\\").replace('"', '\\"') + '"'
    ending = lines[i][len(lines[i].rstrip("\n")):]
    lines[i] = m.group(1) + quoted + m.group(3) + ending
    return "".join(lines)


def apply(path, text):
    """Replace the profile atomically, keeping its mode."""
    from .. import atomicfile

    mode = os.stat(path).st_mode & 0o7777
    atomicfile.write(path, text, mode=mode, durable=True)
