"""The Kumiki ServerApp (``flwr run`` entry point).

The Flower ``run_config`` carries ``config``: the path to the operator's TOML
(or the resolved config as JSON/TOML text). Knobs are never duplicated into
run_config; the other keys say how to start, not what to run: ``resume`` (true:
continue the run from its last server checkpoint) and ``overwrite`` (true: move an
earlier run of the same run.name aside first, as ``kumiki run --overwrite`` does).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from kumiki.config import load_config
from server.federation import run_federation
from server.lifecycle import alive_marker, stopped_by_signals

app = ServerApp()


class ReplyPollingGrid(Grid):
    """Delegates to Flower's grid, but polls for replies every 50 ms (backing off to ``max_poll_s``).

    Flower 1.41's ``HttpGrid.send_and_receive`` pulls right after pushing (never any
    replies yet) and then sleeps 3 s between pulls, so every round trip costs 3 s or more.
    ``KUMIKI_REPLY_POLL_MAX_S`` sets ``max_poll_s``; ``0`` keeps Flower's own loop.
    """

    def __init__(self, inner: Grid, max_poll_s: float = 0.5):
        self.inner, self.max_poll_s = inner, max_poll_s

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.inner.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        delay = 0.05
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(delay if end is None else max(0.0, min(delay, end - time.monotonic())))
            delay = min(delay * 1.5, self.max_poll_s)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    source = context.run_config.get("config")
    if not source:
        raise ValueError("run_config needs config='path/to/kumiki.toml'")
    cfg = load_config(str(source))
    sim = None
    if "sim" in context.run_config:  # in-process engines pass the materialized site roots
        import json

        sim = json.loads(str(context.run_config["sim"]))
    max_poll_s = float(os.environ.get("KUMIKI_REPLY_POLL_MAX_S", "0.5"))
    if max_poll_s > 0:
        grid = ReplyPollingGrid(grid, max_poll_s)
    if context.run_config.get("region-dir"):  # WorldLM shape (b): a sub-federation's server (server/region.py)
        from server.region import serve_region

        serve_region(grid, cfg, str(context.run_config["region-dir"]))
        return
    resume = start_mode(context.run_config, cfg)  # before the marker: overwrite moves the earlier run aside
    # a signal is recorded as the reason the run ended; a ServerApp killed outright leaves its marker behind
    with stopped_by_signals(), alive_marker(cfg.run_dir()):
        run_federation(grid, cfg, sim=sim, engine="deployment", resume=resume)


def start_mode(run_config, cfg) -> bool:
    """How this run starts, from run_config: ``resume`` (returned) or ``overwrite``. A rerun under the same
    run.name (``kumiki submit --overwrite``) moves the earlier run aside, nothing is lost; without it the
    Recorder refuses a run dir that holds a run."""
    resume = wants_resume(run_config.get("resume"))
    if wants_resume(run_config.get("overwrite"), "overwrite"):
        if resume:
            raise ValueError("run_config resume=true continues the run in its run dir and overwrite=true moves it "
                             "aside: choose one")
        from server.recorder import move_aside

        move_aside(cfg.run_dir())
    return resume


def wants_resume(value, key: str = "resume") -> bool:
    """run_config ``resume`` (or another yes/no ``key``): a TOML bool (``resume=true``), or the strings true/false."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", ""):
        raise ValueError(f"run_config {key}={value!r}: use {key}=true or {key}=false")
    return text in ("true", "1")
