"""Typed outputs of DETR-family heads, consumed by the matcher and the criterion.

Every field is a tensor (or a list of these dataclasses), and the classes are registered as pytrees, so a model that
returns them still traces, compiles and exports (``torch.export``, ONNX): the tracer sees the tensors, the caller gets
named fields instead of string-keyed dicts.

Conventions: batch-first ``(B, Q, ...)``; boxes are ``(cx, cy, w, h)`` normalised to ``[0, 1]``; masks are logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch.utils._pytree as pytree
from torch import Tensor

from .denoising import DenoisingMeta

__all__ = ["DenoisingPredictions", "DetectionOutputs", "QueryPredictions", "split_denoising"]


@dataclass
class QueryPredictions:
    """What one decoder output (a "level": a decoder layer, the initial prediction or the encoder proposals)
    predicts for every query.

    Attributes:
        logits: ``(B, Q, C)`` class logits (``C`` may include a trailing no-object class).
        boxes: ``(B, Q, 4)`` sigmoid cxcywh boxes normalised to ``[0, 1]``, or None (a head without boxes).
        masks: ``(B, Q, H, W)`` mask logits, or None (no mask head, or masks not computed for this level).

    A per-image view (``image(b)``) has the same fields without the batch dimension.
    """

    logits: Tensor
    boxes: Tensor | None = None
    masks: Tensor | None = None

    @property
    def num_queries(self) -> int:
        return int(self.logits.shape[-2])

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` of the fields that are set."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                yield f.name, value

    def image(self, b: int) -> QueryPredictions:
        """The predictions of image ``b``: ``logits (Q, C)``, ``boxes (Q, 4)``, ``masks (Q, H, W)``."""
        return self._map(lambda x: x[b])

    def split(self, n: int) -> tuple[QueryPredictions, QueryPredictions]:
        """``(first n queries, the rest)`` of every field (the denoising part comes first in a query sequence)."""
        return self._map(lambda x: x[:, :n]), self._map(lambda x: x[:, n:])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> QueryPredictions:
        return QueryPredictions(
            logits=fn(self.logits),
            boxes=None if self.boxes is None else fn(self.boxes),
            masks=None if self.masks is None else fn(self.masks),
        )


@dataclass
class DenoisingPredictions:
    """Predictions of the denoising queries (DN-DETR / DINO / Mask DINO training), split off the matching ones.

    Attributes:
        final: the last decoder layer's predictions of the ``P`` denoising queries.
        aux: the earlier levels, in the same order as :attr:`DetectionOutputs.aux`.
        meta: the layout of the denoising slots (groups, padding); not a tensor, kept as pytree context.
    """

    final: QueryPredictions
    aux: list[QueryPredictions]
    meta: DenoisingMeta

    def levels(self) -> dict[int | None, QueryPredictions]:
        """``{None: final, 0: aux[0], ...}``: the level key the criterion uses to pair them with matched levels."""
        out: dict[int | None, QueryPredictions] = {None: self.final}
        out.update(enumerate(self.aux))
        return out


@dataclass
class DetectionOutputs:
    """Everything a DETR-family head predicts in one forward.

    Attributes:
        final: the last decoder layer's predictions (what inference uses).
        aux: earlier decoder outputs, first to last (deep supervision; for DINO-style heads the first one is the
            "initial prediction" from the selected queries). Their masks may be None in eval mode.
        interm: the encoder (two-stage) proposals' predictions, or None.
        denoising: the denoising queries' predictions (training with denoising), or None.
    """

    final: QueryPredictions
    aux: list[QueryPredictions] = field(default_factory=list)
    interm: QueryPredictions | None = None
    denoising: DenoisingPredictions | None = None


def split_denoising(
    levels: list[QueryPredictions], meta: DenoisingMeta
) -> tuple[list[QueryPredictions], DenoisingPredictions]:
    """Split every level's ``P + Q`` queries into the matching part and the denoising part (which comes first).

    Args:
        levels: decoder outputs first to last (the last is the final one).
        meta: the denoising layout (``meta.pad_size`` = ``P``).

    Returns:
        ``(matching levels, DenoisingPredictions)`` in the same order.
    """
    parts = [level.split(meta.pad_size) for level in levels]
    dn = [p[0] for p in parts]
    return [p[1] for p in parts], DenoisingPredictions(final=dn[-1], aux=dn[:-1], meta=meta)


pytree.register_dataclass(QueryPredictions, serialized_type_name="detr_core.outputs.QueryPredictions")
pytree.register_dataclass(DetectionOutputs, serialized_type_name="detr_core.outputs.DetectionOutputs")


def _flatten_denoising(d: DenoisingPredictions) -> tuple[list, DenoisingMeta]:
    return [d.final, d.aux], d.meta


def _unflatten_denoising(children: Iterable, meta: DenoisingMeta) -> DenoisingPredictions:
    final, aux = children
    return DenoisingPredictions(final=final, aux=list(aux), meta=meta)


pytree.register_pytree_node(
    DenoisingPredictions,
    _flatten_denoising,
    _unflatten_denoising,
    serialized_type_name="detr_core.outputs.DenoisingPredictions",
)
