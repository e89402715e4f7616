"""kvcat: serve KV-CAT models with on-the-fly KV-cache compaction (Attention Matching)."""

__version__ = "0.1.0"
