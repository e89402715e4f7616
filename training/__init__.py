"""kvcat.training"""
