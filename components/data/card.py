"""The dataset card: a contact sheet of samples with their labels, boxes and masks drawn.

Written next to ``manifest.json`` by the prepare stage and logged to MLflow by every run that
trains on the data, so a person sees what the numbers were computed on.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patches  # noqa: E402
from PIL import Image  # noqa: E402

from components.data.canonical import read_manifest, read_split, rle_to_mask  # noqa: E402

CARD = "card.png"


def contact_sheet(root: str | Path, path: str | Path | None = None, per_view: int = 8, split: str = "train") -> Path:
    """Draw ``per_view`` samples of every view: crops with labels; scenes with boxes, instance
    masks and the semantic mask beside them."""
    root = Path(root)
    manifest = read_manifest(root)
    classes = manifest["classes"]
    views = list(manifest["views"])
    rows = []
    for view in views:
        coco = read_split(root, view, split)
        images = coco["images"][:per_view]
        by_image: dict[int, list[dict]] = {}
        for ann in coco["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        rows.append((view, images, by_image))
    has_semantic = any("semantic_mask" in im for _, images, _ in rows for im in images)
    n_rows = sum(2 if has_semantic and any("semantic_mask" in im for im in images) else 1 for _, images, _ in rows)
    fig, axes = plt.subplots(n_rows, per_view, figsize=(per_view * 1.3, n_rows * 1.45), squeeze=False)
    r = 0
    colours = plt.get_cmap("tab10")
    for view, images, by_image in rows:
        sem_row = has_semantic and any("semantic_mask" in im for im in images)
        for c in range(per_view):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            record = images[c]
            pixels = np.asarray(Image.open(root / view / record["file_name"]).convert("RGB"))
            ax.imshow(pixels)
            if "label" in record:
                ax.set_title(f"{view}: {classes[record['label']]}", fontsize=7)
            anns = by_image.get(record["id"], [])
            overlay = np.zeros((*pixels.shape[:2], 4))
            for ann in anns:
                colour = colours(ann["category_id"] % 10)
                x, y, w, h = ann["bbox"]
                ax.add_patch(patches.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=1, ec=colour))
                ax.text(x, y - 1, classes[ann["category_id"]], fontsize=6, color=colour)
                if "segmentation" in ann:
                    overlay[rle_to_mask(ann["segmentation"]).astype(bool)] = (*colour[:3], 0.45)
            if anns:
                ax.imshow(overlay)
                ax.set_title(f"{view}: {len(anns)} objects", fontsize=7)
            if sem_row and "semantic_mask" in record:
                sem = np.asarray(Image.open(root / view / record["semantic_mask"]))
                axes[r + 1, c].imshow(
                    np.ma.masked_equal(sem, 255), cmap="tab20", vmin=0, vmax=19, interpolation="nearest"
                )
                axes[r + 1, c].set_title("semantic", fontsize=7)
            if sem_row:
                axes[r + 1, c].axis("off")
        r += 2 if sem_row else 1
    fig.suptitle(f"{manifest['name']} ({split}): {manifest.get('source', '')}", fontsize=8)
    fig.tight_layout()
    out = Path(path) if path is not None else root / CARD
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
