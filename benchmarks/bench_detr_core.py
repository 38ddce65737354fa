"""Benchmark detr_core's HungarianMatcher and SetCriterion on CPU.

    /work/venv/bin/python benchmarks/bench_detr_core.py [--batch 2] [--repeats 7] [--threads 1]

Matcher: 300 queries x 100 targets x 80 classes per image, focal class (2) + L1 (5) + GIoU (2) costs.
Reference ("naive"): the original DETR / Mask DINO formulation measured in the same run: one cost matrix over the
flattened batch (B*Q x sum n) split per image afterwards, then scipy per image.
Criterion: final + 5 aux + interm + denoising (final + 5 aux) levels, focal + L1 + GIoU losses, forward + backward;
reference = the same criterion with the naive matcher.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment

from detr_core import box_ops
from detr_core.denoising import DenoisingMeta
from detr_core.losses import BoxLoss, FocalLabelLoss, SetCriterion, expand_weight_dict
from detr_core.matcher import BoxL1Cost, FocalClassCost, GIoUCost, HungarianMatcher
from detr_core.outputs import DenoisingPredictions, DetectionOutputs, QueryPredictions


@torch.no_grad()
def naive_matcher(outputs, targets, alpha=0.25, gamma=2.0, w_class=2.0, w_bbox=5.0, w_giou=2.0):
    """DETR-style batched matcher: costs over all B*Q predictions x all targets of the batch, then split."""
    bs, nq = outputs.logits.shape[:2]
    prob = outputs.logits.flatten(0, 1).sigmoid()
    boxes = outputs.boxes.flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_boxes = torch.cat([t["boxes"] for t in targets])
    neg = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    cost_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    cost_giou = -box_ops.generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(boxes), box_ops.box_cxcywh_to_xyxy(tgt_boxes)
    )
    c = (w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou).view(bs, nq, -1)
    sizes = [len(t["boxes"]) for t in targets]
    out = []
    for i, part in enumerate(c.split(sizes, -1)):
        r, k = linear_sum_assignment(part[i].numpy())
        out.append((torch.as_tensor(r, dtype=torch.long), torch.as_tensor(k, dtype=torch.long)))
    return out


def make_level(b, q, c, g, requires_grad=False):
    logits = torch.randn(b, q, c, generator=g)
    boxes = torch.rand(b, q, 4, generator=g) * 0.5 + 0.25
    return QueryPredictions(logits.requires_grad_(requires_grad), boxes.requires_grad_(requires_grad))


def make_targets(b, n, c, g):
    out = []
    for _ in range(b):
        boxes = torch.rand(n, 4, generator=g) * 0.5 + 0.25
        boxes[:, 2:] = boxes[:, 2:] * 0.3 + 0.02
        out.append({"labels": torch.randint(0, c, (n,), generator=g), "boxes": boxes})
    return out


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, q, n, c = args.batch, args.queries, args.targets, args.classes
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; B={b} Q={q} n={n} C={c}")

    outputs = make_level(b, q, c, g)
    targets = make_targets(b, n, c, g)
    matcher = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0), GIoUCost(2.0)])
    ours_idx, ref_idx = matcher(outputs, targets), naive_matcher(outputs, targets)
    for (r1, c1), (r2, c2) in zip(ours_idx, ref_idx):
        assert torch.equal(r1, r2) and torch.equal(c1, c2), "matchers disagree"
    t_ours = timeit(lambda: matcher(outputs, targets), args.repeats)
    t_ref = timeit(lambda: naive_matcher(outputs, targets), args.repeats)
    print(
        f"matcher  ours {t_ours * 1e3:8.1f} ms   naive batched {t_ref * 1e3:8.1f} ms   ratio ref/ours {t_ref / t_ours:5.2f}"
    )

    num_aux, groups = 5, 2
    weights = expand_weight_dict({"loss_ce": 4.0, "loss_bbox": 5.0, "loss_giou": 2.0}, num_aux)
    losses = {"labels": FocalLabelLoss(c), "boxes": BoxLoss()}
    meta = DenoisingMeta(pad_size=groups * n, num_groups=groups, single_pad=n)

    def full_outputs():
        dn = DenoisingPredictions(
            make_level(b, meta.pad_size, c, g, True),
            [make_level(b, meta.pad_size, c, g, True) for _ in range(num_aux)],
            meta,
        )
        return DetectionOutputs(
            final=make_level(b, q, c, g, True),
            aux=[make_level(b, q, c, g, True) for _ in range(num_aux)],
            interm=make_level(b, q, c, g, True),
            denoising=dn,
        )

    for name, m in (("ours", matcher), ("naive", naive_matcher)):
        crit = SetCriterion(m, losses, weights)
        out = full_outputs()

        def step(crit=crit, out=out):
            total = sum(crit.weighted(crit(out, targets)).values())
            total.backward()

        t = timeit(step, args.repeats)
        print(f"criterion ({name} matcher, 7 matched + 6 DN levels, fwd+bwd) {t * 1e3:8.1f} ms")
        if name == "ours":
            t_crit_ours = t
    print(f"criterion ratio naive/ours {t / t_crit_ours:5.2f}")


if __name__ == "__main__":
    main()
