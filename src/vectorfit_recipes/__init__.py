"""Experiments on top of the ``vectorfit`` library: pinned real data and models, one training loop,
the ``vectorfit`` command. Uses only the public API of ``vectorfit``."""

__all__ = ["assets", "data", "models"]
