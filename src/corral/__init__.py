"""Corral: self-hosted sandboxes for AI agents and untrusted code."""

__version__ = "0.1.0"
