"""Strict dataclass <-> dict conversion and YAML/JSON config files, shared by the model and experiment configs.

``dataclass_from_dict`` checks every value against the field's type hint (``bool``, ``int``, ``float``, ``str``,
``Literal[...]`` choices, ``list[...]``, ``X | None`` and nested dataclasses) and names the full dotted key in every
error, so a typo deep in a YAML file is reported as e.g. ``unknown config key 'decoder.num_querys'``.

Numbers: ints are accepted for float fields; ``2e-4`` is a number (PyYAML follows YAML 1.1, which reads it as a
string; :func:`yaml_load` reads YAML 1.2 floats), as is a string such as ``"1e-4"`` given for a float field. NaN is
never a valid value; infinity only where the field's metadata says ``allow_inf`` (e.g. a time budget).
Value ranges (``>= 0``, ``> 0``) are declared per field with ``metadata={"min": x}`` / ``{"gt": x}`` and checked here,
once, when a config is built from a dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "CONFIG_SUFFIXES",
    "ConfigError",
    "DictConfig",
    "check_ranges",
    "dataclass_from_dict",
    "parse_value",
    "read_config_file",
    "write_config_file",
    "yaml_load",
]

#: file suffixes :func:`read_config_file` / :func:`write_config_file` understand.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

T = TypeVar("T", bound="DictConfig")


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, value out of range or inconsistent values)."""


# ---------------------------------------------------------------------------------------------------- YAML

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads ``1e-4`` / ``2E5`` as floats (YAML 1.2), not as strings (YAML 1.1)."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
    return Loader


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 float syntax (``2e-4`` is a float)."""
    import yaml

    return yaml.load(text, Loader=_loader())


def parse_value(raw: str) -> Any:
    """A command-line override value: YAML (``[1, 2]``, ``true``, ``2e-4``, ``null``); empty -> None.

    Raises:
        ConfigError: the text is not valid YAML.
    """
    import yaml

    if raw == "":
        return None
    try:
        return yaml_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse the value {raw!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- coercion


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); any other hint -> (hint, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), type(None) in args
    return tp, False


def _float(value: Any, key: str, meta: typing.Mapping[str, Any]) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    out = float(value)
    if math.isnan(out):
        raise ConfigError(f"{key}: NaN is not a valid value")
    if math.isinf(out) and not meta.get("allow_inf", False):
        raise ConfigError(f"{key}: must be finite, got {value!r}")
    return out


def _coerce(tp: Any, value: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    """Check ``value`` against the type hint ``tp`` (and the field's metadata)."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: None is not allowed")
    if dataclasses.is_dataclass(base):
        return dataclass_from_dict(base, value, key + ".")  # type: ignore[arg-type]
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{key} = {value!r}; expected one of {list(choices)}")
        return value
    if typing.get_origin(base) is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(base)
        return [_coerce(item, v, f"{key}[{i}]", meta) for i, v in enumerate(value)]
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
        return _float(value, key, meta)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _check_range(value: Any, key: str, meta: typing.Mapping[str, Any]) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if "min" in meta and v < meta["min"]:
            raise ConfigError(f"{key} = {v!r}; must be >= {meta['min']}")
        if "gt" in meta and not v > meta["gt"]:
            raise ConfigError(f"{key} = {v!r}; must be > {meta['gt']}")
        if "max" in meta and v > meta["max"]:
            raise ConfigError(f"{key} = {v!r}; must be <= {meta['max']}")


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Check every field of a (nested) config dataclass against its ``min`` / ``gt`` / ``max`` metadata and against
    its type (``Literal`` choices, finite floats), e.g. after it was changed in Python rather than built from a dict.

    Raises:
        ConfigError: naming the full dotted key.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        _coerce(hints[f.name], value, key, f.metadata)
        _check_range(value, key, f.metadata)


def dataclass_from_dict(cls: type[Any], d: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a (nested) dict; missing keys keep their defaults.

    Args:
        cls: the dataclass type.
        d: its values (nested dataclass fields take nested dicts).
        prefix: dotted path of ``d`` inside the whole config, with a trailing dot (``"solver."``), used in
            error messages; ``""`` at the root.

    Raises:
        ConfigError: ``d`` is not a mapping, a key is not a field (named with its full dotted path), or a
            value does not match the field's type or range.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}")
        meta = fields[key].metadata
        kwargs[key] = _coerce(hints[key], value, prefix + key, meta)
        _check_range(kwargs[key], prefix + key, meta)
    return cls(**kwargs)


class DictConfig:
    """Mixin for config dataclasses: strict ``from_dict`` / ``to_dict`` and a ``validate`` hook."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Strict inverse of :meth:`to_dict`; missing keys keep their defaults, then :meth:`validate` runs.

        Raises:
            ConfigError: unknown key at any depth (named with its full dotted path), a value of the wrong
                type or range, or inconsistent values.
        """
        cfg = dataclass_from_dict(cls, d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent values (nothing to check by default)."""


# --------------------------------------------------------------------------------------------------- files


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"unsupported config file type {path.suffix!r} (use .yaml, .yml or .json)")
    return suffix


def read_config_file(path: str | Path) -> Any:
    """Parse a ``.yaml``/``.yml`` (an empty file is ``{}``) or ``.json`` file.

    Raises:
        FileNotFoundError: no such file. ConfigError: the file does not parse (position named).
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
    import yaml

    try:
        return yaml_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


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
