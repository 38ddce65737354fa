"""DINO (Zhang et al., ICLR 2023), IDEA-Research/DINO's ``DINO_4scale`` ResNet-50 configuration, from detr-core parts.

Per image batch (normalised images, zero-padded bottom/right to the batch maximum, no size divisibility):

1. torchvision ResNet-50 with frozen BatchNorm (``res3..res5``, stem and res2 frozen); the padding is image content
   for the backbone, as in the official code;
2. input projections to 256 channels plus one strided level from the raw ``res5`` map (4 levels, strides 8..64);
   padding masks per level by nearest interpolation of the pixel mask (``PaddedBatch(mask_rule="nearest")``);
3. sine position embedding (T=20, no offset) + a learned level embedding; 6-layer deformable encoder;
4. mixed query selection: the top 900 encoder tokens (padded tokens are NOT excluded, as the official code) give the
   anchor boxes, the content queries are learned (``tgt_embed``);
5. training: 100 contrastive denoising queries (positive and negative groups, label and box noise) before them;
6. 6-layer deformable decoder with iterative box refinement (one box head and one class head shared by all layers,
   ``inverse_sigmoid`` clamped at 1e-3), "look forward twice" box predictions;
7. losses: Hungarian matching (class 2, L1 5, GIoU 2) and focal / L1 / GIoU losses (1, 5, 2) on the final, every
   auxiliary and the encoder ("interm") output, fixed pairs for the denoising queries.

Everything generic is imported from detr-core; this file holds the configuration, the wiring, DINO's init and its
few own tensors (``tgt_embed``, ``label_enc``, ``level_embed``). Module names follow the official ones without the
``transformer.`` prefix, so the checkpoint key map (``checkpoint.py``) is a handful of rules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from detr_core.backbone import ResNetBackbone
from detr_core.decoder import DeformableDecoder, look_forward_twice
from detr_core.denoising import DenoisingQueries, build_denoising_queries
from detr_core.encoder import DeformableEncoder, flatten_levels
from detr_core.layers import MLP, xavier_init_deformable_
from detr_core.losses import BoxLoss, FocalLabelLoss, LossFn, SetCriterion, expand_weight_dict
from detr_core.matcher import BoxL1Cost, FocalClassCost, GIoUCost, HungarianMatcher
from detr_core.neck import InputProjection
from detr_core.outputs import DetectionOutputs, QueryPredictions, split_denoising
from detr_core.padding import PaddedBatch
from detr_core.position_encoding import PositionEmbeddingSine
from detr_core.postprocess import Detections, topk_detections
from detr_core.query_selection import QuerySelectionHead

__all__ = ["DINO", "DINOConfig", "TINY", "build_criterion", "normalize", "param_groups"]

#: ImageNet normalisation of ``[0, 1]`` pixels (the official ``datasets/coco.py``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DINO's ``inverse_sigmoid`` clamp (``util/misc.py``), used for refinement, predictions and denoising anchors.
EPS = 1e-3


@dataclass(frozen=True)
class DINOConfig:
    """The settings of ``config/DINO/DINO_4scale.py`` (defaults) that shape the model, the losses and the output.

    ``num_classes`` counts label indices (COCO: 91 = the largest category id + 1, ids used as labels).
    ``dn_label_noise_ratio`` is DINO's own (a label flips with half that probability). ``dn_number`` must be >= 50:
    below it the official code uses ``2 * dn_number`` groups whatever the targets, here ``dn_number // max_gt``.
    ``backbone_weights``: a local torchvision ResNet checkpoint (the official training starts from ImageNet);
    ``freeze_at`` (detectron2 semantics) 2: the stem and res2 are frozen, as the official code. ``hidden_dim`` other
    than 256 and ``backbone_depth`` 18/34 run here but have no official counterpart (the official query sine embedding
    hard-codes 128 features per coordinate, its builder refuses ResNet-18/34).
    """

    num_classes: int = 91
    num_queries: int = 900
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_feature_levels: int = 4
    pe_temperature: float = 20.0
    dn_number: int = 100
    dn_label_noise_ratio: float = 0.5
    dn_box_noise_scale: float = 0.4
    dn_labelbook_size: int = 91
    backbone_depth: int = 50
    backbone_weights: str | None = None
    freeze_at: int = 2
    focal_alpha: float = 0.25
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    num_select: int = 300

    def __post_init__(self) -> None:
        if self.dn_number < 50:
            raise ValueError(
                f"dn_number must be >= 50 (the official group rule changes below), got {self.dn_number}"
            )
        if self.num_feature_levels < 3:
            raise ValueError(f"num_feature_levels must be >= 3 (res3..res5), got {self.num_feature_levels}")


#: The configuration of ``tools/compare_dino --tiny`` (the official builder accepts it): 2 + 2 layers, 30 queries,
#: 4 classes (the synthetic shapes' ids 1..3 and the unused id 0), FFN 512.
TINY = DINOConfig(
    num_classes=4,
    dn_labelbook_size=4,
    enc_layers=2,
    dec_layers=2,
    dim_feedforward=512,
    num_queries=30,
    num_select=30,
    dn_number=50,
)


def normalize(image: Tensor) -> Tensor:
    """``(3, H, W)`` RGB in ``[0, 255]`` -> the model's input: ``(x / 255 - mean) / std`` (float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    return (image.float() / 255.0 - mean) / std


class DINO(nn.Module):
    """DINO detector; input: normalised ``(3, H_i, W_i)`` images or a :class:`PaddedBatch` of them.

    ``forward(images, targets=None, indices=None)`` -> :class:`DetectionOutputs` (``final`` / ``aux``: cxcywh boxes
    normalised to each image, ``interm``: the selected encoder proposals, ``denoising`` in training with targets).
    ``targets``: per image ``labels (n,)`` int64, ``boxes (n, 4)`` normalised cxcywh. ``indices``: ``(B, K)`` token
    indices that replace the two-stage top-k (comparisons).
    """

    def __init__(self, cfg: DINOConfig = DINOConfig()):
        super().__init__()
        self.cfg = cfg
        d, levels = cfg.hidden_dim, cfg.num_feature_levels
        self.backbone = ResNetBackbone(
            cfg.backbone_depth,
            ("res3", "res4", "res5"),
            freeze_at=cfg.freeze_at,
            weights=cfg.backbone_weights,
        )
        shapes = list(self.backbone.output_shape().values())
        self.input_proj = InputProjection(shapes, d, levels - len(shapes))
        self.position_embedding = PositionEmbeddingSine(
            d // 2, temperature=cfg.pe_temperature, normalize=True
        )
        self.level_embed = nn.Parameter(torch.empty(levels, d))
        ffn, heads = cfg.dim_feedforward, cfg.nheads
        self.encoder = DeformableEncoder(d, ffn, 0.0, "relu", levels, heads, cfg.enc_n_points, cfg.enc_layers)
        self.query_selection = QuerySelectionHead(d, exclude_padding=False)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)
        self.decoder = DeformableDecoder(
            cfg.dec_layers, d, ffn, 0.0, "relu", levels, heads, cfg.dec_n_points, inverse_sigmoid_eps=EPS
        )
        # the official init of the transformer runs before the heads are attached (they keep their own init)
        xavier_init_deformable_(
            nn.ModuleList([self.encoder, self.decoder, self.query_selection, self.tgt_embed])
        )
        nn.init.normal_(self.level_embed)
        self.class_embed = nn.Linear(d, cfg.num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.bbox_embed = MLP(d, d, 4, 3)
        last = cast(nn.Linear, self.bbox_embed.layers[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.decoder.bbox_embed = self.bbox_embed  # one box head for every decoder layer
        # the encoder's heads start as copies of the decoder's and are trained separately
        self.enc_class_embed = copy.deepcopy(self.class_embed)
        self.enc_bbox_embed = copy.deepcopy(self.bbox_embed)
        self.label_enc = nn.Embedding(cfg.dn_labelbook_size + 1, d)

    def denoising_queries(self, targets: Sequence[dict[str, Tensor]]) -> DenoisingQueries | None:
        """DINO's contrastive denoising queries, noise drawn in the official order from the global RNG."""
        c = self.cfg
        return build_denoising_queries(
            list(targets),
            self.label_enc,
            c.num_classes,
            c.num_queries,
            dn_number=c.dn_number,
            label_noise_ratio=c.dn_label_noise_ratio * 0.5,
            box_noise_scale=c.dn_box_noise_scale,
            contrastive=True,
            inverse_sigmoid_eps=EPS,
            label_draws="flipped",
        )

    def forward(
        self,
        images: Sequence[Tensor] | PaddedBatch,
        targets: Sequence[dict[str, Tensor]] | None = None,
        indices: Tensor | None = None,
    ) -> DetectionOutputs:
        if isinstance(images, PaddedBatch):
            batch = images
        else:
            batch = PaddedBatch.from_images(list(images), mask_rule="nearest")
        feats = self.backbone(batch.unmasked())
        srcs = self.input_proj(list(feats.values()))
        masks = [batch.padding_mask(s.shape[-2:], st) for s, st in zip(srcs, self.input_proj.strides)]
        flat = flatten_levels(srcs, masks)
        pos = torch.cat(
            [
                self.position_embedding(s, m).flatten(2).transpose(1, 2)
                + self.level_embed[lvl].view(1, 1, -1)
                for lvl, (s, m) in enumerate(zip(srcs, masks))
            ],
            1,
        )
        shapes, starts, ratios, pad = (
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
            flat.padding_mask,
        )
        memory = self.encoder(flat.tokens, shapes, starts, ratios, pos, pad, flat.shapes)
        sel = self.query_selection(
            memory, pad, flat.shapes, self.enc_class_embed, self.enc_bbox_embed, self.cfg.num_queries, indices
        )
        tgt = self.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
        refs = sel.boxes_unsigmoid.detach()
        dn = self.denoising_queries(targets) if self.training and targets is not None else None
        if dn is not None:
            tgt, refs = torch.cat([dn.content, tgt], 1), torch.cat([dn.anchors_unsigmoid, refs], 1)
        attn_mask = None if dn is None else dn.attn_mask
        hs, references = self.decoder(tgt, memory, refs, shapes, starts, ratios, pad, attn_mask)
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0  # keeps label_enc in the graph without targets
        boxes = look_forward_twice(hs, references[:-1], self.bbox_embed, eps=EPS)
        levels = [QueryPredictions(self.class_embed(h), b) for h, b in zip(hs, boxes)]
        denoising = None
        if dn is not None:
            levels, denoising = split_denoising(levels, dn.meta)
        interm = QueryPredictions(sel.logits, sel.boxes_unsigmoid.sigmoid())
        return DetectionOutputs(levels[-1], levels[:-1], interm, denoising)

    @torch.no_grad()
    def predict(
        self, images: Sequence[Tensor] | PaddedBatch, output_sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        """Top ``num_select`` detections per image, boxes xyxy in the pixels of ``output_sizes`` ``(h, w)``."""
        out = self(images).final
        assert out.boxes is not None
        return topk_detections(out.logits, out.boxes, output_sizes, self.cfg.num_select)


def build_criterion(cfg: DINOConfig) -> SetCriterion:
    """DINO's matcher, losses and the 39 loss weights of the 6-layer model (``loss_ce``, ``loss_bbox``,
    ``loss_giou`` for the final, ``_0.._4``, ``_interm``, ``_dn``, ``_dn_0.._dn_4``); GIoU with DINO's 1e-6."""
    matcher = HungarianMatcher(
        [
            BoxL1Cost(cfg.set_cost_bbox),
            FocalClassCost(cfg.set_cost_class, cfg.focal_alpha),
            GIoUCost(cfg.set_cost_giou, eps=1e-6),
        ]
    )
    base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    losses: dict[str, LossFn] = {
        "labels": FocalLabelLoss(cfg.num_classes, cfg.focal_alpha),
        "boxes": BoxLoss(giou_eps=1e-6),
    }
    return SetCriterion(
        matcher, losses, expand_weight_dict(base, num_aux=cfg.dec_layers - 1), pad_missing_dn=True
    )


def param_groups(
    model: DINO, lr: float = 1e-4, lr_backbone: float = 1e-5, linear_proj_mult: float = 0.1
) -> list[dict]:
    """DINO's AdamW groups: the backbone at ``lr_backbone``, the deformable attention's sampling offsets at
    ``lr * linear_proj_mult``, the rest at ``lr`` (frozen parameters left out)."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "offsets": [], "rest": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = (
                "backbone"
                if name.startswith("backbone.")
                else "offsets"
                if "sampling_offsets" in name
                else "rest"
            )
            groups[kind].append(p)
    rates = {"backbone": lr_backbone, "offsets": lr * linear_proj_mult, "rest": lr}
    return [{"params": ps, "lr": rates[k]} for k, ps in groups.items() if ps]
