"""Integrations with training frameworks. Importing this package needs ``transformers``."""

from .trainer import AVF_STATE_NAME, AVFCallback, VectorFitTrainer, load_training_state, save_training_state

__all__ = ["AVFCallback", "VectorFitTrainer", "save_training_state", "load_training_state", "AVF_STATE_NAME"]
