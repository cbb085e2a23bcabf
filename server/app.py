"""The Kumiki ServerApp (``flwr run`` entry point).

The Flower ``run_config`` carries one key, ``config``: the path to the
operator's TOML (or the resolved config as JSON/TOML text). Knobs are never
duplicated into run_config.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from kumiki.config import load_config
from server.federation import run_federation

app = ServerApp()


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
    run_federation(grid, cfg, sim=sim, engine="deployment")
