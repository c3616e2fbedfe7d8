"""The host's figures a budget counts with: GPU count, VRAM per GPU and system RAM, each with where it came from.

One home (issue 20): `check`, `explain`, `init`, `calibrate` and `slurm-conf` count with the same figures. Each is
the ``[host]`` key where set, else what was detected: the smallest listed GPU's VRAM (so every GPU can take what is
planned), /proc/meminfo's MemTotal. The GPU count, where ``[host] gpus`` is unset, is the number of GPUs listed:
a listing of none counts 0, as the wrapper then routes every job to CPU; only where there is no listing at all
(no snapshot, nothing asked) is one GPU assumed, as the wrapper assumes (``policy.assumed_gpus``).
"""

import os


class HostFigures:
    """The figures and their sources; ``listed`` is the GPU listing they came from (None: there was none)."""
    __slots__ = ("gpus", "gpus_source", "vram_mb", "vram_source", "ram_mb", "ram_source", "listed")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name))

    def __repr__(self):
        return "HostFigures(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def system_ram_mb():
    """MemTotal of /proc/meminfo in MiB, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def snapshot_gpus(cfg):
    """(list of policy.Gpu or None, state): the agent's snapshot as the wrapper reads it (None: no snapshot)."""
    from ..wrapper.run import read_gpus

    return read_gpus(cfg)


def detect_gpus(cfg):
    """([GPU dict with index, name, total_mb, …], where from): the agent's snapshot, else the GPU backend itself."""
    from .. import snapshot

    snap, _why = snapshot.read(cfg.gpu.snapshot, cfg.gpu.snapshot_max_age)
    if snap is not None and snap.get("gpus"):
        return list(snap["gpus"]), f"agent snapshot ({snap.get('source')})"
    if cfg.gpu.backend == "none":
        return [], "[gpu] backend = \"none\""
    from ..daemon import gpu_backends

    backend = gpu_backends.open_backend(cfg.gpu.backend, cfg.gpu.call_timeout)
    try:
        sample = backend.sample()
    finally:
        backend.close()
    source = sample.get("source") or "none"
    if sample.get("error"):
        source += f": {sample['error']}"
    elif source == "none":
        source = "no NVML, no nvidia-smi"
    return list(sample.get("gpus") or ()), source


def _total(g):
    return g.get("total_mb") if isinstance(g, dict) else g.total_mb


def figures(cfg, listed, listed_source=None):
    """The HostFigures of `cfg` and a GPU listing (policy.Gpu or snapshot dicts; None: no listing);
    ``listed_source`` names the listing in the VRAM source."""
    h = HostFigures(listed=listed)
    totals = [t for t in (_total(g) for g in listed or ()) if t]
    if cfg.host.gpu_vram_mb is not None:
        h.vram_mb, h.vram_source = cfg.host.gpu_vram_mb, "config [host] gpu_vram_mb"
    elif totals:
        h.vram_mb = min(totals)
        h.vram_source = f"detected, smallest GPU ({listed_source})" if listed_source else "detected (smallest GPU)"
    if cfg.host.ram_mb is not None:
        h.ram_mb, h.ram_source = cfg.host.ram_mb, "config [host] ram_mb"
    else:
        h.ram_mb, h.ram_source = system_ram_mb(), "detected (/proc/meminfo)"
    if cfg.host.gpus is not None:
        h.gpus, h.gpus_source = cfg.host.gpus, "config [host] gpus"
    elif listed is not None:
        h.gpus, h.gpus_source = len(listed), f"listed ({listed_source or 'agent snapshot'})"
    else:
        h.gpus, h.gpus_source = 1, "assumed (no GPU listing)"
    return h


def cpu_figures():
    """(CPUs, RAM MiB) of a Slurm node line: never 0 (Slurm refuses a node with none)."""
    return os.cpu_count() or 1, system_ram_mb() or 1
