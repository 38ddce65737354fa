"""The error raised for bad data: a file, record, annotation or image that cannot be used, named in the message."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data (an unreadable image, a malformed annotation file or record); the message names it."""
