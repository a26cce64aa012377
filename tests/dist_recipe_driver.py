"""``vectorfit train`` (the real command-line entry point) with the model's dropout set to 0, for
tests/test_recipes_distributed.py to run under ``torch.distributed.run``.

Why dropout 0: with dropout each rank draws its own masks, so a multi-process run can equal the
one-process run only in distribution; without it the two must agree to float round-off, which is
what the test checks. Everything else is the unmodified command."""

from __future__ import annotations

import sys

from vectorfit_recipes import cli
from vectorfit_recipes import models as models_mod

_load = models_mod.load_model


def load_without_dropout(name, num_labels, pooling="mean", **kwargs):
    """``models.load_model`` with every dropout of the BERT-style config at 0."""
    return _load(name, num_labels, pooling=pooling, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kwargs)


if __name__ == "__main__":
    models_mod.load_model = load_without_dropout
    sys.exit(cli.main(sys.argv[1:]))
