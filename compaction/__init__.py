"""kvcat.compaction"""
