"""Mask DINO."""
