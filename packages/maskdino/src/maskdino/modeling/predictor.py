"""The Mask DINO decoder head (official ``MaskDINODecoder``), read as the paper's Figure 2:

1. :meth:`MaskDINOPredictor.memory`: the pixel decoder's maps flattened into the decoder's memory;
2. :meth:`MaskDINOPredictor.select`: unified query selection (top-k encoder tokens, their "interm" prediction,
   mask-enhanced anchors; :mod:`.query_selection`), or learned queries without two-stage;
3. :meth:`MaskDINOPredictor.denoising_queries`: unified denoising queries in training (:mod:`.denoising`);
4. :meth:`MaskDINOPredictor.decode`: the initial prediction, the deformable decoder with iterative box refinement and
   the class / box / mask heads on every layer ("look forward twice" boxes);
5. the denoising part split off, everything returned as typed :class:`~detr_core.outputs.DetectionOutputs`.

Shapes are batch-first. ``L`` levels come from the pixel decoder in its order; the decoder's memory flattens them in
REVERSE order (official), so for ``low2high`` its level 0 is 1/64. Boxes are ``(cx, cy, w, h)`` in ``[0, 1]`` relative
to the padded image (official, no padding info) or to each image's valid region (padding aware: the decoder gets
valid ratios, proposals are normalised by the valid size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detr_core.decoder import DeformableDecoder, look_forward_twice
from detr_core.denoising import DenoisingQueries
from detr_core.encoder import FlatLevels, flatten_levels
from detr_core.layers import MLP, xavier_init_deformable_
from detr_core.outputs import DetectionOutputs, QueryPredictions
from detr_core.padding import PaddedBatch

from ..config.model import BoxInitType, MaskDINOConfig
from .denoising import DenoisingMode, prepare_denoising, split_predictions, with_denoising_queries
from .pixel_decoder import PixelDecoderOutput, c2_xavier_fill
from .query_selection import mask_enhanced_anchors, select_top_queries

__all__ = ["MaskDINOPredictor", "Queries"]


@dataclass
class Queries:
    """The decoder's input queries (before denoising).

    Attributes:
        content: ``(B, Q, C)`` content queries (detached encoder features, or learned).
        anchors_unsigmoid: ``(B, Q, 4)`` anchor boxes in logit space (detached).
        interm: the encoder's prediction for the selected tokens (two-stage), or None.
    """

    content: Tensor
    anchors_unsigmoid: Tensor
    interm: QueryPredictions | None


class MaskDINOPredictor(nn.Module):
    """Decoder + heads (parameter names as the official ``MaskDINODecoder``, so checkpoints map by name).

    Args:
        num_classes: ``C`` (the class head has ``C + 1`` outputs with ``semantic_ce_loss``).
        in_channels: channels of the pixel decoder's maps (``conv_dim``). mask_dim: channels of the mask features.
        num_feature_levels: ``L``.
        hidden_dim, num_queries, nheads, dec_layers, dim_feedforward, dec_n_points, dropout: of the decoder.
        two_stage: queries from the top-k encoder tokens (else learned ``query_feat`` / ``query_embed``).
        initialize_box_type: mask-enhanced anchors ``no | bitmask | mask2box`` (needs two-stage).
        initial_pred: predict from the selected queries before the first decoder layer (an extra output).
        learn_tgt: learned content queries even with two-stage.
        dn: denoising mode (``no | seg``); dn_num: its query budget; noise_scale: its box/label noise.
        semantic_ce_loss: softmax CE classification over ``C + 1`` classes (else sigmoid focal over ``C``).
        enforce_input_proj: a 1x1 conv between pixel decoder and decoder even when the channels match.
        query_pos_scaled: where the decoder's query position embedding comes from (detr_core
            ``DeformableDecoder(query_pos_from_scaled_reference=...)``): True embeds the reference box scaled by
            level 0's valid ratios (official DINO); False (padding-aware mode) the unscaled box, so that the
            queries do not depend on how much padding the batch has (identical without padding).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        mask_dim: int,
        num_feature_levels: int,
        hidden_dim: int = 256,
        num_queries: int = 300,
        nheads: int = 8,
        dec_layers: int = 9,
        dim_feedforward: int = 2048,
        dec_n_points: int = 4,
        dropout: float = 0.0,
        two_stage: bool = True,
        initialize_box_type: BoxInitType = "mask2box",
        initial_pred: bool = True,
        learn_tgt: bool = False,
        dn: DenoisingMode = "seg",
        dn_num: int = 100,
        noise_scale: float = 0.4,
        semantic_ce_loss: bool = False,
        enforce_input_proj: bool = False,
        query_pos_scaled: bool = True,
    ):
        super().__init__()
        if not two_stage and initialize_box_type != "no":
            raise ValueError("mask-enhanced box init needs two-stage query selection")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.hidden_dim = hidden = hidden_dim
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.initial_pred = initial_pred
        self.initialize_box_type = initialize_box_type
        self.learn_tgt = learn_tgt
        self.dn = dn
        self.dn_num = dn_num
        self.noise_scale = noise_scale
        self.semantic_ce_loss = semantic_ce_loss

        if not two_stage or learn_tgt:
            self.query_feat = nn.Embedding(num_queries, hidden)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, 4)
        if two_stage:
            self.enc_output = nn.Linear(hidden, hidden)
            self.enc_output_norm = nn.LayerNorm(hidden)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden or enforce_input_proj:
                conv = nn.Conv2d(in_channels, hidden, kernel_size=1)
                c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden, num_classes + 1 if semantic_ce_loss else num_classes)
        self.label_enc = nn.Embedding(num_classes, hidden)
        self.mask_embed = MLP(hidden, hidden, mask_dim, 3)

        self.decoder = DeformableDecoder(
            num_layers=dec_layers,
            d_model=hidden,
            d_ffn=dim_feedforward,
            dropout=dropout,
            activation="relu",
            n_levels=num_feature_levels,
            n_heads=nheads,
            n_points=dec_n_points,
            query_pos_from_scaled_reference=query_pos_scaled,
        )
        # official init of the decoder: xavier on every matrix, then the deformable attention's own init
        xavier_init_deformable_(self.decoder)
        # ``decoder_norm`` IS ``decoder.norm`` (official: one LayerNorm under two names)
        self.decoder_norm = self.decoder.norm
        # one box head shared by the encoder proposals and every decoder layer (official ``_bbox_embed``)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        last = self.bbox_embed.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.decoder.bbox_embed = self.bbox_embed

    @classmethod
    def from_config(cls, cfg: MaskDINOConfig) -> MaskDINOPredictor:
        """Built from the whole model config (the decoder's settings plus the pixel decoder's widths)."""
        pd, dc = cfg.pixel_decoder, cfg.decoder
        return cls(
            num_classes=cfg.num_classes,
            in_channels=pd.conv_dim,
            mask_dim=pd.mask_dim,
            num_feature_levels=pd.total_num_feature_levels,
            hidden_dim=dc.hidden_dim,
            num_queries=dc.num_queries,
            nheads=dc.nheads,
            dec_layers=dc.dec_layers,
            dim_feedforward=dc.dim_feedforward,
            dec_n_points=dc.dec_n_points,
            dropout=dc.dropout,
            two_stage=dc.two_stage,
            initialize_box_type=dc.initialize_box_type,
            initial_pred=dc.initial_pred,
            learn_tgt=dc.learn_tgt,
            dn=dc.dn,
            dn_num=dc.dn_num,
            noise_scale=dc.noise_scale,
            semantic_ce_loss=dc.semantic_ce_loss,
            enforce_input_proj=dc.enforce_input_proj,
            query_pos_scaled=cfg.padding_mode == "official",
        )

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

    # ------------------------------------------------------------------------------------------ stages
    def memory(self, features: Sequence[Tensor], masks: Sequence[Tensor | None]) -> FlatLevels:
        """Stage 1: the decoder's memory ``(B, S, C)``, its levels in REVERSE pixel-decoder order (official)."""
        if len(features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(features)}")
        order = list(reversed(range(self.num_feature_levels)))
        return flatten_levels([self.input_proj[i](features[i]) for i in order], [masks[i] for i in order])

    def select(self, memory: FlatLevels, mask_features: Tensor, mask_pad: Tensor | None) -> Queries:
        """Stage 2: unified query selection (two-stage) or the learned queries.

        Two-stage: the top-k tokens' features (detached) are the content queries; their boxes, or with
        mask-enhanced init the boxes of the masks they predict, are the anchors; their class / mask / box predictions
        are the "interm" output (its masks are computed in training and when they initialise the anchors).
        """
        b = memory.tokens.shape[0]
        if not self.two_stage:
            return Queries(
                content=self.query_feat.weight[None].expand(b, -1, -1),
                anchors_unsigmoid=self.query_embed.weight[None].expand(b, -1, -1),
                interm=None,
            )
        sel = select_top_queries(
            memory.tokens,
            memory.padding_mask,
            memory.shapes,
            self.enc_output,
            self.enc_output_norm,
            self.class_embed,
            self.bbox_embed,
            self.num_queries,
        )
        need_masks = self.training or self.initialize_box_type != "no"
        interm_logits, interm_masks = self.prediction_heads(sel.content, mask_features, need_masks)
        interm = QueryPredictions(interm_logits, sel.boxes_unsigmoid.sigmoid(), interm_masks)
        content = sel.content.detach()
        anchors = sel.boxes_unsigmoid.detach()
        if self.learn_tgt:
            content = self.query_feat.weight[None].expand(b, -1, -1)
        if self.initialize_box_type != "no":
            assert interm_masks is not None
            anchors = mask_enhanced_anchors(interm_masks, self.initialize_box_type, mask_pad)
        return Queries(content, anchors, interm)

    def denoising_queries(self, targets: Sequence[dict[str, Tensor]] | None) -> DenoisingQueries | None:
        """Stage 3: unified denoising queries (training with ``dn="seg"`` only)."""
        if not (self.training and self.dn != "no" and targets is not None):
            return None
        return prepare_denoising(
            targets, self.label_enc, self.num_classes, self.num_queries, self.dn_num, self.noise_scale
        )

    def decode(
        self,
        content: Tensor,
        anchors_unsigmoid: Tensor,
        memory: FlatLevels,
        mask_features: Tensor,
        self_attn_mask: Tensor | None,
    ) -> list[QueryPredictions]:
        """Stage 4: the initial prediction (``initial_pred``) and every decoder layer's class / box / mask
        predictions, first to last. Masks of all but the last level are only computed in training."""
        levels: list[QueryPredictions] = []
        if self.initial_pred:
            lg, mk = self.prediction_heads(content, mask_features, self.training)
            levels.append(QueryPredictions(lg, anchors_unsigmoid.sigmoid(), mk))
        # under autocast the layers run in the autocast dtype; the deformable attention op casts its own inputs
        # (deform_attn's Autocast kernel: 16-bit value, float32 sampling locations); reference boxes stay float32
        hs, references = self.decoder(
            content,
            memory.tokens,
            anchors_unsigmoid.float(),
            memory.spatial_shapes,
            memory.level_start_index,
            memory.valid_ratios,
            memory.padding_mask,
            self_attn_mask,
        )
        boxes = look_forward_twice(hs, references, self.bbox_embed)
        for i, (h, bx) in enumerate(zip(hs, boxes)):
            lg, mk = self.prediction_heads(h, mask_features, self.training or i == len(hs) - 1)
            levels.append(QueryPredictions(lg, bx, mk))
        return levels

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        pixel: PixelDecoderOutput,
        batch: PaddedBatch,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> DetectionOutputs:
        """
        Args:
            pixel: the pixel decoder's maps and mask features.
            batch: the padded input batch (only its padding is used).
            targets: training only, for denoising: ``labels (n,)``, ``boxes (n, 4)`` cxcywh normalised.

        Returns:
            :class:`~detr_core.outputs.DetectionOutputs`: ``final`` (``logits (B, Q, C')``, ``boxes (B, Q, 4)``,
            ``masks (B, Q, H/4, W/4)``), ``aux`` (``dec_layers`` levels: the initial prediction and all but the last
            layer; their masks are None in eval mode), ``interm`` (two-stage) and in training with denoising
            ``denoising``.
        """
        masks = [
            batch.padding_mask(f.shape[-2:], s) for f, s in zip(pixel.multi_scale_features, pixel.strides)
        ]
        mask_pad = batch.padding_mask(pixel.mask_features.shape[-2:], pixel.mask_stride)
        memory = self.memory(pixel.multi_scale_features, masks)
        queries = self.select(memory, pixel.mask_features, mask_pad)
        dn = self.denoising_queries(targets)
        content, anchors, attn_mask = with_denoising_queries(queries.content, queries.anchors_unsigmoid, dn)
        levels = self.decode(content, anchors, memory, pixel.mask_features, attn_mask)
        levels, dn_predictions = split_predictions(levels, dn)
        if self.training and dn_predictions is None:
            # keep label_enc in the graph when a step has no denoising (DDP needs every parameter used)
            final = levels[-1]
            levels[-1] = QueryPredictions(
                final.logits + 0.0 * self.label_enc.weight.sum(), final.boxes, final.masks
            )
        return DetectionOutputs(
            final=levels[-1], aux=levels[:-1], interm=queries.interm, denoising=dn_predictions
        )
