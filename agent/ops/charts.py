"""Pictures where a picture beats a table: `calibrate --chart FILE` (metric against measured peak VRAM, the fit,
the per-job budget and the GPU's capacity, the chosen threshold) and `stats --chart FILE` (the distribution of the
jobs' metrics by mode against the threshold). PNG, SVG or PDF by the file's extension.

Drawn with python3-matplotlib when it is installed (Suggests: it is large); without it a clear message and
nothing else changes. Never imported by the wrapper or the agent.
"""

import os

FORMATS = (".png", ".svg", ".pdf")


class ChartError(Exception):
    """No chart: matplotlib missing, or a file it cannot write; the message says what to do."""


def _pyplot(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ChartError(f"{path}: name the chart file .png, .svg or .pdf")
    try:
        import matplotlib
    except ImportError:
        raise ChartError("charts need matplotlib, which is not installed: apt install python3-matplotlib "
                         "(everything else works without it)") from None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    try:
        fig.savefig(path, bbox_inches="tight")
    except OSError as exc:
        raise ChartError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def calibration(path, workload, unit, points, fit, rec, budget_mb=None, gpu_vram_mb=None, threshold=None):
    """Measured (metric, peak VRAM) points, the fitted line and the recommended model, the per-job budget and the
    GPU's capacity as horizontal lines, the profile's and the recommended threshold as vertical ones."""
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    ax.scatter(xs, ys, label=f"measured peaks ({len(points)})", color="tab:blue", zorder=3)
    right = max([0.0] + xs + [v for v in (threshold, (rec or {}).get("threshold")) if v]) * 1.1 or 1.0
    line_x = [0.0, right]
    if fit:
        ax.plot(line_x, [fit["base_mb"] + fit["per_unit_mb"] * x for x in line_x], color="tab:blue",
                linestyle=":", label=f"fit: {fit['base_mb']:.0f} + {fit['per_unit_mb']:.4g}/{unit}"
                + (f" (r² {fit['r2']:.3f})" if fit.get("r2") is not None else ""))
    if rec:
        ax.plot(line_x, [rec["vram_base_mb"] + rec["vram_per_unit_mb"] * x for x in line_x], color="tab:orange",
                label=f"model with {rec['margin']:.0%} margin")
    if budget_mb:
        ax.axhline(budget_mb, color="tab:red", linestyle="--", label=f"per-job budget {budget_mb} MiB")
    if gpu_vram_mb:
        ax.axhline(gpu_vram_mb, color="black", linewidth=0.8, label=f"GPU capacity {gpu_vram_mb} MiB")
    if threshold:
        ax.axvline(threshold, color="tab:green", label=f"threshold {threshold:g} {unit}")
    if rec and rec.get("threshold"):
        ax.axvline(rec["threshold"], color="tab:green", linestyle="--",
                   label=f"recommended threshold {rec['threshold']:g} {unit}")
    ax.set_xlabel(f"metric ({unit})")
    ax.set_ylabel("peak VRAM (MiB)")
    ax.set_title(f"gpu-router calibrate: {workload}")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(plt, fig, path)


def distribution(path, per_workload):
    """``per_workload``: {name: {"unit", "threshold", "GPU": [metrics], "CPU": [...], "BLOCKED": [...]}} → one
    histogram per workload, stacked by mode, with the threshold line."""
    plt = _pyplot(path)
    names = sorted(per_workload) or ["(no jobs)"]
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 3.5 * len(names)), squeeze=False)
    colors = {"GPU": "tab:green", "CPU": "tab:blue", "BLOCKED": "tab:red"}
    for ax, name in zip(axes[:, 0], names):
        w = per_workload.get(name, {})
        series = [(mode, w.get(mode) or []) for mode in ("GPU", "CPU", "BLOCKED")]
        series = [(m, v) for m, v in series if v]
        if series:
            ax.hist([v for _, v in series], bins=30, stacked=True, color=[colors[m] for m, _ in series],
                    label=[f"{m} ({len(v)})" for m, v in series])
        if w.get("threshold"):
            ax.axvline(w["threshold"], color="black", linestyle="--", label=f"threshold {w['threshold']:g}")
        ax.set_title(f"{name}: job metrics by decision")
        ax.set_xlabel(f"metric ({w.get('unit') or '?'})")
        ax.set_ylabel("jobs")
        ax.grid(alpha=0.3)
        if series or w.get("threshold"):
            ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(plt, fig, path)
