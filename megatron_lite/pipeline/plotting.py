"""Timeline plot of a simulated pipeline schedule (needs matplotlib, imported only here)."""

from __future__ import annotations

from megatron_lite.pipeline.simulator import SimulationResult


def matplotlib_available() -> bool:
    """True if matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


_DP_COLORS = {"all_gather": "dimgray", "reduce_scatter": "tab:blue"}


def _draw_dp_streams(ax, result: SimulationResult, pp: int) -> None:
    """A thin strip under every rank's row: its data-parallel collectives."""
    for rank, events in enumerate(result.dp_events):
        y = pp - 1 - rank - 0.5
        for e in events:
            if e.kind in _DP_COLORS and e.end > e.start:
                ax.barh(y, e.end - e.start, left=e.start, height=0.16, color=_DP_COLORS[e.kind], linewidth=0)
                ax.text(
                    (e.start + e.end) / 2,
                    y,
                    str(e.chunk),
                    ha="center",
                    va="center",
                    fontsize=5,
                    color="white",
                )


def plot_timeline(result: SimulationResult, path: str, title: str = "") -> None:
    """Draw one row per rank, a bar per compute action, and save it as an image.

    Colour encodes the microbatch; forwards are solid, backwards lighter and hatched. Each bar
    is labelled with its microbatch (and ``.chunk`` when there are several chunks). With
    data-parallel comm simulated, a thin strip under each rank shows its DP stream (all-gathers
    dark, reduce-scatters blue, labelled with the chunk).

    Args:
        result: Output of :func:`~megatron_lite.pipeline.simulator.simulate`.
        path: Output file (format from the extension, e.g. ``.png``).
        title: Figure title.

    Raises:
        ImportError: If matplotlib is not installed (message says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("plotting the timeline needs matplotlib: pip install matplotlib") from e

    pp = len(result.timelines)
    chunks = 1 + max((iv.chunk for tl in result.timelines for iv in tl), default=0)
    num_mb = 1 + max((iv.microbatch for tl in result.timelines for iv in tl), default=0)
    cmap = plt.get_cmap("tab10" if num_mb <= 10 else "tab20")  # tab10: most distinct colours
    ncolors = 10 if num_mb <= 10 else 20
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, result.step_time * 0.5 + 3)), 0.6 * pp + 1.6))
    for rank, timeline in enumerate(result.timelines):
        y = pp - 1 - rank  # rank 0 on top
        for iv in timeline:
            fwd = iv.kind == "F"
            ax.barh(
                y,
                iv.end - iv.start,
                left=iv.start,
                height=0.8,
                color=cmap(iv.microbatch % ncolors),
                alpha=1.0 if fwd else 0.55,
                hatch=None if fwd else "//",
                edgecolor="black",
                linewidth=0.5,
            )
            label = f"{iv.microbatch}" + (f".{iv.chunk}" if chunks > 1 else "")
            ax.text((iv.start + iv.end) / 2, y, label, ha="center", va="center", fontsize=7)
    _draw_dp_streams(ax, result, pp)
    ax.set_yticks(range(pp), [f"rank {r}" for r in reversed(range(pp))])
    ax.set_xlim(0, result.step_time)
    ax.set_xlabel("time    (bar label: microbatch" + (".chunk)" if chunks > 1 else ")"))
    legend = [
        Patch(facecolor="lightgray", edgecolor="black", label="forward"),
        Patch(facecolor="lightgray", edgecolor="black", hatch="//", alpha=0.55, label="backward"),
    ]
    if any(result.dp_events):
        legend += [Patch(facecolor=c, label=k.replace("_", "-")) for k, c in _DP_COLORS.items()]
    ax.legend(handles=legend, loc="upper right", fontsize=8, bbox_to_anchor=(1.0, 1.18), ncol=2)
    stats = f"step {result.step_time:g}, bubble {100 * result.bubble_fraction:.1f}%"
    ax.set_title(f"{title}  ({stats})" if title else stats, loc="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
