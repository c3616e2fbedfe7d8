"""gpu-router-agent: the resident half's command line (packaging/bin/gpu-router-agent, the unit's ExecStart and
ExecStartPre). The service itself is in resident.py (the Agent and its loop), sdglue.py (sd_notify, socket activation,
the fd store), and accounting_mode.py (--enable-accounting).
"""

import argparse

from .. import config as _config
from .accounting_mode import enable_accounting
from .resident import Agent


def main(argv=None):
    from .. import __version__

    p = argparse.ArgumentParser(prog="gpu-router-agent", description="gpu-router's resident agent")
    p.add_argument("--version", action="version", version=f"gpu-router-agent {__version__}")
    p.add_argument("--config", help="config file (default: $GPU_ROUTER_CONFIG or /etc/gpu-router/config.toml)")
    p.add_argument("--once", action="store_true", help="publish one GPU snapshot and exit")
    p.add_argument("--enable-accounting", action="store_true",
                   help="turn on the GPUs' per-process accounting mode ([gpu] accounting = \"auto\") and exit; "
                        "the unit's privileged ExecStartPre")
    args = p.parse_args(argv)
    if args.enable_accounting:
        return enable_accounting(args.config)
    try:
        agent = Agent(args.config)
    except _config.ConfigError as exc:
        import sys

        sys.stderr.write(f"gpu-router-agent: config error: {exc}\n")
        return 2
    if args.once:
        agent.sample()
        return 0
    return agent.run()
