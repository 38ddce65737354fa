"""Image in, predictions out: the inference pipeline of ``maskdino predict``, for any backend.

:class:`ImagePredictor` reads an image (EXIF applied), resizes it as the model's config says (detectron2's PIL resize
for converted official checkpoints, torchvision's for models trained here), normalises and pads it, runs a backend
(the PyTorch model, or an exported one) for the raw head outputs and post-processes them with the model's
:class:`~maskdino.modeling.postprocess.MaskDINOPostProcessor`, the one implementation every backend shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision import tv_tensors

from detr_core.padding import PaddedBatch

from ..config import ExperimentConfig, apply_overrides
from ..data.coco import DatasetMetadata, read_image
from ..data.transforms import ResizeShortestEdge
from ..modeling.model import MaskDINO, build_model
from ..modeling.postprocess import MaskDINOPostProcessor
from ..modeling.precision import Precision, with_precision
from ..structures import Prediction

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_OUTPUT_PIXELS",
    "ImagePredictor",
    "ImageTooLargeError",
    "RawOutputs",
    "expand_image_paths",
    "load_model",
]

#: file suffixes ``maskdino predict`` takes from a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: largest image (pixels) predictions are made at its own resolution; beyond it a clear error (a 100-megapixel
#: image's 100 instance masks alone would be 10 GB).
MAX_OUTPUT_PIXELS = 100_000_000

#: ``(pred_logits (B, Q, C'), pred_masks (B, Q, Hp/4, Wp/4), pred_boxes (B, Q, 4))`` of a padded batch.
RawOutputs = tuple[Tensor, Tensor, Tensor]


class ImageTooLargeError(ValueError):
    """An image has more pixels than :data:`MAX_OUTPUT_PIXELS`."""


def expand_image_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expand to their images (:data:`IMAGE_SUFFIXES`, sorted, not recursive).

    Raises:
        FileNotFoundError: a path does not exist, or a folder has no image.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p} is a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return out


def normalize_and_pad(
    images: list[Tensor], pixel_mean: Tensor, pixel_std: Tensor, size_divisibility: int, masked: bool
) -> PaddedBatch:
    """``(3, H_i, W_i)`` float RGB in ``[0, 255]`` -> a normalised, zero-padded :class:`PaddedBatch` (the model's
    pre-processing, for backends that run outside it)."""
    normalised = [(im.to(pixel_mean.device, pixel_mean.dtype) - pixel_mean) / pixel_std for im in images]
    return PaddedBatch.from_images(normalised, size_divisibility, masked=masked)


def pad_to(batch: PaddedBatch, size: tuple[int, int], masked: bool) -> PaddedBatch:
    """``batch`` zero-padded further to exactly ``size`` ``(H, W)``.

    Raises:
        ImageTooLargeError: the batch is already larger than ``size``.
    """
    hp, wp = batch.padded_size
    if (hp, wp) == tuple(size):
        return batch
    if hp > size[0] or wp > size[1]:
        raise ImageTooLargeError(
            f"the resized image is {hp}x{wp} (padded), larger than the model's fixed input size {size[0]}x{size[1]}"
        )
    tensor = batch.tensor.new_zeros(batch.tensor.shape[0], batch.tensor.shape[1], size[0], size[1])
    tensor[:, :, :hp, :wp] = batch.tensor
    return PaddedBatch.from_tensor(tensor, batch.image_sizes.tolist(), masked=masked)


@dataclass
class LoadedModel:
    """A model and everything needed to run it: its experiment config and dataset metadata."""

    model: MaskDINO
    config: ExperimentConfig
    metadata: DatasetMetadata


def load_model(
    weights: str | os.PathLike,
    config: str | ExperimentConfig | None = None,
    opts: Iterable[str] = (),
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Build a model from a weights file and its embedded config (or ``config``: a preset name, a file, or an
    :class:`ExperimentConfig`), with ``opts`` overrides, and load the weights strictly.

    Raises:
        FileNotFoundError, CheckpointError: the weights file is missing or not valid.
        ConfigError: no config embedded and none given, or an invalid one.
        CheckpointMismatchError: the weights do not fit the config's model.
    """
    from ..checkpoints.weights import load_model_weights, read_weights
    from ..config import ConfigError, load_experiment

    wf = read_weights(weights)
    if config is None:
        if wf.config is None:
            raise ConfigError(
                f"{wf.path} has no embedded config; pass --config (a preset name or a config file)"
            )
        cfg = ExperimentConfig.from_dict(wf.config)
    elif isinstance(config, ExperimentConfig):
        cfg = config
    else:
        cfg = load_experiment(config)
        if wf.config is not None and log is not None:
            log(f"using the config {config!r} instead of the one embedded in {wf.path}")
    opts = list(opts)
    if opts:
        cfg = apply_overrides(cfg, opts)
        if log is not None:
            log(f"config overrides: {' '.join(opts)}")
    if wf.official and cfg.model.padding_mode != "official" and log is not None:
        log(
            f"{wf.path} holds official weights but the model runs with padding_mode={cfg.model.padding_mode!r}: "
            "its outputs will differ from the official code's (see maskdino convert --preset)"
        )
    model = build_model(cfg.model)
    load_model_weights(model, wf)
    model.eval()
    if wf.metadata is not None:
        meta = DatasetMetadata.from_dict(wf.metadata)
    else:
        n = cfg.model.num_classes
        meta = DatasetMetadata(names=[f"class_{k}" for k in range(n)], dataset_ids=list(range(1, n + 1)))
    return LoadedModel(model, cfg, meta)


class ImagePredictor:
    """Read, resize, normalise, run a backend, post-process.

    Args:
        run: the backend: a normalised :class:`PaddedBatch` -> :data:`RawOutputs`.
        postprocessor: the model's post-processing settings.
        resize: the test-time resize.
        pixel_mean, pixel_std, size_divisibility, padding_aware: the model's pre-processing.
        input_size: pad every input to exactly this ``(H, W)`` (a backend exported for a fixed size); an image
            larger than it after the resize is an error.
    """

    def __init__(
        self,
        run: Callable[[PaddedBatch], RawOutputs],
        postprocessor: MaskDINOPostProcessor,
        resize: ResizeShortestEdge,
        pixel_mean: Tensor,
        pixel_std: Tensor,
        size_divisibility: int,
        padding_aware: bool,
        input_size: tuple[int, int] | None = None,
    ):
        self.run = run
        self.input_size = input_size
        self.postprocessor = postprocessor
        self.resize = resize
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.size_divisibility = size_divisibility
        self.padding_aware = padding_aware

    @classmethod
    def from_model(
        cls, model: MaskDINO, cfg: ExperimentConfig, precision: Precision | None = None
    ) -> ImagePredictor:
        """The PyTorch backend: ``model`` itself, in ``precision`` (default the model's; see
        :mod:`maskdino.modeling.precision`)."""
        chosen: Precision = model.precision if precision is None else precision
        return cls(
            run=with_precision(model._inference, chosen, model.device),  # type: ignore[arg-type]
            postprocessor=model.postprocessor,
            resize=ResizeShortestEdge(
                cfg.data.test_short_edge, cfg.data.test_max_size, backend=cfg.data.test_resize
            ),
            pixel_mean=model.pixel_mean,
            pixel_std=model.pixel_std,
            size_divisibility=model.size_divisibility,
            padding_aware=model.padding_aware,
        )

    def resized(self, image: Tensor) -> Tensor:
        """``(3, H, W)`` uint8 -> the network's input ``(3, h, w)`` float in ``[0, 255]``."""
        out = self.resize({"image": tv_tensors.Image(image)})["image"]
        return out.as_subclass(torch.Tensor).float()

    @torch.no_grad()
    def __call__(
        self,
        image: Tensor,
        tasks: Iterable[str] | None = None,
        score_threshold: float | None = None,
    ) -> Prediction:
        """Predictions for one ``(3, H, W)`` uint8 image at its own resolution.

        ``score_threshold``: instances scoring below it are dropped before their full-resolution masks are made
        (what bounds the memory of predictions on large photos).

        Raises:
            ImageTooLargeError: the image has more than :data:`MAX_OUTPUT_PIXELS` pixels.
        """
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if h * w > MAX_OUTPUT_PIXELS:
            raise ImageTooLargeError(
                f"the image is {w}x{h} = {h * w / 1e6:.0f} megapixels; predictions are made at the image's "
                f"resolution up to {MAX_OUTPUT_PIXELS / 1e6:.0f} megapixels: downscale it first"
            )
        x = self.resized(image)
        batch = normalize_and_pad(
            [x], self.pixel_mean, self.pixel_std, self.size_divisibility, self.padding_aware
        )
        if self.input_size is not None:
            batch = pad_to(batch, self.input_size, self.padding_aware)
        logits, masks, boxes = self.run(batch)
        ih, iw = batch.image_sizes[0].tolist()
        frame = (ih, iw) if batch.masked else batch.padded_size
        return self.postprocessor(
            logits[0], masks[0], boxes[0], batch.padded_size, (ih, iw), (h, w), frame, tasks, score_threshold
        )

    def predict_file(
        self,
        path: str | os.PathLike,
        tasks: Iterable[str] | None = None,
        score_threshold: float | None = None,
    ) -> tuple[Tensor, Prediction]:
        """``(the image (3, H, W) uint8, its predictions)``; raises DataError for an unreadable image."""
        image = read_image(Path(path))
        return image, self(image, tasks, score_threshold)
