"""Methods a ``VectorFitModel`` would otherwise inherit, wrongly, from the model it wraps.

``VectorFitModel.__getattr__`` forwards unknown attributes to the base model, so that
``model.config``, ``model.generate`` and the like work. For the adapter methods of transformers'
``PeftAdapterMixin`` (``load_adapter``, ``set_adapter``, ...) and for ``push_to_hub`` that forwarding
does the wrong thing silently: they would attach a *peft* adapter to layers VectorFit has replaced,
or upload the whole base model with VectorFit's internals. Each of them is defined here instead and
raises ``NotImplementedError`` naming what to use. (The adapter methods VectorFit implements,
``load_adapter``, ``add_adapter``, ``set_adapter``, ``delete_adapter``, ``add_weighted_adapter``, live in
:mod:`vectorfit.adapters`.)
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["UnsupportedMethodsMixin", "UNSUPPORTED"]

_MANY = "VectorFitModel has its own adapter methods: load_adapter(path, name, hotswap=True) replaces an adapter's vectors in place"
_DISABLE = "for the base model's outputs use `with model.disable_adapter(): ...`"

#: method name -> what to do instead.
UNSUPPORTED: dict[str, str] = {
    "enable_peft_hotswap": _MANY + " (no preparation step is needed)",
    "disable_adapters": _DISABLE,
    "enable_adapters": _DISABLE,
    "get_adapter_state_dict": "model.trainable_vectors() gives the trained vectors; model.save_pretrained(dir) writes the adapter",
    "push_to_hub": "model.save_pretrained(dir) writes the adapter (a few hundred KB); upload that folder, "
                   "e.g. huggingface_hub.upload_folder(repo_id=..., folder_path=dir)",
}


def _make(name: str, instead: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"VectorFitModel.{name}() is not supported (it would reach the base model's {name}, which does not "
            f"know VectorFit's layers). Instead: {instead}."
        )

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"Not supported on a VectorFitModel (raises ``NotImplementedError``). Instead: {instead}."
    return method


class UnsupportedMethodsMixin:
    """Defines every name in :data:`UNSUPPORTED` as a method that raises a clear error, so that
    attribute forwarding to the base model never reaches the base model's version."""


for _name, _instead in UNSUPPORTED.items():
    setattr(UnsupportedMethodsMixin, _name, _make(_name, _instead))
del _name, _instead
