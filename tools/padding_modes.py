"""Batch invariance of the two padding modes: one image alone against the same image padded beside a larger one.

``padding_mode="aware"`` keeps the padding out of every computation that mixes positions (normalisation statistics,
attention, positional encodings), so an image's prediction should not depend on what it is batched with;
``"official"`` treats the padding as image content, as the released code does. For each mode this builds the model
from the weights' config with that mode, predicts every image of a folder alone and then in a batch of two beside a
larger image (so it is padded on the right and the bottom), and reports the largest raw-output differences and how
the final instances agree.

    python -m tools.padding_modes --weights outputs/demo/train/model_final.pth --images outputs/demo/data/val/images
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torchvision.ops import box_iou

from maskdino.data.coco import read_image
from maskdino.inference.predictor import load_model


def _raw(model, images: list[torch.Tensor]):
    batch = model.preprocess(images)
    with torch.inference_mode():
        logits, masks, boxes = model.inference_forward(batch.tensor, batch.image_sizes)
    return logits, masks, boxes


def _frame(mode: str, raw, h: int, w: int) -> torch.Tensor:
    """(w, h, w, h) of the frame the boxes are normalised to: the padded input (mask logits are at 1/4) or the image."""
    if mode == "official":
        hp, wp = raw[1].shape[-2] * 4, raw[1].shape[-1] * 4
        return torch.tensor([wp, hp, wp, hp], dtype=torch.float32)
    return torch.tensor([w, h, w, h], dtype=torch.float32)


def compare(weights: str, paths: list[Path], mode: str, pad_by: int, top: int = 10) -> dict:
    loaded = load_model(weights, opts=[f"model.padding_mode={mode}"])
    model = loaded.model.eval()
    rows = []
    for p in paths:
        img = read_image(str(p)).float()
        h, w = img.shape[-2:]
        big = torch.full((3, h + pad_by, w + pad_by), 114.0)
        alone = _raw(model, [img])
        paired = _raw(model, [img, big])
        hm, wm = alone[1].shape[-2:]
        diff_logits = float((alone[0][0] - paired[0][0]).abs().max())
        diff_masks = float((alone[1][0] - paired[1][0][:, :hm, :wm]).abs().max())
        # boxes are normalised to the image (aware) or to the padded input (official): compare in pixels
        diff_boxes = float(
            (alone[2][0] * _frame(mode, alone, h, w) - paired[2][0] * _frame(mode, paired, h, w)).abs().max()
        )
        pa = model.predict([img])[0].instances
        pp = model.predict([img, big])[0].instances
        k = min(len(pa.scores), len(pp.scores), top)  # the confident ones: low-score ranks hold near-ties
        same_labels = bool(torch.equal(pa.labels[:k], pp.labels[:k]))
        ious = box_iou(pa.boxes[:k], pp.boxes[:k]).diagonal() if k else torch.ones(0)
        rows.append(
            {
                "image": p.name,
                "max_abs_logits": diff_logits,
                "max_abs_mask_logits": diff_masks,
                "max_abs_boxes_px": diff_boxes,
                "same_labels": same_labels,
                "min_box_iou": float(ious.min()) if k else 1.0,
            }
        )
    return {
        "mode": mode,
        "images": len(rows),
        "max_abs_logits": max(r["max_abs_logits"] for r in rows),
        "median_max_abs_logits": statistics.median(r["max_abs_logits"] for r in rows),
        "max_abs_mask_logits": max(r["max_abs_mask_logits"] for r in rows),
        "max_abs_boxes_px": max(r["max_abs_boxes_px"] for r in rows),
        "images_with_same_labels": sum(r["same_labels"] for r in rows),
        "min_box_iou": min(r["min_box_iou"] for r in rows),
        "median_box_iou": statistics.median(r["min_box_iou"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True, help="a folder of images")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument(
        "--pad-by", type=int, default=64, help="the larger image is this much taller and wider"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    paths = paths[: args.limit]
    out = {}
    print(
        f"{len(paths)} images of {args.images}, each alone and beside one {args.pad_by} px taller and wider"
    )
    print("| mode | max abs class logits | median of per-image max | max abs mask logits | max abs boxes (px) "
          "| images with the same top-10 labels | min / median of per-image min box IoU (top 10) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for mode in ("aware", "official"):
        r = compare(args.weights, paths, mode, args.pad_by)
        out[mode] = r
        print(f"| {mode} | {r['max_abs_logits']:.2g} | {r['median_max_abs_logits']:.2g} | "
              f"{r['max_abs_mask_logits']:.2g} | {r['max_abs_boxes_px']:.2g} | "
              f"{r['images_with_same_labels']} of {r['images']} | {r['min_box_iou']:.3f} / {r['median_box_iou']:.3f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
