"""Deprecated alias of :mod:`maskdino.config` (removed in 0.3)."""

from maskdino._deprecated import moved

moved(__name__, "maskdino.config")

from maskdino.config.experiment import *  # noqa: E402, F403
from maskdino.config.experiment import __all__  # noqa: E402, F401
