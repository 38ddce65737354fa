"""The one exception type this package raises for bad input."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad evaluation input: the message names the file (or argument) and the offending field.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working; raised
    instead of the bare ``KeyError``/``AssertionError`` that pycocotools and panopticapi produce.
    """
