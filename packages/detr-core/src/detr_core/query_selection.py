"""Two-stage query selection (Deformable DETR two-stage, DINO "mixed query selection")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .encoder import shapes_as_list

__all__ = [
    "QuerySelection",
    "QuerySelectionHead",
    "encoder_output_proposals",
    "gather_tokens",
    "select_queries",
    "select_top_k",
]


def encoder_output_proposals(
    memory: Tensor,
    padding_mask: Tensor | None,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    base_scale: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """One anchor box per encoder token.

    The token at (row ``i``, column ``j``) of level ``l`` gets the box ``((j + 0.5) / W_valid, (i + 0.5) / H_valid,
    s, s)`` with ``s = base_scale * 2**l``, where ``W_valid``/``H_valid`` count the unpadded columns/rows of that
    image's level. A proposal is valid iff all four coordinates lie in ``(0.01, 0.99)``; invalid or padded tokens get
    proposal ``+inf`` (so ``sigmoid`` of anything added to it is 1) and zeroed memory.

    Args:
        memory: ``(B, S, C)`` encoder output.
        padding_mask: ``(B, S)`` bool True=pad, or None (no padding).
        spatial_shapes: ``(L, 2)`` ``(H, W)`` per level, in the memory's level order.
        base_scale: anchor size at level 0.

    Returns:
        ``(memory_masked (B, S, C), proposals_unsigmoid (B, S, 4))`` (proposals in logit space).
    """
    b = memory.shape[0]
    device = memory.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(shapes_as_list(spatial_shapes)):
        if padding_mask is not None:
            pad = padding_mask[:, start : start + h * w].view(b, h, w)
            valid_h = (~pad[:, :, 0]).sum(1).to(torch.float32)
            valid_w = (~pad[:, 0, :]).sum(1).to(torch.float32)
        else:
            valid_h = torch.full((b,), float(h), device=device)
            valid_w = torch.full((b,), float(w), device=device)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
        centres = (grid[None] + 0.5) / scale  # (B, H, W, 2)
        wh = torch.full_like(centres, base_scale * (2.0**lvl))
        proposals.append(torch.cat([centres, wh], -1).view(b, h * w, 4))
        start += h * w
    output_proposals = torch.cat(proposals, 1)
    valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
    output_proposals = torch.log(output_proposals / (1 - output_proposals))
    invalid = ~valid
    if padding_mask is not None:
        invalid = invalid | padding_mask[..., None]
    output_proposals = output_proposals.masked_fill(invalid, float("inf"))
    memory_masked = memory.masked_fill(invalid, 0.0)
    return memory_masked, output_proposals


def select_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest scores per image.

    Args:
        scores: ``(B, S)`` e.g. the max class logit per token.
        k: number to keep (``<= S``).

    Returns:
        ``(B, k)`` int64, sorted by decreasing score.
    """
    if k > scores.shape[1]:
        raise ValueError(f"cannot select {k} of {scores.shape[1]} tokens")
    return torch.topk(scores, k, dim=1).indices


def gather_tokens(x: Tensor, indices: Tensor) -> Tensor:
    """Pick tokens per image: ``x (B, S, ...)``, ``indices (B, k)`` int64 -> ``(B, k, ...)``."""
    idx = indices.view(*indices.shape, *([1] * (x.dim() - 2))).expand(*indices.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


@dataclass
class QuerySelection:
    """The top-``k`` encoder tokens chosen as queries (two-stage / mixed query selection).

    Attributes:
        indices: ``(B, k)`` int64 token indices, sorted by decreasing score.
        scores: ``(B, k)`` the max class logit of each selected token (the selection score).
        content: ``(B, k, C)`` projected memory of the selected tokens (NOT detached: DINO and Mask DINO detach it
            for the decoder's input and keep the live one for the encoder loss).
        boxes_unsigmoid: ``(B, k, 4)`` ``box_head(content) + proposal`` in logit space (not detached).
        logits: ``(B, k, num_classes)`` class logits of the selected tokens.
        token_scores: ``(B, S)`` the score of every token that the top-k ranked (``-inf`` at excluded padding).
    """

    indices: Tensor
    scores: Tensor
    content: Tensor
    boxes_unsigmoid: Tensor
    logits: Tensor
    token_scores: Tensor | None = None


def select_queries(
    memory: Tensor,
    padding_mask: Tensor | None,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    project: Callable[[Tensor], Tensor],
    class_head: Callable[[Tensor], Tensor],
    box_head: Callable[[Tensor], Tensor],
    k: int,
    exclude_padding: bool = True,
    base_scale: float = 0.05,
    indices: Tensor | None = None,
) -> QuerySelection:
    """Two-stage query selection (Deformable DETR two-stage, DINO / Mask DINO).

    ``output_memory = project(memory_masked)`` (DINO / Mask DINO: ``LayerNorm(Linear(.))``); every token is scored
    by its max class logit ``class_head(output_memory).max(-1)``; the top ``k`` become queries with content
    ``output_memory`` and box ``box_head(output_memory) + proposal`` (see :func:`encoder_output_proposals`). The box
    head runs only on the ``k`` selected tokens: it is per token, so that equals gathering afterwards.

    Args:
        memory: ``(B, S, C)`` encoder output (levels in the memory's order).
        padding_mask: ``(B, S)`` bool True=pad, or None.
        spatial_shapes: ``(L, 2)`` ``(H, W)``; pass Python ints to keep the graph exportable.
        project: ``(B, S, C) -> (B, S, C)``. class_head: ``C -> num_classes``. box_head: ``C -> 4``.
        k: number of queries.
        exclude_padding: padded tokens can never be selected (their memory is zeroed, so their score is a constant
            that would otherwise make the selection depend on the padding). DINO's reference code does not
            exclude them: pass False to reproduce it.
        base_scale: anchor size at level 0.
        indices: ``(B, k)`` int64 token indices to use instead of the top ``k`` (e.g. another implementation's
            selection, to compare what follows it when near-tied scores swap ranks); the scores are still computed.
    """
    memory_masked, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes, base_scale)
    output_memory = project(memory_masked)
    if torch.is_autocast_enabled(memory.device.type):
        # the selection is a decision: score every token in float32 (a 16-bit class head would tie many of them)
        with torch.autocast(memory.device.type, enabled=False):
            logits_all = class_head(output_memory.float())
    else:
        logits_all = class_head(output_memory)
    scores = logits_all.max(-1).values  # (B, S)
    if padding_mask is not None and exclude_padding:
        scores = scores.masked_fill(padding_mask, float("-inf"))
    if indices is None:
        indices = select_top_k(scores, k)
    elif indices.shape != (scores.shape[0], k) or indices.dtype != torch.long:
        raise ValueError(
            f"indices must be int64 of shape {(scores.shape[0], k)}, got {indices.dtype} {tuple(indices.shape)}"
        )
    else:
        indices = indices.to(scores.device)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= scores.shape[1]):
            raise ValueError(
                f"indices must lie in [0, {scores.shape[1]}), got [{int(indices.min())}, {int(indices.max())}]"
            )
    content = gather_tokens(output_memory, indices)
    return QuerySelection(
        indices=indices,
        scores=torch.gather(scores, 1, indices),
        content=content,
        boxes_unsigmoid=box_head(content) + gather_tokens(proposals, indices),
        logits=gather_tokens(logits_all, indices),
        token_scores=scores,
    )


class QuerySelectionHead(nn.Module):
    """:func:`select_queries` with its own projection ``enc_output_norm(enc_output(.))`` (submodules ``enc_output``:
    Linear C->C, ``enc_output_norm``: LayerNorm, as in the official DINO / Mask DINO code); the class and box heads
    are passed in (in DINO / Mask DINO the decoder's own ``class_embed`` and ``bbox_embed``)."""

    def __init__(self, d_model: int = 256, base_scale: float = 0.05, exclude_padding: bool = True):
        super().__init__()
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.base_scale = base_scale
        self.exclude_padding = exclude_padding

    def project(self, memory: Tensor) -> Tensor:
        """``(B, S, C) -> (B, S, C)``."""
        return self.enc_output_norm(self.enc_output(memory))

    def forward(
        self,
        memory: Tensor,
        padding_mask: Tensor | None,
        spatial_shapes: Tensor | Sequence[Sequence[int]],
        class_embed: nn.Module,
        bbox_embed: nn.Module,
        k: int,
        indices: Tensor | None = None,
    ) -> QuerySelection:
        """See :func:`select_queries`."""
        return select_queries(
            memory,
            padding_mask,
            spatial_shapes,
            self.project,
            class_embed,
            bbox_embed,
            k,
            exclude_padding=self.exclude_padding,
            base_scale=self.base_scale,
            indices=indices,
        )
