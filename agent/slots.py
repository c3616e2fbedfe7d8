"""Admission through flock: numbered slot files, a fair queue for the bounded wait, and the VRAM ledger.

Every lock here is an open file description held with flock and inherited through exec, so it lives exactly as
long as the job and the kernel drops it however the job ends (SIGKILL and OOM kills included): no stale locks,
no cleanup daemon. Files are opened relative to the lock directory's fd with O_NOFOLLOW, so neither the directory
nor a lock file can be swapped for a symlink under us; a directory or file writable by others is refused.
"""

import fcntl
from . import fastos as os  # os without its import cost (fastos.py)
import _stat  # stat.py re-exports these from the built-in _stat: no module to load
import time

# trust (the ledger's and the queue's readers) and procstat are imported where used: the common admission (a slot
# file and its flock) needs neither, and each module costs ~0.1 ms of the wrapper's start.

LEDGER = "vram"
QUEUES = "queue"

# Explicit modes for everything under the lock dir, never the caller's umask (a member with umask 077 would
# otherwise make files and folders the next member cannot use). Folders: group-owned (setgid: what is made
# inside keeps the folder's group, gpu-router), sticky (a member cannot delete or rename another's file: no one
# frees a slot another job holds), 0770. Slot files 0660. Entries with content (a VRAM reservation, a queue
# ticket) 0640: other members read and lock them, only their owner can change what they say.
DIR_MODE = 0o3770
FILE_MODE = 0o660
ENTRY_MODE = 0o640


def _own_mode(fd, st, mode):
    """Give what this process owns its intended mode (fchmod on the open descriptor: no race with a rename)."""
    if st.st_uid == os.geteuid() and _stat.S_IMODE(st.st_mode) != mode:
        try:
            os.fchmod(fd, mode)
        except OSError:
            pass


class LockDirError(Exception):
    """The lock directory cannot be trusted or used; the message says why and what to do."""


def open_lock_dir(path, create=True):
    """An O_DIRECTORY fd on the lock dir after checking it is a real, non-world-writable directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise LockDirError(f"lock directory {path} does not exist") from None
        try:
            os.mkdir(path, 0o770)
        except FileExistsError:
            pass
        except OSError as exc:
            raise LockDirError(f"cannot create lock directory {path}: {exc.strerror} (is the agent's "
                               f"tmpfiles.d entry installed? `systemd-tmpfiles --create gpu-router.conf`)") from None
        st = os.lstat(path)
    if _stat.S_ISLNK(st.st_mode):
        raise LockDirError(f"lock directory {path} is a symlink; refusing it (replace it with a real directory)")
    if not _stat.S_ISDIR(st.st_mode):
        raise LockDirError(f"lock directory {path} is not a directory")
    if st.st_mode & _stat.S_IWOTH:
        raise LockDirError(f"lock directory {path} is writable by others (mode {st.st_mode & 0o7777:04o}); "
                           f"refusing it: anyone could plant lock files there (chmod o-w {path})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        _own_mode(fd, os.fstat(fd), DIR_MODE)
        return fd
    except PermissionError:
        raise LockDirError(f"cannot open lock directory {path}: permission denied (callers must be root or in "
                           f"the directory's group, gpu-router: `adduser USER gpu-router`)") from None
    except OSError as exc:
        raise LockDirError(f"cannot open lock directory {path}: {exc.strerror}") from None


def _open_lock_file(dir_fd, name, display):
    try:
        # Read-only is enough for flock, and lets any member of the lock dir's group use a file another one made.
        # O_NONBLOCK: a FIFO planted under a slot's name would otherwise block this open until a writer comes.
        fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o660,
                     dir_fd=dir_fd)
    except OSError as exc:
        import errno  # not preloaded by python3 -IS: only on this error path

        if exc.errno == errno.ELOOP:  # the name is a symlink
            raise LockDirError(f"lock file {display} is a symlink; refusing it") from None
        raise LockDirError(f"cannot open lock file {display}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode) or st.st_mode & _stat.S_IWOTH:
        os.close(fd)
        raise LockDirError(f"lock file {display} is not a regular file or is writable by others; refusing it")
    _own_mode(fd, st, FILE_MODE)
    return fd


def _subdir(dir_fd, name, display):
    try:
        os.mkdir(name, 0o770, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LockDirError(f"cannot create {display}: {exc.strerror}") from None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise LockDirError(f"{display} is not a usable directory ({exc.strerror}); refusing it") from None
    st = os.fstat(fd)
    if st.st_mode & _stat.S_IWOTH:
        os.close(fd)
        raise LockDirError(f"{display} is writable by others; refusing it")
    _own_mode(fd, st, DIR_MODE)
    return fd


def slot_name(workload, pool, n):
    """``whisper.gpu0.1`` / ``whisper.cpu.0``: one file per slot, per pool (a GPU, or the CPU)."""
    return f"{workload}.{pool}.{n}"


def try_slot(dir_fd, lock_dir, workload, pool, count):
    """(fd, slot number) of the first free slot of ``pool``, or None when all ``count`` are held."""
    for n in range(count):
        name = slot_name(workload, pool, n)
        fd = _open_lock_file(dir_fd, name, os.path.join(lock_dir, name))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, n
    return None


def holders(dir_fd, lock_dir, workload, pool, count, locks_path="/proc/locks"):
    """How many of the pool's slots are held right now (for status and explain).

    Read from the kernel's lock table, never by trying the lock: a trial lock, however brief, makes a wrapper's
    non-blocking LOCK_EX that arrives in that instant fail, and the job is BLOCKED (or takes a worse slot) because
    someone ran `gpu-router status`. Slot files are matched by inode (on overlayfs the device that stat reports is
    not the one /proc/locks names)."""
    locked = flocked_inodes(locks_path)
    if locked is None:
        return 0
    held = 0
    for n in range(count):
        try:
            st = os.stat(slot_name(workload, pool, n), dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        held += st.st_ino in locked
    return held


def flock_table(locks_path="/proc/locks"):
    """{(major, minor, inode): pid} of the flocks held now, from the kernel's lock table (waiters, the "->" lines,
    left out); None when it cannot be read. The one reader of /proc/locks: looking never disturbs a lock.

    Not free: the kernel takes its global file_rwsem for writing to list the table, which waits for an RCU grace
    period when the table was not read a moment before (7-27 ms measured on a 2-core host; the reader waits, other
    processes' flock() calls do not). A scope request's check uses fd_flock_table first (broker.held_slots)."""
    try:
        with open(locks_path, "rb") as f:
            table = f.read(1 << 24)
    except OSError:
        return None
    return _flocks(table.splitlines())


def fd_flock_table(pid, fd):
    """The flocks held through one descriptor of a process, as flock_table gives them, from /proc/PID/fdinfo/FD:
    the kernel's list of that open file's own locks, each line as /proc/locks writes it after "lock:". No global
    lock is taken (see flock_table). None when it cannot be read (no such process or descriptor, no right)."""
    try:
        with open(f"/proc/{int(pid)}/fdinfo/{int(fd)}", "rb") as f:
            info = f.read(1 << 16)
    except (OSError, ValueError):
        return None
    return _flocks(line[5:] for line in info.splitlines() if line.startswith(b"lock:"))


def _flocks(lines):
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != b"FLOCK":
            continue
        try:
            major, minor, inode = parts[5].split(b":")
            out[(int(major, 16), int(minor, 16), int(inode))] = int(parts[4])
        except ValueError:
            continue
    return out


def slot_holder_pids(lock_dir, pools, locks_path="/proc/locks"):
    """PIDs holding a slot of any pool now: each is a job (the wrapper took the slot, then exec'd into the job,
    same PID), so its VRAM is ours even with no scope and no reservation (slots mode, scope = "off"). Only real
    slot files count (``trust.slot_holders``: a slot name the config has, ``pools`` = trust.pools_of(cfg), one
    link): a member's flock on a file of its own in the lock dir makes nothing ours."""
    table = flock_table(locks_path)
    if not table:
        return set()
    try:
        dir_fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return set()
    try:
        from . import trust

        return set().union(*trust.slot_holders(dir_fd, pools, table).values())
    finally:
        os.close(dir_fd)


def flocked_inodes(locks_path="/proc/locks"):
    """Inodes on which some process holds an flock now; None when the table cannot be read."""
    table = flock_table(locks_path)
    return None if table is None else {inode for _, _, inode in table}


# ---- entries that live as long as their holder: queue tickets and VRAM reservations ------------------------

def _publish(dir_fd, name, content):
    """Create ``name`` already locked by us: write under a temp name, lock, then rename into place.

    A reader that can lock a published entry therefore knows its owner is gone.
    """
    tmp = f".tmp.{os.getpid()}.{time.monotonic_ns()}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, ENTRY_MODE,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise LockDirError(f"cannot create an entry in the lock directory: {exc.strerror} (is every caller in "
                           f"group gpu-router, and is the folder mode {DIR_MODE:04o}?)") from None
    try:
        os.fchmod(fd, ENTRY_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except PermissionError:
            # Sticky folder: a dead job of another member left this very name (the PID was reused): take a
            # unique one beside it; readers parse "<key>.<pid>~<unique>" the same way.
            name = f"{name}~{time.monotonic_ns()}"
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise LockDirError(f"cannot publish an entry in the lock directory: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return fd


class Queue:
    """Arrival order for the bounded wait: a ticket per waiter, named by the system-wide monotonic clock."""

    def __init__(self, dir_fd, lock_dir, workload, pool_kind, wait=86400.0):
        self.wait = wait  # the longest a waiter of this queue waits: an older ticket is no waiter's
        self.fd = _subdir(dir_fd, f"{workload}.{pool_kind}.{QUEUES}",
                          os.path.join(lock_dir, f"{workload}.{pool_kind}.{QUEUES}"))
        self.name = f"{time.monotonic_ns():020d}.{os.getpid()}"
        self.ticket = _publish(self.fd, self.name, b"")

    def is_head(self):
        """No valid ticket is ahead of ours (trust.queue_ahead: a forged or back-dated one does not count)."""
        from . import trust

        return not trust.queue_ahead(self.fd, self.name, flock_table, self.wait)

    def leave(self):
        try:
            os.unlink(self.name, dir_fd=self.fd)
        except OSError:
            pass
        os.close(self.ticket)
        os.close(self.fd)


class Ledger:
    """VRAM reservations of admitted jobs, serialised by ``vram.lock`` and alive while their job holds them."""

    def __init__(self, dir_fd, lock_dir):
        self.dir_fd = dir_fd
        self.lock_dir = lock_dir
        self.guard = None
        self.partial = False

    def __enter__(self):
        self.guard = _open_lock_file(self.dir_fd, "vram.lock", os.path.join(self.lock_dir, "vram.lock"))
        fcntl.flock(self.guard, fcntl.LOCK_EX)
        self.fd = _subdir(self.dir_fd, LEDGER, os.path.join(self.lock_dir, LEDGER))
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        os.close(self.guard)

    def live(self):
        """{gpu key: [(pid, MiB), …]} for admission. ``self.partial`` says the folder held more than one pass reads
        (trust.MAX_SCAN names, trust.MAX_NAMES entries: a member's flood): reservations beyond them are unseen, so
        the caller admits as if blind (policy.blind_cap jobs per GPU), never over the entries it did read, and
        never refuses everyone (the agent removes what is not a live reservation, trust.UNLINK_BUDGET a pass)."""
        from . import trust

        entries, self.partial = trust.read_ledger(self.fd)  # the agent reports malformed entries, not each wrapper
        return _shape(entries, False)

    def reserve(self, gpu_key, mb, workload=None, metric=None):
        """The fd that holds the reservation; it must survive exec (slots.inherit) for the job's lifetime.

        The entry reads ``MB WORKLOAD METRIC START`` ("-" for what is unknown): the MiB are what admission
        counts; the workload and metric let the agent say whose prediction a job outgrew (and feed calibration)
        without asking the job; START (this process's start in clock ticks) keeps the entry counting while the
        job runs even if it lets go of the lock (``trust.read_ledger``). Entries of older wrappers stop after METRIC.
        """
        from . import procstat

        start = procstat.start_ticks()
        text = f"{int(mb)} {workload or '-'} {metric or '-'} {start if start is not None else '-'}"
        return _publish(self.fd, f"{gpu_key}.{os.getpid()}", (text + "\n").encode())


SKIPPED = set()  # ledger names already reported as malformed (each is logged once per process)


def ledger_pid(name):
    """(gpu key, pid) of a ledger entry's name ``gpu<N>.<pid>`` (or ``gpu<N>.<pid>~<unique>``), or None when the
    name is not one the wrapper makes (trust.ledger_name)."""
    from . import trust

    return trust.ledger_name(name)


def _skip(name, why):
    if name in SKIPPED or len(SKIPPED) >= 1024:
        return  # each once; after 1024 distinct names, silence (a flood must not become a flood of events)
    SKIPPED.add(name)
    from . import journal

    shown = name[:80].encode("ascii", "backslashreplace").decode("ascii")
    journal.emit("config-error", f"skipping VRAM ledger entry {shown!r}: {why}",
                 {"REASON": "ledger-entry-skipped", "ENTRY": shown, "DETAIL": why}, priority=4)


def _shape(entries, detail):
    out = {}
    for e in entries:
        out.setdefault(e.key, []).append((e.pid, e.mb, e.workload, e.metric) if detail else (e.pid, e.mb))
    return out


def live_reservations(lock_dir, detail=False, verify=False, workloads=None):
    """{gpu key: [(pid, MiB), …]} of live reservations (the agent uses the pids to tell our processes apart);
    with ``detail``: [(pid, MiB, workload or None, metric text or None), …], the workload one of ``workloads``
    (the config's names) when given. ``verify`` (the agent, root): only entries whose lock /proc/locks shows held
    by the PID they name, that PID one of the entry owner's; what does not count is removed (trust.read_ledger).
    At most trust.MAX_NAMES names are read: the cost of a read never grows with what members create."""
    try:
        dir_fd = os.open(os.path.join(lock_dir, LEDGER), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    from . import trust

    try:
        locks = (flock_table() or {}) if verify else None
        entries, _ = trust.read_ledger(dir_fd, workloads, locks, tidy=verify and os.geteuid() == 0,
                                       skip=_skip if verify else None)
        return _shape(entries, detail)
    finally:
        os.close(dir_fd)


def inherit(*fds):
    """Let these descriptors survive exec: the job then holds its slot and reservation until it ends."""
    for fd in fds:
        if fd is not None:
            os.set_inheritable(fd, True)


def tidy(lock_dir, gid=None):
    """The agent's (root's) pass over the lock dir: folders back to 3770 and the group, whoever made them and
    with whatever umask (a lock dir from an older release, or a folder a member's wrapper made before it knew
    better); queue folders cleared of tickets that do not count (trust.tidy_queue). Only the folders the wrapper
    makes (``vram``, ``*.queue``), among at most trust.MAX_NAMES names; never follows a symlink; returns how many
    entries it changed."""
    from . import trust

    changed = 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        top = os.open(lock_dir, flags)
    except OSError:
        return 0
    fds = [(top, None)]
    try:
        listed, _ = trust.names(top)
        for name, _, plain in listed:
            if plain or not (name == LEDGER or name.endswith("." + QUEUES)):
                continue
            try:
                fds.append((os.open(name, flags, dir_fd=top), name))
            except OSError:
                continue  # not a folder, or gone
        for fd, name in fds:
            try:
                st = os.fstat(fd)
                if _stat.S_IMODE(st.st_mode) != DIR_MODE:
                    os.fchmod(fd, DIR_MODE)
                    changed += 1
                if gid is not None and st.st_gid != gid:
                    os.fchown(fd, -1, gid)
                    changed += 1
            except OSError:
                pass
            if name is not None and name != LEDGER:
                changed += trust.tidy_queue(fd, flock_table)
    finally:
        for fd, _ in fds:
            os.close(fd)
    return changed
