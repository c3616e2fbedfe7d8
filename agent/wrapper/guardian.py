"""An external probe's run under a forked guardian: killed at its deadline with everything it started.

Split from probe.py because only the probes that run a tool (ffprobe, mediainfo, an operator's command) need it:
the built-in probes (file size, lines, image headers) do not load it on every job's path.
"""

from .. import fastos as os  # os without its import cost (fastos.py)
import _signal as signal  # the built-in half: `import signal` pulls in enum (~3 ms on the hot path)
import time

from .probe import ProbeFailed

OUTPUT_LIMIT = 64 * 1024


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
