"""Configuration: the model (:class:`MaskDINOConfig` and its parts), the presets of the official configs, and the
experiment (model + data + solver + train) with YAML/JSON files and ``key=value`` overrides.

Every config is a typed dataclass; building one from a dict (a file, a checkpoint, overrides) is strict: unknown keys,
wrong types, out-of-range values and invalid choices raise :class:`ConfigError` naming the full dotted key.
"""

from .experiment import (
    DataConfig,
    ExperimentConfig,
    SolverConfig,
    TrainConfig,
    apply_overrides,
    get_experiment,
    list_experiments,
    load_experiment,
)
from .io import ConfigError
from .model import (
    BackboneConfig,
    DecoderConfig,
    InferenceConfig,
    LossConfig,
    MaskDINOConfig,
    PaddingMode,
    PixelDecoderConfig,
    load_config,
    save_config,
)
from .presets import PRESETS, get_preset

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "ExperimentConfig",
    "InferenceConfig",
    "LossConfig",
    "MaskDINOConfig",
    "PaddingMode",
    "PixelDecoderConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "get_experiment",
    "get_preset",
    "list_experiments",
    "load_config",
    "load_experiment",
    "save_config",
]
