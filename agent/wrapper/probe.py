"""Measure a job's input before it runs: duration, size, pixels, lines, or an operator's command.

A probe that fails, times out, or prints nothing usable yields *unknown* — never 0 — with a reason the event
carries. External probes run under a forked guardian (guardian.py): in their own process group, with the
guardian as their subreaper, so a hung probe and everything it started — detached children too — is killed at the
deadline, when the wrapper dies (even by SIGKILL) and when the caller's process group is signalled; ``subprocess``
is not used because its import costs ~14 ms on the hot path. Built-in parsers read in bounded chunks and check
the deadline as they read.

The input is opened once, non-blocking and without a controlling tty, then checked with fstat: a FIFO is never
read (that would steal the job's data or hang), a directory or device is refused, an empty file is unknown.
"""

from .. import fastos as os  # os without its import cost (fastos.py)
import _stat  # stat.py re-exports these from the built-in _stat: no module to load
import time


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


# ---- running an external probe: guardian.py (imported by the probes that run one) -------------------------

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


def run_command(argv, timeout):
    """guardian.run_command: the probe's process under a forked guardian (imported only here, when one runs)."""
    from .guardian import run_command as run

    return run(argv, timeout)


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
