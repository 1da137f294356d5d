"""PNG plots of a run (matplotlib, Agg backend: no display needed).

    plot_training_curves(metrics_rows, "plots/reward_accuracy.png")
    plot_entropy_histogram(entropy, threshold, "plots/entropy_hist.png")
    plot_token_frequencies(forking_counter, low_counter, decode, "plots/forking_tokens.png")
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megafork.analysis.io import METRIC_ACCURACY, METRIC_EVAL_ACCURACY, METRIC_REWARD

ENTROPY_FLOOR = 1e-6  # the log-scale histogram needs a floor; tokens below it share the first bin


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display needed); every megafork plot starts here."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG (creating its folder), trimmed to its content, and close it.

    Args:
        fig: a figure from `pyplot()`.
        out: PNG path.
        dpi: resolution.
    """
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return p


def plot_training_curves(rows: Sequence[dict], out: str | Path) -> Path:
    """Reward mean and accuracy (train rollouts, and held-out eval where logged) against step.

    Args:
        rows: metrics.jsonl rows (need "step"; plot whichever of reward/accuracy keys exist).
        out: PNG path.
    """
    series = {key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
              for key in (METRIC_REWARD, METRIC_ACCURACY, METRIC_EVAL_ACCURACY)}
    if not any(series.values()):
        raise ValueError(f"plot_training_curves: expected rows with any of {list(series)}, found none")
    plt = pyplot()
    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    if series[METRIC_REWARD]:
        ax_r.plot(*zip(*series[METRIC_REWARD]), marker=".", label="train reward (mean)")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.set_title("reward")
    ax_r.grid(alpha=0.3)
    if series[METRIC_ACCURACY]:
        ax_a.plot(*zip(*series[METRIC_ACCURACY]), marker=".", label="train rollouts")
    if series[METRIC_EVAL_ACCURACY]:
        ax_a.plot(*zip(*series[METRIC_EVAL_ACCURACY]), marker="o", label="held-out (avg@k)")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("accuracy")
    ax_a.set_ylim(0, 1)
    ax_a.set_title("accuracy")
    ax_a.grid(alpha=0.3)
    ax_a.legend()
    return save_figure(fig, out)


def plot_entropy_histogram(entropy: torch.Tensor, threshold: float, out: str | Path, bins: int = 60,
                           title: str = "response-token entropy") -> Path:
    """Histogram of token entropies on log-spaced bins, with the forking threshold marked.

    Args:
        entropy: 1-D entropies (nats) of valid response tokens.
        threshold: the selection threshold (tokens with H >= threshold are forking tokens).
        out: PNG path.
        bins: number of log-spaced bins.
        title: plot title.
    """
    import numpy as np

    e = entropy.detach().double().reshape(-1).clamp_min(ENTROPY_FLOOR).numpy()
    if e.size == 0:
        raise ValueError("plot_entropy_histogram: expected at least one entropy value, found none")
    hi = max(float(e.max()), threshold, ENTROPY_FLOOR * 10) * 1.5
    edges = np.logspace(np.log10(ENTROPY_FLOOR), np.log10(hi), bins + 1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.hist(e, bins=edges, color="#4c72b0")
    ax.set_xscale("log")
    ax.set_yscale("log")
    share = float((e >= threshold).mean())
    ax.axvline(max(threshold, ENTROPY_FLOOR), color="#c44e52", linestyle="--",
               label=f"threshold {threshold:.3g} ({share:.0%} of tokens at or above)")
    ax.set_xlabel(f"entropy (nats, log scale; values < {ENTROPY_FLOOR:g} in the first bin)")
    ax.set_ylabel("tokens (log scale)")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, out)


def plot_token_frequencies(forking: Counter, low: Counter, decode: Callable[[int], str], out: str | Path,
                           top: int = 30) -> Path:
    """Side-by-side bar charts of the `top` most frequent forking and low-entropy tokens.

    Args:
        forking: Counter of forking-token ids.
        low: Counter of low-entropy token ids.
        decode: id -> display text.
        out: PNG path.
        top: bars per chart.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3.0, 0.26 * top + 1)))
    for ax, counts, name, color in ((axes[0], forking, "forking (high-entropy) tokens", "#c44e52"),
                                    (axes[1], low, "low-entropy tokens", "#4c72b0")):
        items = counts.most_common(top)[::-1]
        labels = [repr(decode(t)) for t, _ in items]
        ax.barh(range(len(items)), [c for _, c in items], color=color)
        ax.set_yticks(range(len(items)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xlabel("count")
        ax.set_title(f"top {min(top, len(counts))} {name}")
    fig.tight_layout()
    return save_figure(fig, out)
