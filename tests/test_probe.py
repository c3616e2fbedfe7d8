"""Probes on real files: media made by ffmpeg, images in every supported format, hostile inputs, hung probes."""

import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

import helpers
from gpu_router.wrapper import probe


def measure(path, **profile):
    return probe.measure(helpers.workload(**profile), str(path))


def failure(path, **profile):
    with pytest.raises(probe.ProbeFailed) as info:
        measure(path, **profile)
    return info.value


@pytest.fixture
def corrupt_wav(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(random.Random(1).randbytes(8192))  # ffprobe: "Invalid data found"; mediainfo: nothing
    return path


# ---- finding the input ------------------------------------------------------------------------------------

def test_find_input_last_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a.wav", "b.wav", "-odd.wav"):
        (tmp_path / name).write_bytes(b"x")
    assert probe.find_input("last-file", ["--model", "small", "a.wav", "b.wav", "--out", "nope.txt"]) == "b.wav"
    assert probe.find_input("last-file", ["a.wav", "--flag"]) == "a.wav"
    assert probe.find_input("last-file", ["--", "-odd.wav"]) == "-odd.wav"  # a file may start with "-"
    assert probe.find_input("last-file", ["-odd.wav", "a.wav"]) == "a.wav"  # but plain names come first
    assert probe.find_input("last-file", ["--x", "missing.wav"]) is None
    assert probe.find_input("last-file", []) is None
    os.symlink("dangling-target", tmp_path / "link.wav")
    assert probe.find_input("last-file", ["a.wav", "link.wav"]) == "link.wav"  # found; open_input says why not


def test_find_input_arg_and_option():
    args = ["-m", "small", "in put.wav", "--audio", "x.wav", "--out=o.txt"]
    assert probe.find_input("arg:3", args) == "in put.wav"
    assert probe.find_input("arg:1", args) == "-m"
    assert probe.find_input("arg:-1", args) == "--out=o.txt"
    assert probe.find_input("arg:7", args) is None
    assert probe.find_input("arg:-9", args) is None
    assert probe.find_input("option:--audio", args) == "x.wav"
    assert probe.find_input("option:--out", args) == "o.txt"
    assert probe.find_input("option:--missing", args) is None
    assert probe.find_input("option:--audio", ["--audio"]) is None  # option without a value


# ---- the input file itself ----------------------------------------------------------------------------------

def test_no_input(tmp_path):
    with pytest.raises(probe.ProbeFailed) as info:
        probe.measure(helpers.workload(), None)
    assert info.value.reason == "no-input"


def test_missing_input(tmp_path):
    err = failure(tmp_path / "nope.wav")
    assert err.reason == "input-missing" and "does not exist" in str(err)


def test_dangling_symlink_is_missing(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link.wav")
    assert failure(tmp_path / "link.wav").reason == "input-missing"


def test_symlink_to_a_file_is_followed(tmp_path):
    (tmp_path / "real.bin").write_bytes(b"x" * 123)
    os.symlink(tmp_path / "real.bin", tmp_path / "link.bin")
    assert measure(tmp_path / "link.bin") == [123.0]


def test_empty_input_is_unknown_not_zero(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    for name in ("file-size", "ffprobe-duration", "line-count"):
        err = failure(tmp_path / "empty.wav", probe=name)
        assert err.reason == "input-empty", name


def test_directory_input(tmp_path):
    (tmp_path / "d.wav").mkdir()
    err = failure(tmp_path / "d.wav")
    assert err.reason == "input-not-regular" and "a directory" in str(err)


def test_device_input():
    err = failure("/dev/null")
    assert err.reason == "input-not-regular" and "a device" in str(err)


def test_fifo_is_not_opened_and_its_writer_loses_nothing(tmp_path):
    """A writer blocked in open() on a FIFO must neither be released by the probe nor lose its data."""
    fifo = tmp_path / "in.wav"
    os.mkfifo(fifo)
    data = os.urandom(200_000)  # more than a pipe buffer
    errors = []

    def writer():
        try:
            with open(fifo, "wb") as f:
                f.write(data)
        except Exception as exc:  # BrokenPipeError when a reader came and went
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(0.1)
    err = failure(fifo)
    assert err.reason == "input-not-regular" and "a FIFO" in str(err)
    time.sleep(0.1)
    assert t.is_alive() and not errors, f"the writer was disturbed: {errors}"
    with open(fifo, "rb") as f:
        got = f.read()
    t.join(5)
    assert got == data and not errors


def test_fifo_without_writer_does_not_hang(tmp_path):
    fifo = tmp_path / "in.wav"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert failure(fifo, probe="line-count").reason == "input-not-regular"
    assert time.monotonic() - started < 1


def test_socket_input(tmp_path):
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = helpers.public_tmpdir() / "s.wav"
    try:
        s.bind(str(path))
        assert failure(path).reason == "input-not-regular"
    finally:
        s.close()
        shutil.rmtree(path.parent)


@pytest.mark.skipif(not helpers.can_drop_privileges(), reason="needs root and setpriv to run as nobody")
def test_unreadable_input_as_unprivileged_user():
    folder = helpers.public_tmpdir()
    try:
        secret = folder / "secret.wav"
        secret.write_bytes(b"x" * 100)
        secret.chmod(0o600)
        code = ("import sys; sys.path.append(%r); from gpu_router.wrapper import probe\n"
                "try:\n    probe.open_input(%r)\nexcept probe.ProbeFailed as e:\n    print(e.reason)\n"
                % (str(helpers.LIB), str(secret)))
        out = subprocess.run(helpers.as_user() + [helpers.PYTHON, "-IS", "-c", code], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.strip() == "input-unreadable", out
        secret.chmod(0o644)  # control: readable, it is measured
        code2 = code.replace("probe.open_input(%r)" % str(secret), "print(probe.open_input(%r)[1])" % str(secret))
        out = subprocess.run(helpers.as_user() + [helpers.PYTHON, "-IS", "-c", code2], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.strip() == "100", out
    finally:
        shutil.rmtree(folder)


# ---- media duration -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ffprobe-duration", "mediainfo-duration", "media-duration"])
@pytest.mark.parametrize("media", ["2s.wav", "2s.mp3", "2s-64x48.mkv"])
def test_duration_of_real_media(tmp_path_factory, name, media):
    value, = measure(helpers.media(tmp_path_factory, media), probe=name)
    assert value == pytest.approx(2.0, abs=0.25)  # mp3 frames pad the end


@pytest.mark.parametrize("name", ["ffprobe-duration", "mediainfo-duration", "media-duration"])
def test_corrupt_media_is_unknown_not_zero(corrupt_wav, name):
    err = failure(corrupt_wav, probe=name)
    assert err.reason in ("probe-failed", "probe-bad-output")
    if name == "ffprobe-duration":
        assert err.reason == "probe-failed" and "ffprobe exited 1" in str(err) and "Invalid data" in str(err)
    if name == "mediainfo-duration":
        assert err.reason == "probe-bad-output" and "no duration" in str(err)


def test_text_named_wav_is_not_a_duration(tmp_path):
    (tmp_path / "t.wav").write_text("hello\nworld\n")
    assert failure(tmp_path / "t.wav", probe="ffprobe-duration").reason == "probe-failed"


@pytest.mark.parametrize("name", ["with space.wav", "new\nline.wav", "ünï cödé ✓.wav", "-dash.wav",
                                  "concat:a|b.wav", "http:x.wav", "%d{input}.wav"])
@pytest.mark.parametrize("tool", ["ffprobe-duration", "mediainfo-duration"])
def test_awkward_names_reach_the_tool_intact(tmp_path_factory, tmp_path, monkeypatch, name, tool):
    shutil.copy(helpers.media(tmp_path_factory, "2s.wav"), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert measure(name, probe=tool) == [pytest.approx(2.0, abs=0.1)]  # relative name, as a job passes it


def test_missing_tool_is_probe_not_found(tmp_path_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    err = failure(helpers.media(tmp_path_factory, "2s.wav"), probe="ffprobe-duration")
    assert err.reason == "probe-not-found" and "ffprobe" in str(err)


def test_media_duration_falls_back_to_ffprobe_without_mediainfo(tmp_path_factory, tmp_path, monkeypatch):
    os.symlink(shutil.which("ffprobe"), tmp_path / "ffprobe")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert measure(helpers.media(tmp_path_factory, "2s.wav"), probe="media-duration") == [
        pytest.approx(2.0, abs=0.1)]
    with pytest.raises(probe.ProbeFailed):
        measure(helpers.media(tmp_path_factory, "2s.wav"), probe="mediainfo-duration")


# ---- pixels ---------------------------------------------------------------------------------------------------

IMAGES = ["37x23.png", "37x23.jpg", "37x23.gif", "37x23.bmp", "37x23-lossy.webp", "37x23-lossless.webp",
          "37x23-anim.webp"]


@pytest.mark.parametrize("name", IMAGES)
def test_image_size_parses_real_headers(tmp_path_factory, name):
    path = helpers.media(tmp_path_factory, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert probe.image_size(os.pread(fd, 65536, 0), fd) == (37, 23)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", IMAGES)
def test_image_pixels_needs_no_tool(tmp_path_factory, tmp_path, monkeypatch, name):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ffprobe: the header parser alone
    assert measure(helpers.media(tmp_path_factory, name), probe="image-pixels") == [37.0 * 23]


def test_image_size_large_png(tmp_path_factory):
    assert measure(helpers.media(tmp_path_factory, "3000x2000.png"), probe="image-pixels") == [6_000_000.0]


def test_top_down_bmp(tmp_path_factory, tmp_path):
    data = bytearray(helpers.media(tmp_path_factory, "37x23.bmp").read_bytes())
    height = int.from_bytes(data[22:26], "little", signed=True)
    data[22:26] = (-height).to_bytes(4, "little", signed=True)
    (tmp_path / "td.bmp").write_bytes(bytes(data))
    assert measure(tmp_path / "td.bmp", probe="image-pixels") == [37.0 * 23]


def test_jpeg_with_large_app_segment(tmp_path_factory, tmp_path):
    """The SOF comes after a 60 KB APPn segment: found by walking the markers, not within a fixed head."""
    data = helpers.media(tmp_path_factory, "37x23.jpg").read_bytes()
    app = b"\xff\xe1" + (60_002).to_bytes(2, "big") + b"Exif\0\0" + bytes(59_994)
    (tmp_path / "big.jpg").write_bytes(data[:2] + app + data[2:])
    assert measure(tmp_path / "big.jpg", probe="image-pixels") == [37.0 * 23]


def test_truncated_jpeg_falls_back_and_fails_unknown(tmp_path_factory, tmp_path):
    (tmp_path / "cut.jpg").write_bytes(helpers.media(tmp_path_factory, "37x23.jpg").read_bytes()[:20])
    err = failure(tmp_path / "cut.jpg", probe="image-pixels")
    assert err.reason in ("probe-failed", "probe-bad-output")


def test_zero_sized_gif_header_is_unknown(tmp_path):
    (tmp_path / "z.gif").write_bytes(b"GIF89a" + bytes(4) + bytes(40))
    assert failure(tmp_path / "z.gif", probe="image-pixels").reason == "probe-bad-output"


def test_image_pixels_of_a_video_uses_ffprobe(tmp_path_factory):
    assert measure(helpers.media(tmp_path_factory, "2s-64x48.mkv"), probe="image-pixels") == [64.0 * 48]


def test_video_pixels(tmp_path_factory):
    assert measure(helpers.media(tmp_path_factory, "2s-320x240.mkv"), probe="video-pixels") == [320.0 * 240]


def test_video_pixels_of_audio_is_unknown(tmp_path_factory):
    err = failure(helpers.media(tmp_path_factory, "2s.wav"), probe="video-pixels")
    assert err.reason == "probe-bad-output" and "no picture size" in str(err)


def test_multi_probe_measures_each(tmp_path_factory):
    values = measure(helpers.media(tmp_path_factory, "2s-64x48.mkv"), probe=["ffprobe-duration", "video-pixels"],
                     threshold=[10, 10_000])
    assert values == [pytest.approx(2.0, abs=0.1), 3072.0]


def test_multi_probe_one_unknown_makes_all_unknown(tmp_path_factory):
    with pytest.raises(probe.ProbeFailed):
        measure(helpers.media(tmp_path_factory, "2s.wav"), probe=["ffprobe-duration", "video-pixels"],
                threshold=[10, 10_000])


# ---- lines and size ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,lines", [(b"a\nb\nc", 3), (b"a\nb\n", 2), (b"\n", 1), (b"x", 1),
                                        (b"l\n" * 300_000, 300_000)])
def test_line_count(tmp_path, text, lines):
    (tmp_path / "t.txt").write_bytes(text)
    assert measure(tmp_path / "t.txt", probe="line-count") == [float(lines)]


def test_file_size(tmp_path):
    (tmp_path / "f").write_bytes(b"y" * 4321)
    assert measure(tmp_path / "f") == [4321.0]


# ---- the operator's command ---------------------------------------------------------------------------------

def command(path, argv, timeout="5s"):
    return measure(path, probe="command", probe_command=argv, probe_timeout=timeout)


def command_failure(path, argv, timeout="5s"):
    with pytest.raises(probe.ProbeFailed) as info:
        command(path, argv, timeout)
    return info.value


def test_command_probe_gets_the_input_and_its_number(tmp_path):
    name = tmp_path / "we ird\nname ✓.txt"
    name.write_bytes(b"12345")
    assert command(name, ["/bin/sh", "-c", 'cat "$1"', "sh", "{input}"]) == [12345.0]
    assert command(name, ["sh", "-c", 'echo "  42.5 tokens"; echo 7']) == [42.5]  # PATH lookup, first token


@pytest.mark.parametrize("script,reason,words", [
    ("echo abc", "probe-bad-output", "not a number"),
    ("true", "probe-bad-output", "not a number"),
    ("echo -3", "probe-bad-output", "negative"),
    ("echo nan", "probe-bad-output", "nan"),
    ("echo inf", "probe-bad-output", "inf"),
    ("echo oops >&2; exit 3", "probe-failed", "exited 3: oops"),
    ("kill -9 $$", "probe-failed", "killed by signal 9"),
])
def test_command_probe_failures_are_unknown(tmp_path, script, reason, words):
    (tmp_path / "in").write_bytes(b"x")
    err = command_failure(tmp_path / "in", ["/bin/sh", "-c", script])
    assert err.reason == reason and words in str(err), str(err)


def test_command_probe_not_found(tmp_path):
    (tmp_path / "in").write_bytes(b"x")
    assert command_failure(tmp_path / "in", ["no-such-probe-xyz", "{input}"]).reason == "probe-not-found"
    assert command_failure(tmp_path / "in", ["/nonexistent/probe", "{input}"]).reason == "probe-not-runnable"


def test_command_probe_output_is_bounded(tmp_path):
    (tmp_path / "in").write_bytes(b"x")
    # 10 MB of output: read and dropped beyond the limit, never buffered whole, and the number still parses
    assert command(tmp_path / "in", ["/bin/sh", "-c", "echo 5; head -c 10000000 /dev/zero | tr '\\0' 'a'"]) \
        == [5.0]


@pytest.mark.parametrize("script", [
    "sleep {m} & sleep {m}",  # a hung probe with a child of its own
    "exec >&- 2>&-; sleep {m} & sleep {m}",  # closed its output, still running
    "trap '' TERM; sleep {m}",  # ignores SIGTERM
])
def test_hung_probe_is_killed_with_its_children_at_the_timeout(tmp_path, script):
    marker = f"{random.randint(100000, 999999)}.5"
    (tmp_path / "in").write_bytes(b"x")
    started = time.monotonic()
    err = command_failure(tmp_path / "in", ["/bin/sh", "-c", script.format(m=marker)], timeout="1s")
    took = time.monotonic() - started
    assert err.reason == "probe-timeout" and "1s" in str(err)
    assert 0.9 <= took < 3, took
    deadline = time.monotonic() + 2
    while helpers.processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert helpers.processes_with_arg(marker) == [], "a probe process survived its timeout"


def test_line_count_timeout_is_checked(tmp_path):
    (tmp_path / "big").write_bytes(b"a\n" * (4 << 20))
    with pytest.raises(probe.ProbeFailed) as info:
        measure(tmp_path / "big", probe="line-count", probe_timeout="1ms")
    assert info.value.reason == "probe-timeout"


# ---- issue 8: parsers honour the deadline; a probe never outlives its wrapper (nor its descendants) -------------

def test_jpeg_fill_bytes_do_not_outlast_the_deadline(tmp_path):
    """\\xff\\xd8 then megabytes of 0xFF fill: the marker scan reads in chunks and checks the deadline."""
    path = tmp_path / "fill.jpg"
    path.write_bytes(b"\xff\xd8" + b"\xff" * (30 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert probe._jpeg_size(fd, time.monotonic() + 60) is None  # no SOF: not a picture size
    finally:
        os.close(fd)


def test_jpeg_of_many_tiny_segments_stops_at_the_deadline(tmp_path):
    path = tmp_path / "segments.jpg"
    path.write_bytes(b"\xff\xd8" + b"\xff\xfe\x00\x02" * (4 << 20))  # 4 M empty comment segments, no SOF
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(probe.ProbeFailed) as info:
            probe._jpeg_size(fd, time.monotonic() + 0.05)
        assert info.value.reason == "probe-timeout"
    finally:
        os.close(fd)
    err = failure(path, probe="image-pixels", probe_timeout="50ms")
    assert err.reason == "probe-timeout"


def _hanging_caller(tmp_path, marker, script):
    """A process (the stand-in for the wrapper) running a command probe that hangs; started in its own session so
    a test can signal its process group as a runner would."""
    (tmp_path / "in").write_bytes(b"x")
    code = (f"import sys; sys.path.insert(0, {str(helpers.LIB)!r})\n"
            "from gpu_router.wrapper import probe\n"
            f"print(probe.run_command(['/bin/sh', '-c', {script.format(m=marker)!r}], 60), flush=True)\n")
    return subprocess.Popen([helpers.PYTHON, "-IS", "-c", code], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _gone(marker, timeout=10):
    deadline = time.monotonic() + timeout
    while helpers.processes_with_arg(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return helpers.processes_with_arg(marker) == []


def _wait_started(marker, n=1):
    deadline = time.monotonic() + 10
    while len(helpers.processes_with_arg(marker)) < n:
        assert time.monotonic() < deadline, "the probe did not start"
        time.sleep(0.02)


DETACHING = "setsid sleep {m} & sleep {m} & sleep {m}"  # a child in its own session, one in the group, itself


@pytest.mark.parametrize("how", ["sigkill-wrapper", "sigterm-group", "sigint-group"])
def test_probe_and_its_descendants_die_with_the_wrapper(tmp_path, how):
    marker = f"{random.randint(100000, 999999)}.7"
    caller = _hanging_caller(tmp_path, marker, DETACHING)
    try:
        _wait_started(marker, 3)
        if how == "sigkill-wrapper":
            caller.kill()
        else:
            os.killpg(caller.pid, signal.SIGTERM if how == "sigterm-group" else signal.SIGINT)
        caller.wait(10)
        assert _gone(marker), f"probe processes outlived the wrapper: {helpers.processes_with_arg(marker)}"
    finally:
        if caller.poll() is None:
            caller.kill()
        for pid in helpers.processes_with_arg(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_probe_that_detaches_a_child_leaves_nothing_behind(tmp_path):
    marker = f"{random.randint(100000, 999999)}.9"
    (tmp_path / "in").write_bytes(b"x")
    script = f"setsid sleep {marker} >/dev/null 2>&1 & echo 12"
    try:
        assert command(tmp_path / "in", ["/bin/sh", "-c", script]) == [12.0]
        assert _gone(marker, timeout=5), "the probe's detached child survived it"
    finally:
        for pid in helpers.processes_with_arg(marker):
            os.kill(pid, signal.SIGKILL)
