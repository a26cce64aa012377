"""Integrations with training frameworks. Importing this package needs ``transformers``."""

from .trainer import AVFCallback

__all__ = ["AVFCallback"]
