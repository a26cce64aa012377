"""VectorFit: fine-tune only the singular values and biases of a pre-trained model's matrices,
with Adaptive Vector Freezing (Hegde, Kaur, Tiwari, arXiv 2503.19530), as a peft method.

Importing this package registers ``PeftType.VECTORFIT`` with peft, so peft's own entry points work::

    from peft import get_peft_model, PeftModel
    from vectorfit import VectorFitConfig
    model = get_peft_model(base_model, VectorFitConfig(task_type="SEQ_CLS"))
    ...
    model.save_pretrained("adapter")
    model = PeftModel.from_pretrained(fresh_base_model, "adapter")
"""

from . import _peft
from .config import VARIANTS, AVFConfig, VectorFitConfig
from .errors import AdapterError, ConfigError
from .avf import AdaptiveVectorFreezing, AVFError
from .base_check import allow_base_differences
from .cache import default_cache_root
from .functional import low_memory
from .layer import VectorFitLayer
from .model import VectorFitModel, get_vectorfit_model, target_module_names
from .legacy import convert_legacy_adapter
from .notices import VectorFitWarning
from .optim import param_groups
from .targets import ARCHITECTURES, TargetError

_peft.register(VectorFitConfig, VectorFitModel)

__version__ = "0.2.0"

__all__ = [
    "ARCHITECTURES",
    "AVFConfig",
    "AVFError",
    "AdapterError",
    "AdaptiveVectorFreezing",
    "ConfigError",
    "TargetError",
    "VARIANTS",
    "VectorFitConfig",
    "VectorFitLayer",
    "VectorFitModel",
    "VectorFitWarning",
    "allow_base_differences",
    "convert_legacy_adapter",
    "default_cache_root",
    "get_vectorfit_model",
    "low_memory",
    "param_groups",
    "target_module_names",
]
