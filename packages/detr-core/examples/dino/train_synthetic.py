"""Train the DINO example on maskdino's synthetic shapes (boxes only) on CPU within a time budget, then box AP.

The model is the example's (nothing of maskdino); the data (generation, COCO loading, LSJ augmentation, the sampler)
and the evaluation (coco-eval) are maskdino's and coco-eval's, as in ``maskdino demo``::

    python packages/detr-core/examples/dino/train_synthetic.py --output outputs/dino-demo --minutes 10

Labels are the dataset's category ids (1..3; DINO uses COCO ids directly), so ``num_classes`` is 4. Training starts
from random weights (no ImageNet download): the backbone trains at the full learning rate and nothing is frozen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coco_eval import COCOInstanceEvaluator
from detr_core.box_ops import normalize_boxes
from dino import DINO, DINOConfig, build_criterion, normalize, param_groups
from maskdino.data import generate_synthetic
from maskdino.data.build import build_train_loader
from maskdino.data.coco import InstanceDataset, load_coco_instances
from maskdino.data.synthetic import synthetic_paths
from maskdino.data.transforms import LargeScaleJitter

#: The DINO architecture at CPU-demo size: ResNet-18, hidden 64, 2 + 3 layers, 50 queries (not an official config).
SMALL = DINOConfig(
    num_classes=4,
    dn_labelbook_size=4,
    backbone_depth=18,
    freeze_at=0,
    hidden_dim=64,
    nheads=4,
    dim_feedforward=256,
    enc_layers=2,
    dec_layers=3,
    num_queries=50,
    num_select=50,
    dn_number=50,
)


def targets_of(sample: dict, dataset_ids: list[int]) -> dict[str, torch.Tensor]:
    """``labels`` = category ids, ``boxes`` = cxcywh normalised to the (augmented) image."""
    inst = sample["instances"]
    h, w = sample["image"].shape[-2:]
    labels = torch.as_tensor(dataset_ids, dtype=torch.long)[inst["labels"]]
    return {"labels": labels, "boxes": normalize_boxes(inst["boxes"], (h, w))}


@torch.no_grad()
def evaluate(model: DINO, root: Path, dataset_ids: list[int]) -> dict[str, float]:
    paths = synthetic_paths(root, "val")
    records, meta = load_coco_instances(paths["instances_json"], paths["images"])
    evaluator = COCOInstanceEvaluator(str(paths["instances_json"]), iou_types=("bbox",))
    model.eval()
    for rec in records:
        sample = InstanceDataset([rec], meta)[0]
        image = normalize(sample["image"].as_subclass(torch.Tensor))
        det = model.predict([image], [(rec["height"], rec["width"])])[0]
        keep = torch.isin(det.labels, torch.tensor(dataset_ids))  # label 0 is no category
        out = {"boxes": det.boxes[keep], "scores": det.scores[keep], "category_ids": det.labels[keep]}
        evaluator.process([{"image_id": rec["image_id"]}], [out])
    return evaluator.evaluate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/dino-demo"))
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = generate_synthetic(args.output / "data", seed=0, num_train=400, num_val=50, size=128)
    paths = synthetic_paths(root, "train")
    records, meta = load_coco_instances(paths["instances_json"], paths["images"], filter_empty=True)
    train = InstanceDataset(records, meta, LargeScaleJitter(128, 0.8, 1.25, 0.5))
    model = DINO(SMALL).train()
    criterion = build_criterion(SMALL)
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, lr_backbone=args.lr), weight_decay=1e-4)
    budget = args.minutes * 60
    start, it, dropped, log = time.perf_counter(), 0, False, []
    for batch in build_train_loader(train, args.batch, args.seed):
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        if (
            not dropped and elapsed > 0.8 * budget
        ):  # DINO drops the lr 10x near the end (lr_drop 11 of 12 epochs)
            for g in optimizer.param_groups:
                g["lr"] *= 0.1
            dropped = True
        images = [normalize(s["image"].as_subclass(torch.Tensor)) for s in batch]
        targets = [targets_of(s, meta.dataset_ids) for s in batch]
        losses = criterion.weighted(criterion(model(images, targets), targets))
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)  # DINO's clip_max_norm
        optimizer.step()
        it += 1
        if it % 20 == 0:
            log.append({"iter": it, "time_s": round(elapsed, 1), "loss": round(float(total.detach()), 4)})
            print(json.dumps(log[-1]), flush=True)
    train_s = time.perf_counter() - start
    metrics = evaluate(model, root, meta.dataset_ids)
    result = {"iterations": it, "train_s": round(train_s, 1), "batch": args.batch, "lr": args.lr, **metrics}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "metrics.json").write_text(json.dumps({"result": result, "log": log}, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
