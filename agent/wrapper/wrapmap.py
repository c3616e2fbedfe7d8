"""Which workload a wrapped binary's name stands for, as `gpu-router wrap` recorded it (hot path: no TOML)."""

import os

WRAPPED_DIR = "/var/lib/gpu-router/wrapped"


def lookup(link_name):
    """The workload recorded for a wrapped binary named ``link_name``, or None."""
    directory = os.environ.get("GPU_ROUTER_WRAPPED_DIR") or WRAPPED_DIR
    try:
        fd = os.open(os.path.join(directory, link_name + ".workload"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    finally:
        os.close(fd)
    return text or None
