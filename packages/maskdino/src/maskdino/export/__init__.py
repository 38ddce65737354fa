"""Export for deployment: ONNX (onnxruntime, TensorRT, ...) and OpenVINO, with the pre/post-processing contract
recorded in the file, and the runtimes behind the same predictor as the PyTorch model.

    maskdino export --weights model.pth --format onnx --output model.onnx [--height 800 --width 1344] [--dynamic]
    maskdino predict photo.jpg --backend onnxruntime --model model.onnx --out preds/

onnx, onnxscript, onnxruntime and openvino are optional (``pip install "maskdino[export]"``); ``import maskdino``
never needs them.
"""

from .metadata import ExportError, ExportMetadata, read_onnx_metadata
from .onnx import default_size, export_onnx, export_openvino, openvino_from_onnx

__all__ = [
    "ExportError",
    "ExportMetadata",
    "default_size",
    "export_onnx",
    "export_openvino",
    "openvino_from_onnx",
    "read_onnx_metadata",
]
