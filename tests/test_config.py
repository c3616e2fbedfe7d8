"""The config model: validation errors that name file and key, defaults, durations, and the marshal cache."""

import marshal
import os
import pathlib
import time

import pytest

import helpers
from gpu_router import config

MAIN = {"router": {}, "workloads": {"w": {"binary": "/usr/bin/w.distrib", "threshold": 3600}}}


def load_text(tmp_path, text, dropins=(), use_cache=False):
    path = tmp_path / "config.toml"
    path.write_text(text)
    if dropins:
        ddir = tmp_path / "workloads.d"
        ddir.mkdir(exist_ok=True)
        for name, body in dropins:
            (ddir / name).write_text(body)
    return config.load(str(path), use_cache=use_cache)


def error_of(tmp_path, text, dropins=()):
    with pytest.raises(config.ConfigError) as info:
        load_text(tmp_path, text, dropins)
    return info.value


# ---- defaults and values ------------------------------------------------------------------------------------

def test_minimal_profile_gets_documented_defaults(tmp_path):
    cfg = load_text(tmp_path, '[workloads.whisper]\nbinary = "/usr/bin/whisper.distrib"\nthreshold = 3600\n')
    assert cfg.router.lock_dir == "/run/gpu-router/locks"
    assert cfg.router.retry_exit_code == 75
    assert cfg.router.wait == 0.0
    assert cfg.router.probe_error_exit_code == 65
    assert cfg.gpu.snapshot == "/run/gpu-router/gpus.json"
    assert cfg.gpu.snapshot_max_age == 5.0
    w = cfg.workload("whisper")
    assert (w.name, w.binary, w.threshold, w.probe) == ("whisper", "/usr/bin/whisper.distrib", [3600], ["file-size"])
    assert w.threshold_unit == ["bytes"]
    assert (w.input, w.on_probe_error, w.admission, w.combine) == ("last-file", "cpu", "slots", "all")
    assert (w.max_gpu_jobs, w.max_cpu_jobs, w.gpu_args, w.cpu_args) == (1, 1, [], [])
    assert (w.retry_exit_code, w.wait, w.scope, w.spill_to_cpu) == (75, 0.0, "best-effort", False)
    assert w.source == str(tmp_path / "config.toml")


def test_workload_inherits_router_retry_code_and_wait_unless_it_sets_its_own(tmp_path):
    cfg = load_text(tmp_path, '[router]\nretry_exit_code = 99\nwait = "2m"\n'
                              '[workloads.a]\nbinary = "/bin/a"\nthreshold = 1\n'
                              '[workloads.b]\nbinary = "/bin/b"\nthreshold = 1\nretry_exit_code = 3\nwait = "5s"\n')
    assert (cfg.workload("a").retry_exit_code, cfg.workload("a").wait) == (99, 120.0)
    assert (cfg.workload("b").retry_exit_code, cfg.workload("b").wait) == (3, 5.0)


def test_units_default_per_probe_and_joined_for_product(tmp_path):
    cfg = load_text(tmp_path, '[workloads.a]\nbinary = "/bin/a"\nprobe = ["ffprobe-duration", "video-pixels"]\n'
                              'threshold = [3600, 2073600]\n'
                              '[workloads.b]\nbinary = "/bin/b"\nprobe = ["ffprobe-duration", "video-pixels"]\n'
                              'combine = "product"\nthreshold = 1e9\n')
    assert cfg.workload("a").threshold_unit == ["seconds", "pixels"]
    assert cfg.workload("b").threshold_unit == ["seconds*pixels"]
    assert cfg.workload("b").threshold == [1e9]


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("0s", 0), ("1.5h", 5400), ("2d", 172800),
    ("1 m 30 s", 90), ("45", 45), (12, 12), (0.5, 0.5), ("5min", 300), ("10sec", 10),
])
def test_parse_duration_accepts(text, seconds):
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5x", "m5", "s", -1, True, "1y", float("nan"), "--5s"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        config.parse_duration(bad)


def test_unknown_workload_lists_the_configured_ones(tmp_path):
    cfg = load_text(tmp_path, '[workloads.alpha]\nbinary = "/bin/a"\nthreshold = 1\n'
                              '[workloads.beta]\nbinary = "/bin/b"\nthreshold = 1\n')
    with pytest.raises(config.ConfigError, match="no workload profile named 'gamma' .*alpha, beta"):
        cfg.workload("gamma")


def test_records_compare_and_print():
    a, b = helpers.workload(threshold=5), helpers.workload(threshold=5)
    assert a == b and a != helpers.workload(threshold=6)
    assert "threshold=[5]" in repr(a)


# ---- every bad config names its file and key ----------------------------------------------------------------

BAD = [
    # (id, main text, drop-ins, key expected in the error, words expected in the message)
    ("toml-syntax", '[workloads.w]\nbinary = "/bin/w"\nthreshold = = 3\n', (), None, "TOML syntax error"),
    ("unknown-key-did-you-mean", '[workloads.w]\nbinary = "/bin/w"\ntreshold = 3\nthreshold = 3\n', (),
     "workloads.w.treshold", "did you mean 'threshold'"),
    ("unknown-key-allowed-list", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 3\nzzzz = 1\n', (),
     "workloads.w.zzzz", "allowed: admission"),
    ("unknown-router-key", '[router]\nlock_dri = "/x"\n', (), "router.lock_dri", "did you mean 'lock_dir'"),
    ("unknown-section", '[routr]\nx = 1\n', (), "routr", "unknown section"),
    ("wrong-type-threshold", '[workloads.w]\nbinary = "/bin/w"\nthreshold = "big"\n', (),
     "workloads.w.threshold", "expected a number, or a size"),
    ("wrong-type-slots", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nmax_gpu_jobs = "2"\n', (),
     "workloads.w.max_gpu_jobs", "expected a whole number"),
    ("wrong-type-bool", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nmax_gpu_jobs = true\n', (),
     "workloads.w.max_gpu_jobs", "expected a whole number"),
    ("wrong-type-args", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_args = "--cuda"\n', (),
     "workloads.w.gpu_args", "list of strings"),
    ("wrong-choice", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nscope = "maybe"\n', (),
     "workloads.w.scope", "expected one of 'required', 'best-effort', 'off'"),
    ("negative-vram", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_vram_mb = -3700\n', (),
     "workloads.w.gpu_vram_mb", "from 0 to 16777216, got -3700"),
    # A size with its unit is parsed (issue 10) and bounded (issue 8): 400 digits are inf as a float, not a traceback.
    ("huge-size-string", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_vram_mb = "%sG"\n' % ("9" * 400), (),
     "workloads.w.gpu_vram_mb", "expected a number of MiB or a size"),
    ("huge-threshold-size", '[workloads.w]\nbinary = "/bin/w"\nprobe = "file-size"\nthreshold = "%sG"\n' % ("9" * 60),
     (), "workloads.w.threshold", ""),
    ("negative-ram", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ncpu_ram_mb = -1\n', (),
     "workloads.w.cpu_ram_mb", "from 0 to 16777216, got -1"),
    ("negative-host-ram", '[host]\nram_mb = -65536\n', (), "host.ram_mb", "from 1 to 16777216, got -65536"),
    ("negative-threshold", '[workloads.w]\nbinary = "/bin/w"\nthreshold = -5\n', (),
     "workloads.w.threshold", "> 0, got -5"),
    ("negative-wait", '[router]\nwait = -5\n', (), "router.wait", "expected a duration"),
    ("bad-duration", '[router]\nwait = "soon"\n', (), "router.wait", "expected a duration"),
    ("retry-code-range", '[router]\nretry_exit_code = 256\n', (), "router.retry_exit_code", "from 1 to 255"),
    ("missing-binary", '[workloads.w]\nthreshold = 1\n', (), "workloads.w.binary", "required key is missing"),
    ("missing-threshold", '[workloads.w]\nbinary = "/bin/w"\n', (), "workloads.w.threshold", "required"),
    ("relative-binary", '[workloads.w]\nbinary = "w.distrib"\nthreshold = 1\n', (), "workloads.w.binary",
     "absolute path"),
    ("threshold-count", '[workloads.w]\nbinary = "/bin/w"\nprobe = ["ffprobe-duration", "video-pixels"]\n'
                        'threshold = 3600\n', (), "workloads.w.threshold", "expected 2 thresholds, one per probe, got 1"),
    ("threshold-count-product", '[workloads.w]\nbinary = "/bin/w"\nprobe = ["ffprobe-duration", "video-pixels"]\n'
                                'combine = "product"\nthreshold = [1, 2]\n', (), "workloads.w.threshold",
     "expected one threshold"),
    ("unit-count", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nthreshold_unit = ["s", "px"]\n', (),
     "workloads.w.threshold_unit", "expected 1 unit"),
    ("unknown-probe", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nprobe = "ffprobe"\n', (),
     "workloads.w.probe", "unknown probe 'ffprobe'"),
    ("command-without-argv", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nprobe = "command"\n', (),
     "workloads.w.probe_command", "needs probe_command"),
    ("argv-without-command", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nprobe_command = ["x"]\n', (),
     "workloads.w.probe_command", "only used with"),
    ("no-slots-at-all", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nmax_gpu_jobs = 0\nmax_cpu_jobs = 0\n',
     (), "workloads.w.max_cpu_jobs", "no job could ever run"),
    ("vram-needs-size", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nadmission = "vram"\n', (),
     "workloads.w.gpu_vram_mb", "needs gpu_vram_mb > 0"),
    ("bad-input-spec", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ninput = "arg:x"\n', (),
     "workloads.w.input", "arg:N"),
    ("bad-workload-name", '[workloads."a/b"]\nbinary = "/bin/w"\nthreshold = 1\n', (), "workloads.a/b",
     "letters, digits"),
    ("dropin-redefines", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\n',
     (("50-w.toml", '[workloads.w]\nbinary = "/bin/other"\nthreshold = 2\n'),), "workloads.w",
     "workload defined twice (also in"),
    ("dropin-redefines-dropin", '',
     (("10-a.toml", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\n'),
      ("20-b.toml", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\n')), "workloads.w", "10-a.toml"),
    ("dropin-router-section", '', (("10-a.toml", '[router]\nwait = "5s"\n'),), "router",
     "only [workloads.NAME]"),
    ("dropin-syntax", '', (("10-a.toml", '[workloads.w\n'),), None, "TOML syntax error"),
    ("dropin-wrong-type", '', (("10-a.toml", '[workloads.w]\nbinary = 5\nthreshold = 1\n'),),
     "workloads.w.binary", "absolute path"),
    # issue 8: every duration and size finite and bounded; env names valid; nesting bounded
    ("wait-inf", '[router]\nwait = inf\n', (), "router.wait", "expected a duration"),
    ("wait-nan", '[router]\nwait = nan\n', (), "router.wait", "expected a duration"),
    ("wait-400-digits", '[router]\nwait = ' + "9" * 400 + '\n', (), "router.wait", "at most 1d"),
    ("wait-400-digit-string", '[router]\nwait = "' + "9" * 400 + 's"\n', (), "router.wait", "expected a duration"),
    ("wait-huge-string", '[router]\nwait = "1e999s"\n', (), "router.wait", "expected a duration"),
    ("wait-over-a-day", '[router]\nwait = "2d"\n', (), "router.wait", "from 0s to 1d"),
    ("probe-timeout-inf", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nprobe_timeout = inf\n', (), "workloads.w.probe_timeout", "expected a duration"),
    ("runtime-max-huge", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nruntime_max = 1e300\n', (), "workloads.w.runtime_max", "expected a duration"),
    ("sample-interval-zero", '[gpu]\nsample_interval = 0\n', (), "gpu.sample_interval", "from 10ms"),
    ("per-unit-1e308", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nvram_per_unit_mb = 1e308\n', (), "workloads.w.vram_per_unit_mb", "<= 1.67772e+07"),
    ("threshold-1e308", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1e308\n', (), "workloads.w.threshold",
     "<= 1e+15"),
    ("vram-400-digits", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_vram_mb = ' + "9" * 400 + '\n', (), "workloads.w.gpu_vram_mb", "from 0 to"),
    ("memory-max-huge", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_memory_max = ' + "9" * 30 + '\n', (), "workloads.w.gpu_memory_max", "from 1 to"),
    ("env-key-equals", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nenv = {"A=B" = "x"}\n', (), "workloads.w.env", "not a valid name"),
    ("env-key-nul", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nenv = {"A\\u0000" = "x"}\n', (), "workloads.w.env", "not a valid name"),
    ("env-value-nul", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nenv = {A = "x\\u0000"}\n', (), "workloads.w.env", "without NUL"),
    ("env-key-empty", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nenv = {"" = "x"}\n', (), "workloads.w.env", "not a valid name"),
    ("probe-command-nul", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\nprobe = "command"\nprobe_command = ["a\\u0000"]\n', (), "workloads.w.probe_command",
     "no NUL"),
    ("nested-500", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_args = ' + "[" * 500 + "]" * 500 + '\n',
     (), None, "nested too deeply"),
    ("nested-5", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\ngpu_args = [[[["x"]]]]\n', (),
     "workloads.w.gpu_args[0]", "nested too deeply"),
    ("long-key", '[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\n' + "k" * 5000 + ' = 1\n', (),
     "workloads.w." + "k" * 64 + "…", "unknown key"),
]


@pytest.mark.parametrize("kind", ["directory", "fifo", "dev-zero", "socket", "huge"])
def test_dropin_that_is_not_a_regular_file_is_refused_by_name(tmp_path, kind):
    """A drop-in that is a directory, a FIFO (a read would hang), a symlink to /dev/zero (would never end) or a
    socket is refused by name; so is one larger than 1 MiB."""
    import socket as _socket

    (tmp_path / "config.toml").write_text('[workloads.w]\nbinary = "/bin/w"\nthreshold = 1\n')
    ddir = tmp_path / "workloads.d"
    ddir.mkdir()
    target = ddir / "x.toml"
    keep = None
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "socket":
        keep = _socket.socket(_socket.AF_UNIX)
        keep.bind(str(target))
    else:
        target.write_text("# " + "x" * (2 << 20) + "\n")
    try:
        with pytest.raises(config.ConfigError) as info:
            config.load(str(tmp_path / "config.toml"), use_cache=False)
        assert info.value.path == str(target)
        assert ("not a regular file" in str(info.value)) or ("at most" in str(info.value))
    finally:
        if keep is not None:
            keep.close()


def _expected_file(tmp_path, dropins):
    return str(tmp_path / "workloads.d" / dropins[-1][0]) if dropins else str(tmp_path / "config.toml")


@pytest.mark.parametrize("text,dropins,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_error_names_file_and_key(tmp_path, text, dropins, key, words):
    err = error_of(tmp_path, text, dropins)
    assert err.path == _expected_file(tmp_path, dropins)
    assert err.key == key
    assert words in str(err)
    assert str(err).startswith(err.path)


def test_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b'[workloads.w]\nbinary = "/bin/\xff"\nthreshold = 1\n')
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(str(path), use_cache=False)


def test_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="no such config file") as info:
        config.load(str(tmp_path / "nope.toml"), use_cache=False)
    assert info.value.path == str(tmp_path / "nope.toml")


@pytest.mark.parametrize("case", ["toml-syntax", "unknown-key-did-you-mean", "wrong-type-slots", "negative-vram",
                                  "missing-binary", "threshold-count", "dropin-redefines"])
def test_wrapper_exits_2_on_bad_config_and_runs_nothing(tmp_path, gr_bin, clean_env, case):
    _, text, dropins, key, words = next(b for b in BAD if b[0] == case)
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"threshold": 1}})
    rig.config.write_text(text)
    if dropins:
        (tmp_path / "workloads.d").mkdir()
        for name, body in dropins:
            (tmp_path / "workloads.d" / name).write_text(body)
    res = rig.run("w", rig.config)
    assert res.rc == 2, res
    human = [line for line in res.err.splitlines() if line.startswith("gpu-router: config error:")]
    assert len(human) == 1, res.err
    assert _expected_file(tmp_path, dropins) in human[0]
    if key:
        assert key in human[0]
    assert words in human[0]
    ev = res.event("config-error")
    assert ev["MESSAGE_ID"] == "7b68d5f6d8b14931ab335f51c2a7e293"
    assert ev["PRIORITY"] == "3" and ev["GPU_ROUTER_WORKLOAD"] == "w"
    assert _expected_file(tmp_path, dropins) in ev["GPU_ROUTER_DETAIL"]
    assert rig.starts() == []
    assert not rig.lock_dir.exists(), "a bad config must stop the wrapper before it touches the lock dir"


def test_wrapper_exits_2_for_unknown_workload_and_usage_errors(tmp_path, gr_bin, clean_env):
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"threshold": 1}})
    res = rig.run("nope", rig.config)
    assert res.rc == 2 and "no workload profile named 'nope' (configured: w)" in res.err
    import subprocess

    p = subprocess.run([str(gr_bin), "run", "--", "x"], env=rig.env, capture_output=True)
    assert p.returncode == 2 and b"no workload named" in p.stderr
    p = subprocess.run([str(gr_bin), "run", "--workload"], env=rig.env, capture_output=True)
    assert p.returncode == 2 and b"--workload needs a value" in p.stderr


# ---- the cache ----------------------------------------------------------------------------------------------

@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A config dir plus a trusted cache dir for in-process loads."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o755)
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(cache))
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "config.toml"
    path.write_text('[workloads.w]\nbinary = "/bin/w"\nthreshold = 100\n')
    return path


def _cache_file(path):
    return pathlib.Path(config._cache_file(str(path)))


def _age(path, seconds=10):
    """Make a source look older than the cache (as a real admin edit is, long before the jobs that read it)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


def _plant(path, threshold):
    """Rewrite the cache to say something the TOML does not, keeping its key: a later load that returns it
    proves the cache was used; one that does not proves it was ignored."""
    cf = _cache_file(path)
    blob = marshal.loads(cf.read_bytes())
    blob["config"]["workloads"]["w"]["threshold"] = [threshold]
    cf.write_bytes(marshal.dumps(blob))
    cf.chmod(0o644)
    return cf


def _wait_cache(path):
    """Load until the cache is written (a source changed in the same clock tick as the load is not cached)."""
    deadline = time.monotonic() + 3
    while not _cache_file(path).exists():
        assert time.monotonic() < deadline, "the cache was never written"
        config.load(str(path))
        time.sleep(0.01)


def test_cache_is_written_and_used(cached):
    assert config.load(str(cached)).workload("w").threshold == [100]
    _wait_cache(cached)
    _plant(cached, 4242)
    assert config.load(str(cached)).workload("w").threshold == [4242]  # a hit: the planted value
    assert config.load(str(cached), use_cache=False).workload("w").threshold == [100]


def test_same_size_edit_is_seen(cached):
    config.load(str(cached))
    _wait_cache(cached)
    size = cached.stat().st_size
    with open(cached, "r+") as f:  # in place: same inode, same size
        f.write('[workloads.w]\nbinary = "/bin/w"\nthreshold = 200\n')
    assert cached.stat().st_size == size
    assert config.load(str(cached)).workload("w").threshold == [200]


def test_same_size_edit_with_restored_mtime_is_seen(cached):
    """A tool that restores the mtime (cp -p, rsync -t, tar) still changes ctime, which the key includes."""
    config.load(str(cached))
    _wait_cache(cached)
    st = cached.stat()
    cached.write_text('[workloads.w]\nbinary = "/bin/w"\nthreshold = 300\n')
    os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached.stat().st_mtime_ns == st.st_mtime_ns
    assert config.load(str(cached)).workload("w").threshold == [300]


def test_source_not_older_than_the_cache_is_not_cached(cached, monkeypatch):
    """Racy edits: where timestamps are coarse (kernel ticks; Debian 12's 6.1 kernel), an edit in the same tick
    as a cached load leaves stat identical. A source whose ctime is not older than the cache file must therefore
    not be cached at all (the next load, a tick later, caches it)."""
    real = config._sources

    def future(main_path):
        out = []
        for entry in real(main_path):
            if entry[1] is None:
                out.append(entry)
            else:
                path, mtime, size, ino, ctime = entry
                out.append((path, mtime, size, ino, time.time_ns() + 60 * 10**9))
        return out

    monkeypatch.setattr(config, "_sources", future)
    config.load(str(cached))
    assert not _cache_file(cached).exists()
    monkeypatch.setattr(config, "_sources", real)
    _wait_cache(cached)


def test_adding_editing_and_removing_a_dropin_is_seen(cached):
    config.load(str(cached))
    _wait_cache(cached)
    ddir = cached.parent / "workloads.d"
    ddir.mkdir()
    assert sorted(config.load(str(cached)).workloads) == ["w"]
    (ddir / "10-x.toml").write_text('[workloads.x]\nbinary = "/bin/x"\nthreshold = 7\n')
    assert sorted(config.load(str(cached)).workloads) == ["w", "x"]
    _wait_cache(cached)
    (ddir / "10-x.toml").write_text('[workloads.x]\nbinary = "/bin/x"\nthreshold = 8\n')
    assert config.load(str(cached)).workload("x").threshold == [8]
    (ddir / "20-y.toml").write_text('[workloads.y]\nbinary = "/bin/y"\nthreshold = 9\n')
    (ddir / ".hidden.toml").write_text('this is not toml')
    (ddir / "notes.txt").write_text('neither')
    assert sorted(config.load(str(cached)).workloads) == ["w", "x", "y"]
    (ddir / "10-x.toml").unlink()
    assert sorted(config.load(str(cached)).workloads) == ["w", "y"]


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "foreign-owned", "symlink", "corrupt",
                                 "other-format"])
def test_untrusted_or_broken_cache_is_ignored(cached, how, tmp_path):
    config.load(str(cached))
    _wait_cache(cached)
    cf = _plant(cached, 4242)
    assert config.load(str(cached)).workload("w").threshold == [4242]  # control: the plant works
    if how == "group-writable":
        cf.chmod(0o664)
    elif how == "world-writable":
        cf.chmod(0o646)
    elif how == "foreign-owned":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the cache file to another user")
        os.chown(cf, 65534, 65534)
    elif how == "symlink":
        target = tmp_path / "elsewhere.marshal"
        target.write_bytes(cf.read_bytes())
        cf.unlink()
        cf.symlink_to(target)
    elif how == "corrupt":
        cf.write_bytes(b"\x00garbage")
    elif how == "other-format":
        blob = marshal.loads(cf.read_bytes())
        blob["format"] = config.CACHE_FORMAT + 1
        cf.write_bytes(marshal.dumps(blob))
    assert config.load(str(cached)).workload("w").threshold == [100]


@pytest.mark.parametrize("mode", [0o775, 0o757])
def test_untrusted_cache_dir_is_not_written(cached, mode):
    cache_dir = pathlib.Path(os.environ["GPU_ROUTER_CACHE_DIR"])
    cache_dir.chmod(mode)
    _age(cached)
    assert config.load(str(cached)).workload("w").threshold == [100]
    assert list(cache_dir.iterdir()) == []


def test_missing_cache_dir_still_loads(cached, monkeypatch, tmp_path):
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(tmp_path / "absent"))
    assert config.load(str(cached)).workload("w").threshold == [100]
    assert not (tmp_path / "absent").exists()


def test_wrapper_sees_edits_on_next_run(tmp_path, gr_bin, clean_env):
    """Through the real launcher: a same-size edit of the threshold flips the route on the very next job."""
    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"threshold": 100}})
    data = tmp_path / "input.bin"
    data.write_bytes(b"x" * 500)
    res = rig.warm("w", data)
    assert res.event("routed")["GPU_ROUTER_MODE"] == "CPU"
    res = rig.run("w", data)  # a cached run, then an edit right after it
    assert res.event("routed")["GPU_ROUTER_MODE"] == "CPU"
    rig.doc["workloads"]["w"]["threshold"] = 900  # same size as 100
    rig.rewrite()
    res = rig.run("w", data)
    assert res.event("routed")["GPU_ROUTER_MODE"] == "GPU" and res.event("routed")["GPU_ROUTER_THRESHOLD"] == "900"
    ddir = tmp_path / "workloads.d"
    ddir.mkdir()
    (ddir / "x.toml").write_text(helpers.toml_text({"workloads": {"x": {"binary": str(rig.job), "threshold": 1,
                                                                         "scope": "off"}}}))
    res = rig.run("x", data)
    assert res.rc == 0 and res.event("routed")["GPU_ROUTER_WORKLOAD"] == "x"
