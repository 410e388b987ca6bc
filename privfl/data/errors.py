"""Errors raised by the data layer."""

from __future__ import annotations

from privfl.errors import PrivflError

__all__ = ["DataError"]


class DataError(PrivflError, ValueError):
    """A dataset on disk is missing, unreadable or inconsistent.

    The message always names the offending file (and, for bad mask values, the value).
    """
