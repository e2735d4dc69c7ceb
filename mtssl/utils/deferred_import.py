"""Optional packages that a dependency imports eagerly, loaded only when mtssl itself uses them."""

from __future__ import annotations

import importlib.util
import sys
import types


class _DeferredModule(types.ModuleType):
    """A module whose code runs at the first access of an attribute it does not have yet.

    Unlike ``importlib.util.LazyLoader``, reading what the import system already set (``__file__``, ``__spec__``,
    ``__path__``) does not load it: ``inspect.getmodule``, which torch calls while it imports, reads ``__file__``
    of every module in ``sys.modules``.
    """

    def __getattr__(self, attr: str):
        self.__class__ = types.ModuleType  # from here on a plain module, loaded or failed
        try:
            self.__spec__.loader.exec_module(self)
        except BaseException:
            sys.modules.pop(self.__name__, None)  # as a failed import leaves it
            raise
        return getattr(self, attr)


def defer_import(name: str) -> None:
    """Put a deferred ``name`` into ``sys.modules``: ``import name`` then runs none of its code; the first access
    of one of its attributes does. Nothing happens when ``name`` is already imported or not installed.

    Used for wandb: timm imports it whenever it is installed (``timm/utils/summary.py``, for a logging option mtssl
    does not use), about 1.5 s of CPU in every process that builds a model or checks a config (each rank, launch
    and evaluation). ``logging.wandb=true`` loads it in full at ``wandb.init``.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _DeferredModule
    sys.modules[name] = module
