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
    """Headline TPOT/TTFT bars, batch throughput, long-context TPOT, ablation, failure timeline (those
    present)."""
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
    if "ablation" in secs:
        _plot_ablation(secs["ablation"], target, out, paths)
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


def _plot_ablation(abl: dict, target: str, out: Path, paths: list) -> None:
    """TPOT of each variant (and the striping pairs on other profiles), and per-device utilisation with
    and without striping."""
    bars = {f"{abl['hardware']}/{k}": v for k, v in abl["rows"].items() if "tpot_s" in v}
    pairs = {abl["hardware"]: abl["rows"], **abl.get("striping_rows", {})}
    for hw, pair in abl.get("striping_rows", {}).items():
        bars.update({f"{hw}/{k}": v for k, v in pair.items() if "tpot_s" in v})
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4, 0.3 * len(bars))))
    axes[0].barh(list(bars), [v["tpot_s"] * 1e3 for v in bars.values()])
    axes[0].set_xlabel("TPOT (ms)")
    axes[0].tick_params(axis="y", labelsize=7)
    labels, width = [], 0.4
    for i, (hw, pair) in enumerate(pairs.items()):
        variants = ("full", "no_striping")
        tiers = sorted({t for v in variants for t in pair.get(v, {}).get("utilisation_by_tier", {})})
        for j, variant in enumerate(variants):
            util = pair.get(variant, {}).get("utilisation_by_tier", {})
            xs = [len(labels) + k + (j - 0.5) * width for k in range(len(tiers))]
            ys = [util.get(t, 0.0) for t in tiers]
            axes[1].bar(xs, ys, width, color=f"C{j}", label=variant if i == 0 else None)
        labels += [f"{hw}\n{t}" for t in tiers]
    axes[1].set_xticks(range(len(labels)), labels, fontsize=6, rotation=60)
    axes[1].set_ylabel("device busy fraction")
    axes[1].legend(fontsize=7, title="striping", title_fontsize=7)
    fig.suptitle(f"{target}: ablation (moecxl minus one mechanism) and striping by profile (simulated)")
    fig.tight_layout()
    _save(fig, out, "ablation", paths)
