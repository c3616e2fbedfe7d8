"""snapshot.py: atomic publication by the agent, and the wrapper's trusting, fresh-only, json-free read."""

import json
import marshal
import os
import stat
import subprocess
import threading
import time

import pytest

from gpu_router import snapshot

from helpers import LIB  # noqa: E402 - .build/lib, made by conftest.py

PYTHON = "/usr/bin/python3"


def make(now=None, gpus=None):
    return {"version": 1, "time": time.time() if now is None else now, "source": "nvml", "error": None,
            "driver": "550.54.15",
            "gpus": gpus if gpus is not None else [{
                "index": 0, "uuid": "GPU-1", "name": "NVIDIA Fake", "total_mb": 16384, "used_mb": 1024,
                "free_mb": 15360, "healthy": True, "health": "ok", "ours_mb": 0, "foreign_mb": 1024,
                "processes": [{"pid": 42, "used_mb": 1024, "ours": False}]}]}


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "gpus.json")


def test_roundtrip_writes_twin_and_json_0644(path, tmp_path):
    old = os.umask(0o077)  # the agent's umask must not leak into the files every wrapper reads
    try:
        snap = make()
        snapshot.write(path, snap)
    finally:
        os.umask(old)
    twin = tmp_path / "gpus.marshal"
    for p in (path, str(twin)):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644
    assert marshal.loads(twin.read_bytes()) == snap
    assert json.loads(open(path).read()) == snap
    assert snapshot.read(path, 5.0) == (snap, "ok")
    assert sorted(os.listdir(tmp_path)) == ["gpus.json", "gpus.marshal"]  # no temp files left


def test_twin_written_before_json(path, monkeypatch):
    from gpu_router import atomicfile

    order = []
    real = atomicfile.write
    monkeypatch.setattr(atomicfile, "write", lambda p, d, **kw: (order.append(os.path.basename(p)), real(p, d, **kw)))
    snapshot.write(path, make())
    assert order == ["gpus.marshal", "gpus.json"]


def test_json_fallback_when_twin_missing(path, tmp_path):
    snap = make()
    snapshot.write(path, snap)
    os.unlink(tmp_path / "gpus.marshal")
    assert snapshot.read(path, 5.0) == (snap, "ok")


def test_no_snapshot(path):
    assert snapshot.read(path, 5.0) == (None, "no-snapshot")
    assert snapshot.read("/nonexistent-dir/gpus.json", 5.0) == (None, "no-snapshot")


def test_stale_and_future_snapshots(path):
    now = time.time()
    snapshot.write(path, make(now - 10))
    assert snapshot.read(path, 5.0) == (None, "stale-snapshot")
    assert snapshot.read(path, 60.0)[1] == "ok"
    snapshot.write(path, make(now + 3600))  # a clock step: unknown, not fresh forever
    assert snapshot.read(path, 5.0) == (None, "stale-snapshot")
    snapshot.write(path, make(now))
    assert snapshot.read(path, 5.0, now=now + 4.9)[1] == "ok"
    assert snapshot.read(path, 5.0, now=now + 5.1)[1] == "stale-snapshot"


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_group_or_other_writable_is_untrusted(path, tmp_path, mode):
    snapshot.write(path, make())
    os.chmod(tmp_path / "gpus.marshal", mode)
    assert snapshot.read(path, 5.0) == (None, "untrusted-snapshot")


def test_symlink_is_untrusted(path, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    snapshot.write(str(real / "gpus.json"), make())
    os.symlink(real / "gpus.marshal", tmp_path / "gpus.marshal")
    os.symlink(real / "gpus.json", path)
    assert snapshot.read(path, 5.0) == (None, "untrusted-snapshot")


def test_json_symlink_is_untrusted_too(path, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    snapshot.write(str(real / "gpus.json"), make())
    os.symlink(real / "gpus.json", path)
    assert snapshot.read(path, 5.0) == (None, "untrusted-snapshot")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file away")
def test_foreign_owner_is_untrusted():
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="gpu-router-snap-")  # /tmp/...: traversable by nobody, unlike tmp_path
    try:
        os.chmod(folder, 0o755)
        _foreign_owner(os.path.join(folder, "gpus.json"))
    finally:
        shutil.rmtree(folder)


def _foreign_owner(path):
    twin = snapshot.twin_path(path)
    snapshot.write(path, make())
    os.chown(twin, 65534, 65534)
    assert snapshot.read(path, 5.0) == (None, "untrusted-snapshot")
    # the reader trusts root and itself: as nobody, a root-owned file is still trusted
    os.chown(twin, 0, 0)
    code = f"import sys; sys.path.insert(0, {str(LIB)!r}); from gpu_router import snapshot; " \
           f"print(snapshot.read({path!r}, 5.0)[1])"
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-IS", "-c", code],
                         capture_output=True, text=True)
    if out.returncode != 0 and "setpriv" in out.stderr:
        pytest.skip("setpriv unavailable")
    assert out.stdout.strip() == "ok", out.stderr


def test_fifo_is_untrusted_and_does_not_block(path, tmp_path):
    os.mkfifo(tmp_path / "gpus.marshal", 0o644)
    assert snapshot.read(path, 5.0) == (None, "untrusted-snapshot")


def test_corrupt(path, tmp_path):
    twin = tmp_path / "gpus.marshal"
    twin.write_bytes(b"\x00garbage")
    os.chmod(twin, 0o644)
    assert snapshot.read(path, 5.0) == (None, "corrupt-snapshot")
    # a damaged twin with a good JSON beside it: the JSON wins
    snap = make()
    with open(path, "w") as f:
        json.dump(snap, f)
    os.chmod(path, 0o644)
    assert snapshot.read(path, 5.0) == (snap, "ok")
    os.unlink(twin)
    with open(path, "w") as f:
        f.write("{not json")
    assert snapshot.read(path, 5.0) == (None, "corrupt-snapshot")
    twin.write_bytes(marshal.dumps([1, 2, 3]))
    assert snapshot.read(path, 5.0) == (None, "corrupt-snapshot")
    twin.write_bytes(marshal.dumps({"version": 2, "time": time.time(), "gpus": []}))
    assert snapshot.read(path, 5.0) == (None, "unsupported-snapshot")


def test_reader_never_sees_a_partial_file(path):
    """Atomic rename: a reader racing a writer sees the old or the new snapshot, never a torn one."""
    stop = threading.Event()
    errors = []

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            snapshot.write(path, make(gpus=[{"index": n, "pad": "x" * 2000, "i": i} for n in range(8)]))

    snapshot.write(path, make())
    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < deadline:
            snap, reason = snapshot.read(path, 5.0)
            reads += 1
            if reason != "ok":
                errors.append(reason)
    finally:
        stop.set()
        t.join()
    assert reads > 50 and not errors


def test_hot_path_imports_only_cheap_modules(path):
    """What the wrapper pays: `python3 -IS`, import snapshot, read a fresh snapshot; json must stay unimported."""
    snapshot.write(path, make())
    code = f"""
import sys
sys.path.append({str(LIB)!r})
import os, marshal, time  # what -S leaves unimported and the module may use; the rest is the module's cost
before = set(sys.modules)
from gpu_router import snapshot
snap, reason = snapshot.read({path!r}, 5.0)
print(reason)
print(" ".join(sorted(set(sys.modules) - before)))
"""
    out = subprocess.run([PYTHON, "-IS", "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "ok"
    new = set(out[1].split())
    assert "json" not in new
    assert new <= {"gpu_router", "gpu_router.fastos", "gpu_router.snapshot"}, new  # fastos: os itself here


# ---- issue 8, point 11: deep validation; a wrong inner type is "unknown", never a traceback -------------------

def _g(**over):
    g = make()["gpus"][0]
    g.update(over)
    return g


MALFORMED = {
    "gpus-int": lambda s: s.update(gpus=[1]),
    "gpus-str": lambda s: s.update(gpus="lots"),
    "gpus-none-entry": lambda s: s.update(gpus=[None]),
    "processes-int": lambda s: s.update(gpus=[_g(processes=5)]),
    "processes-str-entry": lambda s: s.update(gpus=[_g(processes=["x"])]),
    "process-pid-str": lambda s: s.update(gpus=[_g(processes=[{"pid": "42", "used_mb": 1}])]),
    "process-pid-missing": lambda s: s.update(gpus=[_g(processes=[{"used_mb": 1}])]),
    "process-used-str": lambda s: s.update(gpus=[_g(processes=[{"pid": 4, "used_mb": "big"}])]),
    "total-str": lambda s: s.update(gpus=[_g(total_mb="lots")]),
    "free-nan": lambda s: s.update(gpus=[_g(free_mb=float("nan"))]),
    "free-inf": lambda s: s.update(gpus=[_g(free_mb=float("inf"))]),
    "used-negative": lambda s: s.update(gpus=[_g(used_mb=-5)]),
    "foreign-list": lambda s: s.update(gpus=[_g(foreign_mb=[1])]),
    "index-str": lambda s: s.update(gpus=[_g(index="0")]),
    "index-missing": lambda s: s.update(gpus=[{k: v for k, v in _g().items() if k != "index"}]),
    "index-bool": lambda s: s.update(gpus=[_g(index=True)]),
    "healthy-str": lambda s: s.update(gpus=[_g(healthy="yes")]),
    "health-int": lambda s: s.update(gpus=[_g(health=5)]),
    "uuid-int": lambda s: s.update(gpus=[_g(uuid=5)]),
    "time-nan": lambda s: s.update(time=float("nan")),
    "time-inf": lambda s: s.update(time=float("inf")),
    "time-str": lambda s: s.update(time="now"),
    "time-bool": lambda s: s.update(time=True),
    "error-dict": lambda s: s.update(error={"x": 1}, gpus=[]),
    "ours-str": lambda s: s.update(gpus=[_g(processes=[{"pid": 4, "used_mb": 1, "ours": "no"}])]),
}


@pytest.mark.parametrize("shape", sorted(MALFORMED))
def test_malformed_inner_types_are_unknown(path, tmp_path, shape):
    snap = make()
    MALFORMED[shape](snap)
    twin = tmp_path / "gpus.marshal"
    twin.write_bytes(marshal.dumps(snap))
    os.chmod(twin, 0o644)
    snap_json = dict(snap)
    with open(path, "w") as f:
        json.dump(snap_json, f)  # NaN/inf as json writes them (Python's json reads them back)
    os.chmod(path, 0o644)
    assert snapshot.read(path, 5.0)[0] is None
    os.unlink(twin)
    assert snapshot.read(path, 5.0)[0] is None


def test_deeply_nested_json_is_corrupt_not_a_crash(path):
    with open(path, "w") as f:
        f.write('{"version": 1, "gpus": ' + "[" * 100000 + "]" * 100000 + "}")
    os.chmod(path, 0o644)
    assert snapshot.read(path, 5.0) == (None, "corrupt-snapshot")


@pytest.mark.parametrize("shape", ["gpus-int", "processes-int", "total-str", "time-nan", "process-pid-str",
                                   "healthy-str"])
def test_the_wrapper_routes_on_a_malformed_snapshot_without_a_traceback(tmp_path, gr_bin, clean_env, shape):
    import helpers

    rig = helpers.Rig(tmp_path, gr_bin, clean_env, {"w": {"probe": "file-size", "threshold": 1000,
                                                         "admission": "vram", "gpu_vram_mb": 100}})
    snap = make()
    MALFORMED[shape](snap)
    snapshot.write(str(rig.snapshot), snap) if shape != "time-nan" else None
    if shape == "time-nan":
        (tmp_path / "gpus.marshal").write_bytes(marshal.dumps(snap))
        os.chmod(tmp_path / "gpus.marshal", 0o644)
    (tmp_path / "in").write_bytes(b"x" * 10)
    res = rig.run("w", tmp_path / "in")
    assert res.rc == 0 and "Traceback" not in res.err, res
    assert res.event("routed")["GPU_ROUTER_GPU_STATE"].startswith("unknown:")
