"""The Mask DINO meta-architecture: pre-processing, backbone -> pixel decoder -> predictor, losses, inference.

``build_model(cfg)`` assembles the parts; :class:`MaskDINO` takes them built (each part can be built and tested
alone). Images enter as a list of ``(3, H, W)`` float RGB tensors in ``[0, 255]``; they are normalised with
``pixel_mean``/``pixel_std`` and zero-padded (after normalisation, as detectron2's ``ImageList``) at the
bottom/right to a common size divisible by ``size_divisibility``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from detr_core.box_ops import normalize_boxes

from .backbone import build_backbone, valid_sizes
from .config import MaskDINOConfig
from .criterion import MaskDINOCriterion, build_criterion
from .pixel_decoder import MaskDINOPixelDecoder, replicate_outside
from .postprocess import postprocess_image
from .predictor import MaskDINOPredictor
from .structures import Prediction

__all__ = ["TASKS", "MaskDINO", "build_model"]

TASKS = ("instance", "panoptic", "semantic")


class MaskDINO(nn.Module):
    """Mask DINO for instance, panoptic and semantic segmentation (and detection via the instance boxes).

    Args:
        backbone: ``(B, 3, H, W)[, image_sizes] -> {"res2".."res5": maps}`` with ``output_shape()``.
        pixel_decoder: :class:`MaskDINOPixelDecoder`.
        predictor: :class:`MaskDINOPredictor`.
        criterion: :class:`MaskDINOCriterion` (its ``weight_dict`` weights the returned losses).
        cfg: the :class:`MaskDINOConfig` the parts were built from (pre-processing and inference settings).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        pixel_decoder: MaskDINOPixelDecoder,
        predictor: MaskDINOPredictor,
        criterion: MaskDINOCriterion,
        cfg: MaskDINOConfig,
    ):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor
        self.criterion = criterion
        self.size_divisibility = cfg.size_divisibility
        self.padding_aware = cfg.padding_mode == "aware"
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------------------------ pre-processing
    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Normalise and pad a list of images.

        Args:
            images: ``(3, H_i, W_i)`` float RGB in ``[0, 255]`` (any device; moved to the model's).

        Returns:
            ``(batch (B, 3, Hp, Wp), image_sizes (B, 2) int64 (h, w))``; padding is 0 after normalisation.
        """
        if len(images) == 0:
            raise ValueError("no images")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        hp, wp = max(s[0] for s in sizes), max(s[1] for s in sizes)
        d = self.size_divisibility
        if d > 1:
            hp, wp = (hp + d - 1) // d * d, (wp + d - 1) // d * d
        batch = torch.zeros(len(images), 3, hp, wp, device=self.device, dtype=self.pixel_mean.dtype)
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i} must be (3, H, W), got {tuple(im.shape)}")
            x = (im.to(self.device, self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
            batch[i, :, : x.shape[1], : x.shape[2]] = x
        return batch, torch.as_tensor(sizes, dtype=torch.long, device=self.device)

    def prepare_targets(
        self, targets: Sequence[dict[str, Tensor]], image_sizes: Tensor, padded_size: tuple[int, int]
    ) -> list[dict[str, Tensor]]:
        """User targets -> criterion targets: ``boxes`` normalised cxcywh by the UNPADDED image size (official),
        ``masks`` zero-padded to the batch size, ``labels`` int64."""
        out = []
        hp, wp = padded_size
        for t, (h, w) in zip(targets, image_sizes.tolist()):
            labels = t["labels"].to(self.device, torch.long)
            boxes = normalize_boxes(t["boxes"].to(self.device, torch.float32), (h, w))
            masks = t["masks"].to(self.device)
            padded = torch.zeros(masks.shape[0], hp, wp, dtype=torch.bool, device=self.device)
            padded[:, : masks.shape[1], : masks.shape[2]] = masks.bool()
            out.append({"labels": labels, "boxes": boxes, "masks": padded})
        return out

    def _padding_sizes(self, images: Sequence[Tensor], batch: Tensor) -> Tensor | None:
        """The ``image_sizes`` to run the network with: None when padding awareness is off or when no image of
        the batch is padded (every padding mask would be all False; the masked ops then reduce to the plain
        ones, so skipping them changes nothing but the cost: ~54 masked fills in the backbone, masked
        GroupNorms and edge replication in the pixel decoder and on the mask logits)."""
        if not self.padding_aware:
            return None
        hp, wp = int(batch.shape[-2]), int(batch.shape[-1])
        if all(int(im.shape[-2]) == hp and int(im.shape[-1]) == wp for im in images):
            return None
        return torch.as_tensor(
            [(int(im.shape[-2]), int(im.shape[-1])) for im in images], dtype=torch.long, device=batch.device
        )

    # ------------------------------------------------------------------------------------ network
    def _backbone(self, batch: Tensor, image_sizes: Tensor | None) -> dict[str, Tensor]:
        if image_sizes is None:
            return self.backbone(batch)
        if getattr(self.backbone, "supports_padding_mask", False):
            return self.backbone(batch, image_sizes)
        return self._backbone_at_own_sizes(batch, image_sizes)

    def _backbone_at_own_sizes(self, batch: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        """Padding-exact features from a backbone that cannot mask padding (Swin: its windows would mix the
        batch padding into the image's tokens).

        Each image runs at the size it would have alone (its own size rounded up to ``size_divisibility``),
        images of equal size together; each feature map is zero-filled beyond that (the pixel decoder masks it).

        Args:
            batch: ``(B, 3, Hp, Wp)``. image_sizes: ``(B, 2)`` unpadded ``(h, w)``.

        Returns:
            ``{name: (B, C, Hp / stride, Wp / stride)}``.
        """
        d = max(self.size_divisibility, 1)
        own = ((image_sizes + d - 1) // d * d).tolist()
        hp, wp = int(batch.shape[-2]), int(batch.shape[-1])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, w) in enumerate(own):
            groups.setdefault((min(h, hp), min(w, wp)), []).append(i)
        if list(groups) == [(hp, wp)]:
            return self.backbone(batch)
        out: dict[str, Tensor] = {}
        for (h, w), idx in groups.items():
            rows = batch[idx, :, :h, :w] if len(idx) < batch.shape[0] else batch[:, :, :h, :w]
            for name, f in self.backbone(rows).items():
                if name not in out:
                    stride = h // f.shape[-2]
                    out[name] = f.new_zeros(batch.shape[0], f.shape[1], hp // stride, wp // stride)
                out[name][idx, :, : f.shape[-2], : f.shape[-1]] = f
        return out

    def network(
        self, batch: Tensor, image_sizes: Tensor | None = None, targets: list[dict] | None = None
    ) -> dict:
        """Raw head outputs (see :meth:`MaskDINOPredictor.forward`) of a normalised padded batch.

        ``image_sizes`` ``(B, 2)`` enables padding awareness; None = official behaviour.
        """
        features = self._backbone(batch, image_sizes)
        pd = self.pixel_decoder(features, image_sizes)
        return self.predictor(
            pd["multi_scale_features"],
            pd["mask_features"],
            pd["multi_scale_masks"],
            pd["mask_features_pad"],
            targets=targets,
        )

    def inference_forward(
        self, batch: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Export-friendly inference graph (fixed input size, no Python data structures in or out).

        Args:
            batch: ``(B, 3, Hp, Wp)`` normalised, padded images (see :meth:`preprocess`).
            image_sizes: ``(B, 2)`` int64 unpadded sizes (padding-aware models) or None (no padding).

        Returns:
            ``pred_logits (B, Q, C')``, ``pred_masks (B, Q, Hp/4, Wp/4)`` (in padding-aware mode the padded part
            repeats the nearest valid logit, so that resizing near the border ignores the padding) and
            ``pred_boxes (B, Q, 4)`` cxcywh in [0, 1] (of the valid image in padding-aware mode, of the padded
            image otherwise).
        """
        sizes = image_sizes if self.padding_aware else None
        out = self.network(batch, sizes)
        masks = out["pred_masks"]
        if sizes is not None:
            masks = replicate_outside(masks, valid_sizes(sizes, self.pixel_decoder.common_stride))
        return out["pred_logits"], masks, out["pred_boxes"]

    # ------------------------------------------------------------------------------------ training
    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        """Training (``self.training`` and ``targets``): dict of WEIGHTED losses (their sum is the total loss).

        Targets per image: ``labels (n,)`` int64 contiguous ids, ``boxes (n, 4)`` xyxy absolute pixels of that
        image, ``masks (n, H, W)`` bool. Otherwise: ``predict(images)``.
        """
        if not (self.training and targets is not None):
            return self.predict(images)
        batch, sizes = self.preprocess(images)
        tgts = self.prepare_targets(targets, sizes, (batch.shape[-2], batch.shape[-1]))
        outputs = self.network(batch, self._padding_sizes(images, batch), targets=tgts)
        return self.criterion.weighted(self.criterion(outputs, tgts))

    # ------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(
        self,
        images: Sequence[Tensor],
        original_sizes: Sequence[tuple[int, int]] | None = None,
        tasks: Iterable[str] | None = None,
    ) -> list[Prediction]:
        """Predictions for a list of images.

        Args:
            images: ``(3, H_i, W_i)`` float RGB in ``[0, 255]``.
            original_sizes: output ``(h, w)`` per image (e.g. the size before a test-time resize); default the
                input sizes. Masks are resized to it and boxes scaled to it.
            tasks: subset of ``("instance", "panoptic", "semantic")``; default from ``cfg.inference``.

        Returns:
            one :class:`maskdino.structures.Prediction` per image.
        """
        was_training = self.training
        self.eval()
        try:
            inf = self.cfg.inference
            if tasks is None:
                chosen = {
                    t for t, on in zip(TASKS, (inf.instance_on, inf.panoptic_on, inf.semantic_on)) if on
                }
            else:
                chosen = set(tasks)
                unknown = chosen - set(TASKS)
                if unknown:
                    raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
            batch, sizes = self.preprocess(images)
            logits, masks, boxes = self.inference_forward(batch, self._padding_sizes(images, batch))
            padded = (int(batch.shape[-2]), int(batch.shape[-1]))
            results = []
            for i, (h, w) in enumerate(sizes.tolist()):
                out_size = (h, w) if original_sizes is None else tuple(int(v) for v in original_sizes[i])
                box = boxes[i]
                if self.padding_aware:
                    # boxes are relative to the valid image; postprocess expects them relative to the padded one
                    box = box * box.new_tensor([w / padded[1], h / padded[0], w / padded[1], h / padded[0]])
                results.append(
                    postprocess_image(
                        logits[i],
                        masks[i],
                        box,
                        padded,
                        (h, w),
                        out_size,
                        instance_on="instance" in chosen,
                        panoptic_on="panoptic" in chosen,
                        semantic_on="semantic" in chosen,
                        focal=not self.cfg.decoder.semantic_ce_loss,
                        top_k=inf.test_topk_per_image,
                        thing_classes=set(inf.thing_classes),
                        object_mask_threshold=inf.object_mask_threshold,
                        overlap_threshold=inf.overlap_threshold,
                        temperature=inf.temperature,
                    )
                )
            return results
        finally:
            self.train(was_training)


def build_model(cfg: MaskDINOConfig) -> MaskDINO:
    """The whole model from a config (backbone weights from ``cfg.backbone.weights`` if set; nothing downloaded)."""
    cfg.validate()
    backbone = build_backbone(cfg.backbone)
    pixel_decoder = MaskDINOPixelDecoder(backbone.output_shape(), cfg.pixel_decoder)
    predictor = MaskDINOPredictor(
        cfg.decoder,
        num_classes=cfg.num_classes,
        in_channels=cfg.pixel_decoder.conv_dim,
        mask_dim=cfg.pixel_decoder.mask_dim,
        num_feature_levels=cfg.pixel_decoder.total_num_feature_levels,
        query_pos_scaled=cfg.padding_mode == "official",
    )
    return MaskDINO(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        predictor=predictor,
        criterion=build_criterion(cfg),
        cfg=cfg,
    )
