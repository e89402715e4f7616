"""Typed loaders for long documents, QA, needle-in-a-haystack and synthetic retrieval."""
