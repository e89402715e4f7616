"""kvcat.server"""
