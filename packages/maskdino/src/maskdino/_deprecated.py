"""Old module paths of maskdino 0.1, kept as aliases of the new ones for one release (see CHANGELOG.md)."""

from __future__ import annotations

import warnings


def moved(old: str, new: str) -> None:
    """Warn once that module ``old`` is now ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in maskdino 0.3; import {new} instead",
        DeprecationWarning,
        stacklevel=3,
    )
