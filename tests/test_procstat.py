"""A process's identity: PID plus start time, read from a real /proc (real processes, a real zombie)."""

import os
import subprocess
import time

from gpu_router import procstat


def test_a_running_process_is_itself_and_no_other():
    p = subprocess.Popen(["sleep", "30"])
    try:
        ticks = procstat.start_ticks(p.pid)
        assert ticks is not None and ticks >= procstat.start_ticks()      # started after this test process
        assert procstat.is_process(p.pid, ticks) and procstat.is_process(p.pid, None)
        assert not procstat.is_process(p.pid, ticks + 1)                  # the same PID, another start: reused
        assert abs(procstat.start_time(p.pid) - time.time()) < 5
    finally:
        p.kill()
        p.wait()
    assert procstat.start_ticks(p.pid) is None and not procstat.is_process(p.pid, ticks)


def test_a_zombie_has_a_start_time_but_is_not_running():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        ticks = procstat.start_ticks(p.pid)
        assert ticks is not None and not procstat.is_process(p.pid, ticks)
    finally:
        p.wait()


def test_a_command_name_with_spaces_and_parentheses():
    exe = f"/tmp/a ) b ( {os.getpid()}"
    os.symlink("/bin/sleep", exe)
    try:
        p = subprocess.Popen([exe, "30"])
        try:
            deadline = time.monotonic() + 10
            while b") b (" not in open(f"/proc/{p.pid}/stat", "rb").read():
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert procstat.is_process(p.pid, procstat.start_ticks(p.pid))
            st = procstat.read(p.pid)  # the name kept whole (at most 15 bytes), the fields after it in place
            assert st.comm == os.path.basename(exe).encode()[:15] and st.ppid == os.getpid()
        finally:
            p.kill()
            p.wait()
    finally:
        os.unlink(exe)


def test_read_names_the_fields_of_a_real_process_and_of_its_zombie():
    """read(): parent, session, start and, once it has exited unreaped, its wait status (exit 3 → 0x300)."""
    p = subprocess.Popen(["sh", "-c", "read x; exit 3"], stdin=subprocess.PIPE, start_new_session=True)
    try:
        st = procstat.read(p.pid)
        assert st.comm == b"sh" and st.ppid == os.getpid() and st.session == p.pid
        assert st.start == procstat.start_ticks(p.pid) and not st.gone and st.exit_status == 0
        p.stdin.close()
        deadline = time.monotonic() + 10
        while not procstat.read(p.pid).gone:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert procstat.read(p.pid).exit_status == 3 << 8
    finally:
        p.wait()
    assert procstat.read(p.pid) is None

