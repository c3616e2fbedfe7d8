"""Reading our events back from the journal: the one reader of `jobs`, `stats` and the agent's metrics follower.

Any member of group gpu-router can write a journal entry with any GPU_ROUTER_* field, and journald stores any
bytes, so what comes back is untrusted input to root. Three things every reader needs, in one place:

* **Text.** Every field as bounded text, whatever it arrived as: str, bytes (python3-systemd, a value that is not
  UTF-8), a JSON byte array (``journalctl -o json``, a value that is not UTF-8 or holds a control character), a
  list (a field written twice: dropped). Undecodable bytes stay as surrogate escapes (``termtext`` shows them).
* **An author.** journald adds the fields that start with ``_`` itself (a client's own are dropped), so ``_UID``
  and ``_SYSTEMD_UNIT`` say who wrote an entry. The agent's events (outcomes, VRAM, health, refusals) count only
  from the agent: uid 0 in ``gpu-router-agent.service``. A wrapper's events count only for its own job: the first
  wrapper event of a job names the job's owner (its uid), and a later wrapper event of that job from another uid
  is ignored; a wrapper's ``job-finished`` is only ever an exec failure (result failed, exit 126/127, no peaks).
  ``drain`` comes from root (``gpu-router drain``).
* **The reader.** python3-systemd's ``journal.Reader``, with ``--since``/``--until`` in journalctl's common forms
  and the same OR of MESSAGE_IDs journalctl was given; imported when reading (this module is core: cheap imports).
"""

from .journal import MESSAGE_IDS, PREFIX

AGENT_UNIT = "gpu-router-agent.service"
MAX_VALUE = 4096   # characters kept of one field (an input path, a message); longer ones end in "…"
MAX_FIELDS = 128   # fields kept of one entry
MAX_OWNERS = 65536  # job owners remembered while following the journal (the oldest forgotten first)
MAX_ENTRIES = 1000000  # entries one command reads at most
BARRIER_S = 3.0    # the longest agent_accounted waits for journald to store what was sent before it

AGENT_EVENTS = frozenset(("job-finished", "gpu-health", "vram-foreign", "vram-underpredicted", "agent",
                          "broker-refused"))
WRAPPER_EVENTS = frozenset(("routed", "blocked", "probe-failed", "scope-failed", "config-error", "job-finished"))
ROOT_EVENTS = frozenset(("drain",))
# What only the agent's job-finished carries: a wrapper's (exec failed) has none of these.
AGENT_ONLY_FIELDS = tuple(PREFIX + k for k in ("DURATION_S", "PEAK_RAM_MB", "PEAK_VRAM_MB", "PEAK_VRAM_SOURCE",
                                               "SIGNAL", "MEMORY_MAX_MB", "MEASURED_VRAM_MB"))
WRAPPER_EXEC_STATUSES = ("126", "127")


def text(value, limit=MAX_VALUE):
    """One field's value as text, at most ``limit`` characters; None for a value that is not one value."""
    if isinstance(value, str):
        out = value
    elif isinstance(value, (bytes, bytearray)):
        out = bytes(value[:limit * 4]).decode("utf-8", "surrogateescape")
    elif isinstance(value, list):
        if value and all(isinstance(b, int) and 0 <= b <= 255 for b in value[:limit * 4]):
            out = bytes(value[:limit * 4]).decode("utf-8", "surrogateescape")  # journalctl's byte array
        else:
            return None  # the field written more than once: no one value to trust
    elif isinstance(value, bool) or value is None:
        return None
    elif isinstance(value, int):
        out = str(value)
    elif hasattr(value, "hex") and hasattr(value, "int"):  # uuid.UUID from python3-systemd's converters
        out = value.hex
    else:
        return None
    return out if len(out) <= limit else out[:limit - 1] + "…"


def decode(entry):
    """An entry (python3-systemd's dict, or journalctl -o json's) → {name: text}, bounded; {} if not a dict."""
    if not isinstance(entry, dict):
        return {}
    out = {}
    for key, value in entry.items():
        if len(out) >= MAX_FIELDS:
            break
        if isinstance(key, (bytes, bytearray)):
            key = bytes(key).decode("ascii", "replace")
        if not isinstance(key, str) or not key or len(key) > 64:
            continue
        if key == "__REALTIME_TIMESTAMP" and hasattr(value, "timestamp"):  # a datetime from the default converters
            value = int(value.timestamp() * 1e6)
        value = text(value)
        if value is not None:
            out[key] = value
    return out


def is_agent(e):
    """Written by the agent itself: journald's own fields say uid 0, in the agent's unit."""
    return e.get("_UID") == "0" and e.get("_SYSTEMD_UNIT") == AGENT_UNIT


def job_of(e):
    return e.get(PREFIX + "JOB") or None


def job_pid(job):
    """The wrapper's PID in a job id (``<workload>-<pid>-<random>``, wrapper/run.py), or None."""
    parts = job.rsplit("-", 2)
    return parts[1] if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() else None


class Authors:
    """Which entries may be believed, one at a time in journal order (``trusted`` for a list, the metrics
    follower entry by entry). Keeps the owner (uid) of each job it has seen, the last MAX_OWNERS."""

    def __init__(self):
        self.owners = {}
        self.ignored = 0

    def check(self, e):
        """True if this decoded entry's author may write it; counts the others in ``ignored``."""
        ok = self._check(e)
        if not ok:
            self.ignored += 1
        return ok

    def _check(self, e):
        event = e.get(PREFIX + "EVENT")
        uid = e.get("_UID")
        if not uid or not (uid.isascii() and uid.isdigit()):
            return False  # not from journald (it always adds _UID): nobody vouches for it
        if event in ROOT_EVENTS:
            return uid == "0"
        agent = is_agent(e)
        if event == "job-finished" and not agent:
            # Only ever the wrapper's exec failure, sent by the process the job id names (the wrapper that was
            # about to become the job); any figure of the agent's makes it a forgery.
            if (e.get(PREFIX + "RESULT") != "failed" or e.get(PREFIX + "EXIT_STATUS") not in WRAPPER_EXEC_STATUSES
                    or any(k in e for k in AGENT_ONLY_FIELDS)):
                return False
            if job_of(e) is not None and job_pid(job_of(e)) != e.get("_PID"):
                return False
        elif event in AGENT_EVENTS:
            return agent
        elif event not in WRAPPER_EVENTS:
            return agent  # an event of a kind no wrapper writes
        if agent:
            return True
        job = job_of(e)
        if job is None:
            return True  # the member's own, of no job (a config error, a probe's own run)
        owner = self.owners.get(job)
        if owner is None:
            if len(self.owners) >= MAX_OWNERS:
                self.owners.pop(next(iter(self.owners)))
            self.owners[job] = uid
            return True
        return owner == uid


def trusted(entries):
    """Decoded entries in journal order → (those their authors may write, how many were not)."""
    authors = Authors()
    kept = [e for e in (decode(x) for x in entries) if authors.check(e)]
    return kept, authors.ignored


# ---- reading ---------------------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
          "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
          "d": 86400, "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800,
          "M": 2629800, "month": 2629800, "months": 2629800, "y": 31557600, "year": 31557600,
          "years": 31557600}


def _span(spec):
    """'1h30min', '2 days' → seconds; ValueError otherwise."""
    total, num, word, seen = 0.0, "", "", False
    for c in spec + " ":
        if c.isdigit() or c == ".":
            if word:
                total, word, seen = total + float(num) * _UNITS[word], "", True
                num = ""
            num += c
        elif c.isalpha():
            if not num:
                raise ValueError(spec)
            word += c
        elif c == " ":
            if word:
                total, num, word, seen = total + float(num) * _UNITS[word], "", "", True
        else:
            raise ValueError(spec)
    if num:
        if seen:
            raise ValueError(spec)
        total += float(num)  # a bare number: seconds
    elif not seen:
        raise ValueError(spec)
    return total


def when(spec, now=None):
    """journalctl's --since/--until forms → Unix time: now, today, yesterday, tomorrow, -1d, +2h, '1h ago',
    @EPOCH, 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM[:SS]', 'HH:MM[:SS]' (today). ValueError for anything else."""
    import time

    now = time.time() if now is None else now
    s = str(spec).strip()
    midnight = time.mktime(time.localtime(now)[:3] + (0, 0, 0, 0, 0, -1))
    try:
        if s == "now":
            return now
        if s in ("today", "yesterday", "tomorrow"):
            day = {"today": 0, "yesterday": -1, "tomorrow": 1}[s]
            return time.mktime(time.localtime(midnight + day * 86400 + 43200)[:3] + (0, 0, 0, 0, 0, -1))
        if s.startswith("@") and 0 <= float(s[1:]) < 1e11:
            return float(s[1:])
        if s and s[0] in "-+":
            return now + (-1 if s[0] == "-" else 1) * _span(s[1:].strip())
        if s.endswith(" ago"):
            return now - _span(s[:-4].strip())
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"):
            try:
                return time.mktime(time.strptime(s, fmt))
            except ValueError:
                continue
        for fmt in ("%H:%M:%S", "%H:%M"):
            try:
                t = time.strptime(s, fmt)
            except ValueError:
                continue
            return midnight + t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec
    except (KeyError, ValueError, OverflowError):
        pass
    raise ValueError(f"not a time journalctl would take: {spec!r} (e.g. -1h, today, 2026-01-31 08:00)")


def open_reader(directory=None):
    """python3-systemd's Reader that leaves every value as journald stored it (decode() makes it text)."""
    from systemd import journal as sd_journal

    raw = {k: (lambda v: v) for k in sd_journal.DEFAULT_CONVERTERS}
    return sd_journal.Reader(path=directory, converters=raw)


def add_matches(reader, events, matches=()):
    """One OR of our MESSAGE_IDs, each ANDed with ``matches`` (NAME=value strings), as journalctl's '+'."""
    for i, event in enumerate(events):
        if i:
            reader.add_disjunction()
        reader.add_match("MESSAGE_ID=" + MESSAGE_IDS[event], *matches)


def read(since, directory=None, events=tuple(MESSAGE_IDS), until=None, matches=(), limit=MAX_ENTRIES):
    """Our events between ``since`` and ``until`` (journalctl's forms), decoded and checked for their authors:
    (entries, how many were ignored as not written by their author). ValueError for a time it cannot read,
    OSError when the journal cannot be opened."""
    start = when(since)
    end = when(until) if until else None
    reader = open_reader(directory)
    try:
        add_matches(reader, events, matches)
        reader.seek_realtime(int(start * 1e6))
        authors, out = Authors(), []
        for _ in range(limit):
            entry = reader.get_next()
            if not entry:
                break
            e = decode(entry)
            if end is not None and int(e.get("__REALTIME_TIMESTAMP") or 0) > end * 1e6:
                break
            if authors.check(e):
                out.append(e)
        return out, authors.ignored
    finally:
        reader.close()


def agent_accounted(job_ids, since, timeout_s=BARRIER_S, directory=None):
    """Which of ``job_ids`` already have the agent's own job-finished in the journal (a set), or None when the
    journal cannot say; ``since``: a Unix time before those events.

    An agent killed right after it sent an event may leave it in journald's socket queue, not yet stored. A marker
    sent now through the same socket is queued behind it (a datagram socket's queue is one line): once the marker
    is stored, so is every event sent before it (or journald dropped it: then it is not there, rightly). The
    marker is an ``agent`` event with a random BARRIER field; waited for at most ``timeout_s``."""
    import time

    from . import journal
    from . import fastos as os

    token = os.urandom(16).hex()
    if journal.emit("agent", f"gpu-router-agent: looking in the journal for the accounts of {len(job_ids)} job(s) "
                    "a killed agent was finishing", {"STATE": "recovering", "BARRIER": token}) != "journald":
        return None
    reader = open_reader(directory)
    try:
        reader.add_match(f"{PREFIX}BARRIER={token}")
        reader.seek_head()
        deadline = time.monotonic() + timeout_s
        while not reader.get_next():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reader.wait(left)
        reader.flush_matches()
        for i, job_id in enumerate(job_ids):
            if i:
                reader.add_disjunction()
            reader.add_match("MESSAGE_ID=" + MESSAGE_IDS["job-finished"], f"{PREFIX}JOB={job_id}", "_UID=0",
                             f"_SYSTEMD_UNIT={AGENT_UNIT}")
        reader.seek_realtime(int(max(0, since - 60) * 1e6))
        done = set()
        for _ in range(MAX_ENTRIES):
            entry = reader.get_next()
            if not entry:
                break
            e = decode(entry)
            if is_agent(e) and job_of(e) in job_ids:
                done.add(job_of(e))
        return done
    finally:
        reader.close()
