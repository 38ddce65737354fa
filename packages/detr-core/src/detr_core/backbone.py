"""Backbones for DETR-family detectors: the ``Backbone`` contract and torchvision ResNets with frozen norms.

A backbone maps a :class:`~detr_core.padding.PaddedBatch` of normalised images to named feature maps
(``{"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}``) and describes them with ``output_shape()``
(channels and stride of each, detectron2's ``ShapeSpec``). Heads are built from that description, so any module that
honours the contract (ResNet here, Swin in maskdino, your own) can be swapped in.

:class:`ResNetBackbone` keeps torchvision's module names (``conv1``, ``bn1``, ``layer1``..``layer4``), so torchvision
ImageNet weights load directly; ``STRIDE_IN_1X1: False`` in detectron2 configs is torchvision's stride on the 3x3
conv. Padding awareness: when the batch is masked, every activation that a spatial operator (3x3/7x7 conv,
max-pool) reads is zeroed outside the valid region, so a padded image produces, inside its valid region, exactly the
features it produces alone (zero padding at the image border is what the convolutions see in both cases; after a
ReLU the max-pool's ``-inf`` padding and a 0 give the same max).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from .padding import PaddedBatch

__all__ = ["Backbone", "ResNetBackbone", "ShapeSpec"]


@dataclass(frozen=True)
class ShapeSpec:
    """Channels and stride (w.r.t. the input image) of one feature map (detectron2's ``ShapeSpec``)."""

    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """What a detector needs of its backbone.

    ``supports_padding_mask``: True when the backbone itself keeps padded batches exact (it reads
    ``batch.masked`` / ``batch.zero_padding``); False when padding leaks into its features (e.g. Swin's windows),
    in which case a padding-exact model runs each image at its own size instead.
    """

    @property
    def supports_padding_mask(self) -> bool: ...

    def output_shape(self) -> dict[str, ShapeSpec]: ...

    def __call__(self, batch: PaddedBatch) -> dict[str, Tensor]: ...


def _conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor, fold: bool) -> Tensor:
    """``bn(conv(x))``; with ``fold`` (a FrozenBatchNorm2d, no autograd) the frozen affine map is folded into
    the convolution's weight and bias, so the normalisation costs no extra pass over the activation (two full
    passes and two fresh buffers per layer otherwise). Equal up to float rounding of ``weight * scale``."""
    if not fold:
        return bn(conv(x))
    assert isinstance(bn, FrozenBatchNorm2d) and isinstance(conv, nn.Conv2d)
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    weight = conv.weight * scale[:, None, None, None]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


_DEPTHS = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}


class ResNetBackbone(nn.Module):
    """torchvision ResNet-18/34/50/101 without ``avgpool``/``fc``.

    Args:
        depth: 18, 34, 50 or 101.
        out_features: subset of ``res2..res5`` to return.
        freeze_at: detectron2 semantics: 0 nothing frozen, 1 the stem, ``k`` the stem and ``res2..res{k}``.
        norm: ``FrozenBN`` (official) or ``BN`` (trainable BatchNorm, for training from scratch; not
            padding-exact).
        weights: optional local torchvision checkpoint (``resnet50-*.pth``); never downloaded.
    """

    def __init__(
        self,
        depth: int = 50,
        out_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
        freeze_at: int = 0,
        norm: str = "FrozenBN",
        weights: str | Path | None = None,
    ):
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}; expected one of {sorted(_DEPTHS)}")
        norm_layer = {"FrozenBN": FrozenBatchNorm2d, "BN": nn.BatchNorm2d}[norm]
        tv = getattr(torchvision.models, _DEPTHS[depth])(weights=None, norm_layer=norm_layer)
        self.depth = depth
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        expansion = 4 if depth >= 50 else 1
        self._shapes = {f"res{i + 2}": ShapeSpec(64 * 2**i * expansion, 4 * 2**i) for i in range(4)}
        unknown = set(out_features) - set(self._shapes)
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}")
        self.out_features = [k for k in self._shapes if k in out_features]
        if weights is not None:
            self.load_torchvision_weights(weights)
        self.freeze(freeze_at)
        #: inference folds each FrozenBatchNorm2d into its convolution (faster; equal up to float rounding). False
        #: keeps the reference order ``bn(conv(x))``, e.g. to compare with another implementation at 1e-5.
        self.fold_norms = True

    @property
    def supports_padding_mask(self) -> bool:
        return True

    def output_shape(self) -> dict[str, ShapeSpec]:
        """``{name: ShapeSpec(channels, stride)}`` of the returned features."""
        return {k: self._shapes[k] for k in self.out_features}

    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a local torchvision ImageNet checkpoint (the classifier ``fc.*`` is ignored)."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        # FrozenBatchNorm2d has no num_batches_tracked; anything else missing is an error.
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise RuntimeError(f"ResNet weights {path}: missing {missing}, unexpected {unexpected}")

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients of the stem (``freeze_at >= 1``) and of ``res2..res{freeze_at}``."""
        stages = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for modules in stages[: max(0, freeze_at)]:
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(False)

    def forward(self, batch: PaddedBatch) -> dict[str, Tensor]:
        """
        Args:
            batch: ``(B, 3, H, W)`` normalised images zero-padded at the bottom/right; when ``batch.masked`` the
                padding is kept out of the features (see the module docstring), otherwise it is image content.

        Returns:
            ``{"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)}`` (only ``out_features``); in
            CPU inference with folded norms the maps are channels-last strided (same values).
        """
        x = batch.tensor
        fold = self._can_fold()
        # CPU inference runs the convolutions channels-last (oneDNN's native layout: ~20% less backbone time
        # at 800x1216) and returns the maps in that layout: the pixel decoder's convolutions want it too, and
        # converting the 1/4-resolution map to NCHW and back costs ~0.2 s at 800x1216.
        channels_last = fold and x.device.type == "cpu"
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = _conv_bn(self.conv1, self.bn1, x, fold)
        x = x.relu_() if fold else self.relu(x)
        # zero the padding before the pool (a window at the border must not see padded activations) and after it
        # (a padded output whose window reaches back into the image is not zero); no-ops for an unmasked batch
        x = batch.zero_padding(self.maxpool(batch.zero_padding(x, 2, fold)), 4, fold)
        out = {}
        stride = 4
        for i, layer in enumerate([self.layer1, self.layer2, self.layer3, self.layer4]):
            if i > 0:
                stride *= 2
            for block in layer:
                x = self._block(block, x, batch, stride, fold)
            name = f"res{i + 2}"
            if name in self.out_features:
                out[name] = x
        return out

    def _can_fold(self) -> bool:
        """Fold the frozen norms into the convolutions: inference (no autograd) with FrozenBatchNorm2d only.
        Not under torch.compile/export, which trace the plain module graph."""
        return (
            self.fold_norms
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and isinstance(self.bn1, FrozenBatchNorm2d)
        )

    @staticmethod
    def _block(block: nn.Module, x: Tensor, batch: PaddedBatch, stride: int, fold: bool = False) -> Tensor:
        """One residual block; ``x`` is already zero outside the valid region (at ``stride`` of its input).

        For an unmasked batch no padding work is done at all; ``fold`` (inference) folds the frozen norms into the
        convolutions and runs the ReLUs and the residual sum in place.
        """
        if not batch.masked and not fold:
            return block(x)

        def zero(t: Tensor, s: int) -> Tensor:
            return batch.zero_padding(t, s, fold)

        def relu(t: Tensor) -> Tensor:
            return t.relu_() if fold else cast(nn.Module, block.relu)(t)

        ds = block.downsample
        assert ds is None or isinstance(ds, nn.Sequential)
        identity = x if ds is None else _conv_bn(ds[0], ds[1], x, fold)
        if isinstance(block, Bottleneck):
            out = relu(_conv_bn(block.conv1, block.bn1, x, fold))
            out = zero(out, stride // block.conv2.stride[0])
            out = relu(_conv_bn(block.conv2, block.bn2, out, fold))
            out = _conv_bn(block.conv3, block.bn3, out, fold)
        elif isinstance(block, BasicBlock):
            out = relu(_conv_bn(block.conv1, block.bn1, x, fold))
            out = zero(out, stride)
            out = _conv_bn(block.conv2, block.bn2, out, fold)
        else:  # pragma: no cover - torchvision only has these two
            raise TypeError(type(block))
        out = out.add_(identity) if fold else out + identity
        return zero(relu(out), stride)
