"""M-Fed server (Zhou et al., "Multi-task Federated Learning with Encoder-Decoder Structure", arXiv 2504.09800,
2025; spec ``mfed.md`` section 5, a reconstruction from the abstract).

Round t with participants S, S_t of them learning task t (n_k examples, n_t = sum_{k in S_t} n_k)::

    E_bar   = sum_{k in S} (n_k / sum_{j in S} n_j) E_k                  encoder_weighting = num_examples
    E_bar   = (1/|T_S|) sum_{t in T_S} sum_{k in S_t} (n_k / n_t) E_k    encoder_weighting = task_balanced
    D_bar_g = sum_{k in S_g} (n_k / n_g) d_k                            each decoder group g on its own sites

A decoder group is a task and decoder architecture (``task:<task>[/<decoder>]``, the ParamSplit groups of
``MFedConfig``): decoders of different tasks are never combined, even where their shapes match, and a group
without participants keeps its D_bar_g. Each site receives E_bar and its own group's D_bar_g only (the base's
per-site messages), plus ``has-global`` under ``extra`` once D_bar_g is an aggregate (the decoder term is off
before). The server keeps the site -> group map (from each site's profile; persisted in the resume state) and
refuses a site that comes back with another task or decoder.

``encoder_scope = task`` keeps one encoder per task instead (per-task FedAvg, no cross-task sharing; with
``decoder_init = from_global`` and ``decoder_reg = none`` it is T independent FedAvg runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kumiki.methods.mfed import mfed_parse_group
from strategies.base import KumikiStrategy, Update
from strategies.replies import BadReply


def encoder_weights(tasks: Sequence[str], num_examples: Sequence[int], weighting: str) -> list[float]:
    """Each update's weight in E_bar (normalized by the caller's weighted mean): n_k, or n_k / (n_t |T_S|)."""
    if weighting == "num_examples":
        return [float(n) for n in num_examples]
    per_task: dict[str, float] = {}
    for t, n in zip(tasks, num_examples):
        per_task[t] = per_task.get(t, 0.0) + n
    return [n / (per_task[t] * len(per_task)) for t, n in zip(tasks, num_examples)]


class MFed(KumikiStrategy):
    def __init__(self, cfg, job, split, initial):
        super().__init__(cfg, job, split, initial)
        #: site -> its decoder group, as first admitted (the spec's node-to-task map)
        self.site_groups: dict[str, str] = {}
        #: groups whose D_bar is an aggregate of their sites' decoders
        self.aggregated: set[str] = set()
        #: encoder_scope = task: each task's own encoder (created from the initial one at its first aggregate)
        self.task_encoders: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------- sites
    def check_profile(self, profile: dict[str, Any]) -> None:
        site, group, task = profile["site"], profile["group"], profile["task"]
        try:
            group_task, kind = mfed_parse_group(group)
        except ValueError as e:
            raise BadReply(f"site {site}: {e}") from None
        if group_task != task:
            raise BadReply(f"site {site} learns {task} but names group {group!r}")
        if (group_task, kind) not in self.method.slots():
            raise BadReply(f"site {site}: group {group!r} is not in this federation (method.tasks / method.sites "
                           f"give {', '.join(sorted(self.split.groups)) or 'no group'})")
        known = self.site_groups.get(site)
        if known is not None and known != group:
            raise BadReply(f"site {site} trained in group {known!r} and now says {group!r}: a site cannot change "
                           "task or decoder")
        self.site_groups[site] = group

    def _task(self, node_id: int) -> str:
        return self.profiles[node_id].task

    # ------------------------------------------------------------- messages
    def payload(self, node_id: int) -> dict[str, np.ndarray]:
        out = super().payload(node_id)
        if self.method.encoder_scope == "task":
            out.update(self.task_encoders.get(self._task(node_id), {}))
        return out

    def extra_arrays(self, node_id: int, server_round: int) -> dict[str, np.ndarray]:
        if not self.split.groups:  # encoder_scope = none: nothing travels
            return {}
        return {"has-global": np.array([int(self.profiles[node_id].group in self.aggregated)], dtype=np.int64)}

    # ------------------------------------------------------------- aggregation
    def aggregate_shared(self, updates: list[Update]) -> dict[str, np.ndarray]:
        if self.method.encoder_scope == "task":
            for task in sorted({u.profile.task for u in updates}):
                members = [u for u in updates if u.profile.task == task]
                self.task_encoders[task] = self.combine(self.part(members, self.shared),
                                                        [float(u.num_examples) for u in members])
            return self.shared
        weights = encoder_weights([u.profile.task for u in updates], [u.num_examples for u in updates],
                                  self.method.encoder_weighting)
        return self.combine(self.part(updates, self.shared), weights)

    def aggregate(self, updates: list[Update]) -> None:
        super().aggregate(updates)
        self.aggregated |= {u.profile.group for u in updates if u.profile.group in self.group_arrays}

    # ------------------------------------------------------------- resume
    def server_state(self) -> dict[str, np.ndarray]:
        return {f"task/{t}/{k}": v for t, arrs in self.task_encoders.items() for k, v in arrs.items()}

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        encoders: dict[str, dict[str, np.ndarray]] = {}
        for key, v in arrays.items():
            kind, task, name = key.split("/", 2) if key.count("/") >= 2 else ("", "", key)
            if kind != "task" or name not in self.shared:
                raise ValueError(f"checkpoint tensor server/{key} is not an M-Fed task encoder of this model")
            encoders.setdefault(task, {})[name] = np.array(v)
        self.task_encoders = encoders

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super().state_dict()
        meta["mfed"] = {"site_groups": dict(self.site_groups), "aggregated": sorted(self.aggregated)}
        return arrays, meta

    def load_state_dict(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_state_dict(arrays, meta)
        saved = meta.get("mfed", {})
        self.site_groups = {str(k): str(v) for k, v in saved.get("site_groups", {}).items()}
        self.aggregated = {str(g) for g in saved.get("aggregated", [])}
