"""Measure a job's input before it runs: duration, size, pixels, lines, or an operator's command.

A probe that fails, times out, or prints nothing usable yields *unknown* — never 0 — with a reason the event
carries. External probes run under a forked guardian (``run_command``): in their own process group, with the
guardian as their subreaper, so a hung probe and everything it started — detached children too — is killed at the
deadline, when the wrapper dies (even by SIGKILL) and when the caller's process group is signalled; ``subprocess``
is not used because its import costs ~14 ms on the hot path. Built-in parsers read in bounded chunks and check
the deadline as they read.

The input is opened once, non-blocking and without a controlling tty, then checked with fstat: a FIFO is never
read (that would steal the job's data or hang), a directory or device is refused, an empty file is unknown.
"""

from .. import fastos as os  # os without its import cost (fastos.py)
import _signal as signal  # the built-in half: `import signal` pulls in enum (~3 ms on the hot path)
import _stat  # stat.py re-exports these from the built-in _stat: no module to load
import time

OUTPUT_LIMIT = 64 * 1024


class ProbeFailed(Exception):
    """An unknown metric: ``reason`` is a short token for the journal, the message says what happened."""

    def __init__(self, reason, message):
        self.reason = reason
        super().__init__(message)


# ---- finding the input among the arguments ----------------------------------------------------------------

def find_input(spec, args):
    """The input path named by ``spec`` ("last-file", "arg:N", "option:--name") in the job's arguments, or None."""
    if spec == "last-file":
        for arg in reversed(args):
            if arg and not arg.startswith("-") and os.path.lexists(arg):
                return arg
        for arg in reversed(args):  # a file whose name starts with "-" is still a file
            if arg.startswith("-") and os.path.lexists(arg):
                return arg
        return None
    if spec.startswith("arg:"):
        n = int(spec[4:])
        index = n - 1 if n > 0 else n
        try:
            return args[index]
        except IndexError:
            return None
    option = spec[len("option:"):]
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg[len(option) + 1:]
    return None


# ---- the input file -----------------------------------------------------------------------------------------

def open_input(path):
    """An fd on a regular, non-empty, readable file, with its size; ProbeFailed otherwise."""
    if path is None:
        raise ProbeFailed("no-input", "no input file found among the arguments")
    # stat before open: merely opening a FIFO releases a writer blocked in its open(), and our close then
    # leaves it with no reader (EPIPE: its data is lost before the job could read it). The fstat below still
    # catches a name swapped between the two calls.
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and not _stat.S_ISREG(st.st_mode):
        raise ProbeFailed("input-not-regular", f"input {path!r} is {_kind(st)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProbeFailed("input-missing", f"input {path!r} does not exist") from None
    except PermissionError:
        raise ProbeFailed("input-unreadable", f"input {path!r} is not readable") from None
    except OSError as exc:
        raise ProbeFailed("input-unreadable", f"input {path!r}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not _stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ProbeFailed("input-not-regular", f"input {path!r} is {_kind(st)}")
    if st.st_size == 0:
        os.close(fd)
        raise ProbeFailed("input-empty", f"input {path!r} is empty")
    return fd, st.st_size


def _kind(st):
    return "a directory" if _stat.S_ISDIR(st.st_mode) else "a FIFO" if _stat.S_ISFIFO(st.st_mode) else \
        "a socket" if _stat.S_ISSOCK(st.st_mode) else "a device" if _stat.S_ISCHR(st.st_mode) or \
        _stat.S_ISBLK(st.st_mode) else "not a regular file"


# ---- running an external probe --------------------------------------------------------------------------------

def run_command(argv, timeout):
    """(exit status, stdout bytes, stderr tail) of argv; at ``timeout`` the probe and all it started are killed.

    A probe never outlives the wrapper, nor the caller's process group, and neither do its descendants. A small
    guardian process (forked: no interpreter start, no import) stands between the wrapper and the probe:
    - it stays in the caller's process group, so a runner's SIGTERM/SIGINT/SIGHUP to the group reaches it;
    - it learns of the wrapper's death, SIGKILL included, from a pipe only the wrapper holds (EOF), and from
      PR_SET_PDEATHSIG;
    - it is a child subreaper, so a descendant that detaches (setsid, double fork) is still its child;
    - the probe runs in a process group of its own with PR_SET_PDEATHSIG=SIGKILL bound to the guardian.
    Whatever ends it (the probe's exit, the deadline, a signal, the wrapper's death), the guardian kills the
    probe's group and every descendant left, reaps them, then exits. A cgroup would also do, but there is none to
    put the probe in before the job has its scope; this needs no privilege and no systemd.
    """
    import select  # external probes only (the guardian forked below has it too): not on the built-in probes' path

    if not os.access(argv[0], os.X_OK) or os.path.isdir(argv[0]):
        raise ProbeFailed("probe-not-runnable", f"cannot run {argv[0]!r}: not an executable file")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    life_r, life_w = os.pipe()  # the wrapper holds life_w: EOF on life_r means the wrapper is gone
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    for fd in (out_r, err_r, life_w):
        os.set_inheritable(fd, False)
    try:
        guard = os.fork()
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, life_r, life_w, devnull):
            os.close(fd)
        raise ProbeFailed("probe-not-runnable", f"cannot start a probe: {exc.strerror}") from None
    if guard == 0:
        code = 70
        try:
            for fd in (out_r, err_r, life_w):
                os.close(fd)
            code = _guardian(argv, out_w, err_w, life_r, devnull)
        finally:
            os._exit(code)
    for fd in (out_w, err_w, life_r, devnull):
        os.close(fd)
    deadline = time.monotonic() + timeout
    buffers = {out_r: b"", err_r: b""}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    timed_out = False
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for fd, _ in poller.poll(left * 1000):
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                elif len(buffers[fd]) < OUTPUT_LIMIT:
                    buffers[fd] += chunk
        status = None if timed_out else _wait(guard, deadline)
    finally:
        os.close(out_r)
        os.close(err_r)
        os.close(life_w)  # the guardian kills what is left (nothing, after a clean exit) and exits
    if status is None:
        _reap_guardian(guard)
        raise ProbeFailed("probe-timeout", f"{os.path.basename(argv[0])} did not "
                          f"{'answer' if timed_out else 'exit'} within {timeout:g}s")
    if status == _EXEC_FAILED:
        raise ProbeFailed("probe-not-runnable", f"cannot run {argv[0]!r}")
    return status, buffers[out_r], buffers[err_r][-400:]


_EXEC_FAILED = 250  # the guardian's code for "the probe could not be exec'd"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl
    except (ImportError, OSError, AttributeError):
        return None


def _guardian(argv, out_w, err_w, life_r, devnull):
    """Runs in the forked guardian; returns its exit code (the probe's, or 128+signal)."""
    import select  # already loaded by run_command before the fork

    parent = os.getppid()
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    state = {"probe": None}

    def on_signal(signum, frame):
        _kill_all(state["probe"])
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if os.getppid() != parent:  # the wrapper died before the handlers were in place
        os._exit(128 + signal.SIGTERM)
    # GPU_ROUTER_PROBING: should the probe tool itself be wrapped, that wrapper (the guardian's child, which it
    # checks) runs it straight instead of probing again: no recursion.
    env = dict(os.environ, GPU_ROUTER_PROBING=str(os.getpid()))
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != me:
                os._exit(_EXEC_FAILED)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL)
            os.dup2(devnull, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.execve(argv[0], argv, env)
        except BaseException:
            pass
        os._exit(_EXEC_FAILED)
    state["probe"] = pid
    try:
        os.setpgid(pid, pid)  # also here: no window where a kill of the group misses it
    except OSError:
        pass
    os.close(out_w)
    os.close(err_w)
    poller = select.poll()
    poller.register(life_r, select.POLLIN)
    try:
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
    except (OSError, AttributeError):
        pidfd = None
    code = None
    while code is None:
        events = poller.poll(None if pidfd is not None else 20)
        if any(fd == life_r for fd, _ in events):
            break  # the wrapper closed its end (done, timed out) or died
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
    _kill_all(pid)
    return 128 + signal.SIGKILL if code is None else code


def _kill_all(probe_pid):
    """Kill the probe's process group and every descendant (all ours: we are their subreaper); reap them."""
    if probe_pid is not None:
        try:
            os.killpg(probe_pid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(10000):
        children = _children()
        for child in children:
            for kill in (os.killpg, os.kill):
                try:
                    kill(child, signal.SIGKILL)
                except OSError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        if not children:
            try:
                os.waitpid(-1, 0)  # one still dying
            except ChildProcessError:
                return


def _children():
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _reap_guardian(pid):
    """The guardian was told (its pipe closed); give it a moment, then kill it for good."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.002)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


def _wait(pid, deadline):
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def _number(text, what):
    """A finite, non-negative float from a probe's output; ProbeFailed otherwise."""
    token = text.strip().split()[0] if text.strip() else ""
    try:
        value = float(token)
    except ValueError:
        shown = text.strip()[:80]
        raise ProbeFailed("probe-bad-output", f"{what} printed {shown!r}, not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ProbeFailed("probe-bad-output", f"{what} printed {token!r}")
    if value < 0:
        raise ProbeFailed("probe-bad-output", f"{what} printed a negative value {token!r}")
    return value


def _external(argv, timeout, what):
    status, out, err = run_command(argv, timeout)
    text = out.decode("utf-8", "replace")
    if status != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()
        how = f"was killed by signal {status - 128}" if 128 < status < 128 + 65 else f"exited {status}"
        raise ProbeFailed("probe-failed", f"{what} {how}" + (f": {detail[-1]}" if detail else ""))
    return text


def _which(name):
    """executables.which, imported only by the probes that look a tool up (not every job's path)."""
    from ..executables import which

    return which(name)


def _tool(name):
    path = _which(name)
    if path is None:
        raise ProbeFailed("probe-not-found", f"{name} is not installed (or not on PATH)")
    return path


def _ff_path(path):
    # "file:" keeps ffprobe from reading a name like "concat:a|b" or "http://…" as a protocol
    return "file:" + os.path.abspath(path)


# ---- the built-in probes (each takes path, fd, size, timeout, workload) --------------------------------------

def _ffprobe_duration(path, fd, size, timeout, workload):
    text = _external([_tool("ffprobe"), "-v", "error", "-show_entries", "format=duration",
                      "-of", "default=noprint_wrappers=1:nokey=1", _ff_path(path)], timeout, "ffprobe")
    value = _number(text, "ffprobe")
    if value == 0:
        raise ProbeFailed("probe-bad-output", "ffprobe reports a duration of 0")
    return value


def _mediainfo_duration(path, fd, size, timeout, workload):
    text = _external([_tool("mediainfo"), "--Output=General;%Duration%", os.path.abspath(path)], timeout,
                     "mediainfo")
    if not text.strip():
        raise ProbeFailed("probe-bad-output", "mediainfo found no duration (not a media file?)")
    value = _number(text, "mediainfo") / 1000.0
    if value == 0:
        raise ProbeFailed("probe-bad-output", "mediainfo reports a duration of 0")
    return value


def _media_duration(path, fd, size, timeout, workload):
    if _which("mediainfo"):
        return _mediainfo_duration(path, fd, size, timeout, workload)
    return _ffprobe_duration(path, fd, size, timeout, workload)


def _file_size(path, fd, size, timeout, workload):
    return float(size)


def _line_count(path, fd, size, timeout, workload):
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, True)
    lines, last = 0, b""
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        lines += chunk.count(b"\n")
        last = chunk[-1:]
        if time.monotonic() > deadline:
            raise ProbeFailed("probe-timeout", f"counting lines took longer than {timeout:g}s")
    return float(lines + (1 if last and last != b"\n" else 0))


def _image_pixels(path, fd, size, timeout, workload):
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, True)
    head = os.pread(fd, 65536, 0)
    dims = image_size(head, fd, deadline)
    if dims is None:
        return _video_pixels(path, fd, size, max(0.001, deadline - time.monotonic()), workload)
    width, height = dims
    if width <= 0 or height <= 0:
        raise ProbeFailed("probe-bad-output", f"image header says {width}x{height}")
    return float(width * height)


def _video_pixels(path, fd, size, timeout, workload):
    text = _external([_tool("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
                      "stream=width,height", "-of", "csv=p=0:s=x", _ff_path(path)], timeout, "ffprobe")
    first = text.strip().splitlines()[0] if text.strip() else ""
    width, _, height = first.partition("x")
    try:
        w, h = int(width), int(height.rstrip(",").strip())
    except ValueError:
        raise ProbeFailed("probe-bad-output", f"ffprobe found no picture size ({first[:40]!r})") from None
    if w <= 0 or h <= 0:
        raise ProbeFailed("probe-bad-output", f"ffprobe says {w}x{h}")
    return float(w * h)


def _command(path, fd, size, timeout, workload):
    argv = [a.replace("{input}", path) for a in workload.probe_command]
    if not argv[0].startswith("/"):
        found = _which(argv[0])
        if found is None:
            raise ProbeFailed("probe-not-found", f"probe command {argv[0]!r} not found on PATH")
        argv[0] = found
    return _number(_external(argv, timeout, os.path.basename(argv[0])), os.path.basename(argv[0]))


PROBES = {
    "ffprobe-duration": _ffprobe_duration,
    "mediainfo-duration": _mediainfo_duration,
    "media-duration": _media_duration,
    "file-size": _file_size,
    "image-pixels": _image_pixels,
    "video-pixels": _video_pixels,
    "line-count": _line_count,
    "command": _command,
}


def image_size(head, fd=None, deadline=None):
    """(width, height) from a PNG, GIF, BMP, WebP or JPEG header, or None: no tool needed for common images."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:2] == b"BM" and len(head) >= 26:
        return int.from_bytes(head[18:22], "little", signed=True), abs(int.from_bytes(head[22:26], "little",
                                                                                      signed=True))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = head[12:16]
        if kind == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        if kind == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if kind == b"VP8 ":
            return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if head[:2] == b"\xff\xd8" and fd is not None:
        return _jpeg_size(fd, deadline)
    return None


def _jpeg_size(fd, deadline=None):
    """SOF dimensions by walking the JPEG's markers. Bounded work per byte: fill bytes are skipped a chunk at a
    time, each segment costs one read, and the deadline is checked at every step."""
    pos = 2
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise ProbeFailed("probe-timeout", "reading the JPEG's markers took longer than the probe timeout")
        chunk = os.pread(fd, 65536, pos)
        if len(chunk) < 4 or chunk[0] != 0xFF:
            return None
        rest = chunk.lstrip(b"\xff")
        if len(rest) < 3:  # all fill (or the marker is cut by the chunk's end): move on, keep one 0xFF
            if len(chunk) < 65536:
                return None
            pos += len(chunk) - 4
            continue
        pos += len(chunk) - len(rest) - 1  # at the last 0xFF before the marker's kind
        kind = rest[0]
        length = int.from_bytes(rest[1:3], "big")
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
            sof = os.pread(fd, 5, pos + 4)
            if len(sof) < 5:
                return None
            return int.from_bytes(sof[3:5], "big"), int.from_bytes(sof[1:3], "big")
        if length < 2:
            return None
        pos += 2 + length


def measure(workload, path):
    """The workload's metric values for the input at ``path`` (one per probe); ProbeFailed if any is unknown."""
    fd, size = open_input(path)
    try:
        return [PROBES[name](path, fd, size, workload.probe_timeout, workload) for name in workload.probe]
    finally:
        os.close(fd)
