"""CPU-speed helpers for inference processes: glibc malloc tuning (:mod:`.allocator`) and NNPACK Winograd 3x3
convolutions (:mod:`.winograd`). Each is exact or bounded in error and documented with what it costs."""

from .allocator import retain_freed_memory
from .winograd import conv2d_inference

__all__ = ["conv2d_inference", "retain_freed_memory"]
