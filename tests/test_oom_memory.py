"""The OOM memory's file (agent/oom_memory.py): written by root only, read by the wrapper from a marshal twin,
bounded, expiring, surviving restarts; the agent records an input only when its own stat matches the claim."""

import marshal
import os
import time

import pytest

from gpu_router import oom_memory


def test_mark_then_the_wrapper_finds_it_by_identity_not_name(tmp_path):
    f = tmp_path / "in.wav"
    f.write_bytes(b"x" * 100)
    ident = oom_memory.input_identity(str(f))
    m = oom_memory.Memory(str(tmp_path))
    m.mark(ident, "oom", time.time(), "w", 8000, 8400, "0", "w-1-aa", 8000, str(f))
    moved = tmp_path / "moved.wav"
    os.rename(f, moved)
    got_id, entry, how = oom_memory.lookup(str(tmp_path), str(moved))
    assert got_id == ident and how == "oom" and oom_memory.entry_dict(entry)["need_mb"] == 8400
    with open(moved, "ab") as fh:
        fh.write(b"edit")                                     # an edit is a new input
    assert oom_memory.lookup(str(tmp_path), str(moved))[1:] == (None, None)
    json_path, twin = oom_memory.paths(str(tmp_path))
    assert os.stat(json_path).st_mode & 0o777 == 0o600 and os.stat(twin).st_mode & 0o777 == 0o644
    assert str(f).encode() not in open(twin, "rb").read()     # the twin, readable by all, names no input


def test_survives_a_restart_expires_and_is_bounded(tmp_path, monkeypatch):
    now = time.time()
    m = oom_memory.Memory(str(tmp_path))
    m.mark((1, 2, 3, 4), "oom", now, "w", 1, 2, "0", "j", 8000)
    m.mark((1, 2, 3, 5), "oom", now - oom_memory.TTL_S - 1, "w", 1, 2, "0", "j", 8000)   # expired
    m.mark((1, 2, 3, 6), "suspect", now - oom_memory.RETRY_WINDOW_S - 1, "w", 1, 2, "0", "j", 8000)
    again = oom_memory.Memory(str(tmp_path))
    assert set(again.entries) == {(1, 2, 3, 4)}
    monkeypatch.setattr(oom_memory, "MAX_ENTRIES", 3)
    for i in range(5):
        again.mark((9, 9, 9, i), "oom", now + i, "w", 1, 2, "0", "j", 8000)
    assert set(oom_memory.load_twin(str(tmp_path))) == {(9, 9, 9, 2), (9, 9, 9, 3), (9, 9, 9, 4)}


@pytest.mark.parametrize("age,kind,expected", [(10, "suspect", "suspect"), (oom_memory.RETRY_WINDOW_S + 1, "suspect",
                                                None), (10, "oom", "oom"), (-3600, "oom", None)])
def test_a_suspect_counts_only_within_the_retry_window(age, kind, expected):
    entry = (kind, 1000.0, "w", 1, 2, "0", "j", 8000)
    assert oom_memory.applies(entry, 1000.0 + age) == expected


def test_a_twin_others_could_write_or_of_another_shape_is_empty(tmp_path):
    m = oom_memory.Memory(str(tmp_path))
    m.mark((1, 2, 3, 4), "oom", time.time(), "w", 1, 2, "0", "j", 8000)
    twin = oom_memory.paths(str(tmp_path))[1]
    os.chmod(twin, 0o666)
    assert oom_memory.load_twin(str(tmp_path)) == {}
    os.chmod(twin, 0o644)
    with open(twin, "wb") as f:
        f.write(marshal.dumps({"version": 1, "entries": {(1, 2, 3, 4): ("rm -rf", "x")}}))
    assert oom_memory.applies(oom_memory.load_twin(str(tmp_path))[(1, 2, 3, 4)], time.time()) is None
    with open(twin, "wb") as f:
        f.write(b"\x00garbage")
    assert oom_memory.load_twin(str(tmp_path)) == {}


@pytest.mark.parametrize("text,expected", [(b"1:2:3:4", (1, 2, 3, 4)), (b"1:2:3", None), (b"1:2:3:-4", None),
                                           (b"a:b:c:d", None), (b"", None), ("9" * 200 + ":1:1:1", None),
                                           (b"\xff:1:1:1", None)])
def test_the_claimed_id_is_parsed_strictly(text, expected):
    assert oom_memory.parse_id(text) == expected


def test_the_agent_records_only_what_its_own_stat_confirms(tmp_path, monkeypatch):
    f = tmp_path / "in.wav"
    f.write_bytes(b"abc")
    ident = oom_memory.input_identity(str(f))
    pid = os.getpid()
    assert oom_memory.verify(pid, str(f), ident) == ident                      # absolute, through /proc/PID/root
    monkeypatch.chdir(tmp_path)
    assert oom_memory.verify(pid, b"in.wav", ident) == ident                   # relative, through /proc/PID/cwd
    assert oom_memory.verify(pid, str(f), (ident[0], ident[1] + 1, 3, ident[3])) is None  # a claim that lies
    assert oom_memory.verify(pid, str(f), None) is None
    assert oom_memory.verify(pid, str(tmp_path), oom_memory.identity_of(os.stat(tmp_path))) is None  # not a file


def test_a_squeezed_cuda_oom_is_remembered_too(tmp_path, monkeypatch):
    """An oversize input squeezed out early by another's growth failed within its reservation (OOM_CAUSE
    squeezed): its failure says nothing of its size, so its retry must not go blindly to the GPU again (the
    bench's *oversize* trace showed such inputs trying the GPU twice). The agent's _remember, on a real Agent."""
    import helpers
    from gpu_router.daemon import accounting, service

    base, cfg = helpers.agent_folder(tmp_path, workload='binary = "/bin/true"\nthreshold = 100\n')
    monkeypatch.setenv("GPU_ROUTER_CACHE_DIR", str(base))
    agent = service.Agent(str(cfg))
    for n, cause in enumerate(("squeezed", "outgrew")):
        job = accounting.JobAccount(f"w-1-{n}", 1, "w", "GPU", "0", "10", None, None, None)
        job.input_id = (1, 1000 + n, 10, 10)
        job.peak_vram_mb, job.gpu_total_mb, job.others_mb = 3000, 8000, 5000
        fields = {"RESULT": "cuda-oom", "OOM_CAUSE": cause}
        agent._remember(job, fields)
        assert fields.get("OOM_MEMORY") == "oom", cause
        assert agent.oom.get(job.input_id) is not None
