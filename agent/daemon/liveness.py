"""Whether a job's process still runs: its pidfd, and /proc/PID/stat with the start time it was granted with (a
PID may be reused)."""

from .. import procstat


def pidfd_alive(pidfd):
    """False once a pidfd is readable (its process has exited); True when there is no pidfd to ask."""
    if pidfd is None:
        return True
    import select

    try:
        return not select.select([pidfd], [], [], 0)[0]
    except (OSError, ValueError):
        return True


def job_alive(job, zombie_ok=False):
    """The job's process (same PID and start time: a PID may be reused) exists and, unless ``zombie_ok``, runs."""
    st = procstat.read(job.pid)
    if st is None or job.pid_start is not None and st.start != job.pid_start:
        return False
    return zombie_ok or not st.gone
