"""The wrapped-records folder and the hot path's reader of it: which workload a wrapped binary's name stands for,
as `gpu-router wrap` recorded it (no TOML). `wrap` writes there, `init` and the wrapper read: one home."""

from . import fastos as os  # os without its import cost (fastos.py)

from . import atomicfile

WRAPPED_DIR = "/var/lib/gpu-router/wrapped"
ENV = "GPU_ROUTER_WRAPPED_DIR"   # overrides the folder (tests, a relocated state tree)


def folder():
    """The wrapped-records folder: $GPU_ROUTER_WRAPPED_DIR, else WRAPPED_DIR."""
    return os.environ.get(ENV) or WRAPPED_DIR


def lookup(link_name):
    """The workload recorded for a wrapped binary named ``link_name``, or None."""
    text = atomicfile.read_trusted(os.path.join(folder(), link_name + ".workload"))
    return (text or "").strip() or None
