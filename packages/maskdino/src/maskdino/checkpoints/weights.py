"""Model weight files: ours (training checkpoints, converted or exported weights) and the official ones.

Every file is read safely (:mod:`detr_core.checkpoint`). A file may embed the experiment config it runs with and the
dataset metadata (class names): training checkpoints (``{"model", "config", "metadata", ...}``), converted official
checkpoints (``maskdino convert --preset``) and :func:`save_weights` files; in ``.safetensors`` files they are JSON
strings in the header metadata. Weights are checked to be finite when loaded: a diverged run's weights are an error
naming the first bad tensor, not a model that silently predicts nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from detr_core.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    check_finite,
    extract_state_dict,
    load_checkpoint_file,
    load_into_model,
    match_aliases,
    save_checkpoint,
)

from .official import ALIASES, convert_official_state_dict, is_official_layout

__all__ = ["WeightsFile", "load_model_weights", "read_weights", "save_weights"]

#: version of the layout of our weight files (bumped when key names change; older files are upgraded on load).
FORMAT_VERSION = 1


@dataclass
class WeightsFile:
    """The content of a weights file.

    Attributes:
        path: where it was read from.
        state_dict: the weights in OUR key layout (an official file is converted).
        config: the embedded experiment config (a dict for :meth:`maskdino.config.ExperimentConfig.from_dict`), or
            None.
        metadata: the embedded dataset metadata (class names and ids), or None.
        official: the file held the official (detectron2) layout.
    """

    path: Path
    state_dict: dict[str, Tensor]
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    official: bool = False


def _safetensors_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _json_field(raw: Any, path: Path, key: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its embedded {key} is not valid JSON") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: its embedded {key} is not a mapping")
    return raw


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """Read a weights file of any supported kind (see the module docstring).

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a valid weights file (named), or non-finite weights.
    """
    path = Path(path)
    obj = load_checkpoint_file(path)
    config = metadata = None
    if path.suffix.lower() == ".safetensors":
        header = _safetensors_header(path)
        config = _json_field(header.get("config"), path, "config")
        metadata = _json_field(header.get("metadata"), path, "metadata")
    elif isinstance(obj, dict):
        config = _json_field(obj.get("config"), path, "config")
        metadata = _json_field(obj.get("metadata"), path, "metadata")
    sd = extract_state_dict(obj, path)
    if not sd:
        raise CheckpointError(f"{path} holds no weights")
    official = is_official_layout(sd)
    if official:
        sd = convert_official_state_dict(sd)
    check_finite(sd, path)
    return WeightsFile(path, sd, config, metadata, official)


def load_model_weights(
    model: nn.Module, weights: str | os.PathLike | WeightsFile, strict: bool = True
) -> WeightsFile:
    """Load weights into ``model`` (our key names, or an official checkpoint converted on the fly).

    Raises:
        FileNotFoundError, CheckpointError: see :func:`read_weights`.
        CheckpointMismatchError: ``strict`` and the file does not fit the model (every missing, unexpected or
            shape-mismatched key is listed; e.g. weights of another preset).
    """
    wf = weights if isinstance(weights, WeightsFile) else read_weights(weights)
    sd = match_aliases(wf.state_dict, model.state_dict().keys(), ALIASES)
    try:
        load_into_model(model, sd, strict=strict)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{wf.path}: {e}") from None
    return wf


def save_weights(
    path: str | os.PathLike,
    state_dict: dict[str, Tensor],
    config: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    source: str | None = None,
) -> None:
    """Write model weights with their config and dataset metadata, atomically.

    ``.safetensors``: the tensors, with ``config`` / ``metadata`` as JSON strings in the header; any other suffix: a
    ``torch.save`` dict ``{"model", "config", "metadata", "format_version"}``.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        header = {"format": "pt", "maskdino_format_version": str(FORMAT_VERSION)}
        if config is not None:
            header["config"] = json.dumps(config)
        if metadata is not None:
            header["metadata"] = json.dumps(metadata)
        if source is not None:
            header["source"] = source
        save_checkpoint(state_dict, path, metadata=header)
        return
    obj: dict[str, Any] = {"model": state_dict, "format_version": FORMAT_VERSION}
    if config is not None:
        obj["config"] = config
    if metadata is not None:
        obj["metadata"] = metadata
    if source is not None:
        obj["source"] = source
    save_checkpoint(obj, path)
