"""Reusable DETR-family building blocks (Deformable DETR, DAB-DETR, DN-DETR, DINO, Mask DINO).

Modules: ``box_ops`` (geometry), ``position_encoding`` (sine embeddings), ``layers`` (MLP), ``encoder`` /
``decoder`` (deformable transformer with iterative box refinement), ``query_selection`` (two-stage),
``denoising`` (DN queries), ``matcher`` (Hungarian), ``losses`` (focal, box, dice, point sampling, SetCriterion),
``distributed``. Tensors are batch-first ``(B, Q, C)``; boxes are cxcywh normalised to ``[0, 1]`` unless stated.
"""

from . import (
    box_ops,
    decoder,
    denoising,
    distributed,
    encoder,
    layers,
    losses,
    matcher,
    position_encoding,
    query_selection,
)
from .decoder import DeformableDecoder, DeformableDecoderLayer, look_forward_twice
from .denoising import DenoisingMeta, DenoisingQueries, build_denoising_queries, split_denoising_outputs
from .encoder import DeformableEncoder, DeformableEncoderLayer
from .layers import MLP
from .losses import SetCriterion
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine, sine_embedding

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DenoisingMeta",
    "DenoisingQueries",
    "HungarianMatcher",
    "PositionEmbeddingSine",
    "SetCriterion",
    "box_ops",
    "build_denoising_queries",
    "decoder",
    "denoising",
    "distributed",
    "encoder",
    "layers",
    "look_forward_twice",
    "losses",
    "matcher",
    "position_encoding",
    "query_selection",
    "sine_embedding",
    "split_denoising_outputs",
]
