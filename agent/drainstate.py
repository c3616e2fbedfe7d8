"""The drain switch: while ``<[agent] state_dir>/drain`` exists, no new job is admitted to a GPU.

`gpu-router drain` writes it, `gpu-router resume` removes it; the wrapper pays one failed lstat per job for it (hot
path: atomicfile, the trusted reader, is imported only when the file is there), the status command, the agent and
the metrics exporter read the same file. It lives under /var/lib, so it survives an agent restart and a reboot (a
drain before a driver update stays until resumed).

Format: ``key=value`` lines, written atomically: ``action`` (``cpu``: GPU-bound jobs run on the CPU instead;
``block``: they exit with the retry code), ``since`` (Unix time), ``by`` (user), ``reason`` (free text, one line).
"""

from . import fastos as os  # os without its import cost (fastos.py)

FILE = "drain"
ACTIONS = ("cpu", "block")


def path(state_dir):
    return os.path.join(state_dir, FILE)


def read(state_dir):
    """None when not drained (the common case: one failed lstat, no import); else the state as a dict of strings.

    A symlink, a hard link, anything but a regular file, a file not owned by root or by us, or one writable by
    others is ignored (``atomicfile.read_trusted``): it could not have come from `drain`, which writes it only in a
    folder root alone can change (``atomicfile.write_state``)."""
    name = os.path.join(state_dir, FILE)
    try:
        os.lstat(name)
    except FileNotFoundError:
        return None
    except OSError:
        pass  # not ours to say here: read_trusted decides (and refuses what it cannot open)
    from . import atomicfile

    text = atomicfile.read_trusted(name)
    if text is None:
        return None
    state = {"action": "cpu"}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            state[key.strip()] = value.strip()
    if state["action"] not in ACTIONS:
        state["action"] = "cpu"
    return state


def render(action, since, by, reason):
    one_line = " ".join(str(reason or "").split())
    return f"action={action}\nsince={since:.3f}\nby={by}\nreason={one_line}\n"
