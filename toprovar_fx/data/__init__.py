"""Offline, seeded training data for the reference model (``procedural``: Pillow-drawn scenes)."""

from .procedural import NUM_CLASSES, class_names, grid, iter_chunks, label_of, make_batch, make_sample, render

__all__ = ["NUM_CLASSES", "class_names", "grid", "iter_chunks", "label_of", "make_batch", "make_sample", "render"]
