"""A process's identity from /proc/PID/stat: its PID and its start time in clock ticks since boot; the one reader
of /proc/PID/stat (``read``: state, parent, session, start, a zombie's wait status), held so by tests/test_layout.py.

A PID alone may be reused; with the start time (field 22, the same in every PID namespace) it names one process.
The wrapper records its own in each VRAM reservation, the agent in each holder and job record.
"""

from . import fastos as os  # os without its import cost (fastos.py)


GONE = (b"Z", b"X", b"x")  # states of a process that has exited (a zombie, or dead and being reaped)


def _raw(pid):
    """/proc/PID/stat's bytes, or None when there is no such process."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _fields(pid):
    """The fields after the command name (which may hold spaces and parentheses), or None when there is no such
    process. fields[0] is the state (field 3), fields[19] the start time (field 22)."""
    stat = _raw(pid)
    if stat is None:
        return None
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
    if not fields or fields[0] in GONE:
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



class Stat:
    """What the agent and the tools take from /proc/PID/stat, by name (proc(5) numbers the fields from 1)."""

    __slots__ = ("comm", "state", "ppid", "session", "start", "exit_status")

    def __init__(self, comm, fields):
        self.comm = comm                # field 2 without its parentheses (bytes, at most 15 of them)
        self.state = fields[0]          # field 3: b"R", b"S", … b"Z"
        self.ppid = int(fields[1])      # field 4
        self.session = int(fields[3])   # field 6
        self.start = int(fields[19])    # field 22, clock ticks since boot
        # field 52: the wait status of an exited process its parent has not reaped (0 while it runs)
        self.exit_status = int(fields[49]) if len(fields) > 49 else None

    @property
    def gone(self):
        """The process has exited (a zombie: its memory, VRAM included, is already freed)."""
        return self.state in GONE


def read(pid):
    """The Stat of a process, or None when there is none (or its stat cannot be parsed)."""
    stat = _raw(pid)
    if stat is None:
        return None
    head, _, tail = stat.rpartition(b")")
    fields = tail.split()
    try:
        return Stat(head[head.find(b"(") + 1:], fields) if len(fields) > 19 else None
    except ValueError:
        return None
