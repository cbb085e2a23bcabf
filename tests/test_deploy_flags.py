"""Every Flower command line we ship or document is parsed by the pinned Flower's own parsers.

The compose files (per host and the insecure overrides), the commands deploy/native.py runs,
and the commands in the docs (deploy/README.md and docs/): a flag Flower 1.41 does not know, a
deprecated one, a malformed --node-config/--run-config, or a wrong `flwr` sub-command fails
here, before an operator meets it on a factory floor.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.flwr_flags import FlagError, check, commands_in_markdown, env_file, interpolate, load_yaml, program_of

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose"
FACTORY_ENVS = sorted((ROOT / "deploy" / "sites").glob("*.env"))


def _compose_commands() -> list[tuple[str, list[str]]]:
    out = []
    server_env = env_file(ROOT / "deploy" / "server.env")
    for name in ("server.yml", "insecure-server.yml"):
        for svc_name, svc in interpolate(load_yaml(COMPOSE / name), server_env)["services"].items():
            image = load_yaml(COMPOSE / "server.yml")["services"][svc_name]
            if svc_name == "proxy":  # nginx, not Flower: its command is deploy/proxy.py's (tests/test_compose.py)
                continue
            out.append((f"{name}:{svc_name}", [program_of(interpolate(image, server_env)), *svc["command"]]))
    for env_path in FACTORY_ENVS:
        env = env_file(env_path)
        for name in ("factory.yml", "insecure-factory.yml"):
            for svc_name, svc in interpolate(load_yaml(COMPOSE / name), env)["services"].items():
                image = interpolate(load_yaml(COMPOSE / "factory.yml")["services"][svc_name], env)
                out.append((f"{name}[{env_path.stem}]:{svc_name}", [program_of(image), *svc["command"]]))
    return out


@pytest.mark.parametrize("where, argv", _compose_commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_compose_commands(where, argv):
    assert argv[0], f"{where}: no Flower image"
    check(argv)


def _native():
    spec = importlib.util.spec_from_file_location("kumiki_native", ROOT / "deploy" / "native.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kumiki_native"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_native_scripts_commands(tmp_path):
    n = _native()
    d = n.Deployment(tmp_path / "fed")
    for secure in (True, False):
        for argv in (n.superlink_cmd(d, 9001, secure), n.server_superexec_cmd(d, 9001, secure),
                     n.supernode_cmd(d, "factory-a", 9001, 9002, tmp_path / "data", secure)):
            ns = check(argv)
            assert ns.insecure is (not secure), argv
        ns = check(n.site_superexec_cmd(d, "factory-a", 9002, secure))  # the on-host link to its own SuperNode
        assert ns.insecure and (ns.superexec_auth_secret_file is not None) is secure
    for argv in (n.register_cmd(d, "factory-a"), n.unregister_cmd(123), n.run_cmd(tmp_path / "c.json"),
                 ["flwr", "supernode", "list", n.FEDERATION], ["flwr", "ls", n.FEDERATION, "--run-id", "5",
                                                               "--format", "json"]):
        check(argv)


#: The pages that show Flower commands, and how many each shows at least (so a rewrite cannot drop them unseen).
DOCUMENTED = {"deploy/README.md": 12, "docs/deployment.md": 3, "docs/user-guide.md": 1, "docs/methods/worldlm.md": 3}


@pytest.mark.parametrize("doc", sorted(DOCUMENTED))
def test_documented_commands(doc):
    cmds = commands_in_markdown((ROOT / doc).read_text())
    assert len(cmds) >= DOCUMENTED[doc], f"{doc}: the commands were not found"
    for argv in cmds:
        check(argv)


def test_every_page_with_flower_commands_is_checked():
    """A page that gains Flower commands is parsed too (README.md included; docs/runbook.md is a copy of
    deploy/README.md, checked there)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    shown = {p.relative_to(ROOT).as_posix() for p in pages if commands_in_markdown(p.read_text())}
    assert shown - {"docs/runbook.md"} <= set(DOCUMENTED), shown - set(DOCUMENTED)


def test_the_runbook_validates_first_and_uses_the_shipped_config():
    """Runs are submitted with `kumiki submit` (flwr run, then the run's real status), after `kumiki validate`."""
    import shlex

    text = (ROOT / "deploy" / "README.md").read_text()
    runs = [c for c in commands_in_markdown(text) if Path(c[0]).name == "flwr" and c[1] == "run"]
    assert all("config='deploy/factories.toml'" in " ".join(c) or "configs/" in " ".join(c) for c in runs)
    submits = [shlex.split(line.split("#")[0]) for block in text.split("```")[1::2]
               for line in block.splitlines() if "kumiki submit " in line]
    assert submits and all(c[2] == "deploy/factories.toml" and c[3] == "kumiki" for c in submits), submits
    for block in text.split("```")[1::2]:
        if block.startswith(("bash", "sh\n")) and ("flwr run" in block or "kumiki submit" in block):
            first = min(i for i in (block.find("flwr run"), block.find("kumiki submit")) if i >= 0)
            if "--overwrite" in block or "run.name=" in block:
                continue  # the rerun block: the config was validated in the block before
            assert "kumiki validate" in block[:first], "kumiki validate comes before every run"
    # what `kumiki submit` runs parses with Flower's own parser, the rerun's overwrite=true included
    check(["flwr", "run", ".", "kumiki", "--run-config", "config='deploy/factories.toml' overwrite=true", "--stream"])


@pytest.mark.parametrize("argv, why", [
    (["flower-superlink", "--ssl-certfil", "x"], "not a full flag"),           # argparse would take the prefix
    (["flower-superlink", "--ssl-certfiles", "x"], "refuses"),                 # a typo
    (["flower-superlink", "--insecure", "--fleet-api-address", "0.0.0.0:9092"], "deprecated"),
    (["flower-supernode", "--insecure", "--clientappio-api-address", "x"], "refuses"),   # removed in 1.41
    (["flower-supernode", "--insecure", "--node-config", "site=factory a"], "node-config"),
    (["flower-superexec", "--insecure"], "refuses"),                           # --runtime-api-address is required
    (["flower-superexec", "--insecure", "--appio-api-address", "x:1"], "deprecated"),
    (["flwr", "supernode", "register", "k.pub", "c", "--nam", "x"], "refuses"),
    (["flwr", "supernode", "revoke", "1"], "no such command"),
    (["flwr", "run", ".", "c", "--run-config", "config=/no/quotes"], "run-config"),
])
def test_the_checker_rejects_what_flower_would(argv, why):
    with pytest.raises(FlagError, match=why):
        check(argv)


def test_demo_data_makes_the_shipped_factories_folders(tmp_path):
    """The runbook's rehearsal starts with `native.py demo-data`: one checked site folder per shipped factory."""
    from kumiki.data.sites import load_site

    n = _native()
    n.main(["demo-data", str(tmp_path / "data")])
    for name in n.DEFAULT_SITES:
        data = load_site(tmp_path / "data" / name / "data")
        assert data.name == name and data.role == "train" and data.num_train > 0
