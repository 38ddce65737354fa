"""Strict dataclass <-> dict conversion and YAML/JSON config files, shared by the model and experiment configs.

``dataclass_from_dict`` checks every value against the field's type hint (``bool``, ``int``, ``float``,
``str``, ``list[...]``, ``X | None`` and nested dataclasses) and names the full dotted key in every error,
so a typo deep in a YAML file is reported as e.g. ``unknown config key 'decoder.num_querys'``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Self

__all__ = [
    "CONFIG_SUFFIXES",
    "ConfigError",
    "DictConfig",
    "dataclass_from_dict",
    "read_config_file",
    "write_config_file",
]

#: file suffixes :func:`read_config_file` / :func:`write_config_file` understand.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type or inconsistent values)."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); any other hint -> (hint, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), type(None) in args
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp``; ints are accepted (and converted) for float fields."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed")
    if dataclasses.is_dataclass(base):
        return dataclass_from_dict(base, value, key + ".")
    if typing.get_origin(base) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is a subclass of int: `true` must not pass as an int/float, nor `1` as a bool.
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def dataclass_from_dict(cls: type, d: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; missing keys keep their defaults.

    Args:
        cls: the dataclass type.
        d: its values (nested dataclass fields take nested dicts).
        prefix: dotted path of ``d`` inside the whole config, with a trailing dot (``"solver."``), used in
            error messages; ``""`` at the root.

    Raises:
        ConfigError: ``d`` is not a mapping, a key is not a field (named with its full dotted path), or a
            value does not match the field's type.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix + key!r}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


class DictConfig:
    """Mixin for config dataclasses: strict ``from_dict`` / ``to_dict`` and a ``validate`` hook."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Strict inverse of :meth:`to_dict`; missing keys keep their defaults, then :meth:`validate` runs.

        Raises:
            ConfigError: unknown key at any depth (named with its full dotted path), a value of the wrong
                type, or inconsistent values.
        """
        cfg = dataclass_from_dict(cls, d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values (nothing to check by default)."""


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"unsupported config file type {path.suffix!r} (use .yaml, .yml or .json)")
    return suffix


def read_config_file(path: str | Path) -> Any:
    """Parse a ``.yaml``/``.yml`` (an empty file is ``{}``) or ``.json`` file."""
    path = Path(path)
    text = path.read_text()
    if _suffix(path) == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def write_config_file(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as YAML (keys in insertion order) or JSON, by suffix; creates the parent folder."""
    path = Path(path)
    if _suffix(path) == ".json":
        text = json.dumps(data, indent=2)
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
