"""Run each stage of both models on the same input: backbone, pixel decoder, predictor, whole network.

The official outputs come back as our typed :class:`~detr_core.outputs.DetectionOutputs` so that both sides are
compared field by field. Every stage of ours can be fed the OFFICIAL output of the stage before, so a difference is
attributed to the stage that makes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import maskdino.modeling.predictor as our_predictor_module
from detr_core.outputs import DetectionOutputs, QueryPredictions
from detr_core.padding import PaddedBatch
from maskdino.modeling.pixel_decoder import PixelDecoderOutput

if TYPE_CHECKING:
    from maskdino.modeling.model import MaskDINO

__all__ = [
    "OfficialRun",
    "capture_official_selection",
    "capture_our_selection",
    "official_batch",
    "official_outputs",
    "run_official",
]


def official_outputs(out: dict[str, Any]) -> DetectionOutputs:
    """The official predictor's output dict (``pred_logits``, ``aux_outputs``, ``interm_outputs``, ...) as ours."""

    def level(d: dict[str, Tensor]) -> QueryPredictions:
        return QueryPredictions(d["pred_logits"], d.get("pred_boxes"), d.get("pred_masks"))

    interm = out.get("interm_outputs")
    return DetectionOutputs(
        final=level(out),
        aux=[level(a) for a in out.get("aux_outputs") or []],
        interm=level(interm) if interm is not None else None,
    )


def official_batch(off: Any, images: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """The official pre-processing: normalise, then detectron2's ``ImageList`` zero padding to the size divisibility.

    Returns:
        ``(tensor (B, 3, Hp, Wp), image sizes)``.
    """
    from detectron2.structures import ImageList

    il = ImageList.from_tensors(
        [(im.to(off.device) - off.pixel_mean) / off.pixel_std for im in images], off.size_divisibility
    )
    return il.tensor, [tuple(s) for s in il.image_sizes]


@dataclass
class OfficialRun:
    """Every stage's output of the official model on one batch."""

    features: dict[str, Tensor]
    mask_features: Tensor
    multi_scale: list[Tensor]
    outputs: DetectionOutputs
    selected: Tensor | None  # (B, Q) token indices of the two-stage selection
    scores: Tensor | None  # (B, S) selection score of every token


@torch.no_grad()
def run_official(off: Any, x: Tensor) -> OfficialRun:
    """Backbone -> pixel decoder -> predictor of the official model (its ``sem_seg_head`` does the same two calls)."""
    feats = off.backbone(x)
    mask_features, _, multi_scale = off.sem_seg_head.pixel_decoder.forward_features(feats, None)
    with capture_official_selection(off) as sel:
        out, _ = off.sem_seg_head.predictor(multi_scale, mask_features, None)
    return OfficialRun(
        feats, mask_features, multi_scale, official_outputs(out), sel.get("indices"), sel.get("scores")
    )


@contextlib.contextmanager
def capture_official_selection(off: Any) -> Iterator[dict[str, Tensor]]:
    """While active, the official two-stage selection is recorded: ``scores (B, S)`` (max class logit of every
    encoder token, from the first ``class_embed`` call on all tokens) and ``indices (B, Q)`` (its top-k, as the
    official ``torch.topk`` call)."""
    predictor = off.sem_seg_head.predictor
    captured: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Tensor) -> None:
        if "scores" not in captured and output.dim() == 3 and output.shape[1] > predictor.num_queries:
            captured["scores"] = output.max(-1).values
            captured["indices"] = torch.topk(captured["scores"], predictor.num_queries, dim=1).indices

    handle = predictor.class_embed.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_our_selection() -> Iterator[dict[str, Tensor]]:
    """While active, our two-stage selection is recorded: ``indices (B, Q)`` and ``scores (B, Q)``."""
    original = our_predictor_module.select_top_queries
    captured: dict[str, Tensor] = {}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        sel = original(*args, **kwargs)
        captured.setdefault("indices", sel.indices)
        captured.setdefault("scores", sel.scores)
        return sel

    our_predictor_module.select_top_queries = wrapped  # type: ignore[assignment]
    try:
        yield captured
    finally:
        our_predictor_module.select_top_queries = original  # type: ignore[assignment]


def pixel_output(ours: MaskDINO, mask_features: Tensor, multi_scale: list[Tensor]) -> PixelDecoderOutput:
    """Official pixel decoder outputs in our predictor's input type."""
    pd = ours.pixel_decoder
    return PixelDecoderOutput(mask_features, list(multi_scale), pd.output_strides(), pd.common_stride)


def our_batch(ours: MaskDINO, x: Tensor, sizes: list[tuple[int, int]]) -> PaddedBatch:
    """The official padded tensor as our batch, masked when ``ours`` is padding-aware (and something is padded)."""
    return PaddedBatch.from_tensor(x, sizes, masked=ours.padding_aware)
