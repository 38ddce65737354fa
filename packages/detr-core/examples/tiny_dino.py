"""A tiny DINO-style box detector assembled only from detr-core parts (proof that the parts are generic).

Pieces: a 2-conv backbone giving two feature levels, ``PositionEmbeddingSine`` + level embedding,
``DeformableEncoder``, two-stage ``QuerySelectionHead``, DN-DETR denoising queries, ``DeformableDecoder`` with a
shared ``bbox_embed`` (look forward twice), ``HungarianMatcher`` + ``SetCriterion`` with focal and box losses.

``make_dataset`` draws images of filled rectangles of two colours (= two classes); ``train`` overfits them;
``predict`` returns per-image boxes / scores / labels. Runs on CPU in seconds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_core import box_ops
from detr_core.decoder import DeformableDecoder, look_forward_twice
from detr_core.denoising import build_denoising_queries
from detr_core.encoder import DeformableEncoder, level_start_index
from detr_core.layers import MLP
from detr_core.losses import BoxLoss, FocalLabelLoss, SetCriterion, expand_weight_dict
from detr_core.matcher import BoxL1Cost, FocalClassCost, GIoUCost, HungarianMatcher
from detr_core.outputs import DetectionOutputs, QueryPredictions, split_denoising
from detr_core.position_encoding import PositionEmbeddingSine
from detr_core.query_selection import QuerySelectionHead

COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.4, 1.0]])


def make_dataset(
    num_images: int = 4, size: int = 64, max_objects: int = 3, seed: int = 0
) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Images ``(N, 3, size, size)`` in ``[0, 1]`` with 1..max_objects filled rectangles (class = colour) on a dark
    background, and targets with ``labels (n,)`` and ``boxes_xyxy (n, 4)`` absolute pixels (exclusive x1/y1) and
    ``boxes (n, 4)`` normalised cxcywh. Rectangles do not overlap much (later ones are drawn on top)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((num_images, 3, size, size), 0.05)
    targets = []
    for i in range(num_images):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        boxes, labels = [], []
        while len(boxes) < n:
            w, h = (torch.randint(size // 6, size // 2, (2,), generator=g)).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            cand = torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32)
            if boxes and box_ops.box_iou(cand, torch.stack(boxes)).max() > 0.05:
                continue
            label = int(torch.randint(0, 2, (1,), generator=g))
            images[i, :, y0 : y0 + h, x0 : x0 + w] = COLOURS[label][:, None, None]
            boxes.append(cand[0])
            labels.append(label)
        xyxy = torch.stack(boxes)
        targets.append(
            {
                "labels": torch.tensor(labels, dtype=torch.long),
                "boxes_xyxy": xyxy,
                "boxes": box_ops.normalize_boxes(xyxy, (size, size)),
            }
        )
    return images, targets


class TinyDINO(nn.Module):
    """Deformable-DETR/DINO-style detector: two-stage queries, refinement, denoising. Images ``(B, 3, H, W)``."""

    def __init__(
        self,
        num_classes: int = 2,
        d_model: int = 32,
        num_queries: int = 16,
        enc_layers: int = 1,
        dec_layers: int = 3,
        n_heads: int = 4,
        n_points: int = 4,
        dn_number: int = 12,
    ):
        super().__init__()
        self.num_classes, self.num_queries, self.dn_number = num_classes, num_queries, dn_number
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1),
            nn.ReLU(),
        )  # stride 8
        self.down = nn.Sequential(nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU())  # stride 16
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, d_model, 1), nn.GroupNorm(4, d_model)) for _ in range(2)
        )
        self.position = PositionEmbeddingSine(d_model // 2)
        self.level_embed = nn.Parameter(torch.randn(2, d_model) * 0.02)
        layer_kwargs = dict(d_model=d_model, d_ffn=2 * d_model, dropout=0.0, n_levels=2, n_heads=n_heads)
        self.encoder = DeformableEncoder(num_layers=enc_layers, n_points=n_points, **layer_kwargs)
        self.query_selection = QuerySelectionHead(d_model, base_scale=0.2)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.label_enc = nn.Embedding(num_classes, d_model)
        self.decoder = DeformableDecoder(dec_layers, n_points=n_points, **layer_kwargs)
        self.decoder.bbox_embed = self.bbox_embed

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectionOutputs:
        """Final, auxiliary and encoder predictions (``logits (B, Q, C)``, ``boxes (B, Q, 4)``) and, when
        ``targets`` are given in training, the denoising queries' predictions."""
        f0 = self.stem(images)
        feats = [f0, self.down(f0)]
        srcs, poss, shapes = [], [], []
        for lvl, f in enumerate(feats):
            src = self.input_proj[lvl](f)
            pos = self.position(src) + self.level_embed[lvl][None, :, None, None]
            shapes.append(src.shape[-2:])
            srcs.append(src.flatten(2).transpose(1, 2))
            poss.append(pos.flatten(2).transpose(1, 2))
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=images.device)
        start = level_start_index(spatial_shapes)
        valid = torch.ones(images.shape[0], 2, 2, device=images.device)
        memory = self.encoder(torch.cat(srcs, 1), spatial_shapes, start, valid, pos=torch.cat(poss, 1))

        sel = self.query_selection(
            memory, None, spatial_shapes, self.class_embed, self.bbox_embed, self.num_queries
        )
        tgt, refs, attn_mask, dn = sel.content.detach(), sel.boxes_unsigmoid.detach(), None, None
        if self.training and targets is not None:
            dn = build_denoising_queries(
                targets, self.label_enc, self.num_classes, self.num_queries, dn_number=self.dn_number
            )
            if dn is not None:
                tgt = torch.cat([dn.content, tgt], 1)
                refs = torch.cat([dn.anchors_unsigmoid, refs], 1)
                attn_mask = dn.attn_mask
        hs, references = self.decoder(
            tgt, memory, refs, spatial_shapes, start, valid, self_attn_mask=attn_mask
        )
        boxes = look_forward_twice(hs, references[:-1], self.bbox_embed)
        levels = [QueryPredictions(self.class_embed(h), b) for h, b in zip(hs, boxes)]
        denoising = None
        if dn is not None:
            levels, denoising = split_denoising(levels, dn.meta)
        interm = QueryPredictions(sel.logits, sel.boxes_unsigmoid.sigmoid())
        return DetectionOutputs(final=levels[-1], aux=levels[:-1], interm=interm, denoising=denoising)

    @torch.no_grad()
    def predict(self, images: Tensor, top_k: int = 10) -> list[dict[str, Tensor]]:
        """Per image ``boxes (k, 4)`` xyxy absolute pixels, ``scores (k,)``, ``labels (k,)`` (top-k over
        query x class)."""
        was_training = self.training
        self.eval()
        out = self(images)
        self.train(was_training)
        h, w = images.shape[-2:]
        prob = out.final.logits.sigmoid().flatten(1)  # (B, Q*C)
        scores, idx = prob.topk(top_k, dim=1)
        q_idx, labels = idx // self.num_classes, idx % self.num_classes
        results = []
        for b in range(images.shape[0]):
            boxes = box_ops.denormalize_boxes(out.final.boxes[b, q_idx[b]], (h, w))
            results.append({"boxes": boxes, "scores": scores[b], "labels": labels[b]})
        return results


def build_criterion(model: TinyDINO) -> SetCriterion:
    """Focal (2) + L1 (5) + GIoU (2) matcher and losses, DINO weights (class 1 / bbox 5 / giou 2)."""
    matcher = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0), GIoUCost(2.0)])
    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights = expand_weight_dict(base, num_aux=len(model.decoder.layers) - 1)
    return SetCriterion(matcher, {"labels": FocalLabelLoss(model.num_classes), "boxes": BoxLoss()}, weights)


def train(
    model: TinyDINO,
    images: Tensor,
    targets: list[dict[str, Tensor]],
    steps: int = 300,
    lr: float = 1e-3,
    log_every: int = 0,
) -> list[float]:
    """Full-batch AdamW; returns the weighted total loss per step."""
    criterion = build_criterion(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(steps * 0.8)], 0.1)
    history = []
    model.train()
    for step in range(steps):
        losses = criterion.weighted(criterion(model(images, targets), targets))
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        scheduler.step()
        history.append(float(total.detach()))
        if log_every and step % log_every == 0:
            print(f"step {step} loss {history[-1]:.3f}", flush=True)
    return history


if __name__ == "__main__":
    import os
    import time

    torch.manual_seed(0)
    torch.set_num_threads(1)
    imgs, tgts = make_dataset()
    net = TinyDINO()
    t0 = time.perf_counter()
    hist = train(net, imgs, tgts, steps=int(os.environ.get("STEPS", 200)), log_every=20)
    print(f"trained in {time.perf_counter() - t0:.1f}s, loss {hist[0]:.2f} -> {hist[-1]:.2f}")
    for p, t in zip(net.predict(imgs), tgts):
        print(t["boxes_xyxy"].tolist(), t["labels"].tolist())
        print(p["boxes"][:4].round().tolist(), p["scores"][:4].tolist(), p["labels"][:4].tolist())
