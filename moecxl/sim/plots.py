"""Figures of simulated results; every title says "simulated"."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, out: Path, name: str, paths: list):
    p = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)


def plot_results(results: dict, out: str | Path) -> list[Path]:
    """Headline TPOT/TTFT bars, batch throughput, long-context TPOT, failure timeline (those present)."""
    out, paths = Path(out), []
    target = results["target"]["name"]
    secs = results["sections"]
    if "headline" in secs:
        rows = {k: v for k, v in secs["headline"]["rows"].items() if "tpot_s" in v}
        fig, axes = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(rows))))
        for ax, key in zip(axes, ("tpot_s", "ttft_s")):
            ax.barh(list(rows), [v[key] * 1e3 for v in rows.values()])
            ax.set_xlabel(f"{key[:4].upper()} (ms)")
            ax.tick_params(axis="y", labelsize=7)
        fig.suptitle(f"{target}: TPOT and TTFT by profile/policy (simulated)")
        _save(fig, out, "headline", paths)
    if "batch" in secs:
        fig, ax = plt.subplots(figsize=(6, 4))
        series: dict = {}
        for b, runs in secs["batch"]["rows"].items():
            for k, v in runs.items():
                if isinstance(v, dict) and "tokens_per_s" in v:
                    series.setdefault(k, []).append((int(b), v["tokens_per_s"]))
        for k, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
        ax.set_title(f"{target}: throughput vs batch (simulated)")
        _save(fig, out, "batch", paths)
    if "long_context" in secs:
        fig, ax = plt.subplots(figsize=(6, 4))
        series = {}
        for t, runs in secs["long_context"]["rows"].items():
            for k, v in runs.items():
                if "ttft_s" in v:
                    series.setdefault(k, []).append((int(t), v["ttft_s"] * 1e3))
        for k, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.legend(fontsize=7)
        ax.set_title(f"{target}: long context (simulated)")
        _save(fig, out, "long_context", paths)
    if "failure" in secs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for p, v in secs["failure"]["rows"].items():
            if "step_times_s" in v:
                ax.plot([t * 1e3 for t in v["step_times_s"]], label=p)
        for f in secs["failure"]["faults"]:
            ax.axvspan(f["offline_at_step"], f["online_at_step"] or ax.get_xlim()[1], alpha=0.15, color="red")
        ax.set_xlabel("decode step")
        ax.set_ylabel("step time (ms)")
        ax.legend(fontsize=7)
        ax.set_title(f"{target}: device failure (shaded: offline) (simulated)")
        _save(fig, out, "failure", paths)
    return paths
