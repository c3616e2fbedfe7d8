"""Entry point: the wrapper when called as ``gpu-router run`` or through a symlink named after a workload,
the operator CLI otherwise. The CLI (argparse, json, structlog) is imported only when asked for."""

import sys

SELF_NAMES = ("gpu-router", "gpu_router", "__main__.py", "main.py")


def workload_for_link(name):
    """The workload a symlink name stands for: the name itself, unless `gpu-router wrap` recorded another."""
    from .wrapmap import lookup

    return lookup(name) or name


def main(argv=None):
    argv = sys.argv if argv is None else argv
    name = argv[0].rpartition("/")[2] if argv else "gpu-router"  # basename, without importing os (fastos.py)
    if name not in SELF_NAMES:
        from .wrapper.run import run

        return run(workload_for_link(name), argv[1:])
    if len(argv) > 1 and argv[1] == "run":
        from .wrapper.run import main_run

        return main_run(argv[2:])
    import os  # noqa: F401 - loaded first, so fastos is os itself in the CLI's process

    from .ops.cli import main as cli_main

    return cli_main(argv[1:])
