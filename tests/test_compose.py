"""The compose files: valid against the Compose Specification, and the deployment they describe.

No container engine here, so this checks structure (jsonschema) and our own rules: the server
host's file (SuperLink with TLS, authentication and a state volume its user can write, the
ServerApp runner, health checks, start order), the factory host's file (one SuperNode and its
ClientApp runner, the factory's data read-only, its state in its own volume), one env file per
shipped factory, a Kumiki config matching those factories, and images built without network
when a wheelhouse is given. Every Flower flag in these files is parsed in tests/test_deploy_flags.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from kumiki.config import load_config
from tests.flwr_flags import check, env_file, interpolate, load_yaml, program_of

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "deploy" / "compose"
#: The Compose Specification's JSON schema, vendored (from ../shared/schemas/) so this test never skips.
SCHEMA = json.loads((Path(__file__).resolve().parent / "data" / "compose-spec.json").read_text())
FILES = [ROOT / "docker-compose.yml", *sorted(COMPOSE_DIR.glob("*.yml"))]
FACTORY_ENVS = sorted((ROOT / "deploy" / "sites").glob("*.env"))
FLWR = "1.41.0"


def _cmd(svc: dict) -> list[str]:
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd and cmd.index(name) + 1 < len(cmd) else None


def server(env: dict | None = None) -> dict:
    return interpolate(load_yaml(COMPOSE_DIR / "server.yml"), {**env_file(ROOT / "deploy" / "server.env"), **(env or {})})


def factory(env_path: Path) -> dict:
    return interpolate(load_yaml(COMPOSE_DIR / "factory.yml"), env_file(env_path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_compose_file_validates_against_the_compose_spec(path):
    jsonschema.validate(load_yaml(path), SCHEMA)


def test_the_schema_check_can_fail():
    bad = load_yaml(COMPOSE_DIR / "server.yml")
    bad["services"]["superlink"]["ports"] = "8000"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_the_root_file_is_the_server_hosts_file():
    root = load_yaml(ROOT / "docker-compose.yml")
    assert root["include"] == [{"path": "deploy/compose/server.yml", "env_file": "deploy/server.env"}]
    # one project name whichever way the server is started: the same containers and state volume
    assert root["name"] == load_yaml(COMPOSE_DIR / "server.yml")["name"] == "kumiki-server"
    for inc in root["include"]:
        assert (ROOT / inc["path"]).is_file() and (ROOT / inc["env_file"]).is_file()


def test_server_file_tls_authentication_state_health_and_start_order():
    s = server()
    link, runner = s["services"]["superlink"], s["services"]["superexec-serverapp"]
    assert program_of(link) == "flower-superlink" and program_of(runner) == "flower-superexec"
    cmd = _cmd(link)
    assert "--insecure" not in cmd and "--enable-supernode-auth" in cmd
    secrets = {k: v["file"] for k, v in s["secrets"].items()}
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "superlink.crt"),
                       ("--ssl-keyfile", "superlink.key"), ("--superexec-auth-secret-file", "superexec.secret")):
        assert _flag(cmd, flag) == f"/run/secrets/{name}" and name in link["secrets"], flag
        assert secrets[name].endswith(f"/{name}")
    assert "--disable-runtime-dependency-installation" in cmd
    assert _flag(cmd, "--isolation") == "process" and _flag(cmd, "--host") == "0.0.0.0"
    # the database lives in a named volume mounted where the image made a folder owned by uid 49999
    db = _flag(cmd, "--database")
    assert db and not db.startswith("/") and db.split("/")[0] == "state"
    assert "superlink-state:/app/state" in link["volumes"] and "superlink-state" in s["volumes"]
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stage = dockerfile.split("AS superlink", 1)[1].split("FROM ", 1)[0]
    assert "mkdir -p /app/state && chown app:app /app/state" in stage and "USER app" in stage
    # not published: factories and the operator reach it through the proxy only (test below)
    assert "ports" not in link and link["networks"] == ["link"] and runner["networks"] == ["link"]
    # health: the SuperLink over HTTPS with the federation's CA; the runner starts once it is healthy
    assert "https://localhost:8000/health" in link["healthcheck"]["test"][-1]
    assert "cafile='/run/secrets/ca.crt'" in link["healthcheck"]["test"][-1]
    assert runner["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    rcmd = _cmd(runner)
    assert _flag(rcmd, "--runtime-api-address") == f"superlink:{_flag(cmd, '--port')}"
    assert _flag(rcmd, "--root-certificates") == "/run/secrets/ca.crt" and "--insecure" not in rcmd
    assert _flag(rcmd, "--superexec-auth-secret-file") == "/run/secrets/superexec.secret"
    assert any(v.endswith(":/app/runs") for v in runner["volumes"]), "run outputs land on the host"
    for svc in (link, runner, s["services"]["proxy"]):
        compile(svc["healthcheck"]["test"][-1], "<healthcheck>", "exec")


def _proxy_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kumiki_deploy_proxy", ROOT / "deploy" / "proxy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_superlink_sits_behind_the_proxy_factories_reach_the_fleet_api_only():
    """The server host publishes the proxy alone: the Fleet listener to the factories, the Control listener (mutual
    TLS) on the host's loopback by default; the SuperLink lives on an internal network with the proxy and the
    ServerApp runner. (make compose-test attacks it with real containers: deploy/compose_test.py.)"""
    s = server()
    proxy, link = s["services"]["proxy"], s["services"]["superlink"]
    published = [svc for svc in s["services"].values() if svc.get("ports")]
    assert published == [proxy], "only the proxy publishes a port"
    assert s["networks"]["link"]["internal"] is True and set(proxy["networks"]) == {"link", "edge"}
    a = _proxy_module().parser().parse_args(_cmd(proxy))
    assert a.exec_ and a.out and a.certs == "/run/secrets" and not a.plain_upstream
    assert a.superlink == f"superlink:{_flag(_cmd(link), '--port')}" and a.superlink_name == "superlink"
    assert set(proxy["secrets"]) == {"ca.crt", "superlink.crt", "superlink.key"}
    fleet, control = a.fleet.rsplit(":", 1)[1], a.control.rsplit(":", 1)[1]
    assert proxy["ports"] == [f"8000:{fleet}", f"127.0.0.1:8001:{control}"]  # server.env's defaults
    assert proxy["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    conf = _proxy_module().nginx_conf(superlink=a.superlink, fleet_listen=a.fleet, control_listen=a.control,
                                      certs="/run/secrets", runtime_dir=a.runtime_dir)
    assert "ssl_verify_client on;" in conf and conf.count("location /v1/") == 2
    insecure = load_yaml(COMPOSE_DIR / "insecure-server.yml")["services"]
    assert insecure["proxy"]["profiles"] == ["never"] and insecure["superlink"]["ports"]


@pytest.mark.parametrize("env_path", FACTORY_ENVS, ids=lambda p: p.stem)
def test_factories_run_only_apps_signed_with_the_operators_key(env_path):
    """Every SuperNode verifies apps against app-signing.pub from the certs bundle (launch/fastpath.py app-verify)."""
    f = factory(env_path)
    node = f["services"]["supernode"]
    assert node["environment"]["KUMIKI_APP_SIGNING_PUB"] == "/run/secrets/app-signing.pub"
    assert "app-signing.pub" in node["secrets"]
    assert f["secrets"]["app-signing.pub"]["file"] == f"{env_file(env_path)['KUMIKI_CERTS']}/app-signing.pub"


@pytest.mark.parametrize("env_path", FACTORY_ENVS, ids=lambda p: p.stem)
def test_factory_file_one_supernode_its_runner_its_data_read_only_its_own_state(env_path):
    env = env_file(env_path)
    f = factory(env_path)
    assert env["KUMIKI_SITE"] == env_path.stem and f["name"] == f"kumiki-{env_path.stem}"
    node, runner = f["services"]["supernode"], f["services"]["superexec"]
    assert set(f["services"]) == {"supernode", "superexec"}
    assert program_of(node) == "flower-supernode" and program_of(runner) == "flower-superexec"
    cmd = _cmd(node)
    assert "--insecure" not in cmd
    assert _flag(cmd, "--superlink") == env["KUMIKI_SUPERLINK"]
    assert _flag(cmd, "--root-certificates") == "/run/secrets/ca.crt"
    assert _flag(cmd, "--auth-supernode-private-key") == "/run/secrets/site.key"
    assert f["secrets"]["site.key"]["file"] == f"{env['KUMIKI_CERTS']}/sites/{env['KUMIKI_SITE']}.key"
    assert _flag(cmd, "--isolation") == "process"
    nc = dict(re.findall(r"(\S+?)='([^']*)'", _flag(cmd, "--node-config")))
    assert nc["site"] == env["KUMIKI_SITE"]
    # with process isolation the ClientApp runs in the runner: data and state are mounted there
    rcmd = _cmd(runner)
    assert _flag(rcmd, "--runtime-api-address") == f"supernode:{_flag(cmd, '--port')}"
    mounts = {v["target"]: v for v in runner["volumes"]}
    data, state = mounts[nc["data-dir"]], mounts[nc["state-dir"]]
    assert data["type"] == "bind" and data["read_only"] is True and data["source"] == env["KUMIKI_DATA"]
    assert state["type"] == "volume" and not state.get("read_only") and state["source"] in f["volumes"]
    assert not env["KUMIKI_DATA"].startswith(("./", "../")), "factory data lives outside the app directory"
    # the SuperNode <-> runner link: shared secret on both ends; start order by health
    assert _flag(cmd, "--superexec-auth-secret-file") == _flag(rcmd, "--superexec-auth-secret-file")
    assert runner["depends_on"] == {"supernode": {"condition": "service_healthy"}}
    # healthy means connected to the SuperLink (launch/fastpath.py alive), not merely started
    assert node["healthcheck"]["test"] == ["CMD", "python", "/opt/kumiki/fastpath.py", "alive", "30"]
    assert "ports" not in node and "ports" not in runner, "a factory publishes nothing"


def test_factories_differ_only_by_their_env_file():
    rendered = [factory(p) for p in FACTORY_ENVS]
    assert len({r["name"] for r in rendered}) == len(rendered)
    assert len({r["services"]["superexec"]["volumes"][0]["source"] for r in rendered}) == len(rendered)
    raw = (COMPOSE_DIR / "factory.yml").read_text()
    used = set(re.findall(r"\$\{(KUMIKI_[A-Z_]+)", raw))
    for p in FACTORY_ENVS:
        missing = {v for v in used if f"${{{v}:-" not in raw and f"${{{v}-" not in raw} - set(env_file(p))
        assert not missing, f"{p.name} lacks {missing}"


def test_the_shipped_config_matches_the_shipped_factories():
    cfg = load_config(str(ROOT / "deploy" / "factories.toml"))
    assert cfg.total_sites == len(FACTORY_ENVS) == 3
    assert cfg.data.dataset == "site-folders"


def test_insecure_overrides_say_so_and_drop_every_secret():
    for name, services in (("insecure-server.yml", ("superlink", "superexec-serverapp")),
                           ("insecure-factory.yml", ("supernode", "superexec"))):
        text = (COMPOSE_DIR / name).read_text()
        assert text.startswith("# INSECURE")
        data = load_yaml(COMPOSE_DIR / name)
        for svc in services:
            assert "--insecure" in _cmd(data["services"][svc]) and data["services"][svc]["secrets"] == []
    secure = (COMPOSE_DIR / "server.yml").read_text() + (COMPOSE_DIR / "factory.yml").read_text()
    assert secure.count("- --insecure") == 1  # only the factory runner's on-host link to its own SuperNode


def test_images_build_offline_from_a_wheelhouse_and_run_the_fast_path():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR}" in dockerfile
    stages = dict(m[::-1] for m in re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, re.M))
    assert stages == {"superlink": "flwr/superlink:${FLWR_VERSION}", "supernode": "flwr/supernode:${FLWR_VERSION}",
                      "proxy": "flwr/superlink:${FLWR_VERSION}", "superexec": "flwr/superexec:${FLWR_VERSION}-${PYTHON_TAG}"}
    assert "--no-index --find-links /tmp/wheelhouse" in dockerfile and "ARG PIP_INDEX_URL" in dockerfile
    for target in ("superlink", "supernode", "superexec"):
        stage = dockerfile.split(f"AS {target}", 1)[1].split("\nFROM ", 1)[0]
        assert "COPY launch/fastpath.py /opt/kumiki/fastpath.py" in stage
        assert f'ENTRYPOINT ["python", "/opt/kumiki/fastpath.py", "{target}"]' in stage
    build = interpolate(load_yaml(COMPOSE_DIR / "build.yml"), {})
    images = {s["build"]["target"]: s["image"] for s in build["services"].values()}
    run_images = {program_of(s) or s["image"].split("/")[1].split(":")[0]: s["image"]
                  for s in [*server()["services"].values(), *factory(FACTORY_ENVS[0])["services"].values()]}
    assert {(t if t == "proxy" else f"flower-{t}"): i for t, i in images.items()} == run_images, \
        "the runtime files use the images built"
    proxy = dockerfile.split("AS proxy", 1)[1].split("\nFROM ", 1)[0]  # nginx from the base's own packages
    assert "nginx-light" in proxy and "COPY deploy/proxy.py /opt/kumiki/proxy.py" in proxy and "USER app" in proxy
    assert "!deploy/proxy.py" in (ROOT / ".dockerignore").read_text().split()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"certs/", "**/*.key", "runs/", ".venv/"} <= set(ignored), "keys and runs never enter a build context"
    assert "deploy/wheelhouse/*.whl" in (ROOT / ".gitignore").read_text()
    reqs = __import__("runpy").run_path(str(ROOT / "deploy" / "image_requirements.py"))["requirements"]
    deps = reqs(ROOT / "pyproject.toml")
    assert "torch==2.13.0" in deps and not [d for d in deps if d.startswith("flwr")]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert len(deps) == len(declared) - 1


def test_the_compose_commands_parse_with_flowers_own_parsers():
    """Also in tests/test_deploy_flags.py; here as the topology's own sanity check."""
    for name, svc in server()["services"].items():
        if name != "proxy":  # nginx's, parsed by deploy/proxy.py's parser (test above)
            check([program_of(svc), *_cmd(svc)])
    for p in FACTORY_ENVS:
        for svc in factory(p)["services"].values():
            check([program_of(svc), *_cmd(svc)])


def test_a_rerun_under_the_same_run_name_is_refused_unless_overwrite_moves_the_earlier_one_aside(tmp_path):
    """The runbook's rerun (`kumiki submit --overwrite` = run_config overwrite=true), as the ServerApp sees it."""
    from server.app import start_mode
    from server.recorder import Recorder

    cfg = load_config(str(ROOT / "deploy" / "factories.toml"), [f"run.output_dir={json.dumps(str(tmp_path))}"])
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "ok"}')
    assert start_mode({}, cfg) is False
    with pytest.raises(FileExistsError, match="choose another run.name"):
        Recorder(run_dir, cfg, "deployment", quiet=True)
    with pytest.raises(ValueError, match="choose one"):
        start_mode({"overwrite": True, "resume": True}, cfg)
    assert start_mode({"overwrite": "true"}, cfg) is False
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{cfg.run.name}.replaced-")]
    assert len(aside) == 1 and json.loads((aside[0] / "summary.json").read_text()) == {"status": "ok"}
    assert not run_dir.exists()
    Recorder(run_dir, cfg, "deployment", quiet=True)  # the rerun starts


REGION_ENVS = sorted((ROOT / "deploy" / "regions").glob("*.env"))


@pytest.mark.parametrize("env_path", REGION_ENVS, ids=lambda p: p.stem)
def test_region_file_is_worldlm_shape_b_a_superlink_per_region_bridged_to_the_root(env_path):
    from kumiki import hierarchy

    env = env_file(env_path)
    f = interpolate(load_yaml(COMPOSE_DIR / "region.yml"), env)
    region = env["KUMIKI_REGION"]
    assert env_path.stem == region and f["name"] == f"kumiki-{region}"
    s = f["services"]
    assert {program_of(v) for v in s.values()} == {"flower-superlink", "flower-supernode", "flower-superexec", None}
    for svc in s.values():
        if program_of(svc):
            check([program_of(svc), *_cmd(svc)])
    link, agg = _cmd(s["superlink"]), _cmd(s["aggregator"])
    assert "--enable-supernode-auth" in link and "--insecure" not in link + agg
    # the aggregator: a site of the ROOT (its key from the root's certificates) named after the region
    assert _flag(agg, "--superlink") == env["KUMIKI_ROOT_SUPERLINK"]
    assert f["secrets"]["aggregator.key"]["file"] == f"{env['KUMIKI_ROOT_CERTS']}/sites/{region}.key"
    assert f["secrets"]["ca.crt"]["file"] == f"{env['KUMIKI_REGION_CERTS']}/ca.crt"
    nc = dict(re.findall(r"(\S+?)='([^']*)'", _flag(agg, "--node-config")))
    assert nc["site"] == region and nc["region-config"] == f"deploy/{env['KUMIKI_REGION_CONFIG']}"
    # the bridge (aggregator-superexec) and the region's ServerApp share the region dir; the bridge's flwr CLI
    # reaches this region's SuperLink under the connection the node config names
    def mounts(svc):
        return {v.split(":")[1] if isinstance(v, str) else v["target"]: v.split(":")[0] if isinstance(v, str)
                else v["source"] for v in svc["volumes"]}
    state = [t for t in mounts(s["aggregator-superexec"]) if nc["region-dir"].startswith(t + "/")]
    assert state and mounts(s["aggregator-superexec"])[state[0]] == mounts(s["superexec-serverapp"])[state[0]]
    conf = f["configs"]["region-flwr"]["content"]
    assert f'[superlink.{nc["region-federation"]}]' in conf and 'address = "superlink:8000"' in conf
    assert s["aggregator-superexec"]["configs"][0]["target"] == f"{nc['region-flwr-home']}/config.toml"
    assert _flag(_cmd(s["aggregator-superexec"]), "--runtime-api-address") == "aggregator:9094"
    # guarded as the root is: only the proxy publishes (the sites' Fleet-only port; Control on loopback, mutual TLS),
    # the region's SuperLink on an internal network; the bridge signs the region's app with the REGION's key and
    # the aggregator runs only apps the ROOT operator signed
    published = [name for name, svc in s.items() if svc.get("ports")]
    assert published == ["proxy"] and f["networks"]["link"]["internal"] is True and s["superlink"]["networks"] == ["link"]
    a = _proxy_module().parser().parse_args(_cmd(s["proxy"]))
    assert a.superlink == "superlink:8000" and a.control and a.exec_
    fleet, control = a.fleet.rsplit(":", 1)[1], a.control.rsplit(":", 1)[1]
    assert s["proxy"]["ports"] == [f"{env['KUMIKI_REGION_PUBLISH']}:{fleet}",
                                   f"{env['KUMIKI_REGION_CONTROL_PUBLISH']}:{control}"]
    assert env["KUMIKI_REGION_CONTROL_PUBLISH"].startswith("127.0.0.1:")
    bridge = s["aggregator-superexec"]
    assert bridge["environment"]["KUMIKI_APP_SIGNING_KEY"] == "/run/secrets/region-app-signing.key"
    assert f["secrets"]["region-app-signing.key"]["file"] == f"{env['KUMIKI_REGION_CERTS']}/app-signing.key"
    assert "link" in bridge["networks"] and "link" in s["superexec-serverapp"]["networks"]
    assert s["aggregator"]["environment"]["KUMIKI_APP_SIGNING_PUB"] == "/run/secrets/root-app-signing.pub"
    assert f["secrets"]["root-app-signing.pub"]["file"] == f"{env['KUMIKI_ROOT_CERTS']}/app-signing.pub"
    # the config it names is a shape (b) config with this region in its tree
    cfg = load_config(str(ROOT / "deploy" / env["KUMIKI_REGION_CONFIG"]))
    assert cfg.federation.superlinks == "per_group" and region in hierarchy.resolve(cfg).groups


@pytest.mark.parametrize("status, code", [("finished:completed", 0), ("finished:failed", 1)])
def test_kumiki_submit_exits_with_the_runs_real_status(tmp_path, monkeypatch, status, code):
    """`flwr run` exits 0 even when the run fails in the ServerApp; `kumiki submit` reads the status back."""
    import sys

    from typer.testing import CliRunner

    from launch import cli
    from launch.engines import local

    fake = tmp_path / "flwr"
    argv_file = tmp_path / "argv.json"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\njson.dump([sys.argv[1:], {{k: v for k, v in os.environ.items()"
                    f" if k.startswith('KUMIKI_')}}], open({str(argv_file)!r}, 'w'))\n"
                    "print('Successfully started run 42')\n")  # flwr run: exit 0 whatever happens later
    fake.chmod(0o755)
    monkeypatch.setattr(local, "flwr_cli", lambda: [str(fake)])  # what runs fastpath.py flwr
    asked = []
    monkeypatch.setattr(local, "_flwr_status", lambda env, run_id, federation: asked.append(run_id) or status)
    from launch.certs import make_certs

    certs = make_certs(tmp_path / "certs", [])
    r = CliRunner().invoke(cli.cli, ["submit", str(ROOT / "deploy" / "factories.toml"), "kumiki", "--overwrite",
                                     "--set", "run.rounds=2", "--certs", str(certs.root)])
    assert r.exit_code == code, r.output
    assert asked == [42]
    argv, env = json.loads(argv_file.read_text())
    # the proxy's Control listener wants the operator's certificate; the factories want the app signed
    assert env["KUMIKI_CLIENT_CERT"] == str(certs.operator_crt) and env["KUMIKI_CLIENT_KEY"] == str(certs.operator_key)
    assert env["KUMIKI_APP_SIGNING_KEY"] == str(certs.app_signing_key)
    assert argv[:3] == ["run", ".", "kumiki"] and argv[-1] == "--stream"
    run_config = argv[argv.index("--run-config") + 1]
    check(["flwr", *argv])  # what it ran parses with Flower's own parser
    assert run_config.endswith(" overwrite=true") and '"rounds":2' in run_config  # --set: the resolved config


def test_compose_test_probes_each_stand_in_base_image_once(tmp_path, monkeypatch):
    """deploy/compose_test.py starts a container to see whether a base image's / is traversable: on vfs a full copy
    of the image (it timed out at load 28). A probed image id is remembered, so later runs start no container."""
    import argparse
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("kumiki_compose_test_probe", ROOT / "deploy" / "compose_test.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    monkeypatch.setattr(ct, "PROBED", tmp_path / "ok")
    started = []

    class Runner:
        a = argparse.Namespace(build_timeout=1800)

        def sh(self, cmd, timeout, **kw):
            out = types.SimpleNamespace(stdout="", returncode=0)
            if "{{.Id}}" in cmd:
                out.stdout = f"sha256:{abs(hash(cmd[-1]))}\n"
            elif cmd[:2] == ["docker", "run"]:
                started.append(cmd[-4])
                out.stdout = "755\n"
            return out

    assert ct.repair_stand_in_bases(Runner()) == "" and sorted(started) == sorted(ct.BASES)
    started.clear()
    assert ct.repair_stand_in_bases(Runner()) == "" and started == []


def test_compose_test_refuses_to_start_without_room_for_its_containers():
    """On vfs every container copies its image: with 9 GB free the factories step failed deep inside Docker
    ("no space left on device"). The preflight says so first, with the fix."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kumiki_compose_test_disk", ROOT / "deploy" / "compose_test.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    gib = 2**30
    short = ct.disk_shortfall("vfs", 9 * gib)
    assert short and "9.0 GiB free" in short and ct.disk_shortfall("vfs", 13 * gib) and "--min-free-gb" in short
    assert ct.disk_shortfall("vfs", 30 * gib) is None
    assert ct.disk_shortfall("overlay2", 9 * gib) is None  # containers share their image's layers
    assert ct.disk_shortfall("vfs", 9 * gib, min_free_gb=8) is None  # the operator's own bound
    # WorldLM's shape (b): 21 containers; a run that started near 30 GiB free filled the disk
    assert ct.disk_shortfall("vfs", 30 * gib, regions=True) and ct.disk_shortfall("vfs", 46 * gib, regions=True) is None
    assert ct.parser().parse_args(["--min-free-gb", "8"]).min_free_gb == 8


def _compose_test_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / "compose_test.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    return ct


def _steps_run(ct, argv: list[str]) -> list[str]:
    """The steps deploy/compose_test.py's main() runs, in order, with a Runner that runs nothing."""
    runs = []

    class Dry:
        def __init__(self, a):
            self.a, self.names, self.server, self.factories = a, [], "p-server", {}
            runs.append(self)

        def step(self, name, fn, *args):
            self.names.append(name)

        def regions(self):
            self.names.append("regions:*")

        def summary(self, ok):
            pass

        def __getattr__(self, attr):  # r.preflight, r.server_up, ...: passed to step, never called
            return lambda *a, **k: None

    ct.Runner = Dry
    assert ct.main(argv) == 0
    return runs[0].names


def _runbook_table(heading: str) -> list[list[str]]:
    """The rows (cells) of the first table under ``heading`` in deploy/README.md."""
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]  # header and |---| off


def test_the_runbooks_test_table_is_what_compose_test_does_step_for_step():
    """deploy/README.md "Test this runbook" lists make compose-test's steps: the same names in the same order as
    deploy/compose_test.py runs them, each naming runbook sections that exist; and shape (b)'s table lists
    deploy/compose_regions.py's steps in its order."""
    ct = _compose_test_module("kumiki_compose_test_steps")
    table = _runbook_table("## Test this runbook")
    assert [row[0] for row in table] == _steps_run(ct, [])
    headings = set(re.findall(r"^## (\d+)\. ", (ROOT / "deploy" / "README.md").read_text(), re.M))
    for row in table:
        for n in re.findall(r"\d+", row[1]):
            assert n in headings, f"{row[0]}: runbook section {n} does not exist"
    assert _steps_run(ct, ["--regions-only"]) == ["preflight", "images", "regions:*", "teardown"]
    regions = re.findall(r'\bstep\("([^"]+)"', (ROOT / "deploy" / "compose_regions.py").read_text())
    shape_b = _runbook_table("## WorldLM shape (b)")
    assert [row[0] for row in shape_b] == [f"regions:{s}" for s in regions]
