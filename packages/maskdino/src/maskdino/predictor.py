"""The Mask DINO decoder head (official ``MaskDINODecoder``): query selection, mask-enhanced anchors, denoising,
the deformable decoder and the class / box / mask heads.

Shapes are batch-first. ``L`` levels come from the pixel decoder in its order; the decoder's memory flattens
them in REVERSE order (official), so for ``low2high`` its level 0 is 1/64. Boxes are ``(cx, cy, w, h)`` in
``[0, 1]`` relative to the padded image (official, no padding info) or to each image's valid region (padding
aware: the decoder gets valid ratios, proposals are normalised by the valid size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detr_core.decoder import DeformableDecoder, look_forward_twice
from detr_core.denoising import split_denoising_level
from detr_core.encoder import flatten_levels
from detr_core.layers import MLP, xavier_init_deformable_

from .config import DecoderConfig
from .denoising import prepare_denoising
from .mask_enhanced_init import mask_enhanced_anchors
from .pixel_decoder import c2_xavier_fill
from .query_selection import select_queries

__all__ = ["MaskDINOPredictor"]


class MaskDINOPredictor(nn.Module):
    """Decoder + heads.

    Args:
        cfg: :class:`DecoderConfig`.
        num_classes: ``C`` (the class head has ``C + 1`` outputs with ``semantic_ce_loss``).
        in_channels: channels of the pixel decoder's maps (``conv_dim``).
        mask_dim: channels of the mask features.
        num_feature_levels: ``L``.
        query_pos_scaled: where the decoder's query position embedding comes from (detr_core
            ``DeformableDecoder(query_pos_from_scaled_reference=...)``): True embeds the reference box scaled by
            level 0's valid ratios (official DINO); False (padding-aware mode) the unscaled box, so that the
            queries do not depend on how much padding the batch has (identical without padding).
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        num_classes: int,
        in_channels: int,
        mask_dim: int,
        num_feature_levels: int,
        query_pos_scaled: bool = True,
    ):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_queries = cfg.num_queries
        self.hidden_dim = hidden = cfg.hidden_dim
        self.num_feature_levels = num_feature_levels
        self.two_stage = cfg.two_stage
        self.initial_pred = cfg.initial_pred
        self.initialize_box_type = cfg.initialize_box_type
        self.learn_tgt = cfg.learn_tgt
        self.dn = cfg.dn
        self.dn_num = cfg.dn_num
        self.noise_scale = cfg.noise_scale
        self.semantic_ce_loss = cfg.semantic_ce_loss
        if not cfg.two_stage and cfg.initialize_box_type != "no":
            raise ValueError("mask-enhanced box init needs two-stage query selection")

        if not cfg.two_stage or cfg.learn_tgt:
            self.query_feat = nn.Embedding(cfg.num_queries, hidden)
        if not cfg.two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 4)
        if cfg.two_stage:
            self.enc_output = nn.Linear(hidden, hidden)
            self.enc_output_norm = nn.LayerNorm(hidden)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden or cfg.enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden, num_classes + 1 if cfg.semantic_ce_loss else num_classes)
        self.label_enc = nn.Embedding(num_classes, hidden)
        self.mask_embed = MLP(hidden, hidden, mask_dim, 3)

        self.decoder = DeformableDecoder(
            num_layers=cfg.dec_layers,
            d_model=hidden,
            d_ffn=cfg.dim_feedforward,
            dropout=cfg.dropout,
            activation="relu",
            n_levels=num_feature_levels,
            n_heads=cfg.nheads,
            n_points=cfg.dec_n_points,
            query_pos_from_scaled_reference=query_pos_scaled,
        )
        # official init of the decoder: xavier on every matrix, then the deformable attention's own init
        xavier_init_deformable_(self.decoder)
        # ``decoder_norm`` IS ``decoder.norm`` (official: one LayerNorm under two names)
        self.decoder_norm = self.decoder.norm
        # one box head shared by the encoder proposals and every decoder layer (official ``_bbox_embed``)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        self.decoder.bbox_embed = self.bbox_embed

    # ------------------------------------------------------------------------------------------ heads
    def prediction_heads(
        self, output: Tensor, mask_features: Tensor, pred_mask: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """``output (B, Q, C)`` -> class logits ``(B, Q, C')`` and mask logits ``(B, Q, H/4, W/4)`` (or None).

        ``decoder_norm`` is applied here even to outputs that are already normed (official; kept for parity).
        """
        decoder_output = self.decoder_norm(output)
        logits = self.class_embed(decoder_output)
        masks = None
        if pred_mask:
            masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        return logits, masks

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        features: list[Tensor],
        mask_features: Tensor,
        masks: list[Tensor] | None = None,
        mask_features_pad: Tensor | None = None,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict:
        """
        Args:
            features: ``L`` maps ``(B, C_in, H_l, W_l)`` in the pixel decoder's level order.
            mask_features: ``(B, mask_dim, H/4, W/4)``.
            masks: ``L`` padding masks ``(B, H_l, W_l)`` (True = padding) or None (official: no padding).
            mask_features_pad: ``(B, H/4, W/4)`` padding mask of ``mask_features`` or None.
            targets: training only, for denoising: ``labels (n,)``, ``boxes (n, 4)`` cxcywh normalised.

        Returns:
            dict with ``pred_logits (B, Q, C')``, ``pred_masks (B, Q, H/4, W/4)``, ``pred_boxes (B, Q, 4)``,
            ``aux_outputs`` (``dec_layers`` dicts: the initial prediction and all but the last layer; their masks
            are None in eval mode), ``interm_outputs`` (two-stage), and in training with denoising
            ``dn_outputs`` (same layout, ``P`` queries) and ``dn_meta``.
        """
        if len(features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(features)}")
        b = features[0].shape[0]
        order = list(reversed(range(self.num_feature_levels)))  # official: memory in reverse level order
        flat = flatten_levels(
            [self.input_proj[i](features[i]) for i in order],
            None if masks is None else [masks[i] for i in order],
        )
        memory, memory_pad, shapes = flat.tokens, flat.padding_mask, flat.shapes
        spatial_shapes, level_start, valid_ratios = (
            flat.spatial_shapes,
            flat.level_start_index,
            flat.valid_ratios,
        )

        interm_outputs = None
        if self.two_stage:
            sel = select_queries(
                memory,
                memory_pad,
                shapes,
                self.enc_output,
                self.enc_output_norm,
                self.class_embed,
                self.bbox_embed,
                self.num_queries,
            )
            need_masks = self.training or self.initialize_box_type != "no"
            interm_logits, interm_masks = self.prediction_heads(sel.content, mask_features, need_masks)
            interm_outputs = {
                "pred_logits": interm_logits,
                "pred_boxes": sel.boxes_unsigmoid.sigmoid(),
                "pred_masks": interm_masks,
            }
            tgt = sel.content.detach()
            refpoint = sel.boxes_unsigmoid.detach()
            if self.learn_tgt:
                tgt = self.query_feat.weight[None].expand(b, -1, -1)
            if self.initialize_box_type != "no":
                assert interm_masks is not None
                refpoint = mask_enhanced_anchors(interm_masks, self.initialize_box_type, mask_features_pad)
        else:
            tgt = self.query_feat.weight[None].expand(b, -1, -1)
            refpoint = self.query_embed.weight[None].expand(b, -1, -1)

        dn = None
        if self.training and self.dn != "no" and targets is not None:
            dn = prepare_denoising(
                targets, self.label_enc, self.num_classes, self.num_queries, self.dn_num, self.noise_scale
            )
        attn_mask = None
        if dn is not None:
            tgt = torch.cat([dn.content, tgt], 1)
            refpoint = torch.cat([dn.anchors_unsigmoid, refpoint], 1)
            attn_mask = dn.attn_mask

        logits_list: list[Tensor] = []
        masks_list: list[Tensor | None] = []
        if self.initial_pred:
            lg, mk = self.prediction_heads(tgt, mask_features, self.training)
            logits_list.append(lg)
            masks_list.append(mk)
        if torch.is_autocast_enabled(memory.device.type):
            # the official decoder layers run with autocast disabled (float32 deformable attention)
            with torch.autocast(device_type=memory.device.type, enabled=False):
                hs, references = self.decoder(
                    tgt.float(),
                    memory.float(),
                    refpoint.float(),
                    spatial_shapes,
                    level_start,
                    valid_ratios.float(),
                    memory_pad,
                    attn_mask,
                )
        else:
            hs, references = self.decoder(
                tgt, memory, refpoint, spatial_shapes, level_start, valid_ratios, memory_pad, attn_mask
            )
        for i, h in enumerate(hs):
            lg, mk = self.prediction_heads(h, mask_features, self.training or i == len(hs) - 1)
            logits_list.append(lg)
            masks_list.append(mk)
        boxes_list = look_forward_twice(hs, references, self.bbox_embed)
        if self.initial_pred:
            boxes_list = [refpoint.sigmoid(), *boxes_list]

        levels = [
            {"pred_logits": lg, "pred_masks": mk, "pred_boxes": bx}
            for lg, mk, bx in zip(logits_list, masks_list, boxes_list)
        ]
        out: dict = {}
        if dn is not None:
            split = [split_denoising_level(level, dn.meta) for level in levels]
            dn_levels = [s[0] for s in split]
            levels = [s[1] for s in split]
            out["dn_outputs"] = {**dn_levels[-1], "aux_outputs": dn_levels[:-1]}
            out["dn_meta"] = dn.meta
        elif self.training:
            # keep label_enc in the graph when a step has no denoising (DDP needs every parameter used)
            levels[-1]["pred_logits"] = levels[-1]["pred_logits"] + 0.0 * self.label_enc.weight.sum()
        out.update(levels[-1])
        out["aux_outputs"] = levels[:-1]
        if interm_outputs is not None:
            out["interm_outputs"] = interm_outputs
        return out
