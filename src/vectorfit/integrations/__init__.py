"""Integrations with training frameworks. Importing this package needs ``transformers``."""

from .trainer import AVFCallback, VectorFitTrainer

__all__ = ["AVFCallback", "VectorFitTrainer"]
