"""Figures: loss and accuracy against iterations for a run."""
from __future__ import annotations

import os

from .io import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Loss (log scale) and, where the run evaluated along the way, accuracy against iterations."""
    plt = _pyplot()
    losses = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval" in h]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    if losses:
        ax.plot([h["iteration"] for h in losses], [h["loss"] for h in losses])
        if all(h["loss"] > 0 for h in losses):
            ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("matching loss")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        for model in evals[0]["eval"]:
            its = [h["iteration"] for h in evals]
            # None (every evaluation run diverged) is a gap in the curve, not a number
            mean = [100 * h["eval"][model]["mean"] if h["eval"][model]["mean"] is not None else float("nan")
                    for h in evals]
            std = [100 * h["eval"][model]["std"] if h["eval"][model]["std"] is not None else float("nan")
                   for h in evals]
            ax.errorbar(its, mean, yerr=std, marker="o", capsize=3, label=model)
        ax.set_xlabel("iteration")
        ax.set_ylabel("test accuracy %")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
