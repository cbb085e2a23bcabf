"""Every method's config: the common base (``base.py``) and one module per method (``<method>.py``).

A method's config sits next to nothing but its own knobs; ``kumiki/registry.py`` names each one (with its
strategy and site objective) on one line, so adding a method touches its config, its strategy, its site
objective and that line. Import from the method's module (``from kumiki.methods.fedprox import
FedProxConfig``).

``from kumiki.methods import X`` still works for code written before the split (branches merged later): the
name is looked up in the base and in every registered method's module. The lead may drop this shim once no
such import remains.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # dunder probes (pickle, inspect, pytest) never look through the method modules
        raise AttributeError(name)
    from kumiki.registry import METHODS

    # importlib, not ``from kumiki.methods import base``: that would ask this very hook for ``base`` again
    modules = [importlib.import_module("kumiki.methods.base")]
    modules += [importlib.import_module(e.config_ref.partition(":")[0]) for e in METHODS.values()]
    for module in modules:
        if name in vars(module):
            return vars(module)[name]
    raise AttributeError(f"module 'kumiki.methods' has no attribute {name!r}")
