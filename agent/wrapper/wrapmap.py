"""Which workload a wrapped binary's name stands for, as `gpu-router wrap` recorded it (hot path: no TOML)."""

import os

from .. import atomicfile

WRAPPED_DIR = "/var/lib/gpu-router/wrapped"


def lookup(link_name):
    """The workload recorded for a wrapped binary named ``link_name``, or None."""
    directory = os.environ.get("GPU_ROUTER_WRAPPED_DIR") or WRAPPED_DIR
    text = atomicfile.read_trusted(os.path.join(directory, link_name + ".workload"))
    return (text or "").strip() or None
