"""Build script for the optional C speed-up (``coco_eval._speedups``); everything else is in pyproject.toml.

``optional=True``: without a working compiler the build skips the extension and the package falls back to
numpy for the same checks.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("coco_eval._speedups", ["src/coco_eval/_speedups.c"], optional=True)])
