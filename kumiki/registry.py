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
    #: the root's strategy when the sub-federations run their own SuperLinks (``federation.superlinks =
    #: "per_group"``), for the methods that can (WorldLM); named here so that a strategy never imports its bridge
    bridged: str | None = None

    def load_strategy(self) -> type:
        return _load(self.strategy)

    def strategy_for(self, cfg) -> type:
        """The strategy class that runs ``cfg``: the bridged root where the config asks for per-group SuperLinks."""
        if cfg.federation.superlinks == "per_group" and self.bridged is not None:
            return _load(self.bridged)
        return self.load_strategy()

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
    "worldlm": MethodEntry(m.WorldLMConfig, "strategies.worldlm:WorldLM", "client.methods.worldlm:WorldLMObjective",
                           bridged="strategies.worldlm_bridge:BridgedRoot"),
    "hierfavg": MethodEntry(m.HierFAVGConfig, "strategies.hierfavg:HierFAVG", "client.methods.hierfavg:HierFAVGObjective"),
    "mfed": MethodEntry(m.MFedConfig, "strategies.mfed:MFed", "client.methods.mfed:MFedObjective"),
}


def knobs(cfg: type[m.MethodConfig]) -> list[dict[str, Any]]:
    """A config class's knobs: key, whether the operator must set it, its default (a default factory's value,
    not pydantic's ``PydanticUndefined`` marker; None where required) and its meaning."""
    out = []
    for k, f in cfg.model_fields.items():
        if k == "name":
            continue
        required = f.is_required()
        default = None if required else f.get_default(call_default_factory=True)
        out.append({"key": f"method.{k}", "required": required, "default": default, "meaning": f.description or ""})
    return out


def summary(cfg: type[m.MethodConfig]) -> str:
    """The docstring's first paragraph on one line (a first line alone may stop mid-sentence)."""
    para = (cfg.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def catalog() -> list[dict[str, Any]]:
    """Every method with its one-line meaning, knobs (default, meaning) and paper optimizer: ``kumiki methods``."""
    return [{"name": name, "summary": summary(e.config), "knobs": knobs(e.config),
             "train_defaults": dict(e.config.train_defaults)} for name, e in METHODS.items()]


def entry(name: str) -> MethodEntry:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None
