"""The Mask DINO meta-architecture: pre-processing, backbone -> pixel decoder -> predictor, losses, inference.

``build_model(cfg)`` assembles the parts; :class:`MaskDINO` takes them built (each part can be built and tested
alone). Images enter as a list of ``(3, H, W)`` float RGB tensors in ``[0, 255]``; they are normalised with
``pixel_mean``/``pixel_std`` and zero-padded (after normalisation, as detectron2's ``ImageList``) at the
bottom/right to a common size divisible by ``size_divisibility``, into one :class:`~detr_core.padding.PaddedBatch`
that carries the padding down to every stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, cast

import torch
from torch import Tensor, nn

from detr_core.backbone import Backbone
from detr_core.box_ops import normalize_boxes
from detr_core.outputs import DetectionOutputs
from detr_core.padding import PaddedBatch

from ..config.model import MaskDINOConfig, PaddingMode
from ..structures import Prediction
from .backbone import build_backbone
from .criterion import MaskDINOCriterion, build_criterion
from .pixel_decoder import MaskDINOPixelDecoder
from .postprocess import TASKS, MaskDINOPostProcessor
from .predictor import MaskDINOPredictor

__all__ = ["TASKS", "MaskDINO", "backbone_at_own_sizes", "build_model"]


def backbone_at_own_sizes(
    backbone: nn.Module, batch: PaddedBatch, size_divisibility: int
) -> dict[str, Tensor]:
    """Padding-exact features from a backbone that cannot mask padding (Swin: its windows would mix the batch
    padding into the image's tokens).

    Each image runs at the size it would have alone (its own size rounded up to ``size_divisibility``), images of
    equal size together; each feature map is zero-filled beyond that (the pixel decoder masks it).

    Returns:
        ``{name: (B, C, Hp / stride, Wp / stride)}``.
    """
    d = max(size_divisibility, 1)
    own = ((batch.image_sizes + d - 1) // d * d).tolist()
    hp, wp = batch.padded_size
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(own):
        groups.setdefault((min(h, hp), min(w, wp)), []).append(i)
    if list(groups) == [(hp, wp)]:
        return backbone(batch.unmasked())
    x = batch.tensor
    out: dict[str, Tensor] = {}
    for (h, w), idx in groups.items():
        rows = x[idx, :, :h, :w] if len(idx) < x.shape[0] else x[:, :, :h, :w]
        for name, f in backbone(
            PaddedBatch.from_tensor(rows, [(h, w)] * rows.shape[0], masked=False)
        ).items():
            if name not in out:
                stride = h // f.shape[-2]
                out[name] = f.new_zeros(x.shape[0], f.shape[1], hp // stride, wp // stride)
            out[name][idx, :, : f.shape[-2], : f.shape[-1]] = f
    return out


class MaskDINO(nn.Module):
    """Mask DINO for instance, panoptic and semantic segmentation (and detection via the instance boxes).

    Args:
        backbone: a :class:`detr_core.backbone.Backbone` (``PaddedBatch -> {"res2".."res5": maps}``).
        pixel_decoder: :class:`MaskDINOPixelDecoder`.
        predictor: :class:`MaskDINOPredictor`.
        criterion: :class:`MaskDINOCriterion` (its ``weight_dict`` weights the returned losses).
        postprocessor: :class:`MaskDINOPostProcessor` (the per-image instance / panoptic / semantic outputs).
        pixel_mean, pixel_std: RGB normalisation of ``[0, 255]`` inputs.
        size_divisibility: padded sizes are multiples of it.
        padding_mode: ``aware`` (padding masked everywhere: an image gets the same prediction alone or padded in a
            batch) or ``official`` (padding is image content, as the released code).
        precision: the default inference precision of :meth:`predict` (``fp32`` or ``bf16``).
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: MaskDINOPixelDecoder,
        predictor: MaskDINOPredictor,
        criterion: MaskDINOCriterion,
        postprocessor: MaskDINOPostProcessor,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        padding_mode: PaddingMode = "aware",
        precision: Literal["fp32", "bf16"] = "fp32",
    ):
        super().__init__()
        self.precision = precision
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.criterion = criterion
        self.postprocessor = postprocessor
        self.size_divisibility = size_divisibility
        self.padding_mode = padding_mode
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean)).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std)).view(3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def padding_aware(self) -> bool:
        return self.padding_mode == "aware"

    # ------------------------------------------------------------------------------------ pre-processing
    def preprocess(self, images: Sequence[Tensor]) -> PaddedBatch:
        """Normalise and pad a list of images.

        Args:
            images: ``(3, H, W)`` float RGB in ``[0, 255]`` (any device; moved to the model's).

        Returns:
            The :class:`~detr_core.padding.PaddedBatch` ``(B, 3, Hp, Wp)`` (padding is 0 after normalisation); it is
            masked in padding-aware mode when an image is smaller than the batch.
        """
        if len(images) == 0:
            raise ValueError("no images")
        normalised = []
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3:
                shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
                raise ValueError(f"image {i} must be a (3, H, W) tensor, got {shape}")
            if im.shape[1] == 0 or im.shape[2] == 0:
                raise ValueError(f"image {i} is empty: {tuple(im.shape)}")
            normalised.append((im.to(self.device, self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std)
        return PaddedBatch.from_images(normalised, self.size_divisibility, masked=self.padding_aware)

    def prepare_targets(
        self, targets: Sequence[dict[str, Tensor]], batch: PaddedBatch
    ) -> list[dict[str, Tensor]]:
        """User targets -> criterion targets: ``boxes`` normalised cxcywh by the UNPADDED image size (official),
        ``masks`` zero-padded to the batch size, ``labels`` int64."""
        out = []
        hp, wp = batch.padded_size
        for t, (h, w) in zip(targets, batch.image_sizes.tolist()):
            labels = t["labels"].to(self.device, torch.long)
            boxes = normalize_boxes(t["boxes"].to(self.device, torch.float32), (h, w))
            masks = t["masks"].to(self.device)
            padded = torch.zeros(masks.shape[0], hp, wp, dtype=torch.bool, device=self.device)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
            out.append({"labels": labels, "boxes": boxes, "masks": padded})
        return out

    # ------------------------------------------------------------------------------------ network
    def features(self, batch: PaddedBatch) -> dict[str, Tensor]:
        """Backbone features; padding-exact for a masked batch (a backbone that cannot mask padding runs each image
        at its own size)."""
        if batch.masked and not getattr(self.backbone, "supports_padding_mask", False):
            return backbone_at_own_sizes(self.backbone, batch, self.size_divisibility)
        return self.backbone(batch)

    def network(self, batch: PaddedBatch, targets: list[dict[str, Tensor]] | None = None) -> DetectionOutputs:
        """Raw head outputs (see :meth:`MaskDINOPredictor.forward`) of a normalised padded batch."""
        pixel = self.pixel_decoder(self.features(batch), batch)
        return self.predictor(pixel, batch, targets=targets)

    def inference_forward(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Export-friendly inference graph (tensors in and out, no Python data structures).

        Args:
            images: ``(B, 3, Hp, Wp)`` normalised, padded images (see :meth:`preprocess`).
            image_sizes: ``(B, 2)`` int64 unpadded sizes; used by padding-aware models (ignored in official mode);
                None = nothing is padded.

        Returns:
            ``pred_logits (B, Q, C')``, ``pred_masks (B, Q, Hp/4, Wp/4)`` (in padding-aware mode the padded part
            repeats the nearest valid logit, so that resizing near the border ignores the padding) and
            ``pred_boxes (B, Q, 4)`` cxcywh in [0, 1] (of the valid image in padding-aware mode, of the padded
            image otherwise).
        """
        if image_sizes is None or not self.padding_aware:
            full = torch.tensor(
                [[images.shape[-2], images.shape[-1]]], dtype=torch.long, device=images.device
            )
            batch = PaddedBatch(images, full.expand(images.shape[0], 2), False)
        else:
            batch = PaddedBatch(images, image_sizes.to(images.device, torch.long), True)
        return self._inference(batch)

    def _inference(self, batch: PaddedBatch) -> tuple[Tensor, Tensor, Tensor]:
        final = self.network(batch).final
        assert final.masks is not None and final.boxes is not None
        return (
            final.logits,
            batch.replicate_padding(final.masks, self.pixel_decoder.common_stride),
            final.boxes,
        )

    # ------------------------------------------------------------------------------------ training
    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        """Training (``self.training`` and ``targets``): dict of WEIGHTED losses (their sum is the total loss).

        Targets per image: ``labels (n,)`` int64 contiguous ids, ``boxes (n, 4)`` xyxy absolute pixels of that
        image, ``masks (n, H, W)`` bool. Otherwise: ``predict(images)``.
        """
        if not (self.training and targets is not None):
            return self.predict(images)
        batch = self.preprocess(images)
        tgts = self.prepare_targets(targets, batch)
        outputs = self.network(batch, targets=tgts)
        return self.criterion.weighted(self.criterion(outputs, tgts))

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Tensor],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        tasks: Iterable[str] | None = None,
        precision: Literal["fp32", "bf16"] | None = None,
    ) -> list[Prediction]:
        """Predictions for a list of images.

        Args:
            images: ``(3, H_i, W_i)`` float RGB in ``[0, 255]``.
            original_sizes: output ``(h, w)`` per image (e.g. the size before a test-time resize); default the
                input sizes. Masks are resized to it and boxes scaled to it.
            tasks: subset of ``("instance", "panoptic", "semantic")``; default the post-processor's.
            precision: ``fp32``, or ``bf16``: the network under bfloat16 autocast, its outputs (and every decision
                made from them) in float32 (:mod:`maskdino.modeling.precision`); default ``self.precision``.

        Returns:
            one :class:`maskdino.structures.Prediction` per image.
        """
        chosen = self.postprocessor.resolve_tasks(tasks)
        if original_sizes is not None and len(original_sizes) != len(images):
            raise ValueError(f"{len(original_sizes)} original_sizes for {len(images)} images")
        was_training = self.training
        self.eval()
        try:
            batch = self.preprocess(images)
            precision = self.precision if precision is None else precision
            if precision == "fp32":
                logits, masks, boxes = self._inference(batch)
            else:
                from .precision import autocast

                with autocast(precision, self.device):
                    outs = self._inference(batch)
                logits, masks, boxes = (o.float() for o in outs)
            padded = batch.padded_size
            results = []
            for i, (h, w) in enumerate(batch.image_sizes.tolist()):
                out_size = (
                    (h, w)
                    if original_sizes is None
                    else (int(original_sizes[i][0]), int(original_sizes[i][1]))
                )
                # boxes are relative to the valid image in padding-aware mode, to the padded one otherwise
                box_frame = (h, w) if batch.masked else padded
                results.append(
                    self.postprocessor(
                        logits[i], masks[i], boxes[i], padded, (h, w), out_size, box_frame, chosen
                    )
                )
            return results
        finally:
            self.train(was_training)


def build_model(cfg: MaskDINOConfig) -> MaskDINO:
    """The whole model from a config (backbone weights from ``cfg.backbone.weights`` if set; nothing downloaded)."""
    cfg.validate()
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = MaskDINOPixelDecoder.from_config(
        cast(Backbone, backbone).output_shape(), cfg.pixel_decoder
    )
    predictor = MaskDINOPredictor.from_config(cfg)
    return MaskDINO(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        predictor=predictor,
        criterion=build_criterion(cfg),
        postprocessor=MaskDINOPostProcessor.from_config(cfg),
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
        size_divisibility=cfg.size_divisibility,
        padding_mode=cfg.padding_mode,
        precision=cfg.inference.precision,
    )
