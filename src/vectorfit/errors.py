"""The library's exception types (a leaf module: everything may import it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class AdapterError(ValueError):
    """An adapter could not be saved or loaded; the message says which file or module and why."""
