"""Durable site state: what a site keeps on its own disk across rounds and restarts.

Flower's ``Context.state`` lives in SuperNode memory and dies with it; a factory's
personal head, Ditto model, FedHB posterior or DP accountant must not. One file
per site, ``<state-dir>/site_state.pt``, rewritten atomically (temp file, fsync,
rename, fsync of the directory) after every completed round, so a site killed
mid-round restarts bit-identical to its last completed round.

A factory's state dir outlives runs. The file records the run it belongs to (name and id); when a new run
reaches the site, the old run's files move to ``previous-runs/<run>.<run_id>/`` and the new run starts from
fresh personal state (the privacy ledger, kept beside them, is never moved: epsilon spans runs).

The state a save replaces is kept beside it (``site_state.prev.pt``, a hard link: no copy), so that a server
resumed from its last checkpoint can send a round again that this site already trained: the site then trains
it from the state it had before (``SiteStore.load(before_round=r)``), and the re-run equals the first run.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILE = "site_state.pt"
PREV = "site_state.prev.pt"
log = logging.getLogger("kumiki.client")


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
    #: last_round of the state this one replaced (0: fresh state; None: not recorded, an older file)
    previous_round: int | None = None
    #: the run (name and id, ``Job.run``/``Job.run_id``) this state belongs to
    run: str = ""
    run_id: str = ""

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "last_round": self.last_round, "personal": self.personal,
                "extra": self.extra, "previous_round": self.previous_round, "run": self.run, "run_id": self.run_id}


class SiteStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / FILE
        self.prev_path = self.root / PREV
        #: (last_round, previous_round) of the live file as this store last read it
        self._live: tuple[int, int | None] | None = None

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

    def _read(self, path: Path, fingerprint: str) -> SiteState:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            prev = raw.get("previous_round")
            state = SiteState(raw["fingerprint"], int(raw["last_round"]), dict(raw["personal"]), dict(raw["extra"]),
                              None if prev is None else int(prev), str(raw.get("run", "")), str(raw.get("run_id", "")))
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise StateCorrupt(
                f"site state {path} is unreadable ({type(exc).__name__}: {str(exc)[:200]}); it is truncated or "
                "not a Kumiki state file. Restore it from a backup, or move it away to restart this site from fresh "
                "personal state (site.on_missing_state = 'reset')"
            ) from None
        if state.fingerprint != fingerprint:
            raise StateMismatch(
                f"{path} was written for another model, method, site or run (fingerprint {state.fingerprint} != "
                f"{fingerprint}); move it away or point state-dir at a new folder"
            )
        return state

    def run_of(self) -> tuple[str, str] | None:
        """(run, run_id) the live state belongs to; None without a live file, or one too old (or too broken) to say."""
        if not self.path.is_file():
            return None
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            return (str(raw["run"]), str(raw["run_id"])) if raw.get("run_id") else None
        except Exception:  # noqa: BLE001 - load() reports an unreadable file with its fix
            return None

    def privacy_record(self) -> dict | None:
        """The live state's DP record (``client.privacy.RECORD``): what its privacy ledger must at least hold."""
        if not self.path.is_file():
            return None
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            return dict(raw["extra"].get("privacy") or {}) or None
        except Exception:  # noqa: BLE001 - load() reports an unreadable file with its fix
            return None

    def archive(self, run: tuple[str, str]) -> Path:
        """Move another run's state files to ``previous-runs/<run>.<run_id>/`` (never deleted, never overwritten)."""
        dest = self.root / "previous-runs" / f"{run[0]}.{run[1]}"
        n = 1
        while dest.exists():
            n += 1
            dest = self.root / "previous-runs" / f"{run[0]}.{run[1]}.{n}"
        dest.mkdir(parents=True)
        for f in (self.path, self.prev_path):
            if f.is_file():
                os.replace(f, dest / f.name)
        self._live = None
        return dest

    def load(self, fingerprint: str, before_round: int | None = None) -> SiteState:
        """The saved state, or a fresh one; refuses unreadable state and state written for another split.

        ``before_round = r`` (a training message for round r): the state must predate round r. When the live
        file already holds round r or later (a server resumed from its checkpoint re-sends a round this site
        trained), the state it replaced is used instead: the kept previous file, or fresh state if the live
        one was the site's first.
        """
        if not self.path.is_file():
            self._live = None
            return SiteState(fingerprint)
        state = self._read(self.path, fingerprint)
        self._live = (state.last_round, state.previous_round)
        if before_round is None or state.last_round < before_round:
            return state
        if self.prev_path.is_file():
            prev = self._read(self.prev_path, fingerprint)
            if prev.last_round < before_round:
                log.warning("%s holds round %d; round %d is trained again (the server resumed from an earlier "
                            "checkpoint), from the state of round %d", self.path, state.last_round, before_round,
                            prev.last_round)
                return prev
        elif state.previous_round == 0:
            log.warning("%s holds round %d; round %d is trained again (the server resumed from an earlier "
                        "checkpoint), from fresh state", self.path, state.last_round, before_round)
            return SiteState(fingerprint, previous_round=None)
        log.warning("%s holds round %d and no earlier state; training round %d from it", self.path,
                    state.last_round, before_round)
        return state

    def _live_rounds(self) -> tuple[int, int | None] | None:
        """(last_round, previous_round) of the live file (None: there is none)."""
        if not self.path.is_file():
            return None
        if self._live is None:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            self._live = (int(raw["last_round"]), raw.get("previous_round"))
        return self._live

    def save(self, state: SiteState) -> None:
        """Write ``state`` atomically; the live file it replaces is kept as the previous state when it is of an
        earlier round (a round trained again replaces only the live file)."""
        self.root.mkdir(parents=True, exist_ok=True)
        live = self._live_rounds()
        rotate = live is not None and live[0] < state.last_round
        state.previous_round = 0 if live is None else (live[0] if rotate else live[1])
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        link = self.prev_path.with_name(f".{PREV}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            if rotate:  # prev := the live file (a second name for it), then live := the new state
                link.unlink(missing_ok=True)
                try:
                    os.link(self.path, link)
                except OSError:  # a file system without hard links
                    shutil.copy2(self.path, link)
                os.replace(link, self.prev_path)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # the live file is untouched; leave no debris beside it
            link.unlink(missing_ok=True)
            raise
        self._live = (state.last_round, state.previous_round)
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
