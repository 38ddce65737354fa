"""Deprecated alias of :mod:`maskdino.cpu_inference.allocator` (removed in 0.3)."""

from maskdino._deprecated import moved

moved(__name__, "maskdino.cpu_inference.allocator")

from maskdino.cpu_inference.allocator import *  # noqa: E402, F403
from maskdino.cpu_inference.allocator import __all__  # noqa: E402, F401
