"""M-Fed's config (spec ``mfed.md``) and its task/decoder naming: groups ``task:<task>[/<decoder>]``."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from kumiki.methods.base import ALL, BN_BUFFERS, MethodConfig
from kumiki.split import SplitRules


#: M-Fed's tasks, their decoder architectures (the first is the task's default; ``models/mfed.py``)
MFED_DECODERS: dict[str, tuple[str, ...]] = {
    "classification": ("mlp", "linear"),
    "segmentation": ("convt", "upsample"),
    "edges": ("upsample", "convt"),
    "denoising": ("convt", "upsample"),
}
#: encoder BatchNorm buffers (decoder buffers belong to their task group)
ENCODER_BN = tuple(f"encoder.{p}" for p in BN_BUFFERS)


def mfed_slot(entry: str) -> tuple[str, str]:
    """``"segmentation"`` or ``"segmentation/upsample"`` -> (task, decoder architecture), the default filled in."""
    task, _, kind = entry.partition("/")
    if task not in MFED_DECODERS:
        raise ValueError(f"unknown M-Fed task {task!r} in {entry!r}; tasks: {', '.join(MFED_DECODERS)}")
    kinds = MFED_DECODERS[task]
    kind = kind or kinds[0]
    if kind not in kinds:
        raise ValueError(f"{task} has no decoder {kind!r} in {entry!r}; choose {' or '.join(kinds)}")
    return task, kind


def mfed_group(task: str, kind: str) -> str:
    """The ParamSplit group of a (task, decoder): ``task:<task>``, or ``task:<task>/<decoder>`` for a non-default
    decoder (sites of one task with different decoders are separate groups: their tensors differ)."""
    return f"task:{task}" if kind == MFED_DECODERS[task][0] else f"task:{task}/{kind}"


def mfed_key(task: str, kind: str) -> str:
    """The decoder's module name in the model (``decoders.<key>.*``)."""
    return task if kind == MFED_DECODERS[task][0] else f"{task}_{kind}"


def mfed_parse_group(group: str) -> tuple[str, str]:
    """Inverse of :func:`mfed_group` (ValueError for anything else)."""
    if not group.startswith("task:"):
        raise ValueError(f"group {group!r} is not an M-Fed task group (task:<task> or task:<task>/<decoder>)")
    task, kind = mfed_slot(group[len("task:"):])
    if mfed_group(task, kind) != group:
        raise ValueError(f"group {group!r}: write the default decoder's group as {mfed_group(task, kind)!r}")
    return task, kind


class MFedConfig(MethodConfig):
    """M-Fed (Zhou et al., arXiv 2504.09800, 2025): one encoder shared across tasks, per-task decoders pulled toward
    their task's global decoder.

    Spec ``mfed.md`` (a reconstruction from the abstract: its defaults, its open choices as knobs). Sites
    learn different tasks (classification, segmentation, edges, denoising) with different decoders; the
    encoder ``encoder.*`` is averaged over all sites, each decoder ``decoders.<key>.*`` only over its task
    group's sites (group ``task:<task>``, or ``task:<task>/<decoder>`` for a non-default decoder). Each site
    keeps its own local decoder d_k across rounds and trains it with the task loss plus
    (mu/2)||d_k - D_bar_t||^2 toward its task's global decoder (``decoder_reg = prox``).

    Task assignment: ``tasks`` entries (``"segmentation"`` or ``"segmentation/upsample"``) go round-robin
    over the sites (training sites first, then unseen ones: site i gets entry i mod len); ``sites`` lists
    one entry per site instead. A deployed site names its group in its site.json or node config
    (``group``); without one it joins its task's default decoder group.
    """

    name: Literal["mfed"] = "mfed"
    variant: ClassVar[str] = "mfed"
    tasks_supported: ClassVar[tuple[str, ...] | None] = tuple(MFED_DECODERS)
    #: the spec's optimizer (section 9): Adam, lr 1e-3, weight decay 0, fresh every round; batch 32 ([train]'s),
    #: not the spec's 64, which leaves a site of 61 examples one step per round (digits, 15 rounds, CNN-S:
    #: segmentation mIoU 83.0 vs 85.5 and classification 99.1 vs 99.4 with 32; MLP: 61.9 vs 79.7, 91.6 vs 95.1)
    train_defaults: ClassVar[dict[str, Any]] = {"optimizer": "adam", "lr": 1e-3}

    tasks: list[str] = Field(default_factory=lambda: ["classification", "segmentation"], min_length=1,
                             description="task[/decoder] entries assigned round-robin to the sites")
    sites: list[str] | None = Field(None, min_length=1, description="one task[/decoder] entry per site (training "
                                                                     "sites first, then unseen); overrides tasks")
    decoder_reg: Literal["prox", "output", "consistency", "none"] = Field(
        "prox", description="the local decoder's pull toward the global one: prox (mu/2)||d - D||^2, output "
                            "gamma l(D(E(x)), y), consistency gamma Div(d(E(x)), D(E(x))), or none")
    mu: float = Field(0.1, ge=0.0, description="weight of the prox term")
    gamma: float = Field(0.5, ge=0.0, description="weight of the output and consistency terms")
    mu_schedule: Literal["constant", "linear_ramp"] = Field(
        "constant", description="the term's weight: constant, or growing linearly to its value over mu_ramp_rounds")
    mu_ramp_rounds: int = Field(10, ge=1, description="rounds of linear_ramp")
    decoder_init: Literal["keep_local", "from_global"] = Field(
        "keep_local", description="each round's decoder start: the site's own d_k, or the global D_bar_t")
    encoder_weighting: Literal["num_examples", "task_balanced"] = Field(
        "num_examples", description="encoder mean over sites: by examples, or each task's mean weighted equally")
    encoder_scope: Literal["all", "task", "none"] = Field(
        "all", description="who shares an encoder: all sites, each task's sites (per-task FedAvg), or none (local)")
    encoder_bn_stats: Literal["shared", "personal"] = Field(
        "shared", description="the encoder's BatchNorm statistics: averaged with it, or kept on each site")
    edge_tolerance_px: int = Field(1, ge=0, le=5, description="edges F-score: a pixel within this distance counts")
    edge_balance: Literal["batch", "example"] = Field(
        "batch", description="edges loss: edge pixels weigh #non-edge/#edge of the batch, or of each example "
                             "(needed with privacy.enabled)")

    @model_validator(mode="after")
    def _entries(self) -> MFedConfig:
        for e in [*self.tasks, *(self.sites or [])]:
            mfed_slot(e)
        return self

    def assignment(self, sites: int) -> list[tuple[str, str]]:
        """(task, decoder) of each of ``sites`` sites."""
        entries = self.sites if self.sites is not None else [self.tasks[i % len(self.tasks)] for i in range(sites)]
        return [mfed_slot(e) for e in entries[:sites]]

    def slots(self) -> list[tuple[str, str]]:
        """Every (task, decoder) of the federation, in a fixed order (the model's decoders)."""
        return sorted({mfed_slot(e) for e in (self.sites if self.sites is not None else self.tasks)})

    def site_tasks(self, sites: int) -> list[str] | None:
        return [t for t, _ in self.assignment(sites)]

    def site_groups(self, sites: int) -> list[str] | None:
        return [mfed_group(t, k) for t, k in self.assignment(sites)]

    def site_group(self, task: str, group: str) -> str:
        return group or (mfed_group(task, MFED_DECODERS[task][0]) if task in MFED_DECODERS else group)

    def check_run(self, cfg) -> None:
        train, unseen = cfg.data.sites, cfg.data.unseen_sites
        if self.sites is not None and len(self.sites) != train + unseen:
            raise ValueError(f"method.sites lists {len(self.sites)} sites, but data.sites + data.unseen_sites = "
                             f"{train + unseen}; give one task[/decoder] entry per site, training sites first")
        slots = self.assignment(train + unseen)
        taught = set(slots[:train])
        idle = sorted(set(self.slots()) - taught) if cfg.data.dataset != "site-folders" else []
        if idle:
            key = "method.sites" if self.sites is not None else "method.tasks"
            raise ValueError(f"{key}: {', '.join(mfed_group(*s) for s in idle)} would have no training site with "
                             f"data.sites = {train}; every task and decoder needs one (more training sites, or "
                             "fewer entries)")
        lost = sorted(set(slots[train:]) - taught)
        if lost and cfg.data.dataset != "site-folders":
            raise ValueError(f"method.sites: unseen sites of {', '.join(mfed_group(*s) for s in lost)} have no "
                             "training site of their task and decoder to learn it from")
        if cfg.privacy.enabled and self.edge_balance == "batch" and any(t == "edges" for t, _ in self.slots()):
            raise ValueError("privacy.enabled: the edges loss weighs pixels by the batch's edge share, which couples "
                             "the examples of a batch; set method.edge_balance = \"example\"")
        if self.encoder_scope == "task" and (cfg.privacy.central or cfg.server.aggregation == "norm_bound"):
            raise ValueError("method.encoder_scope = \"task\" keeps one encoder per task, which privacy.central and "
                             "server.aggregation = \"norm_bound\" do not handle; use encoder_scope = \"all\"")
        shape = cfg.data.input_shape
        if shape is not None and any(t != "classification" for t, _ in self.slots()) and (shape[1] % 4 or shape[2] % 4):
            raise ValueError(f"data.input_shape {shape}: M-Fed's dense decoders need a height and width that are "
                             "multiples of 4")
        if cfg.model.arch not in ("cnn", "mlp"):
            raise ValueError(f"M-Fed has no encoder for model.arch = {cfg.model.arch!r}")

    def model_options(self) -> dict[str, Any]:
        return {"decoders": {mfed_key(t, k): (t, k) for t, k in self.slots()}}

    def split_rules(self) -> SplitRules:
        if self.encoder_scope == "none":  # local-only on the multi-task model: nothing travels
            return SplitRules(personal=ALL)
        return SplitRules(shared=("encoder.*",),
                          personal=ENCODER_BN if self.encoder_bn_stats == "personal" else (),
                          groups={mfed_group(t, k): (f"decoders.{mfed_key(t, k)}.*",) for t, k in self.slots()})
