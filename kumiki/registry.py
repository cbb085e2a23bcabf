"""Method registry: one line per method joins its config, strategy and site objective.

Configs (``kumiki/methods/<method>.py``), strategies (``strategies/<method>.py``) and site objectives
(``client/methods/<method>.py``) are named by import path: the server never imports ``client/``, the site
never imports ``strategies/``, and adding a method adds its three files and one line here
(``docs/write-a-method.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from kumiki.methods.base import MethodConfig


@dataclass(frozen=True)
class MethodEntry:
    config_ref: str  # "module:Class" under kumiki/methods/
    strategy: str  # "module:Class" under strategies/
    objective: str  # "module:Class" under client/methods/
    #: the root's strategy when the sub-federations run their own SuperLinks (``federation.superlinks =
    #: "per_group"``), for the methods that can (WorldLM); named here so that a strategy never imports its bridge
    bridged: str | None = None

    @property
    def config(self) -> type[MethodConfig]:
        return _load(self.config_ref)

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
    "fedavg": MethodEntry("kumiki.methods.fedavg:FedAvgConfig", "strategies.fedavg:FedAvg",
                          "client.methods.fedavg:FedAvgObjective"),
    "fedprox": MethodEntry("kumiki.methods.fedprox:FedProxConfig", "strategies.fedprox:FedProx",
                           "client.methods.fedprox:FedProxObjective"),
    "fedavg_ft": MethodEntry("kumiki.methods.fedavg_ft:FedAvgFTConfig", "strategies.fedavg_ft:FedAvgFT",
                             "client.methods.fedavg_ft:FedAvgFTObjective"),
    "local": MethodEntry("kumiki.methods.local:LocalConfig", "strategies.local:LocalOnly",
                         "client.methods.local:LocalObjective"),
    "dualfed": MethodEntry("kumiki.methods.dualfed:DualFedConfig", "strategies.dualfed:DualFed",
                           "client.methods.dualfed:DualFedObjective"),
    "fedhb": MethodEntry("kumiki.methods.fedhb:FedHBConfig", "strategies.fedhb:FedHB",
                         "client.methods.fedhb:FedHBObjective"),
    "fedper": MethodEntry("kumiki.methods.fedper:FedPerConfig", "strategies.fedper:FedPer",
                          "client.methods.fedper:FedPerObjective"),
    "fedrep": MethodEntry("kumiki.methods.fedrep:FedRepConfig", "strategies.fedrep:FedRep",
                          "client.methods.fedrep:FedRepObjective"),
    "ditto": MethodEntry("kumiki.methods.ditto:DittoConfig", "strategies.ditto:Ditto",
                         "client.methods.ditto:DittoObjective"),
    "floral": MethodEntry("kumiki.methods.floral:FloralConfig", "strategies.floral:FLoRAL",
                          "client.methods.floral:FloralObjective"),
    "floral_ensemble": MethodEntry("kumiki.methods.floral_ensemble:FloralEnsembleConfig",
                                   "strategies.floral_ensemble:FloralEnsemble",
                                   "client.methods.floral_ensemble:FloralEnsembleObjective"),
    "local_adaptors": MethodEntry("kumiki.methods.local_adaptors:LocalAdaptorsConfig",
                                  "strategies.local_adaptors:LocalAdaptors",
                                  "client.methods.local_adaptors:LocalAdaptorsObjective"),
    "worldlm": MethodEntry("kumiki.methods.worldlm:WorldLMConfig", "strategies.worldlm:WorldLM",
                           "client.methods.worldlm:WorldLMObjective", bridged="strategies.worldlm_bridge:BridgedRoot"),
    "hierfavg": MethodEntry("kumiki.methods.hierfavg:HierFAVGConfig", "strategies.hierfavg:HierFAVG",
                            "client.methods.hierfavg:HierFAVGObjective"),
    "mfed": MethodEntry("kumiki.methods.mfed:MFedConfig", "strategies.mfed:MFed", "client.methods.mfed:MFedObjective"),
}


def knobs(cfg: type[MethodConfig]) -> list[dict[str, Any]]:
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


def summary(cfg: type[MethodConfig]) -> str:
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
