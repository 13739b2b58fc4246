"""Errors of bringing a deployment up, shared by the launcher and its progress display."""

from __future__ import annotations


class ClusterStartError(Exception):
    """The cluster cannot start as asked; the message says what to change."""
