"""Run an exported model with onnxruntime or OpenVINO, behind the same :class:`ImagePredictor` as the PyTorch model.

:class:`ExportedModel` checks its input against the exported contract (names, a fixed size, dtypes) and returns the
raw outputs as torch tensors; :func:`exported_predictor` wraps it with the recorded pre-processing and the shared
post-processing, so ``maskdino predict --backend onnxruntime|openvino`` writes the same pictures and
``predictions.json`` as the PyTorch backend.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from deform_attn.onnx import CUSTOM_DOMAIN, CUSTOM_OP_TYPE
from detr_core.padding import PaddedBatch

from ..data.transforms import ResizeShortestEdge
from ..inference.predictor import ImagePredictor, RawOutputs
from ..modeling.postprocess import MaskDINOPostProcessor
from ..modeling.precision import native_bf16
from .metadata import INPUT_NAMES, METADATA_KEY, ExportError, ExportMetadata, read_onnx_metadata

__all__ = ["BACKENDS", "ExportedModel", "exported_predictor", "openvino_extension"]

Backend = Literal["onnxruntime", "openvino"]
BACKENDS: tuple[Backend, ...] = ("onnxruntime", "openvino")


def openvino_extension() -> Path:
    """The OpenVINO library that runs the ``custom`` op form's nodes (compiled on first use by
    :func:`deform_attn.openvino.extension_path`)."""
    import deform_attn.openvino

    try:
        return deform_attn.openvino.extension_path()
    except deform_attn.openvino.ExtensionBuildError as e:
        raise ExportError(f"--op-form custom needs the deform_attn OpenVINO extension: {e}") from None


class ExportedModel:
    """An exported Mask DINO network: ``images (B, 3, H, W)`` normalised, ``image_sizes (B, 2)`` -> raw outputs.

    Args:
        path: ``.onnx`` (onnxruntime or OpenVINO) or ``.xml`` (OpenVINO IR).
        backend: ``onnxruntime`` or ``openvino`` (default: by the file's suffix).
        threads: intra-op threads (default: the runtime's).

    Raises:
        FileNotFoundError: no such file. ExportError: not a model exported by maskdino, or an unknown backend.
    """

    def __init__(self, path: str | os.PathLike, backend: Backend | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model not found: {self.path}")
        if backend is None:
            backend = "openvino" if self.path.suffix == ".xml" else "onnxruntime"
        if backend not in BACKENDS:
            raise ExportError(f"backend {backend!r}: expected one of {list(BACKENDS)}")
        self.backend = backend
        if backend == "onnxruntime":
            self.metadata = self._load_onnxruntime(threads)
        else:
            self.metadata = self._load_openvino(threads)

    # -------------------------------------------------------------------------------------------- loading
    def _load_onnxruntime(self, threads: int | None) -> ExportMetadata:
        if self.path.suffix != ".onnx":
            raise ExportError(f"{self.path}: onnxruntime runs .onnx files (export with --format onnx)")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            if CUSTOM_OP_TYPE in str(e):
                raise ExportError(
                    f"{self.path} was exported with --op-form custom ({CUSTOM_DOMAIN}::{CUSTOM_OP_TYPE} nodes), "
                    "which only OpenVINO runs: use --backend openvino, or export with --op-form grid_sample"
                ) from None
            raise ExportError(f"{self.path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise ExportError(f"{self.path} was not exported by maskdino (no maskdino metadata)")
        self._input_names = [i.name for i in self._session.get_inputs()]
        return ExportMetadata.from_json(meta, str(self.path))

    def _load_openvino(self, threads: int | None) -> ExportMetadata:
        import openvino as ov

        def unreadable(e: Exception) -> ExportError:
            return ExportError(f"{self.path} is not a valid OpenVINO/ONNX model: {str(e).splitlines()[0]}")

        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as e:
            if CUSTOM_OP_TYPE not in str(e):
                raise unreadable(e) from None
            core.add_extension(str(openvino_extension()))  # the custom op form's nodes
            try:
                model = core.read_model(str(self.path))
            except Exception as e2:
                raise unreadable(e2) from None
        if model.has_rt_info(METADATA_KEY):
            metadata = ExportMetadata.from_json(model.get_rt_info(METADATA_KEY).astype(str), str(self.path))
        elif self.path.suffix == ".onnx":  # an .onnx file read by OpenVINO: its ONNX metadata
            metadata = read_onnx_metadata(self.path)
        else:
            raise ExportError(f"{self.path} was not exported by maskdino (no {METADATA_KEY} metadata)")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[
            metadata.precision
        ]}  # fmt: skip
        if metadata.precision == "bf16" and not native_bf16():
            warnings.warn(
                "this CPU has no native bfloat16 (avx512_bf16 / AMX): OpenVINO runs the bf16 model in float32",
                RuntimeWarning,
                stacklevel=3,
            )
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(model, "CPU", config)
        self._input_names = [p.get_any_name() for p in self._compiled.inputs]
        return metadata

    # -------------------------------------------------------------------------------------------- running
    def check_input(self, images: Tensor, image_sizes: Tensor) -> None:
        """Raise ExportError when the input does not fit the exported contract."""
        m = self.metadata
        if images.dim() != 4 or images.shape[1] != 3:
            raise ExportError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if image_sizes.shape != (images.shape[0], 2):
            raise ExportError(
                f"image_sizes must be (B, 2) = ({images.shape[0]}, 2), got {tuple(image_sizes.shape)}"
            )
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if not m.dynamic:
            if (h, w) != (m.height, m.width):
                raise ExportError(
                    f"{self.path} was exported for {m.height}x{m.width} inputs, got {h}x{w} (pad the image to that "
                    "size, or export with --dynamic)"
                )
            if images.shape[0] != 1:
                raise ExportError(f"{self.path} was exported for batch 1, got {images.shape[0]}")
        elif h % m.size_divisibility or w % m.size_divisibility:
            raise ExportError(f"input {h}x{w}: height and width must be multiples of {m.size_divisibility}")

    def __call__(self, images: Tensor, image_sizes: Tensor) -> RawOutputs:
        """Raw outputs of a normalised padded batch (see :meth:`MaskDINO.inference_forward`)."""
        self.check_input(images, image_sizes)
        feeds = {
            "images": images.detach().float().cpu().contiguous().numpy(),
            "image_sizes": image_sizes.detach().to(torch.long).cpu().contiguous().numpy(),
        }
        feeds = {
            k: v for k, v in feeds.items() if k in self._input_names
        }  # official mode may drop image_sizes
        if self.backend == "onnxruntime":
            outs = self._session.run(None, feeds)
        else:
            result = self._compiled([feeds[n] for n in self._input_names if n in feeds])
            outs = [result[o] for o in self._compiled.outputs]
        logits, masks, boxes = (torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs)
        return logits, masks, boxes

    def run_batch(self, batch: PaddedBatch) -> RawOutputs:
        return self(batch.tensor, batch.image_sizes)


def exported_predictor(model: ExportedModel) -> ImagePredictor:
    """An :class:`ImagePredictor` that runs ``model`` with its recorded pre- and post-processing; inputs are padded to
    the exported size (fixed-size models) or to ``size_divisibility`` (dynamic models)."""
    m = model.metadata
    fixed = None if m.dynamic or m.height is None or m.width is None else (m.height, m.width)
    return ImagePredictor(
        run=model.run_batch,
        postprocessor=MaskDINOPostProcessor(**m.postprocess),
        resize=ResizeShortestEdge(m.test_short_edge, m.test_max_size, backend=m.test_resize),  # type: ignore[arg-type]
        pixel_mean=torch.tensor(m.pixel_mean).view(3, 1, 1),
        pixel_std=torch.tensor(m.pixel_std).view(3, 1, 1),
        size_divisibility=m.size_divisibility,
        padding_aware=m.padding_mode == "aware",
        input_size=fixed,
    )


def check_backend_name(name: str) -> Backend:
    if name not in BACKENDS:
        raise ExportError(f"backend {name!r}: expected one of {list(BACKENDS)}")
    return name


__all__ += ["check_backend_name", "INPUT_NAMES"]
