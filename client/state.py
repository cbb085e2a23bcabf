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


OWNER = "OWNER"


class StateMismatch(RuntimeError):
    """The state on disk belongs to another model, method, split, site or run."""


class StateCorrupt(RuntimeError):
    """The state file cannot be read (truncated, garbage, or not Kumiki's)."""


class StateMissing(RuntimeError):
    """The state file is gone although the server says this site completed rounds."""


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

    def claim(self, site: str) -> None:
        """Mark this state dir as ``site``'s; another site pointed at it is refused (no silent overwrites)."""
        self.root.mkdir(parents=True, exist_ok=True)
        owner = self.root / OWNER
        try:
            fd = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = owner.read_text().strip()
            if holder != site:
                raise StateMismatch(f"state dir {self.root} belongs to site {holder!r}, not {site!r}; give each site "
                                    "its own state-dir") from None
            return
        with os.fdopen(fd, "w") as f:
            f.write(site + "\n")

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self, fingerprint: str) -> SiteState:
        """The saved state, or a fresh one; refuses unreadable state and state written for another split."""
        if not self.path.is_file():
            return SiteState(fingerprint)
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            state = SiteState(raw["fingerprint"], int(raw["last_round"]), dict(raw["personal"]), dict(raw["extra"]))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise StateCorrupt(
                f"site state {self.path} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); it is truncated or "
                "not a Kumiki state file. Restore it from a backup, or move it away to restart this site from fresh "
                "personal state (site.on_missing_state = 'reset')"
            ) from None
        if state.fingerprint != fingerprint:
            raise StateMismatch(
                f"{self.path} was written for another model, method, site or run (fingerprint {state.fingerprint} != "
                f"{fingerprint}); move it away or point state-dir at a new folder"
            )
        return state

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
