"""Drawing images for people: sample grids of a dataset or of a model's predictions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, titles: list[str], colours: list[str], path: str | Path, cols: int = 8) -> None:
    """``images``: N x H x W x 3 in [0, 1]."""
    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.35))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(np.clip(images[i], 0, 1))
            ax.set_title(titles[i], fontsize=7, color=colours[i])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
