"""Deprecated alias of :mod:`maskdino.modeling.model` (removed in 0.3)."""

from maskdino._deprecated import moved

moved(__name__, "maskdino.modeling.model")

from maskdino.modeling.model import *  # noqa: E402, F403
from maskdino.modeling.model import __all__  # noqa: E402, F401
