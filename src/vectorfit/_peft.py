"""VectorFit as a peft method: the version check, the ``PeftType.VECTORFIT`` member, the registration.

peft keeps its methods in a closed ``enum`` (``peft.utils.peft_types.PeftType``) and looks them up in
mapping tables. ``register_peft_method`` (peft >= 0.15) fills the tables; the enum member must exist
first, and a standard ``enum`` cannot grow, so ``aenum.extend_enum`` (a maintained library made for
exactly this) adds it. Both happen once, when ``vectorfit`` is imported.

The tuner contract vectorfit relies on (``BaseTuner._get_adapter_state_dict``,
``_remap_adapter_state_dict_for_load``, ``unload_and_optionally_merge_module``, ``tuner_layer_cls``)
is the one of the peft releases in :data:`PEFT_RANGE`; CI tests the lowest and the newest of them. An
installed peft outside the range fails here, at import, with one sentence saying what to install.
"""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

#: The peft releases this vectorfit is tested with (lowest and newest in CI), as pip writes it.
PEFT_RANGE = ">=0.21.0,<0.23"
_LOW, _HIGH = Version("0.21.0"), Version("0.23")

#: The method's name in peft (``PeftType.VECTORFIT``, ``"peft_type": "VECTORFIT"`` in adapter files).
NAME = "vectorfit"
#: Prefix of every adapter tensor's name (``...q_proj.vectorfit_sigma.default``).
PREFIX = "vectorfit_"


def _check_version() -> None:
    try:
        found = importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"vectorfit needs peft{PEFT_RANGE}; install it with: pip install 'peft{PEFT_RANGE}'") from None
    v = Version(found)
    if not (_LOW <= Version(v.base_version) < _HIGH):
        raise ImportError(
            f"vectorfit is tested with peft{PEFT_RANGE}, whose tuner contract it implements, but peft {found} is installed; "
            f"install a tested release with: pip install 'peft{PEFT_RANGE}'"
        )


def ensure_peft_type() -> None:
    """Add ``VECTORFIT`` to ``peft.utils.peft_types.PeftType`` (idempotent)."""
    _check_version()
    from aenum import extend_enum
    from peft.utils.peft_types import PeftType

    if NAME.upper() not in PeftType.__members__:
        extend_enum(PeftType, NAME.upper(), NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register the method with peft (idempotent: a second import of vectorfit registers nothing)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method
    from peft.utils.peft_types import PeftType

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType.VECTORFIT) is model_cls:
        return
    register_peft_method(name=NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX, is_mixed_compatible=False)


ensure_peft_type()
