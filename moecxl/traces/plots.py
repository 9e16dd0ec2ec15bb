"""Figures of a trace set's statistics, and `stats`: read a trace directory, write stats.json and PNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moecxl.traces.schema import TraceError, read_traces, write_json_atomic
from moecxl.traces.statistics import compute_stats


def plot_stats(stats: dict, out: str | os.PathLike) -> list[Path]:
    """The PNGs of `compute_stats`' output: popularity, transitions, entropy, reuse distance, domains."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    L, files = stats["L"], []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    fig, ax = plt.subplots(figsize=(8, 0.25 * L + 2))
    im = ax.imshow(np.asarray(stats["popularity"]), aspect="auto", cmap="viridis")
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert popularity ({stats['model']})")
    fig.colorbar(im, ax=ax, label="share of routing slots")
    save(fig, "popularity.png")

    if stats["transitions"]:
        tr = stats["transitions"]
        fig, axes = plt.subplots(1, len(tr), figsize=(3.6 * len(tr), 3.4), squeeze=False)
        for ax, (l, m) in zip(axes[0], tr.items()):
            ax.imshow(np.asarray(m), cmap="magma", vmin=0)
            ax.set(
                title=f"P(e at {int(l) + 1} | e at {l})",
                xlabel=f"expert at layer {int(l) + 1}",
                ylabel=f"expert at layer {l}",
            )
        save(fig, "transitions.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, key, title, x0 in (
        (axes[0, 0], "layer_entropy", "layer l -> l+1", 1),
        (axes[0, 1], "temporal_entropy", "token t-1 -> t, same layer", 0),
    ):
        for kind, style in (("choice", "-"), ("set", "--")):
            xs = [i + x0 for i, r in enumerate(stats[key]) if r]
            for part, color in (("marginal", "tab:gray"), ("conditional", "tab:blue")):
                ys = [r[kind][part] for r in stats[key] if r]
                ax.plot(xs, ys, style, color=color, marker=".", label=f"{part} ({kind})")
        ax.axhline(stats["log2_E"], color="k", lw=0.5, label="log2 E")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set(title=f"routing entropy: {title}", xlabel="layer", ylabel="bits")
        ax.legend(fontsize=7)
    save(fig, "entropy.png")

    reuse = stats["reuse_distance"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for l in sorted({int(i) for i in np.linspace(0, L - 1, min(L, 5))}):
        h = np.asarray(reuse["per_layer"][l]["hist"], float)
        if h.sum():
            ax.plot(np.arange(1, len(h) + 1), h / h.sum(), marker=".", label=stats["layers"][l])
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"reuse distance (tokens; last bin > {reuse['max_distance']})",
        ylabel="fraction of reuses",
        title="temporal reuse distance",
    )
    ax.legend(fontsize=7)
    save(fig, "reuse_distance.png")

    if stats["domain_tv"]:
        doms = list(stats["popularity_by_domain"])
        fig, axes = plt.subplots(1, 2, figsize=(12, 0.2 * L + 3), squeeze=False)
        for pair, tv in stats["domain_tv"].items():
            axes[0, 0].plot(range(L), tv, marker=".", label=pair)
        axes[0, 0].set(xlabel="MoE layer", ylabel="total variation", title="popularity difference by domain")
        axes[0, 0].legend(fontsize=7)
        a, b = ("code", "prose") if {"code", "prose"} <= set(doms) else (doms[0], doms[1])
        diff = np.asarray(stats["popularity_by_domain"][a]) - np.asarray(stats["popularity_by_domain"][b])
        lim = max(float(np.abs(diff).max()), 1e-9)
        im = axes[0, 1].imshow(diff, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[0, 1].set(xlabel="expert", ylabel="MoE layer", title=f"popularity {a} - {b}")
        fig.colorbar(im, ax=axes[0, 1])
        save(fig, "domain_popularity.png")
    return files


def stats(trace_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Read a trace directory, write stats.json and the PNGs into `out`, return the statistics."""
    ts = read_traces(trace_dir)
    if not len(ts):
        raise TraceError(f"{trace_dir}: no trace rows")
    result = compute_stats(ts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["figures"] = [p.name for p in plot_stats(result, out)]
    write_json_atomic(out / "stats.json", result)
    return result
