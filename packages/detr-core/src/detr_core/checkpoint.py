"""Checkpoint files for DETR-family models: safe reading, atomic writing, key maps from foreign layouts, strict loading.

Reading never executes pickled code: ``.pth``/``.pt``/``.bin`` go through ``torch.load(weights_only=True)`` (numpy
arrays and ``argparse.Namespace`` allowed, as detectron2 and DINO files hold them), detectron2 ``.pkl`` files through
a restricted unpickler that only builds numpy arrays, numpy dtypes/scalars and builtin containers, and
``.safetensors`` through safetensors. A file that cannot be read that way raises :class:`CheckpointError` naming the
file and the reason (never a suggestion to load it unsafely).

Foreign layouts (an official repository's key names) are converted by a :class:`KeyMap`: ordered regular-expression
rules applied to every key. Several source keys may map to one target key when the source model registered one
module under several names (DETR-family decoders share their box head between layers): their tensors must be equal,
else :class:`KeyMapError` names both. :func:`match_aliases` then spreads a canonical key to every name a model uses
for a shared module, and :func:`load_into_model` loads strictly, listing every missing, unexpected or
shape-mismatched key.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ForeignLayoutError",
    "KeyMap",
    "KeyMapError",
    "LoadReport",
    "check_finite",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_foreign_checkpoint",
    "load_into_model",
    "load_state_dict_file",
    "match_aliases",
    "remove_orphaned_temporaries",
    "restricted_pickle_load",
    "save_checkpoint",
    "strip_prefix",
]

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A file is not a checkpoint this code can read safely (corrupt, truncated, foreign, or it would run code)."""


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


def save_checkpoint(obj: Any, path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    ``.safetensors`` paths take a mapping of tensors (shared storage is cloned; ``metadata`` goes into the header);
    anything else is written with ``torch.save``. An interrupted or failed write (disk full, a signal) leaves the
    previous file at ``path`` untouched and removes the temporary file; only a hard kill can leave a temporary file
    behind, named ``.<name>.<random>.tmp`` (see :func:`remove_orphaned_temporaries`).
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


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def remove_orphaned_temporaries(folder: PathLike, names: Iterable[str] | re.Pattern[str]) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` left in ``folder`` when a process was killed while
    writing.

    Only files named ``.<name>.<random>.tmp`` whose ``<name>`` is in ``names`` (or matches the pattern) are removed,
    so other programs' files are never touched. Call it before the first save of a run, when no other writer of the
    same folder can be active.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = names if isinstance(names, re.Pattern) else None
    fixed = None if wanted is not None else set(names)  # type: ignore[arg-type]
    removed = []
    for p in folder.iterdir():
        m = _TMP_NAME.match(p.name)
        if not m or not p.is_file():
            continue
        name = m.group("name")
        if (wanted is not None and wanted.fullmatch(name)) or (fixed is not None and name in fixed):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------- reading


def _numpy_core(submodule: str) -> Any:
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


def restricted_pickle_load(path: PathLike) -> Any:
    """Unpickle a detectron2-style ``.pkl`` (numpy arrays in dicts) without running arbitrary code.

    Raises:
        pickle.UnpicklingError: the file references anything but numpy arrays/dtypes and containers.
    """
    with open(path, "rb") as f:
        # latin1: the MSRA / Caffe2 detectron pickles were written by Python 2.
        return _RestrictedUnpickler(f, encoding="latin1").load()


def _safe_globals() -> list[Any]:
    items: list[Any] = [
        np.ndarray,
        np.dtype,
        _numpy_core("multiarray")._reconstruct,
        _numpy_core("multiarray").scalar,
        argparse.Namespace,  # DINO / Deformable DETR checkpoints store their command line as ``args``
    ]
    items += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return items


# torch's weights-only unpickler names the global it refused in one of these forms (torch 2.6 - 2.14)
_UNSUPPORTED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


_REFUSED_GLOBAL = re.compile(r"refusing to unpickle global ([\w.]+)")


def _why_unreadable(exc: BaseException) -> str:
    """A short reason for a failed safe load, without torch's advice to disable ``weights_only``."""
    text = str(exc)
    m = _UNSUPPORTED_GLOBAL.search(text) or _REFUSED_GLOBAL.search(text)
    if m:
        return f"it would run code or build objects that are not weights ({m.group(1)}); refusing to load it"
    if "central directory" in text or "zip archive" in text or isinstance(exc, zipfile.BadZipFile | EOFError):
        return "it is truncated or corrupt (not a complete checkpoint archive)"
    return f"it is not a PyTorch, safetensors or detectron2 checkpoint ({type(exc).__name__})"


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise
        # A plain pickle (not torch's zip format): torch's weights-only unpickler stops at opcodes it does not know
        # before it sees what the file would build; the restricted unpickler reads it to the end and names that.
        return restricted_pickle_load(path)


def load_checkpoint_file(path: PathLike) -> Any:
    """The object stored in a checkpoint file, read safely (see the module docstring).

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder).
        CheckpointError: the file cannot be read safely; the message names the file and why.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path}" + (" (it is a folder)" if path.is_dir() else "")
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix == ".pkl":
            return restricted_pickle_load(path)
        return _torch_load(path)
    except (OSError, MemoryError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        if not isinstance(exc, MemoryError) and exc.errno is not None:
            raise  # a real I/O error (permissions, disk), not a format problem
        raise CheckpointError(f"{path} is not a valid checkpoint: {_why_unreadable(exc)}") from None
    except Exception as exc:  # every parser error of every format means the same to the user
        raise CheckpointError(f"{path} is not a valid checkpoint: {_why_unreadable(exc)}") from None


def _to_tensor(v: Any, key: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.ndarray | np.generic):
        arr = np.asarray(v)
        if arr.dtype == object:
            raise TypeError(f"{key}: object arrays are not weights")
        return torch.from_numpy(np.array(arr, copy=True, order="C"))  # keeps 0-d scalars 0-d
    raise TypeError(f"{key}: expected an array or tensor, got {type(v).__name__}")


def extract_state_dict(
    obj: Any, source: PathLike | str = "checkpoint", key: str | None = None
) -> dict[str, Tensor]:
    """The state dict inside a checkpoint object: ``{"model": sd, ...}`` (detectron2, DINO, ours),
    ``{"state_dict": sd}`` or ``sd`` itself. Numpy arrays become tensors; non-tensor entries (e.g. ``__author__``
    strings) are dropped.

    Args:
        key: take ``obj[key]`` (e.g. ``"ema_model"``, the EMA weights DINO / Deformable DETR files may hold) instead
            of looking for ``model`` / ``state_dict``.

    Raises:
        CheckpointError: no mapping of tensors inside, or no ``key`` entry (the message lists the entries).
    """
    sd: Any = obj
    if key is not None:
        if not (isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping)):
            have = sorted(str(k) for k in obj) if isinstance(obj, Mapping) else []
            raise CheckpointError(f"{source}: has no {key!r} weights (entries: {have[:20]})")
        sd = obj[key]
    elif isinstance(obj, Mapping):
        for k in ("model", "state_dict"):
            if k in obj and isinstance(obj[k], Mapping):
                sd = obj[k]
                break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: expected a dict of weights, got {type(obj).__name__}")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if isinstance(v, Tensor | np.ndarray | np.generic) and not (
            isinstance(v, np.ndarray) and v.dtype == object
        ):
            out[str(k)] = _to_tensor(v, str(k))
    if sd and not out:
        raise CheckpointError(f"{source}: holds no tensors (not a weights file)")
    return out


def strip_prefix(sd: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """``sd`` with ``prefix`` removed from the keys that start with it (``module.``: a model saved inside
    ``DistributedDataParallel``); other keys unchanged."""
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def load_state_dict_file(path: PathLike) -> dict[str, Tensor]:
    """Read the state dict of a ``.safetensors``, ``.pth``/``.pt``/``.bin`` or detectron2 ``.pkl`` file, safely.

    Returns:
        ``{name: Tensor}`` on CPU.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`load_checkpoint_file` and :func:`extract_state_dict`.
    """
    return extract_state_dict(load_checkpoint_file(path), path)


def check_finite(sd: Mapping[str, Tensor], source: PathLike | str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first floating-point tensor with a NaN or infinite value."""
    for k, v in sd.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(
                f"{source}: tensor {k!r} {tuple(v.shape)} has {bad} non-finite value(s) (NaN/inf); the weights are "
                "unusable (a diverged training run?)"
            )


# -------------------------------------------------------------------------------------------- key maps


class KeyMapError(ValueError):
    """A foreign state dict does not fit a key map (e.g. copies of a shared module differ)."""


class ForeignLayoutError(CheckpointError):
    """A state dict is not in the layout a key map converts from (another model's checkpoint)."""


Replacement = str | Callable[[re.Match[str]], str] | None


def _same(a: Tensor, b: Tensor) -> bool:
    # Meta tensors (key/shape-only checks) have no values to compare.
    return a.shape == b.shape and (a.is_meta or b.is_meta or torch.equal(a, b))


@dataclass(frozen=True)
class KeyMap:
    """Ordered renaming rules from a foreign state-dict layout to ours.

    Every rule ``(pattern, replacement)`` is applied in order to every key with ``re.sub(pattern, replacement, key,
    count=1)`` (``\\1`` etc. refer to groups; the replacement may be a function of the match, e.g. to renumber
    stages); a replacement of ``None`` drops keys that match. Keys no rule touches
    pass through unchanged, so a strict load reports them.

    When several source keys end up with the same name (one module registered under several names in the source
    model), their tensors must be equal; the first one is kept.

    ``name`` names the source layout in messages; ``signature`` holds patterns that the source layout always has
    (at least one key matches each): :meth:`check_source` raises :class:`ForeignLayoutError` for a state dict
    that lacks one, i.e. a checkpoint of another model, before any key-by-key comparison.
    """

    rules: Sequence[tuple[str, Replacement]]
    name: str = "foreign"
    signature: Sequence[str] = ()
    _compiled: tuple[tuple[re.Pattern[str], Replacement], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.rules))

    def map_key(self, key: str) -> str | None:
        """Our name of ``key`` (None: dropped)."""
        for pattern, repl in self._compiled:
            if pattern.search(key):
                if repl is None:
                    return None
                key = pattern.sub(repl, key, count=1)
        return key

    def convert(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``sd`` in our names; tensors are shared, not copied.

        Raises:
            KeyMapError: two source keys map to one name but hold different tensors.
        """
        out: dict[str, Tensor] = {}
        origin: dict[str, str] = {}
        for key, value in sd.items():
            new = self.map_key(key)
            if new is None:
                continue
            if new in out:
                if not _same(out[new], value):
                    raise KeyMapError(
                        f"{key} and {origin[new]} both map to {new} but differ: the checkpoint's copies of a shared "
                        "module are not tied"
                    )
                continue
            out[new] = value
            origin[new] = key
        return out

    def check_source(self, sd: Mapping[str, Tensor], source: PathLike | str = "checkpoint") -> None:
        """Raise :class:`ForeignLayoutError` unless every ``signature`` pattern matches a key of ``sd``."""
        missing = [p for p in self.signature if not any(re.search(p, k) for k in sd)]
        if missing:
            sample = ", ".join(list(sd)[:5]) or "none"
            raise ForeignLayoutError(
                f"{source} is not a {self.name} checkpoint: no key matches {missing} (its {len(sd)} keys begin "
                f"with: {sample})"
            )

    def to_source(self, sd: Mapping[str, Tensor], source_keys: Iterable[str]) -> dict[str, Tensor]:
        """The inverse of :meth:`convert` for a known source layout: ``{k: sd[map_key(k)]}`` for every source key
        ``k`` that is not dropped (copies of a shared module all get the same tensor).

        Raises:
            KeyMapError: a source key maps to a name ``sd`` does not have.
        """
        out: dict[str, Tensor] = {}
        for key in source_keys:
            new = self.map_key(key)
            if new is None:
                continue
            if new not in sd:
                raise KeyMapError(f"{key} maps to {new}, which the state dict does not have")
            out[key] = sd[new]
        return out


def match_aliases(
    sd: Mapping[str, Tensor], model_keys: Iterable[str], aliases: Mapping[str, str]
) -> dict[str, Tensor]:
    """Rename / fill / drop alias keys of shared modules so that ``sd`` uses the names of ``model_keys``.

    ``aliases`` maps an alias key prefix to its canonical prefix (e.g. ``{"decoder.bbox_embed.": "bbox_embed."}``).
    A key the model has whose canonical name is in ``sd`` gets that value; an alias key of ``sd`` the model does not
    have is dropped when the model has its canonical name.
    """

    def canonical(key: str) -> str:
        for alias, canon in aliases.items():
            if key.startswith(alias):
                return canon + key.removeprefix(alias)
        return key

    model_keys = list(model_keys)
    wanted = set(model_keys)
    wanted_canon = {canonical(w) for w in model_keys}
    by_canon: dict[str, Tensor] = {}
    for k, v in sd.items():
        by_canon.setdefault(canonical(k), v)
    # Keep what the model names, and anything whose canonical name it lacks (reported as unexpected).
    out = {k: v for k, v in sd.items() if k in wanted or canonical(k) not in wanted_canon}
    for k in model_keys:
        if k not in out and canonical(k) in by_canon:
            out[k] = by_canon[canonical(k)]
    return out


# ---------------------------------------------------------------------------------------- strict loading


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
        CheckpointMismatchError: when ``strict`` and any key is missing, unexpected or of another shape (nothing is
            loaded then). Non-strict loading loads the matching keys and returns the report.
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


def load_foreign_checkpoint(
    path: PathLike,
    key_map: KeyMap,
    model: nn.Module | None = None,
    aliases: Mapping[str, str] | None = None,
    key: str | None = None,
    strict: bool = True,
) -> dict[str, Tensor]:
    """Read a checkpoint of another code base and convert it to our names (strictly by default).

    Steps: :func:`load_checkpoint_file` (safe), :func:`extract_state_dict` (``model``, or ``key`` such as
    ``"ema_model"``), :func:`strip_prefix` (``module.``), :meth:`KeyMap.check_source`, :meth:`KeyMap.convert`; with
    a ``model``, :func:`match_aliases` with ``aliases`` and :func:`load_into_model`.

    Raises:
        FileNotFoundError, CheckpointError: unreadable file; ForeignLayoutError: another model's layout;
        KeyMapError: untied copies of a shared module; CheckpointMismatchError: (strict) missing, unexpected or
        shape-mismatched keys, all listed.

    Returns:
        The converted state dict (for ``model``'s names when a model is given).
    """
    sd = strip_prefix(extract_state_dict(load_checkpoint_file(path), path, key=key))
    key_map.check_source(sd, path)
    sd = key_map.convert(sd)
    if model is not None:
        sd = match_aliases(sd, model.state_dict().keys(), aliases or {})
        load_into_model(model, sd, strict=strict)
    return sd
