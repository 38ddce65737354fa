"""Deformable transformer decoder with DAB-style box queries and iterative box refinement (DINO / Mask DINO).

Queries are batch-first ``(B, Q, C)``; their positions are boxes ``(cx, cy, w, h)`` normalised to ``[0, 1]`` of the
padded image. Each layer's box prediction refines the previous reference in logit space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deform_attn import MSDeformAttn

from .box_ops import inverse_sigmoid
from .layers import MLP, clone_modules, get_activation_fn, post_norm_ffn
from .position_encoding import sine_embedding

__all__ = ["DeformableDecoder", "DeformableDecoderLayer", "look_forward_twice"]


class DeformableDecoderLayer(nn.Module):
    """One post-norm decoder layer in the order of DINO / Mask DINO:

    ``tgt = norm2(tgt + MHA(tgt + pos, tgt + pos, tgt, mask))``;
    ``tgt = norm1(tgt + MSDA(tgt + pos, box refs, memory))``;
    ``tgt = norm3(tgt + linear2(act(linear1(tgt))))``.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = get_activation_fn(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor | None,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            tgt: ``(B, Q, C)`` query content. query_pos: ``(B, Q, C)`` or None.
            reference_points: ``(B, Q, L, 4)`` boxes (or ``(B, Q, L, 2)`` points) per level, normalised.
            memory: ``(B, S, C)``. spatial_shapes: ``(L, 2)`` int64. level_start_index: ``(L,)``.
            memory_padding_mask: ``(B, S)`` bool True=pad, or None.
            self_attn_mask: ``(Q, Q)`` bool, True where query ``i`` may NOT attend to key ``j``, or None.

        Returns:
            ``(B, Q, C)``.
        """
        q = k = tgt if query_pos is None else tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        query = tgt if query_pos is None else tgt + query_pos
        tgt2 = self.cross_attn(
            query, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        return post_norm_ffn(
            tgt, self.linear1, self.activation, self.dropout3, self.linear2, self.dropout4, self.norm3
        )


def _layer_bbox_embed(bbox_embed: nn.Module, i: int) -> nn.Module:
    # A ModuleList means one head per layer (Deformable DETR without sharing); anything else is shared.
    return bbox_embed[i] if isinstance(bbox_embed, nn.ModuleList) else bbox_embed


class DeformableDecoder(nn.Module):
    """Decoder stack with box queries and iterative refinement.

    Per layer ``i`` (``ref`` = current sigmoid boxes ``(B, Q, 4)``, detached after the first refinement):

    - ``ref_input = ref[:, :, None] * cat([valid_ratios, valid_ratios], -1)[:, None]`` -> ``(B, Q, L, 4)``;
    - ``query_pos = ref_point_head(sine_embedding(ref_input[:, :, 0], d_model // 2))`` (DINO), or with
      ``query_pos_from_scaled_reference=False`` ``ref_point_head(sine_embedding(ref, d_model // 2))``: the box
      itself, not scaled by level 0's valid ratios, so that under padding the query position does not depend on
      how much padding the batch has (identical without padding);
    - ``out = layers[i](out, query_pos, ref_input, memory, ...)``;
    - if ``bbox_embed`` is set: ``new = sigmoid(bbox_embed(out) + inverse_sigmoid(ref))`` on the UN-normed output,
      ``references.append(new)`` (undetached), ``ref = new.detach()``; otherwise ``ref`` is kept;
    - ``intermediate.append(norm(out))``.

    ``bbox_embed`` is assigned by the model (one module shared by all layers, or an ``nn.ModuleList`` with one per
    layer). ``inverse_sigmoid_eps`` is the clamp of ``inverse_sigmoid`` in the refinement (Deformable DETR / Mask DINO
    1e-5, DINO 1e-3: it decides the logit of a reference at 0 or 1, e.g. a selected invalid proposal). Positional embedding uses ``sine_embedding`` with ``d_model // 2`` features per coordinate, so
    ``ref_point_head = MLP(2 * d_model, d_model, d_model, 2)``.
    """

    def __init__(
        self,
        num_layers: int = 6,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        query_pos_from_scaled_reference: bool = True,
        inverse_sigmoid_eps: float = 1e-5,
    ):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.num_layers = num_layers
        self.d_model = d_model
        layer = DeformableDecoderLayer(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points)
        self.layers = clone_modules(layer, num_layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: nn.Module | None = None
        self.query_pos_from_scaled_reference = query_pos_from_scaled_reference
        self.inverse_sigmoid_eps = inverse_sigmoid_eps

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        refpoints_unsigmoid: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            tgt: ``(B, Q, C)`` initial query content. memory: ``(B, S, C)`` encoder output.
            refpoints_unsigmoid: ``(B, Q, 4)`` initial boxes in logit space.
            spatial_shapes: ``(L, 2)`` int64 (in the memory's level order). level_start_index: ``(L,)``.
            valid_ratios: ``(B, L, 2)`` ``(w_ratio, h_ratio)``.
            memory_padding_mask: ``(B, S)`` bool True=pad, or None.
            self_attn_mask: ``(Q, Q)`` bool True=blocked, or None.

        Returns:
            ``(intermediate, references)``: ``num_layers`` tensors ``(B, Q, C)`` = ``norm(out_i)``, and
            ``num_layers + 1`` tensors ``(B, Q, 4)`` sigmoid boxes, ``references[0] = sigmoid(refpoints_unsigmoid)``.
        """
        output = tgt
        reference_points = refpoints_unsigmoid.sigmoid()
        references = [reference_points]
        intermediate = []
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for i, layer in enumerate(self.layers):
            reference_points_input = reference_points[:, :, None] * ratios4  # (B, Q, L, 4)
            pos_source = (
                reference_points_input[:, :, 0, :]
                if self.query_pos_from_scaled_reference
                else reference_points
            )
            query_sine_embed = sine_embedding(pos_source, self.d_model // 2)
            query_pos = self.ref_point_head(query_sine_embed)
            output = layer(
                output,
                query_pos,
                reference_points_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
            )
            if self.bbox_embed is not None:
                delta = _layer_bbox_embed(self.bbox_embed, i)(output)
                new_reference_points = (
                    delta + inverse_sigmoid(reference_points, self.inverse_sigmoid_eps)
                ).sigmoid()
                # "look forward twice": the next layer sees a detached reference, the loss sees the live one
                reference_points = new_reference_points.detach()
                references.append(new_reference_points)
            else:
                references.append(reference_points)
            intermediate.append(self.norm(output))
        return intermediate, references


def look_forward_twice(
    hidden_states: list[Tensor], references: list[Tensor], bbox_embed: nn.Module, eps: float = 1e-5
) -> list[Tensor]:
    """Box predictions of each decoder layer (DINO's "look forward twice").

    ``boxes[i] = sigmoid(bbox_embed(hidden_states[i]) + inverse_sigmoid(references[i]))``: layer ``i``'s box is
    its delta applied to the UNDETACHED reference that layer ``i`` received (``references[i]``), so the gradient of
    layer ``i``'s box loss also reaches layer ``i - 1``'s prediction.

    Args:
        hidden_states: list of ``(B, Q, C)`` (normed decoder outputs).
        references: list of ``(B, Q, 4)`` sigmoid boxes, at least ``len(hidden_states)`` of them.
        bbox_embed: shared head or ``nn.ModuleList`` with one head per layer.
        eps: the clamp of ``inverse_sigmoid`` (1e-5 Deformable DETR / Mask DINO, 1e-3 DINO).

    Returns:
        list of ``len(hidden_states)`` tensors ``(B, Q, 4)`` sigmoid boxes.
    """
    return [
        (_layer_bbox_embed(bbox_embed, i)(hs) + inverse_sigmoid(ref, eps)).sigmoid()
        for i, (hs, ref) in enumerate(zip(hidden_states, references))
    ]
