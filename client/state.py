"""Durable site state: what a site keeps on its own disk across rounds and restarts.

Flower's ``Context.state`` lives in SuperNode memory and dies with it; a factory's
personal head, Ditto model, FedHB posterior or DP accountant must not. One file
per site, ``<state-dir>/site_state.pt``, rewritten atomically (temp file, fsync,
rename, fsync of the directory) after every completed round, so a site killed
mid-round restarts bit-identical to its last completed round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILE = "site_state.pt"


class StateMismatch(RuntimeError):
    """The state on disk belongs to another model, method or split."""


@dataclass
class SiteState:
    fingerprint: str
    last_round: int = 0
    #: Personal tensors of the model (``ParamSplit.personal``).
    personal: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Whatever else the method keeps (tensors, numbers, strings, nested dicts of those).
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "last_round": self.last_round, "personal": self.personal, "extra": self.extra}


class SiteStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / FILE

    def load(self, fingerprint: str) -> SiteState:
        """The saved state, or a fresh one; refuses state written for another split."""
        if not self.path.is_file():
            return SiteState(fingerprint)
        raw = torch.load(self.path, map_location="cpu", weights_only=True)
        if raw.get("fingerprint") != fingerprint:
            raise StateMismatch(
                f"{self.path} was written for another model/method (fingerprint {raw.get('fingerprint')} != {fingerprint}); "
                "move it away or point state-dir at a new folder"
            )
        return SiteState(raw["fingerprint"], int(raw["last_round"]), dict(raw["personal"]), dict(raw["extra"]))

    def save(self, state: SiteState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # the live file is untouched; leave no debris beside it
            raise
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
