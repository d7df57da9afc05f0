"""Graph passes, one per file; the order is the literal list in ``pipeline.py``."""
