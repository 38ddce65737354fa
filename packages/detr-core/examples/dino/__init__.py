"""DINO-4scale (IDEA-Research/DINO) built from detr-core parts: the model, the official checkpoint layout, training.

Importable without maskdino: put ``packages/detr-core/examples`` on ``sys.path`` and ``import dino``.
"""

from .checkpoint import ALIASES, LAYOUTS, OFFICIAL_KEY_MAP, load_official_checkpoint, read_layout, to_official
from .model import DINO, TINY, DINOConfig, build_criterion, normalize, param_groups

__all__ = [
    "ALIASES",
    "DINO",
    "LAYOUTS",
    "OFFICIAL_KEY_MAP",
    "TINY",
    "DINOConfig",
    "build_criterion",
    "load_official_checkpoint",
    "normalize",
    "param_groups",
    "read_layout",
    "to_official",
]
