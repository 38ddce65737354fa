"""Reusable DETR-family building blocks."""
