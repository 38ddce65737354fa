"""Export the whole Mask DINO network (backbone, pixel decoder, query selection, decoder, heads) to ONNX, and from
ONNX to OpenVINO.

The graph is :meth:`MaskDINO.inference_forward`: ``images (B, 3, H, W)`` normalised and padded, ``image_sizes (B, 2)``
int64 -> ``pred_logits (B, Q, C')``, ``pred_masks (B, Q, H/4, W/4)``, ``pred_boxes (B, Q, 4)``. The deformable
attention op is written in standard ONNX operators by :mod:`deform_attn.onnx` (``GridSample`` per level, or a
Gather-based form without GridSample), so onnxruntime, OpenVINO and TensorRT read the file without a plugin; the
``custom`` form (a flag, never the default) writes one ``deform_attn::MSDeformAttn`` node instead, which OpenVINO
runs with the op's own CPU kernels through :mod:`deform_attn.openvino`.
Pre- and post-processing stay outside the graph (they are data-dependent: resize to the image's aspect, top-k,
mask pasting, panoptic merge) and are the same code for every backend (:mod:`maskdino.inference.predictor`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..inference.predictor import LoadedModel
from .metadata import (
    INPUT_NAMES,
    METADATA_KEY,
    OP_FORMS,
    OUTPUT_NAMES,
    ExportError,
    ExportMetadata,
    OpForm,
    read_onnx_metadata,
    write_onnx_metadata,
)
from .runtime import openvino_extension

__all__ = ["OPSET", "default_size", "export_onnx", "export_openvino", "openvino_from_onnx"]

#: ONNX opset of the exported graphs (GridSample needs >= 16).
OPSET = 18


class _InferenceGraph(nn.Module):
    """``(images, image_sizes) -> (pred_logits, pred_masks, pred_boxes)`` of a model, for the exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model.inference_forward(images, image_sizes)  # type: ignore[operator]


def default_size(loaded: LoadedModel) -> tuple[int, int]:
    """The fixed size that holds any test image of the model's resize (landscape): the shorter side and the capped
    longer side, rounded up to ``size_divisibility`` (800 x 1344 for the COCO recipes)."""
    d = max(1, loaded.model.size_divisibility)
    data = loaded.config.data
    return (-(-data.test_short_edge // d) * d, -(-data.test_max_size // d) * d)


def _check_size(loaded: LoadedModel, height: int | None, width: int | None) -> tuple[int, int]:
    if (height is None) != (width is None):
        raise ExportError("give both --height and --width (or neither)")
    if height is None or width is None:
        return default_size(loaded)
    d = max(1, loaded.model.size_divisibility)
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % d:
            raise ExportError(
                f"--{name} {v}: must be a positive multiple of the model's size_divisibility ({d})"
            )
    return height, width


def _check_model(loaded: LoadedModel) -> None:
    model = loaded.model
    if model.padding_aware and not getattr(model.backbone, "supports_padding_mask", False):
        raise ExportError(
            f"padding-aware models with the {loaded.config.model.backbone.name} backbone run each image at its own "
            "size (the backbone cannot mask padding), which one graph cannot express: export with "
            "--opts model.padding_mode=official"
        )


def _export_program(
    loaded: LoadedModel, height: int, width: int, dynamic: bool, op_form: str
) -> Any:  # torch.onnx.ONNXProgram
    import deform_attn.onnx

    model = loaded.model.eval()
    # a dynamic batch is traced with two images: a traced size of 1 would be specialised
    b = 2 if dynamic else 1
    images = torch.zeros(b, 3, height, width)
    sizes = torch.tensor([[height, width]] * b, dtype=torch.long)
    dynamic_shapes = None
    if dynamic:
        d = max(1, model.size_divisibility)
        batch = torch.export.Dim("batch", min=1, max=64)
        h = torch.export.Dim("height_steps", min=2, max=4096 // d)
        w = torch.export.Dim("width_steps", min=2, max=4096 // d)
        dynamic_shapes = {"images": {0: batch, 2: d * h, 3: d * w}, "image_sizes": {0: batch}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own chatter (pickle protocol, deprecations)
        return torch.onnx.export(
            _InferenceGraph(model),
            (images, sizes),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=deform_attn.onnx.translation_table(op_form),
            verbose=False,
        )


def export_onnx(
    loaded: LoadedModel,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    precision: Literal["fp32", "fp16"] = "fp32",
    op_form: OpForm = "grid_sample",
) -> ExportMetadata:
    """Write the ONNX model of ``loaded`` to ``path``.

    Args:
        loaded: a model with its config and class names (:func:`maskdino.inference.predictor.load_model`).
        path: the ``.onnx`` file (written atomically).
        height, width: the fixed input size (default :func:`default_size`); with ``dynamic`` the size the graph is
            traced at.
        dynamic: batch, height and width are dynamic (multiples of ``size_divisibility``).
        precision: ``fp32``, or ``fp16`` (weights and compute in float16, float32 inputs and outputs; for runtimes
            with fast float16, e.g. GPUs). bfloat16 ONNX is not supported by onnxruntime's CPU provider: use OpenVINO.
        op_form: ``grid_sample``, ``gather`` (no GridSample; for TensorRT) or ``custom`` (one
            ``deform_attn::MSDeformAttn`` node per attention, run by OpenVINO with the library of
            ``deform_attn.openvino``; the fastest OpenVINO model on CPU; onnxruntime cannot run it).

    Returns:
        The metadata written into the file.

    Raises:
        ExportError: an unsupported model or setting.
    """
    if precision not in ("fp32", "fp16"):
        raise ExportError(
            f"--precision {precision} is not available for ONNX (onnxruntime's CPU provider has no bfloat16 "
            "kernels for these operators): use --format openvino --precision bf16, or fp32 / fp16"
        )
    if op_form not in OP_FORMS:
        raise ExportError(f"op form {op_form!r}: expected one of {', '.join(OP_FORMS)}")
    if op_form == "custom" and precision != "fp32":
        raise ExportError("--op-form custom is float32 (its OpenVINO kernel): use --precision fp32")
    _check_model(loaded)
    h, w = _check_size(loaded, height, width)
    metadata = ExportMetadata.from_experiment(
        loaded.config, loaded.metadata, h, w, dynamic, precision, op_form
    )
    program = _export_program(loaded, h, w, dynamic, op_form)
    onnx_model = program.model_proto
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx_model = convert_float_to_float16(onnx_model, keep_io_types=True, disable_shape_infer=True)
    write_onnx_metadata(onnx_model, metadata)
    _save_onnx(onnx_model, Path(path))
    return metadata


def _save_onnx(onnx_model: Any, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save_model(onnx_model, tmp)
        onnx.checker.check_model(tmp)  # a file that onnxruntime / OpenVINO / TensorRT can read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_openvino(
    loaded: LoadedModel,
    path: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    dynamic: bool = False,
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    op_form: OpForm = "grid_sample",
) -> ExportMetadata:
    """Write the OpenVINO IR (``path`` = ``.xml``, weights in the ``.bin`` beside it), converted from the ONNX graph.

    ``precision`` is recorded as the runtime's inference precision hint: ``bf16`` runs in bfloat16 on CPUs with
    AVX-512-BF16 / AMX (others fall back to float32), ``fp16`` also stores the weights in float16; ``fp32`` pins
    float32 (OpenVINO would otherwise pick bfloat16 on such CPUs by itself).
    """
    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"{path}: an OpenVINO model is written as .xml (+ .bin)")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(loaded, onnx_path, height, width, dynamic, "fp32", op_form)
        return openvino_from_onnx(onnx_path, path, precision)


def openvino_from_onnx(
    onnx_path: str | os.PathLike, path: str | os.PathLike, precision: Literal["fp32", "bf16", "fp16"] = "fp32"
) -> ExportMetadata:
    """Convert a float32 ONNX file written by :func:`export_onnx` to the OpenVINO IR ``path`` (``.xml`` + ``.bin``)
    with ``precision`` as its inference precision hint (see :func:`export_openvino`)."""
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"{path}: an OpenVINO model is written as .xml (+ .bin)")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ExportError(f"--precision {precision}: expected fp32, bf16 or fp16 for OpenVINO")
    metadata = read_onnx_metadata(onnx_path)
    if metadata.precision != "fp32":
        raise ExportError(f"{onnx_path} is a {metadata.precision} ONNX model; OpenVINO converts the fp32 one")
    metadata.precision = precision
    extension = [str(openvino_extension())] if metadata.op_form == "custom" else None
    ov_model = ov.convert_model(str(onnx_path), extension=extension)
    ov_model.set_rt_info(metadata.to_json(), METADATA_KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(path), compress_to_fp16=precision == "fp16")
    return metadata
