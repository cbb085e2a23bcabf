"""What every method's config shares: the base class, the contract both sides derive the split from.

A method's config model is the contract both sides share: the server builds its strategy from it, the site
rebuilds it from the message's ConfigRecord, and both derive the same :class:`~kumiki.split.ParamSplit` from
``split_rules()``. Defaults are the papers' (see ``../shared/methods/``). Each method's subclass lives in its
own module beside this one (``kumiki/methods/<method>.py``) and is named in ``kumiki/registry.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from kumiki.split import SplitRules

#: Tensor-name patterns of the models in ``models/`` (plain: encoder + head).
ALL = ("*",)


class MethodConfig(BaseModel):
    """Base: subclasses add ``name: Literal[...]`` and their knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    #: Which model layout the method needs (see ``models.build_model``).
    variant: ClassVar[str] = "plain"
    #: False for methods that never exchange tensors (local-only).
    federated: ClassVar[bool] = True
    #: The paper's local optimizer: fills every ``[train]`` key the operator did not set.
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: False where the server update is not a (weighted) mean, so a trimmed mean or median cannot replace it.
    coordinatewise_ok: ClassVar[bool] = True
    #: The tasks (``kumiki/tasks.py``) the method can train; None: any task its model variant has an output for.
    tasks_supported: ClassVar[tuple[str, ...] | None] = None
    #: False where an evaluate message carries more than a training message (``eval.in_train_reply`` is then off)
    eval_in_train_reply: ClassVar[bool] = True
    #: True for methods that run the federation tree's levels (``kumiki/hierarchy.py``; WorldLM, HierFAVG).
    hierarchical: ClassVar[bool] = False
    #: The ``[federation]`` policy keys the method honours (``root_rounds``, a group's ``rounds``, ``dp``...).
    tree_policy: ClassVar[tuple[str, ...]] = ()

    def resolve(self, cfg) -> MethodConfig:
        """This config with what depends on the rest of the run filled in (default: itself)."""
        return self

    def split_rules(self) -> SplitRules:
        return SplitRules(shared=ALL)

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of the method's model variant (``models.build_model``)."""
        return {}

    def epochs_per_round(self, train) -> int:
        """Passes over the site's training data in one round (a DP site plans its noise with it)."""
        return train.local_epochs

    def site_tasks(self, sites: int) -> list[str] | None:
        """The task of each of ``sites`` materialized sites where the method assigns them (M-Fed), else None:
        every site then learns its dataset's task."""
        return None

    def site_groups(self, sites: int) -> list[str] | None:
        """The group of each of ``sites`` materialized sites (their site.json ``group``) where the method assigns
        them (M-Fed's task groups), else None."""
        return None

    def site_group(self, task: str, group: str) -> str:
        """A site's group, given its task and the group its node config or site.json names ("" if none)."""
        return group

    def check_run(self, cfg) -> None:
        """Combination checks of this method against the whole config (``KumikiConfig``); raise ValueError."""


#: BatchNorm buffers (running statistics and the batch counter).
BN_BUFFERS = ("*.running_mean", "*.running_var", "*.num_batches_tracked")
