"""Pictures of predictions (torchvision.utils drawing) and the loss curve (matplotlib, optional)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from maskdino.data.coco import DatasetMetadata

__all__ = ["draw_instances", "draw_panoptic", "plot_loss_curve", "save_image"]


# High-contrast colours for instances (class colours can equal the objects' own colours, e.g. red circles).
INSTANCE_PALETTE = [(255, 255, 0), (0, 255, 255), (255, 255, 255), (255, 0, 255), (255, 128, 0), (0, 255, 0),
                    (0, 128, 255), (255, 0, 0)]  # fmt: skip


def draw_instances(
    image: torch.Tensor,
    instances,
    meta: DatasetMetadata,
    score_threshold: float = 0.5,
    alpha: float = 0.45,
    class_colors: bool = False,
) -> torch.Tensor:
    """Draw masks, boxes and ``name score`` labels of instances scoring at least ``score_threshold``.

    Colours: one high-contrast colour per instance (default) or the class colours (``class_colors``).

    Args:
        image: uint8 (3, H, W) at the size of the predictions.
    Returns:
        uint8 (3, H, W).
    """
    keep = instances.scores >= score_threshold
    boxes = instances.boxes[keep].detach().float().cpu()
    labels = instances.labels[keep].cpu().tolist()
    scores = instances.scores[keep].detach().float().cpu().tolist()
    out = image.cpu()
    if not labels:
        return out
    if class_colors:
        colors = [tuple(meta.colors[k]) for k in labels]
    else:
        colors = [INSTANCE_PALETTE[i % len(INSTANCE_PALETTE)] for i in range(len(labels))]
    if instances.masks is not None:
        out = draw_segmentation_masks(out, instances.masks[keep].cpu().bool(), alpha=alpha, colors=colors)
    h, w = out.shape[-2:]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    text = [f"{meta.names[k]} {s:.2f}" for k, s in zip(labels, scores)]
    return draw_bounding_boxes(out, boxes, labels=text, colors=colors, width=max(1, min(h, w) // 150))


def draw_panoptic(image: torch.Tensor, panoptic, meta: DatasetMetadata, alpha: float = 0.6) -> torch.Tensor:
    """Colour each panoptic segment with its class colour (things slightly varied per instance)."""
    seg = panoptic.segments.cpu()
    infos = panoptic.segments_info
    if not infos:
        return image.cpu()
    masks = torch.stack([seg == int(s["id"]) for s in infos])
    rng = np.random.default_rng(0)
    colors = []
    for s in infos:
        base = np.array(meta.colors[int(s["category_id"])], dtype=np.int64)
        if s.get("isthing", False):
            base = np.clip(base + rng.integers(-40, 41, 3), 0, 255)
        colors.append(tuple(int(v) for v in base))
    return draw_segmentation_masks(image.cpu(), masks, alpha=alpha, colors=colors)


def save_image(image: torch.Tensor, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, title: str = "training loss") -> bool:
    """Plot total loss (and its smoothed version) per iteration from ``metrics.jsonl``.

    Returns False (and writes nothing) when matplotlib is not installed or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in read_metrics(metrics_jsonl) if "total_loss" in r]
    if not rows:
        return False
    # A resumed run appends; keep the last value logged for each iteration.
    by_it = {int(r["iteration"]): r for r in rows}
    its = np.array(sorted(by_it))
    loss = np.array([by_it[i]["total_loss"] for i in its])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(its, loss, lw=0.8, alpha=0.4, label="total loss")
    if len(loss) >= 10:
        k = max(5, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(its[k - 1 :], smooth, lw=1.8, label=f"moving average ({k} points)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (sum of weighted terms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return True
