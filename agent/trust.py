"""The one reader of what a member can write or name in the lock dir: ledger entries, queue tickets, slot files,
and the fields of a broker request (job ids, metrics).

Root acts on these (the agent's "ours", calibration samples, scope limits) and so does every member's wrapper
(admission, arrival order), so each is hostile input: a member may plant any name, any content, hard links,
FIFOs, symlinks, a hundred thousand files, a lock held by any process of theirs. Everything here is bounded
(names looked at per pass, bytes read per entry, entries and tickets counted per owner), never follows or blocks
(O_NOFOLLOW | O_NONBLOCK opens relative to a directory fd), checks the file itself with fstat (a regular file,
one link, its owner), and returns typed values or None: a value read here never reaches a path, a label or a
terminal unless it passed one of these checks. HACKING.md, "Threat model", lists who reads what.
"""

import fcntl
from . import fastos as os  # os without its import cost (fastos.py)
import _stat  # stat.py re-exports these from the built-in _stat: no module to load
import time

from . import procstat

MAX_NAMES = 1024        # names looked at per pass over one folder: the cost of a pass never grows beyond it
MAX_SCAN = 65536        # ledger names listed per pass (getdents alone, no syscall a name): hard links cost a name each
UNLINK_BUDGET = 4096    # names the agent removes per pass: a flood is cleared over a few samples, never in one long one
MAX_PER_UID = 64        # ledger entries, and queue tickets, counted per owner (root's own are not capped)
MAX_ENTRY = 256         # bytes read of a ledger entry (the wrapper writes ~40)
TICKET_SLACK_NS = 2_000_000_000  # a ticket's name (its monotonic time) and its inode's ctime agree this closely
WAIT_SLACK_NS = 5_000_000_000    # a waiter gives up after its wait; a ticket older than wait + this is no waiter

STATS = {"opens": 0, "names": 0}  # entries opened and names looked at since start (the record fuzz counts them)

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_JOB_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_METRIC_CHARS = frozenset(b"0123456789.,eE+-")
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


# ---- fields ------------------------------------------------------------------------------------------------

def digits(text, most=10):
    """A non-negative int from ASCII digits only (``int()`` would take "٣", " 7" or "1_0"), or None."""
    if isinstance(text, bytes):
        if not text.isdigit() or len(text) > most:
            return None
        return int(text)
    if not text or len(text) > most or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def safe_name(text):
    """A workload name as config.py allows one (letters, digits, '_', '.', '-'; no leading dot; ≤ 64): safe as
    one path component, a label value and a terminal word."""
    return isinstance(text, str) and 0 < len(text) <= 64 and text[0] != "." and set(text) <= _NAME_CHARS


def workload(word, workloads=None):
    """A workload name from a record: one of ``workloads`` (the config's) when given, else a safe name; None
    otherwise (and for "-", unknown)."""
    if isinstance(word, bytes):
        if len(word) > 64 or not word.isascii():
            return None
        word = word.decode("ascii")
    if word == "-" or not safe_name(word):
        return None
    if workloads is not None and word not in workloads:
        return None
    return word


def metric(value):
    """A METRIC: "unknown" or comma-separated finite numbers (as the wrapper writes it); anything else is
    "unknown". Bytes or text in, text out."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if value == b"unknown" or not value or len(value) > 64 or not set(value) <= _METRIC_CHARS:
        return "unknown"
    text = value.decode("ascii")
    try:
        numbers = [float(x) for x in text.split(",")]
    except ValueError:
        return "unknown"
    if not all(x == x and abs(x) != float("inf") for x in numbers):
        return "unknown"
    return text


def job_id(raw, workload_name, pid):
    """A broker request's JOB as the wrapper makes it, ``<workload>-<its pid>-<suffix>``: it names the scope
    unit, and after an agent restart the PID in it is read back, so it must be the caller's own (SO_PEERCRED)."""
    if not isinstance(raw, bytes) or len(raw) > 200 or not set(raw) <= _JOB_CHARS:
        return None
    head = f"{workload_name}-{pid}-".encode()
    if not raw.startswith(head) or len(raw) == len(head):
        return None
    return raw.decode("ascii")


def job_pid(job, workload_name):
    """The PID a job id names (``<workload>-<pid>-<suffix>``), or None; only a hint: check it is in the scope."""
    if not isinstance(job, str) or not job.startswith(workload_name + "-"):
        return None
    return digits(job[len(workload_name) + 1:].partition("-")[0])


# ---- names -------------------------------------------------------------------------------------------------

def names(dir_fd, limit=MAX_NAMES):
    """([(name, inode, is a plain file), …], truncated) of at most ``limit`` names of a folder: one getdents
    pass, no stat, stopped at the cap (a member's 100,000 files cost the same as 1,024)."""
    out = []
    try:
        with os.scandir(dir_fd) as it:
            for entry in it:
                if len(out) >= limit:
                    STATS["names"] += len(out)
                    return out, True
                try:
                    out.append((entry.name, entry.inode(), entry.is_file(follow_symlinks=False)))
                except OSError:
                    continue
    except OSError:
        return out, False
    STATS["names"] += len(out)
    return out, False


def ledger_name(name):
    """(gpu key, pid) of a ledger entry's name ``gpu<N>.<pid>`` (or ``…~<unique>``), or None."""
    key, dot, tail = name.rpartition(".")
    pid_text, tilde, unique = tail.partition("~")
    if not dot or not key.startswith("gpu") or digits(key[3:], 4) is None:
        return None
    if tilde and digits(unique, 20) is None:
        return None
    pid = digits(pid_text)
    return None if not pid else (key, pid)


def ticket_name(name):
    """(monotonic ns, pid) of a queue ticket's name ``<20 digits>.<pid>`` (or ``…~<unique>``), or None."""
    ns_text, dot, tail = name.partition(".")
    pid_text, tilde, unique = tail.partition("~")
    if not dot or len(ns_text) != 20 or (tilde and digits(unique, 20) is None):
        return None
    ns, pid = digits(ns_text, 20), digits(pid_text)
    return None if ns is None or not pid else (ns, pid)


def slot_name(name, pools):
    """(workload, pool, n) of a slot file's name ``<workload>.<pool>.<n>`` for a slot the config has;
    ``pools``: {workload: (max GPU jobs or None, max CPU jobs)}. None for anything else."""
    rest, dot, n_text = name.rpartition(".")
    w, dot2, pool = rest.rpartition(".")
    n = digits(n_text, 6)
    if not dot or not dot2 or n is None or w not in pools:
        return None
    max_gpu, max_cpu = pools[w]
    if pool == "cpu":
        return (w, pool, n) if n < (max_cpu or 0) else None
    if pool.startswith("gpu") and digits(pool[3:], 4) is not None and max_gpu and n < max_gpu:
        return w, pool, n
    return None


def pools_of(cfg):
    """{workload: (max GPU jobs, max CPU jobs)} from a loaded config, for slot_name."""
    return {name: (w.max_gpu_jobs, w.max_cpu_jobs) for name, w in cfg.workloads.items()}


# ---- files -------------------------------------------------------------------------------------------------

def open_entry(dir_fd, name, size=MAX_ENTRY):
    """(fd, stat) of an entry that is a regular file with one link and at most ``size`` bytes, opened without
    following or blocking; False for anything else (a FIFO, a symlink, a hard link of another entry, a device);
    None when it cannot be opened (gone, out of descriptors: nothing is concluded from that)."""
    try:
        fd = os.open(name, _FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        import errno  # not preloaded by python3 -IS: only on this error path

        return False if exc.errno == errno.ELOOP else None  # a symlink, refused; else gone or cannot tell
    STATS["opens"] += 1
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not _stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > size or st.st_mode & _stat.S_IWOTH:
        os.close(fd)
        return False
    return fd, st


def ledger_text(data, workloads=None):
    """(MiB, workload or None, metric text or None, start ticks or None) of an entry's content ``MB WORKLOAD
    METRIC START`` (older wrappers stop after METRIC); None when it does not start with a number of MiB."""
    words = data.split()
    if not words or len(words) > 4:
        return None
    mb = digits(words[0], 9)
    if mb is None:
        return None
    name = workload(words[1], workloads) if len(words) > 1 else None
    m = metric(words[2]) if len(words) > 2 else "unknown"
    start = digits(words[3], 19) if len(words) > 3 else None
    return mb, name, None if m == "unknown" else m, start


def holders_by_inode(table):
    """{inode: {pid, …}} of a flock table ({(major, minor, inode): pid}, slots.flock_table)."""
    out = {}
    for (_, _, inode), pid in (table or {}).items():
        out.setdefault(inode, set()).add(pid)
    return out


class Entry:
    """A ledger entry that passed every check: a live reservation."""

    __slots__ = ("key", "pid", "mb", "workload", "metric", "start", "uid", "name")

    def __init__(self, key, pid, mb, workload, metric, start, uid, name):
        self.key, self.pid, self.mb, self.workload = key, pid, mb, workload
        self.metric, self.start, self.uid, self.name = metric, start, uid, name


def _unlink(dir_fd, name):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def read_ledger(dir_fd, workloads=None, locks=None, tidy=False, skip=None):
    """([Entry, …], truncated) of the live reservations in the ledger folder.

    An entry counts while its file's lock is held, or while the process with the PID and start time it records
    runs with the file's owner among its uids (a job may close what it inherited). With ``locks`` (the flock
    table: the agent's view) a held entry counts only when /proc/locks shows the PID its name gives holding it
    and the file's owner among that PID's uids: a member's entry cannot name another's job or PID 1. Per owner at
    most MAX_PER_UID count. ``tidy`` (root, the agent): what does not count is removed, so junk does not last.
    ``skip(name, why)`` is told about malformed entries."""
    listed, truncated = names(dir_fd, MAX_SCAN)
    by_inode = holders_by_inode(locks) if locks is not None else None
    per_uid = {}
    seen = set()
    out = []
    budget = [UNLINK_BUDGET]

    def reject(name, why=None):
        """An entry that does not count: told to ``skip`` (malformed), removed by ``tidy`` within this pass's
        budget, so a flood is cleared over a few passes, never in one long one."""
        if why is not None and skip is not None:
            skip(name, why)
        if tidy and budget[0] > 0:
            budget[0] -= 1
            _unlink(dir_fd, name)

    opened = 0
    for name, inode, plain in listed:
        if name.startswith("."):
            # An entry being published (slots._publish) under its temporary name, locked within microseconds;
            # one left for a minute by no one is a dead wrapper's or a member's junk.
            if tidy and by_inode is not None and inode not in by_inode:
                _unlink_stale(dir_fd, name, by_inode)
            continue
        parsed = ledger_name(name)
        if parsed is None or not plain or inode in seen:
            reject(name, "not a ledger entry (name, type or a second link)")
            continue
        seen.add(inode)
        if opened >= MAX_NAMES:
            truncated = True  # more distinct entries than one pass opens: the rest are unseen
            break
        opened += 1
        key, pid = parsed
        got = open_entry(dir_fd, name)
        if got is None:
            continue
        if got is False:
            reject(name, "not a single-link regular file of at most 256 bytes")
            continue
        fd, st = got
        try:
            try:
                data = os.read(fd, MAX_ENTRY)
            except OSError:
                continue
            text = ledger_text(data, workloads)
            if text is None:
                reject(name, "it does not hold a number of MiB")
                continue
            mb, name_w, m, start = text
            if st.st_uid and per_uid.get(st.st_uid, 0) >= MAX_PER_UID:
                reject(name, f"uid {st.st_uid} has more than {MAX_PER_UID} entries")
                continue
            if not _live(fd, st, dir_fd, name, pid, start, by_inode, inode):
                reject(name)  # held, but not by the process it names: never a wrapper's entry
                continue
            per_uid[st.st_uid] = per_uid.get(st.st_uid, 0) + 1
            out.append(Entry(key, pid, mb, name_w, m, start, st.st_uid, name))
        finally:
            os.close(fd)
    return out, truncated


STALE_NS = 60_000_000_000


def _unlink_stale(dir_fd, name, by_inode):
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    if st.st_ino not in by_inode and time.time_ns() - st.st_ctime_ns > STALE_NS:
        _unlink(dir_fd, name)


def _live(fd, st, dir_fd, name, pid, start, by_inode, inode):
    """Whether an opened entry is a live reservation (see read_ledger); a dead one is removed on the way.

    Unlocked, it still counts while the process with its PID *and* start time runs: the lock goes in
    exit_files(), before the process is reaped, and a job may close what it inherited (close_range, a daemonising
    tool) while its VRAM is still held. The start time makes it that process and no other (a reused PID, a
    wrapper in another PID namespace); its uids must include the entry's owner (no entry pinned on PID 1)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if by_inode is None:
            return True  # the wrapper's view: held, so counted (the safe side for admission)
        # Held by the PID its name gives (or by no one the table shows: locked after the table was read), and
        # that process one of the file's owner's: never another member's job, never PID 1.
        # A PID that is gone left its lock to a child that inherited the descriptor (a daemonising job): the lock
        # is still that process's, and a reused PID is caught by its uids.
        held = by_inode.get(st.st_ino) or by_inode.get(inode) or ()
        uids = procstat.uids(pid)
        return (not held or pid in held) and (st.st_uid in uids or (not uids and pid in held))
    except OSError:
        return by_inode is None
    # Unlocked: its maker, and no one else, still running (its owner among that process's uids).
    if start is not None and procstat.is_process(pid, start) and st.st_uid in procstat.uids(pid):
        return True
    _unlink(dir_fd, name)
    return False


# ---- queue tickets -----------------------------------------------------------------------------------------

def _boot_offset_ns():
    """CLOCK_BOOTTIME − CLOCK_MONOTONIC (time spent suspended): process start times count it, tickets do not."""
    try:
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    except (AttributeError, OSError):
        return 0


def ticket_counts(st, ns, pid, by_inode, now_ns, max_wait_ns, wall_offset_ns, boot_offset_ns):
    """Whether one queue ticket (``st``: its lstat) is a waiting wrapper's, made when its name says.

    An empty regular file with one link, held (per /proc/locks) by the PID its name gives, whose uids include the
    file's owner; that process started before the ticket's time; the time is not in the future and younger than
    the longest wait; the inode's ctime (set by the kernel at the rename that published it, never by the member)
    agrees with the name, so a ticket cannot be back-dated to the head of the queue."""
    if not _stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size:
        return False
    if ns > now_ns or now_ns - ns > max_wait_ns + WAIT_SLACK_NS:
        return False
    if pid not in (by_inode.get(st.st_ino) or ()):
        return False
    if abs(st.st_ctime_ns - wall_offset_ns - ns) > TICKET_SLACK_NS:
        return False
    if st.st_uid not in procstat.uids(pid):
        return False
    ticks = procstat.start_ticks(pid)
    if ticks is None:
        return False
    hz = os.sysconf("SC_CLK_TCK")
    return ticks * 1_000_000_000 // hz - boot_offset_ns <= ns + 1_000_000_000 // hz


def queue_ahead(dir_fd, own, read_locks, max_wait_s=86400.0):
    """Whether a valid ticket (ticket_counts) is ahead of the ticket named ``own``, counting at most MAX_PER_UID
    per owner. A folder with more than MAX_NAMES names, or an unreadable lock table, gives up on order (False):
    arrival order is fairness, never safety, and a member must not be able to stop the others with it. Tickets
    no one holds are removed on the way (their waiter is gone; the sticky folder limits a member to its own)."""
    listed, truncated = names(dir_fd)
    locks = read_locks()  # after the listing: a ticket listed was locked before it was renamed into place
    if ticket_name(own) is None or truncated or locks is None:
        return False
    by_inode = holders_by_inode(locks)
    now = time.monotonic_ns()
    wall = time.time_ns() - now
    boot = _boot_offset_ns()
    max_wait_ns = int(max_wait_s * 1e9)
    per_uid = {}
    for name, _, plain in sorted(listed):
        if name >= own:
            break
        parsed = ticket_name(name)
        if parsed is None or not plain:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        STATS["opens"] += 1
        if st.st_ino not in by_inode:
            _unlink(dir_fd, name)
            continue
        if not ticket_counts(st, parsed[0], parsed[1], by_inode, now, max_wait_ns, wall, boot):
            continue
        if st.st_uid and per_uid.get(st.st_uid, 0) >= MAX_PER_UID:
            continue
        per_uid[st.st_uid] = per_uid.get(st.st_uid, 0) + 1
        return True
    return False


def tidy_queue(dir_fd, read_locks):
    """Root's pass over a queue folder: remove what is no waiter's ticket (a name of another form, one no one
    holds, one held by another process than it names, back-dated or from the future, a temporary name left for a
    minute). A wrapper's own ticket always counts, so only junk goes; returns how many names were removed."""
    listed, _ = names(dir_fd)
    locks = read_locks()
    if locks is None:
        return 0
    by_inode = holders_by_inode(locks)
    now = time.monotonic_ns()
    wall = time.time_ns() - now
    boot = _boot_offset_ns()
    removed = 0
    for name, inode, _ in listed:
        if name.startswith("."):
            if inode not in by_inode:
                _unlink_stale(dir_fd, name, by_inode)
            continue
        parsed = ticket_name(name)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if parsed is None or not ticket_counts(st, parsed[0], parsed[1], by_inode, now, 86400 * 10 ** 9, wall,
                                               boot):
            _unlink(dir_fd, name)
            removed += 1
    return removed


# ---- slot files --------------------------------------------------------------------------------------------

def slot_holders(dir_fd, pools, locks, only=None):
    """{(workload, pool): {pid, …}} of the real slots held now: files directly in the lock dir named as a slot the
    config has (slot_name), regular with one link, whose inode /proc/locks shows held (``only``: of that workload
    alone). Any other flock on any other file of a member's counts for nothing."""
    by_inode = holders_by_inode(locks)
    out = {}
    listed, _ = names(dir_fd)
    for name, inode, plain in listed:
        if not plain:
            continue
        slot = slot_name(name, pools)
        if slot is None or (only is not None and slot[0] != only):
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        held = by_inode.get(st.st_ino)
        if held and _stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            out.setdefault(slot[:2], set()).update(held)
    return out
