"""A process's identity from /proc/PID/stat: its PID and its start time in clock ticks since boot.

A PID alone may be reused; with the start time (field 22, the same in every PID namespace) it names one process.
The wrapper records its own in each VRAM reservation, the agent in each holder and job record.
"""

from . import fastos as os  # os without its import cost (fastos.py)


def _fields(pid):
    """The fields after the command name (which may hold spaces and parentheses), or None when there is no such
    process. fields[0] is the state (field 3), fields[19] the start time (field 22)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields if len(fields) > 19 else None


def start_ticks(pid="self"):
    """The start time in clock ticks since boot, zombie or not; None when there is no such process."""
    fields = _fields(pid)
    try:
        return int(fields[19]) if fields else None
    except ValueError:
        return None


def is_process(pid, ticks):
    """True while the process that started at ``ticks`` runs (not a zombie); ``ticks`` None: any process there."""
    fields = _fields(pid)
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return False
    try:
        return ticks is None or int(fields[19]) == ticks
    except ValueError:
        return False


def start_time(pid):
    """Wall-clock start (boot time + start ticks; /proc/stat's btime is whole seconds), or None."""
    return ticks_to_time(start_ticks(pid))


def ticks_to_time(ticks):
    """Wall-clock time of a start time in ticks (one recorded earlier: the process may be gone), or None."""
    if ticks is None:
        return None
    try:
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def uids(pid):
    """The real, effective, saved and filesystem uids (/proc/PID/status "Uid:"), or () when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return tuple(int(x) for x in line.split()[1:5])
    except (OSError, ValueError):
        pass
    return ()

