"""VectorFit: fine-tune only the singular values and biases of a pre-trained model's matrices,
with Adaptive Vector Freezing (Hegde, Kaur, Tiwari, arXiv 2503.19530).

Quick start::

    from vectorfit import VectorFitConfig, get_vectorfit_model
    model = get_vectorfit_model(base_model, VectorFitConfig(modules_to_save=["classifier"]))
"""

from .adapter_io import AdapterError
from .avf import AdaptiveVectorFreezing, AVFError
from .cache import default_cache_root
from .config import VARIANTS, AVFConfig, ConfigError, VectorFitConfig
from .functional import low_memory
from .layer import SVDLinear
from .model import VectorFitModel, get_vectorfit_model, target_module_names
from .notices import VectorFitWarning
from .optim import param_groups
from .targets import ARCHITECTURES, TargetError

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AVFConfig",
    "AVFError",
    "AdapterError",
    "AdaptiveVectorFreezing",
    "ConfigError",
    "SVDLinear",
    "TargetError",
    "VARIANTS",
    "VectorFitConfig",
    "VectorFitModel",
    "VectorFitWarning",
    "default_cache_root",
    "get_vectorfit_model",
    "low_memory",
    "param_groups",
    "target_module_names",
]
