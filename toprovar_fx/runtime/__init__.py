"""Per-generation state of the backend: scale clock, entropy statistics, decisions, reports."""
