"""Checkpoint files: safe loading, atomic saving and conversion of the official Mask DINO checkpoints.

Loading never executes arbitrary pickled code: ``.pth``/``.pt`` go through ``torch.load(weights_only=True)``
(with numpy arrays allowed, as some detectron2 files hold them), detectron2 ``.pkl`` files through a
restricted unpickler that only builds numpy arrays, numpy dtypes/scalars and builtin containers, and
``.safetensors`` through safetensors.

Official key map (:func:`convert_official_state_dict`), applied in this order:

=============================================  ==============================================
official (detectron2 ``MaskDINO`` model)        ours
=============================================  ==============================================
``criterion.empty_weight``                      dropped (a constant of the CE loss)
``sem_seg_head.<rest>``                         ``<rest>`` (``pixel_decoder.*``, ``predictor.*``)
``backbone.stem.conv1.weight``                  ``backbone.conv1.weight``
``backbone.stem.conv1.norm.*``                  ``backbone.bn1.*``
``backbone.res{s}.{b}.conv{k}.weight``          ``backbone.layer{s-1}.{b}.conv{k}.weight``
``backbone.res{s}.{b}.conv{k}.norm.*``          ``backbone.layer{s-1}.{b}.bn{k}.*``
``backbone.res{s}.{b}.shortcut.weight``         ``backbone.layer{s-1}.{b}.downsample.0.weight``
``backbone.res{s}.{b}.shortcut.norm.*``         ``backbone.layer{s-1}.{b}.downsample.1.*``
``backbone.*`` (Swin)                           unchanged (same layout)
``predictor._bbox_embed.*``                     ``predictor.bbox_embed.*``
``predictor.bbox_embed.{i}.*``                  checked equal to ``_bbox_embed``, dropped
``predictor.decoder.bbox_embed.{i}.*``          checked equal, -> ``predictor.decoder.bbox_embed.*``
``predictor.decoder.norm.*``                    checked equal to ``predictor.decoder_norm.*``, kept
=============================================  ==============================================

In the official model one box MLP (``_bbox_embed``) is shared by all decoder layers and the encoder
head, and the decoder's final LayerNorm is the head's ``decoder_norm``; its state dict repeats them
under 9 + 9 + 1 and 2 names (110 alias keys). Our model shares the same objects but registers them once
per owning module (``predictor.bbox_embed`` = ``predictor.decoder.bbox_embed``, ``predictor.decoder_norm``
= ``predictor.decoder.norm``); when a model is given, alias names are matched to the names its
``state_dict`` actually has.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "convert_official_state_dict",
    "load_into_model",
    "load_official_checkpoint",
    "load_state_dict_file",
    "match_aliases",
    "restricted_pickle_load",
    "save_checkpoint",
]


# ------------------------------------------------------------------------------------------------ saving


def _dedup_shared(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, cloning those that share storage (safetensors refuses shared memory)."""
    out: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"safetensors can only store tensors; {k!r} is {type(v).__name__}")
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        out[k] = t
    return out


def save_checkpoint(obj: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same directory, fsync, ``os.replace``.

    A crash or an exception during the write leaves any previous file at ``path`` untouched and no
    partial file behind.

    Args:
        obj: for ``.safetensors`` a mapping ``name -> Tensor`` (a state dict); otherwise anything
            ``torch.save`` accepts.
        path: destination; the suffix ``.safetensors`` selects safetensors, anything else ``torch.save``.
        metadata: safetensors only: string metadata stored in the header.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".safetensors":
                from safetensors.torch import save as st_save

                if not isinstance(obj, Mapping):
                    raise TypeError("a .safetensors checkpoint must be a mapping of tensors")
                f.write(st_save(_dedup_shared(obj), metadata=dict(metadata) if metadata else None))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; not possible on every platform / filesystem)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------------------------- loading


def _numpy_core(submodule: str) -> Any:
    import importlib

    for root in ("numpy._core", "numpy.core"):  # numpy >= 2 renamed numpy.core
        try:
            return importlib.import_module(f"{root}.{submodule}")
        except ImportError:
            continue
    raise ImportError(f"numpy core module {submodule} not found")


_ALLOWED_BUILTINS = {
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("__builtin__", "set"),  # Python 2 pickles
    ("__builtin__", "frozenset"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only numpy arrays/dtypes/scalars and builtin containers; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "_reconstruct",
            "scalar",
        ):
            return getattr(_numpy_core("multiarray"), name)
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _numpy_core("numeric")._frombuffer
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType") and hasattr(np.dtypes, name):
            return getattr(np.dtypes, name)
        if (module, name) in _ALLOWED_BUILTINS:
            import builtins
            import collections

            return getattr(collections if module == "collections" else builtins, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module}.{name}: only numpy arrays and builtin containers are allowed"
        )


def restricted_pickle_load(path: str | os.PathLike) -> Any:
    """Unpickle a detectron2-style ``.pkl`` (numpy arrays in dicts) without running arbitrary code.

    Raises:
        pickle.UnpicklingError: the file references anything but numpy arrays/dtypes and containers.
    """
    with open(path, "rb") as f:
        # latin1: the MSRA / Caffe2 detectron pickles were written by Python 2.
        return _RestrictedUnpickler(f, encoding="latin1").load()


def _to_tensor(v: Any, key: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray | np.generic):
        arr = np.asarray(v)
        if arr.dtype == object:
            raise TypeError(f"{key}: object arrays are not weights")
        return torch.from_numpy(np.array(arr, copy=True, order="C"))  # keeps 0-d scalars 0-d
    raise TypeError(f"{key}: expected an array or tensor, got {type(v).__name__}")


def _unwrap(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The state dict inside a checkpoint object (detectron2 ``{"model": sd, ...}``, ``{"state_dict": sd}``)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        return dict(obj)
    if isinstance(obj, nn.Module):  # not reachable with weights_only, kept for clarity
        return obj.state_dict()
    raise TypeError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")


def _numpy_safe_globals() -> list[Any]:
    items: list[Any] = [
        np.ndarray,
        np.dtype,
        _numpy_core("multiarray")._reconstruct,
        _numpy_core("multiarray").scalar,
    ]
    items += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return items


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` or detectron2 ``.pkl``, safely.

    detectron2 files are ``{"model": state_dict, ...}``; the ``model`` entry is returned. Numpy arrays
    (``.pkl`` files, some ``.pth``) become tensors; non-tensor entries (e.g. ``__author__`` strings) of
    the state dict are dropped.

    Returns:
        ``{name: Tensor}`` on CPU.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix == ".pkl":
        obj = restricted_pickle_load(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Some detectron2 checkpoints store numpy arrays: allow exactly those, still weights-only.
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = _unwrap(obj, path)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, Tensor | np.ndarray | np.generic) and not (
            isinstance(v, np.ndarray) and v.dtype == object
        ):
            out[k] = _to_tensor(v, k)
    return out


# -------------------------------------------------------------------------------------------- conversion

_RES_BLOCK = re.compile(r"^backbone\.res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(.+)$")
_BBOX_LAYER = re.compile(r"^predictor\.(decoder\.)?bbox_embed\.(\d+)\.(.+)$")

#: alias key prefixes of shared modules in our model -> canonical prefix.
ALIASES: dict[str, str] = {
    "predictor.decoder.bbox_embed.": "predictor.bbox_embed.",
    "predictor.decoder.norm.": "predictor.decoder_norm.",
}


def _convert_resnet_key(key: str) -> str:
    """detectron2 ResNet key -> torchvision key (unchanged if not a detectron2 ResNet key)."""
    if key.startswith("backbone.stem.conv1."):
        rest = key.removeprefix("backbone.stem.conv1.")
        return (
            "backbone.bn1." + rest.removeprefix("norm.")
            if rest.startswith("norm.")
            else "backbone.conv1." + rest
        )
    m = _RES_BLOCK.match(key)
    if not m:
        return key
    stage, block, conv, norm, rest = m.groups()
    layer = f"backbone.layer{int(stage) - 1}.{block}."
    if conv == "shortcut":
        return layer + ("downsample.1." if norm else "downsample.0.") + rest
    k = conv[-1]
    return layer + (f"bn{k}." if norm else f"conv{k}.") + rest


def _check_same(a: Tensor, b: Tensor, what: str) -> None:
    # Meta tensors (key/shape-only checks) have no values to compare.
    if a.shape != b.shape or (not (a.is_meta or b.is_meta) and not torch.equal(a, b)):
        raise ValueError(
            f"{what}: the shared copies differ; this is not a Mask DINO checkpoint with tied modules"
        )


def convert_official_state_dict(sd: Mapping[str, Tensor], backbone: str | None = None) -> dict[str, Tensor]:
    """Official (detectron2) Mask DINO state dict -> ours (see the module docstring for the table).

    Args:
        sd: the official ``model`` state dict (``backbone.*``, ``sem_seg_head.*``, ``criterion.*``).
        backbone: ``"resnet"`` (detectron2 ResNet -> torchvision names), ``"swin"`` (unchanged) or None to
            detect it from the keys (``backbone.stem.*`` means ResNet).

    Returns:
        A new dict; tensors are shared with ``sd`` (not copied). Keys the table does not cover pass through
        unchanged, so that loading reports them.

    Raises:
        ValueError: aliases of a shared module whose values differ, or an unknown ``backbone``.
    """
    if backbone is None:
        backbone = "resnet" if any(k.startswith("backbone.stem.") for k in sd) else "swin"
    if backbone not in ("resnet", "swin"):
        raise ValueError(f"backbone must be 'resnet' or 'swin', got {backbone!r}")
    stage1: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith("criterion."):
            continue  # empty_weight: a loss constant rebuilt from the config
        key = key.removeprefix("sem_seg_head.")
        if backbone == "resnet" and key.startswith("backbone."):
            key = _convert_resnet_key(key)
        stage1[key] = value

    out: dict[str, Tensor] = {}
    per_layer: list[tuple[str, str, Tensor]] = []
    for key, value in stage1.items():
        if key.startswith("predictor._bbox_embed."):
            out["predictor.bbox_embed." + key.removeprefix("predictor._bbox_embed.")] = value
            continue
        m = _BBOX_LAYER.match(key)
        if m:
            per_layer.append((key, m.group(3), value))
            continue
        out[key] = value
    has_shared = any(k.startswith("predictor.bbox_embed.") for k in out)
    for key, rest, value in per_layer:
        canonical = "predictor.bbox_embed." + rest
        if has_shared:
            _check_same(value, out[canonical], f"{key} vs predictor._bbox_embed.{rest}")
        elif canonical in out:
            _check_same(value, out[canonical], f"{key} vs {canonical}")
        else:  # a checkpoint without the ``_bbox_embed`` entry: take the first copy
            out[canonical] = value
        if key.startswith("predictor.decoder."):
            out["predictor.decoder.bbox_embed." + rest] = out[canonical]
    for key in [k for k in out if k.startswith("predictor.decoder.norm.")]:
        other = "predictor.decoder_norm." + key.removeprefix("predictor.decoder.norm.")
        if other in out:
            _check_same(out[key], out[other], f"{key} vs {other}")
    return out


def _canonical(key: str) -> str:
    for alias, canon in ALIASES.items():
        if key.startswith(alias):
            return canon + key.removeprefix(alias)
    return key


def match_aliases(sd: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """Rename / fill / drop alias keys of shared modules so that ``sd`` uses the names of ``model_keys``.

    A key the model has whose canonical name (see :data:`ALIASES`) is in ``sd`` gets that value; an alias
    key of ``sd`` the model does not have is dropped when the model has its canonical name.
    """
    model_keys = list(model_keys)
    wanted = set(model_keys)
    wanted_canon = {_canonical(w) for w in model_keys}
    by_canon: dict[str, Tensor] = {}
    for k, v in sd.items():
        by_canon.setdefault(_canonical(k), v)
    # Keep what the model names, and anything whose canonical name it lacks (reported as unexpected).
    out = {k: v for k, v in sd.items() if k in wanted or _canonical(k) not in wanted_canon}
    for k in model_keys:
        if k not in out and _canonical(k) in by_canon:
            out[k] = by_canon[_canonical(k)]
    return out


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit a model: lists missing, unexpected and shape-mismatched keys by name."""


@dataclass
class LoadReport:
    """Result of :func:`load_into_model`."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs model shape"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 50) -> str:
        parts = []
        for name, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:limit]) + (
                    f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
                )
                parts.append(f"{len(keys)} {name}: {shown}")
        return "; ".join(parts) if parts else "all keys matched"


def load_into_model(model: nn.Module, sd: Mapping[str, Tensor], strict: bool = True) -> LoadReport:
    """Load ``sd`` into ``model``, comparing names and shapes first.

    Raises:
        CheckpointMismatchError: when ``strict`` and any key is missing, unexpected or of another shape
            (nothing is loaded then). Non-strict loading loads the matching keys and returns the report.
    """
    own = model.state_dict()
    report = LoadReport(
        missing=sorted(k for k in own if k not in sd),
        unexpected=sorted(k for k in sd if k not in own),
        mismatched=sorted(
            f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
            for k in sd
            if k in own and sd[k].shape != own[k].shape
        ),
    )
    if strict and not report.ok:
        raise CheckpointMismatchError(
            f"checkpoint does not match {type(model).__name__}: {report.describe()}"
        )
    bad = {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return report


def load_official_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    strict: bool = True,
    backbone: str | None = None,
) -> dict[str, Tensor]:
    """Read an official Mask DINO checkpoint (``.pth``/``.pkl``) and convert it to our names.

    Args:
        path: the released detectron2 checkpoint (``{"model": state_dict, ...}``).
        model: if given, the converted weights are loaded into it (alias names matched to its state dict).
        strict: with a model: raise :class:`CheckpointMismatchError` listing every missing, unexpected and
            shape-mismatched key instead of loading partially.
        backbone: ``resnet`` / ``swin`` / None (detect).

    Returns:
        The converted state dict (for ``model``'s names when a model is given).
    """
    sd = convert_official_state_dict(load_state_dict_file(path), backbone=backbone)
    if model is not None:
        sd = match_aliases(sd, model.state_dict().keys())
        load_into_model(model, sd, strict=strict)
    return sd
