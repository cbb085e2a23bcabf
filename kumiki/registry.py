"""Method registry: one line per method joins its config, strategy and site objective.

Strategies and objectives are named by import path, so the server never
imports ``client/`` and the site never imports ``strategies/``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from kumiki import methods as m


@dataclass(frozen=True)
class MethodEntry:
    config: type[m.MethodConfig]
    strategy: str  # "module:Class" under strategies/
    objective: str  # "module:Class" under client/methods/

    def load_strategy(self) -> type:
        return _load(self.strategy)

    def load_objective(self) -> type:
        return _load(self.objective)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


METHODS: dict[str, MethodEntry] = {
    "fedavg": MethodEntry(m.FedAvgConfig, "strategies.fedavg:FedAvg", "client.methods.fedavg:FedAvgObjective"),
    "fedprox": MethodEntry(m.FedProxConfig, "strategies.fedprox:FedProx", "client.methods.fedprox:FedProxObjective"),
    "fedavg_ft": MethodEntry(m.FedAvgFTConfig, "strategies.fedavg_ft:FedAvgFT", "client.methods.fedavg_ft:FedAvgFTObjective"),
    "local": MethodEntry(m.LocalConfig, "strategies.local:LocalOnly", "client.methods.local:LocalObjective"),
    "dualfed": MethodEntry(m.DualFedConfig, "strategies.dualfed:DualFed", "client.methods.dualfed:DualFedObjective"),
    "fedhb": MethodEntry(m.FedHBConfig, "strategies.fedhb:FedHB", "client.methods.fedhb:FedHBObjective"),
    "fedper": MethodEntry(m.FedPerConfig, "strategies.fedper:FedPer", "client.methods.fedper:FedPerObjective"),
    "fedrep": MethodEntry(m.FedRepConfig, "strategies.fedrep:FedRep", "client.methods.fedrep:FedRepObjective"),
    "ditto": MethodEntry(m.DittoConfig, "strategies.ditto:Ditto", "client.methods.ditto:DittoObjective"),
    "floral": MethodEntry(m.FloralConfig, "strategies.floral:FLoRAL", "client.methods.floral:FloralObjective"),
    "floral_ensemble": MethodEntry(m.FloralEnsembleConfig, "strategies.floral_ensemble:FloralEnsemble",
                                   "client.methods.floral_ensemble:FloralEnsembleObjective"),
    "local_adaptors": MethodEntry(m.LocalAdaptorsConfig, "strategies.local_adaptors:LocalAdaptors",
                                  "client.methods.local_adaptors:LocalAdaptorsObjective"),
    "worldlm": MethodEntry(m.WorldLMConfig, "strategies.worldlm:WorldLM", "client.methods.worldlm:WorldLMObjective"),
    "hierfavg": MethodEntry(m.HierFAVGConfig, "strategies.hierfavg:HierFAVG", "client.methods.hierfavg:HierFAVGObjective"),
    "mfed": MethodEntry(m.MFedConfig, "strategies.mfed:MFed", "client.methods.mfed:MFedObjective"),
}


def catalog() -> list[dict[str, Any]]:
    """Every method with its one-line meaning, knobs (default, meaning) and paper optimizer: ``kumiki methods``."""
    out = []
    for name, e in METHODS.items():
        cfg = e.config
        knobs = [{"key": f"method.{k}", "default": f.default, "meaning": f.description or ""}
                 for k, f in cfg.model_fields.items() if k != "name"]
        out.append({"name": name, "summary": (cfg.__doc__ or "").strip().splitlines()[0],
                    "knobs": knobs, "train_defaults": dict(cfg.train_defaults)})
    return out


def entry(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
