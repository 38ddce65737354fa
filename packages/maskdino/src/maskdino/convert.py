"""Deprecated alias of :mod:`maskdino.cli.convert` (removed in 0.3)."""

from maskdino._deprecated import moved

moved(__name__, "maskdino.cli.convert")

from maskdino.cli.convert import build_parser, convert_main  # noqa: E402

__all__ = ["build_parser", "convert_main"]
