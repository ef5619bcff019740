"""Dreamloom: a self-hosted, Midjourney-style image studio for Discord communities."""

__version__ = "0.1.0"
