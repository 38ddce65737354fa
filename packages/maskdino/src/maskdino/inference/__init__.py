"""Inference outside training: the image predictor (read, resize, run, post-process) and drawing of predictions."""

from .predictor import ImagePredictor, LoadedModel, expand_image_paths, load_model

__all__ = ["ImagePredictor", "LoadedModel", "expand_image_paths", "load_model"]
