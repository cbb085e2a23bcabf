"""ParamSplit: the one declaration of which tensors travel and which stay home.

Every method in Kumiki is, first of all, a decision about each tensor of the
model's ``state_dict``: **shared** (averaged over all sites), **group**
(averaged over the sites of one group only: an M-Fed task, a WorldLM
sub-federation) or **personal** (never leaves the site).

Rules are shell-style patterns (``fnmatch``) on ``state_dict`` names. Shared
rules are the base; personal and group rules carve exceptions out of it, so
``shared=["encoder.*"], personal=["*.running_mean"]`` keeps the encoder's BN
statistics at home. A tensor that no rule claims, or that two non-shared
classes claim (personal and a group, or two groups), is a start-up error:
a silent default here would leak a personal tensor or freeze a shared one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SHARED = "shared"
PERSONAL = "personal"
#: The group name of tensors that every group holds its own copy of (WorldLM's key layers: the same names in
#: every sub-federation, different values). A site of any group sends and receives them; the server keeps one
#: value per group.
EVERY_GROUP = "*"


class SplitError(ValueError):
    """A rule set that does not assign every tensor exactly one class."""


@dataclass(frozen=True)
class SplitRules:
    """Pattern rules, kept as data so both the server and the sites build the same split."""

    shared: tuple[str, ...] = ()
    personal: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "shared": list(self.shared),
            "personal": list(self.personal),
            "groups": {g: list(p) for g, p in sorted(self.groups.items())},
        }


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class ParamSplit:
    """Assignment of every tensor name to ``shared``, ``personal`` or one group."""

    def __init__(self, kinds: Mapping[str, str], rules: SplitRules):
        self._kind = dict(kinds)
        self.rules = rules
        self.names: tuple[str, ...] = tuple(kinds)
        self.shared: tuple[str, ...] = tuple(n for n, k in kinds.items() if k == SHARED)
        self.personal: tuple[str, ...] = tuple(n for n, k in kinds.items() if k == PERSONAL)
        groups: dict[str, list[str]] = {}
        for n, k in kinds.items():
            if k not in (SHARED, PERSONAL):
                groups.setdefault(k, []).append(n)
        self.groups: dict[str, tuple[str, ...]] = {g: tuple(v) for g, v in groups.items()}

    # ------------------------------------------------------------------ build
    @classmethod
    def from_rules(
        cls,
        model_or_names: Any,
        shared: Iterable[str] = (),
        personal: Iterable[str] = (),
        groups: Mapping[str, Iterable[str]] | None = None,
    ) -> ParamSplit:
        rules = SplitRules(
            shared=tuple(shared),
            personal=tuple(personal),
            groups={g: tuple(p) for g, p in (groups or {}).items()},
        )
        return cls.build(model_or_names, rules)

    @classmethod
    def build(cls, model_or_names: Any, rules: SplitRules) -> ParamSplit:
        if hasattr(model_or_names, "state_dict"):
            names = list(model_or_names.state_dict().keys())
        else:
            names = list(model_or_names)
        for g in rules.groups:
            if g in (SHARED, PERSONAL):
                raise SplitError(f"group name {g!r} is reserved")
        kinds: dict[str, str] = {}
        unclaimed, double = [], []
        for n in names:
            special = []
            if _matches(n, rules.personal):
                special.append(PERSONAL)
            special += [g for g, pats in rules.groups.items() if _matches(n, pats)]
            if len(special) > 1:
                double.append(f"{n} ({' and '.join(special)})")
            elif special:
                kinds[n] = special[0]
            elif _matches(n, rules.shared):
                kinds[n] = SHARED
            else:
                unclaimed.append(n)
        problems = []
        if unclaimed:
            problems.append("unclaimed tensors: " + ", ".join(unclaimed))
        if double:
            problems.append("tensors claimed twice: " + ", ".join(double))
        if problems:
            raise SplitError("; ".join(problems) + f" (rules: {rules.as_dict()})")
        return cls(kinds, rules)

    # ------------------------------------------------------------------ query
    def kind(self, name: str) -> str:
        return self._kind[name]

    def travelling(self, group: str | None = None) -> tuple[str, ...]:
        """Names a site in ``group`` may send and receive: shared + its group's tensors (+ its copy of the
        ``EVERY_GROUP`` tensors, whatever its group)."""
        if EVERY_GROUP in self.groups:
            return self.shared + self.groups[EVERY_GROUP]
        if group is not None and group not in self.groups:
            return self.shared
        return self.shared + (self.groups[group] if group else ())

    def select(self, state: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
        return {n: state[n] for n in names}

    def outgoing(self, state: Mapping[str, Any], group: str | None = None) -> dict[str, Any]:
        """The only tensors that may leave a site."""
        return self.select(state, self.travelling(group))

    def personal_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return self.select(state, self.personal)

    def fingerprint(self, extra: Mapping[str, Any] | None = None) -> str:
        """Hash of names, classes and (optionally) shapes: a site refuses state from another split."""
        payload = json.dumps({"kinds": self._kind, "extra": extra or {}}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
