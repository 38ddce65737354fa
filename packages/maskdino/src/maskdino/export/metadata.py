"""The contract an exported model carries with it: how to pre-process its input and post-process its outputs.

It is stored as JSON in the exported file (ONNX ``metadata_props["maskdino"]``, OpenVINO ``rt_info["maskdino"]``), so
that ``maskdino predict --backend onnxruntime|openvino --model PATH`` needs nothing else, and any other runtime can
read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import deform_attn.onnx

from ..config import ExperimentConfig
from ..data.coco import DatasetMetadata

__all__ = [
    "FORMAT_VERSION",
    "INPUT_NAMES",
    "METADATA_KEY",
    "OUTPUT_NAMES",
    "ExportError",
    "ExportMetadata",
    "Precision",
    "read_onnx_metadata",
    "write_onnx_metadata",
]

FORMAT_VERSION = 1
#: the key of the metadata JSON in ONNX ``metadata_props`` and OpenVINO ``rt_info``
METADATA_KEY = "maskdino"
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("pred_logits", "pred_masks", "pred_boxes")
Precision = Literal["fp32", "bf16", "fp16"]


class ExportError(ValueError):
    """A model or setting that cannot be exported, or an exported file that is not one of ours."""


@dataclass
class ExportMetadata:
    """Everything needed to run an exported model.

    Attributes:
        height, width: the fixed input size (multiples of ``size_divisibility``), or None for a dynamic size.
        dynamic: height, width and batch are dynamic.
        pixel_mean, pixel_std: RGB normalisation of ``[0, 255]`` inputs (applied before the model).
        size_divisibility: padded sizes are multiples of it.
        padding_mode: ``aware`` (the ``image_sizes`` input masks the padding) or ``official`` (padding is content).
        test_resize, test_short_edge, test_max_size: the test-time resize (:class:`ResizeShortestEdge`).
        precision: ``fp32`` / ``bf16`` / ``fp16``: the precision the runtime is asked to run in.
        op_form: how the deformable attention op was written in ONNX (``grid_sample``, ``gather`` or ``custom``).
        postprocess: :class:`~maskdino.modeling.postprocess.MaskDINOPostProcessor` keyword arguments.
        classes: the dataset metadata (class names, ids, things), :meth:`DatasetMetadata.to_dict`.
        inputs, outputs: tensor names, in order.
    """

    height: int | None
    width: int | None
    dynamic: bool
    pixel_mean: list[float]
    pixel_std: list[float]
    size_divisibility: int
    padding_mode: str
    test_resize: str
    test_short_edge: int
    test_max_size: int
    precision: str
    op_form: str
    postprocess: dict[str, Any]
    classes: dict[str, Any]
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    outputs: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_experiment(
        cls,
        cfg: ExperimentConfig,
        classes: DatasetMetadata,
        height: int | None,
        width: int | None,
        dynamic: bool,
        precision: str,
        op_form: str,
    ) -> ExportMetadata:
        m, inf = cfg.model, cfg.model.inference
        tasks = [t for t, on in zip(("instance", "panoptic", "semantic"), (inf.instance_on, inf.panoptic_on,
                 inf.semantic_on)) if on]  # fmt: skip
        return cls(
            height=None if dynamic else height,
            width=None if dynamic else width,
            dynamic=dynamic,
            pixel_mean=list(m.pixel_mean),
            pixel_std=list(m.pixel_std),
            size_divisibility=m.size_divisibility,
            padding_mode=m.padding_mode,
            test_resize=cfg.data.test_resize,
            test_short_edge=cfg.data.test_short_edge,
            test_max_size=cfg.data.test_max_size,
            precision=precision,
            op_form=op_form,
            postprocess={
                "focal": not m.decoder.semantic_ce_loss,
                "tasks": tasks,
                "top_k": inf.test_topk_per_image,
                "thing_classes": list(inf.thing_classes),
                "object_mask_threshold": inf.object_mask_threshold,
                "overlap_threshold": inf.overlap_threshold,
                "temperature": inf.temperature,
            },
            classes=classes.to_dict(),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str = "exported model") -> ExportMetadata:
        """Raises ExportError when ``text`` is not our metadata (or of a newer format)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ExportError(f"{source}: its maskdino metadata is not valid JSON") from None
        if not isinstance(data, dict) or data.get("format_version", 0) > FORMAT_VERSION:
            raise ExportError(f"{source}: maskdino metadata of an unknown format (newer maskdino?)")
        try:
            return cls(**data)
        except TypeError as e:
            raise ExportError(f"{source}: incomplete maskdino metadata ({e})") from None


def write_onnx_metadata(onnx_model: Any, metadata: ExportMetadata) -> None:
    """Replace the ``metadata_props`` of the ``onnx.ModelProto`` ``onnx_model`` with ``metadata``."""
    import onnx

    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=metadata.to_json()))


def read_onnx_metadata(path: str | os.PathLike) -> ExportMetadata:
    """The metadata of the ONNX file ``path`` (its weights are not read).

    Raises ExportError when the file is not ONNX or was not exported by maskdino."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise ExportError(
            f"{path} is not a readable ONNX model: {str(e).splitlines()[0] if str(e) else e!r}"
        ) from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path} was not exported by maskdino (no {METADATA_KEY} metadata)")
    return ExportMetadata.from_json(props[METADATA_KEY], str(path))


#: how the deformable attention op is written in the exported graph (see :func:`maskdino.export.export_onnx`):
#: the translations of ``deform_attn.onnx``
OpForm = Literal["grid_sample", "gather", "custom"]
OP_FORMS: tuple[str, ...] = deform_attn.onnx.METHODS
