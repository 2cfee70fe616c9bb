"""PNG figures logged with every run: training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def training_curves(history: list[dict[str, float]], path: str | Path) -> None:
    """Train losses and validation metrics against epoch, one panel each."""
    epochs = [int(h["epoch"]) for h in history]
    losses = sorted({k for h in history for k in h if k.startswith("train/")})
    vals = sorted({k for h in history for k in h if k.startswith("val/")})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, keys, title in ((axes[0], losses, "training loss"), (axes[1], vals, "validation")):
        for key in keys:
            ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if keys:  # a baseline of the initial weights has no training losses
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
