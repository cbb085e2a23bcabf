"""In-process engine: the real ClientApp and strategy, no Ray, no processes.

Every message still goes through ``ClientApp.__call__`` with a per-site
``Context`` and node config, and every reply is checked by the strategy, so
this exercises the same code paths as the simulation and deployment engines.
It exists for tests and benchmarks on 2-core machines, where Ray's ~17 s
start-up would dominate small runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    ``node_configs[i]`` is node ``i + 1``'s node config; ``offline`` holds node ids
    that never answer (a site that disappeared). ``record``: keep every message sent and
    every reply in ``sent`` and ``replies`` (for tests that inspect them); off, the grid
    keeps none, so a long run's memory does not grow with its rounds.
    """

    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_id: int = 1, record: bool = False):
        self.app = client_app
        self.contexts = {
            i + 1: Context(run_id=run_id, node_id=i + 1, node_config=dict(nc), state=RecordDict(), run_config={})
            for i, nc in enumerate(node_configs)
        }
        self.offline: set[int] = set()
        self.record = record
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._run = None
        self._ids = itertools.count(1)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id="", ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def get_nodes(self):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        out = []
        for msg in messages:
            if self.record:
                self.sent.append(msg)
            nid = msg.metadata.dst_node_id
            if nid in self.offline:
                continue
            try:
                reply = self.app(msg, self.contexts[nid])
            except Exception as exc:  # noqa: BLE001 - a crashing ClientApp is an error reply, as in deployment
                reply = Message(Error(code=1, reason=repr(exc)), reply_to=msg)
            if self.record:
                self.replies.append(reply)
            out.append(reply)
        return out


def run_inprocess(cfg, quiet: bool = False, grid_hook=None, overwrite: bool = False, resume: bool = False,
                  record: bool | None = None) -> dict:
    """Run a whole config in this process; ``grid_hook(grid)`` lets tests inspect or perturb the grid.

    ``record``: the grid keeps every message and reply (``grid.sent``, ``grid.replies``); by default only
    when a ``grid_hook`` is given (tests read them), never in plain runs and benchmarks.
    """
    from client.app import app as client_app
    from launch.engines.prepare import node_configs, prepare_sites
    from launch.rundir import claim_run_dir
    from server.federation import run_federation

    with claim_run_dir(cfg, overwrite, resume):
        sim = prepare_sites(cfg, resume)
        grid = InProcessGrid(client_app, node_configs(cfg, sim), record=grid_hook is not None if record is None else record)
        if grid_hook is not None:
            grid_hook(grid)
        return run_federation(grid, cfg, sim=None, engine="inprocess", quiet=quiet, resume=resume)
