"""Evaluation harness: method-independent metrics over any prefix -> cache function."""
