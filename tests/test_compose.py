"""docker-compose.yml: valid against the Compose Specification schema, and the pilot's topology.

No container engine here, so this checks structure (jsonschema) and our own topology rules:
one SuperLink, a SuperNode per factory, each factory's ClientApp executor with its own data and
state volume, node configs naming the site's data-dir/state-dir, and the image versions.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
#: The Compose Specification's JSON schema, vendored (from ../shared/schemas/) so this test never skips.
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
FLWR = "1.41.0"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _image(svc: dict) -> str:
    return str(svc.get("image", ""))


def _cmd(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(svc: dict, name: str) -> str | None:
    cmd = _cmd(svc)
    return cmd[cmd.index(name) + 1] if name in cmd and cmd.index(name) + 1 < len(cmd) else None


def _mounts(svc: dict) -> dict[str, dict]:
    """target -> {"source", "read_only"} for the service's volumes (short or long syntax)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):  # SOURCE:TARGET[:MODE]; SOURCE may hold ${VAR:-default}
            parts = v.split(":")
            mode = parts.pop() if len(parts) > 2 and not parts[-1].startswith("/") else ""
            out[parts[-1]] = {"source": ":".join(parts[:-1]), "read_only": "ro" in mode.split(",")}
        else:
            out[v["target"]] = {"source": v.get("source", ""), "read_only": bool(v.get("read_only"))}
    return out


def _node_config(svc: dict) -> dict:
    text = _flag(svc, "--node-config")
    assert text, "a SuperNode without --node-config"
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", text)  # flwr's own parsing rule
    return tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs))


def _by_role(compose: dict):
    services = compose["services"]
    links = {n: s for n, s in services.items() if _image(s).startswith("flwr/superlink")}
    nodes = {n: s for n, s in services.items() if _image(s).startswith("flwr/supernode")}
    execs = {n: s for n, s in services.items() if n not in links and n not in nodes and "--runtime-api-address" in _cmd(s)}
    return services, links, nodes, execs


def test_compose_validates_against_the_compose_spec(compose):
    import json

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema)
    bad = {**compose, "services": {**compose["services"], "superlink": {**compose["services"]["superlink"], "ports": "8000"}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_pilot_topology(compose):
    services, links, nodes, execs = _by_role(compose)
    assert len(links) == 1, f"expected one SuperLink, got {sorted(links)}"
    (link_name, link), = links.items()
    assert _image(link) == f"flwr/superlink:{FLWR}"
    assert _flag(link, "--isolation") == "process"  # the ServerApp runs in its own SuperExec
    link_port = _flag(link, "--port")
    assert link_port and _flag(link, "--database")

    assert len(nodes) >= 3, "the pilot has three factories"
    sites, data_sources, state_sources = set(), set(), set()
    for name, node in nodes.items():
        assert _image(node) == f"flwr/supernode:{FLWR}"
        assert _flag(node, "--superlink") == f"{link_name}:{link_port}"
        assert _flag(node, "--isolation") == "process"
        nc = _node_config(node)
        assert {"site", "data-dir", "state-dir"} <= set(nc), f"{name}: node config {nc}"
        sites.add(nc["site"])
        # with process isolation the ClientApp runs in the SuperExec serving this SuperNode's Runtime API
        port = _flag(node, "--port")
        served = [e for e in execs.values() if _flag(e, "--runtime-api-address") == f"{name}:{port}"]
        assert len(served) == 1, f"{name}: expected one SuperExec on {name}:{port}"
        mounts = _mounts(served[0])
        assert nc["data-dir"] in mounts and nc["state-dir"] in mounts, f"{name}: data/state not mounted where the ClientApp runs"
        data, state = mounts[nc["data-dir"]], mounts[nc["state-dir"]]
        assert data["source"] and state["source"]
        assert data["read_only"] and not state["read_only"], f"{name}: data read-only, state writable"
        data_sources.add(data["source"])
        state_sources.add(state["source"])
    assert len(sites) == len(nodes), "two SuperNodes claim the same site"
    assert len(data_sources) == len(nodes) and len(state_sources) == len(nodes), "volumes shared between factories"
    named = set(compose.get("volumes", {}))
    assert state_sources <= named, "site state must live in named volumes"

    server_execs = [e for e in execs.values() if _flag(e, "--runtime-api-address") == f"{link_name}:{link_port}"]
    assert len(server_execs) == 1, "one SuperExec runs the ServerApp"


def test_images_and_insecure_flags_are_marked(compose):
    _, links, nodes, execs = _by_role(compose)
    for name, svc in execs.items():
        build = svc.get("build", {})
        assert build.get("dockerfile") == "deploy/Dockerfile", name
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}", dockerfile, re.M)
    assert f"ARG FLWR_VERSION={FLWR}" in dockerfile
    # TLS/auth come later: every --insecure is there on purpose and says so
    lines = COMPOSE.read_text().splitlines()
    insecure = [line for line in lines if line.strip().startswith("- --insecure")]
    assert len(insecure) == len(links) + len(nodes) + len(execs), insecure  # every Flower process, for now
    assert all("INSECURE" in line for line in insecure)
    for env in ("factory-a", "factory-b", "factory-c"):
        assert (ROOT / f"deploy/sites/{env}.env").is_file()
