"""TLS and SuperNode authentication (issue 12 part 1).

* ``kumiki certs``: a CA, a SuperLink certificate whose names a real TLS client accepts (and
  only those), one OpenSSH ECDSA key per factory that flwr's own loader accepts; reruns,
  new factories, rotation and renewal never lose a file.
* One real cluster on loopback (the local engine, secure by default): while two registered
  sites run, an unregistered site, a site without a key (it would register itself), an
  impostor presenting a registered site's public key without its private key, and a
  SuperNode without TLS are all refused and logged, and the run completes with exactly the
  two registered sites.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from deploy import attacker_app
from launch.certs import CertError, make_certs, site_keypair, superlink_names
from launch.engines import local
from tests.conftest import make_config


def _handshake(bundle, server_hostname: str) -> None:
    """A real TLS handshake in memory: the SuperLink's certificate against a client trusting only ca.crt."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(bundle.superlink_crt, bundle.superlink_key)
    client = ssl.create_default_context(cafile=str(bundle.ca_crt))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for end, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            return
    raise AssertionError("handshake did not complete")


def test_certs_make_a_ca_a_superlink_certificate_and_one_key_per_factory(tmp_path):
    b = make_certs(tmp_path / "certs", ["factory-a", "factory-b"], ["kumiki.example.com", "10.1.2.3"])
    assert set(superlink_names(b.superlink_crt)) == {"superlink", "localhost", "127.0.0.1", "::1", "host.docker.internal",
                                                     "kumiki.example.com", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate(b.ca_crt.read_bytes())
    x509.load_pem_x509_certificate(b.superlink_crt.read_bytes()).verify_directly_issued_by(ca)
    for name in ("superlink", "localhost", "127.0.0.1", "kumiki.example.com", "10.1.2.3"):
        _handshake(b, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(b, "evil.example.com")  # a name the certificate does not carry
    for site in ("factory-a", "factory-b"):
        key = load_ssh_private_key(b.site_key(site).read_bytes(), None)  # what flower-supernode does
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        pub = load_ssh_public_key(b.site_pub(site).read_bytes())  # what `flwr supernode register` does
        assert pub.public_numbers() == key.public_key().public_numbers()
    for secret in (b.ca_key, b.superlink_key, b.site_key("factory-a"), b.superexec_secret,
                   b.site_secret("factory-a")):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_certs_rerun_add_rotate_and_renew_never_lose_a_file(tmp_path):
    root = tmp_path / "certs"
    first = make_certs(root, ["factory-a"], ["kumiki.example.com"])
    before = {p: p.read_bytes() for p in first.created}
    assert make_certs(root, ["factory-a"]).created == []  # a rerun writes nothing
    added = make_certs(root, ["factory-d"])  # a new factory: only its files
    assert {p.name for p in added.created} == {"factory-d.key", "factory-d.pub", "factory-d.superexec.secret"}
    assert all(p.read_bytes() == data for p, data in before.items())

    make_certs(root, [], rotate=["factory-a"])
    olds = sorted(p.name for p in (root / "sites").glob("factory-a.*.old-*"))
    assert [n.split(".old-")[0] for n in olds] == ["factory-a.key", "factory-a.pub"]
    assert (root / "sites" / "factory-a.key").read_bytes() != before[first.site_key("factory-a")]

    with pytest.raises(CertError, match="renew-superlink"):
        make_certs(root, [], ["plant2.example.com"])
    make_certs(root, [], ["plant2.example.com"], renew_superlink=True)
    assert {"kumiki.example.com", "plant2.example.com"} <= set(superlink_names(root / "superlink.crt"))
    assert (root / "ca.crt").read_bytes() == before[first.ca_crt]  # same CA: nothing to redistribute
    with pytest.raises(CertError):
        make_certs(root, ["Factory A"])
    with pytest.raises(CertError):
        make_certs(root, [], ["bad host!"])


def test_security_flags_are_on_unless_insecure(tmp_path):
    b = make_certs(tmp_path / "c", ["site-0"])
    link = local.security_args("superlink", b, secret=True)
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
            "--superexec-auth-secret-file"} <= set(link) and "--insecure" not in link
    node = local.security_args("supernode", b, site="site-0")
    assert node[node.index("--auth-supernode-private-key") + 1] == str(b.site_key("site-0"))
    assert "--root-certificates" in local.security_args("superexec-server", b)
    for role in ("superlink", "supernode", "superexec-server"):
        assert local.security_args(role, None) == ["--insecure"]


# --------------------------------------------------------------------------- real processes
def _intruders(home: Path) -> dict:
    """Start the three refused clients against the running SuperLink; return their outcomes."""
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor
    import httpx

    address = json.loads((home / "endpoints.json").read_text())["fleet"]  # the port the sites dial
    certs = home / "certs"
    stranger = home / "stranger.key"
    stranger.write_bytes(site_keypair()[0])
    stranger.chmod(0o600)
    node = [local.exe("flower-supernode"), "--superlink", address, "--max-retries", "1", "--max-wait-time", "20",
            "--isolation", "process"]  # no SuperExec of their own: nothing but the refused connection
    procs = {
        "unregistered": [*node, "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key",
                         str(stranger), "--port", str(local.free_ports(1)[0])],
        "keyless": [*node, "--root-certificates", str(certs / "ca.crt"), "--port", str(local.free_ports(1)[0])],
        "no-tls": [*node, "--insecure", "--port", str(local.free_ports(1)[0])],
    }
    logs = {k: home / f"intruder-{k}.log" for k in procs}
    running = {k: subprocess.Popen(v, stdout=logs[k].open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                                   env={"PATH": str(local.venv_bin()), "FLWR_HOME": str(home)})
               for k, v in procs.items()}
    # The impostor: site-0's public key (public knowledge), signed with a key that is not site-0's.
    site0 = load_ssh_public_key((certs / "sites" / "site-0.pub").read_bytes())
    other = ec.generate_private_key(ec.SECP384R1())
    out: dict = {}
    with FleetHttpClient.from_server_address(
            address, False, (certs / "ca.crt").read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(other, site0)]) as client:
        try:
            client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(site0), heartbeat_interval=30))
            out["impostor"] = "accepted"
        except httpx.HTTPStatusError as e:
            out["impostor"] = e.response.status_code
    deadline = time.monotonic() + 45  # refused clients exit within seconds; an admitted one would stay
    for k, p in running.items():
        try:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = None  # still connected: it was let in
        local._signal_group(p.pid, signal.SIGKILL)
        p.wait()
        out[k] = (rc, local.tail(logs[k], 60))
    return out


@pytest.mark.deploy
def test_unregistered_impostor_and_plaintext_sites_are_refused_and_the_run_goes_on(tmp_path):
    cfg = make_config(tmp_path, rounds=1, sites=2, arch="mlp", name="secure")
    home = cfg.run_dir().resolve() / "flwr"
    seen: dict = {}

    def on_start(pids):  # the cluster is up and both registered sites have connected
        seen.update(_intruders(home))

    summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=on_start)

    rc, text = seen["unregistered"]
    assert rc not in (0, None) and "Failed to activate SuperNode" in text, text[-1500:]
    rc, text = seen["keyless"]  # would register itself with a fresh key if authentication were off
    assert rc not in (0, None) and "could not establish a connection" in text, text[-1500:]
    rc, text = seen["no-tls"]
    assert rc not in (0, None) and "could not establish a connection" in text, text[-1500:]
    assert seen["impostor"] == 401
    link_log = (cfg.run_dir() / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log  # the unregistered key, logged
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 401' in link_log  # the impostor, logged
    assert "[/v1/fleet/register-node][ApiError:2001]" in link_log  # the keyless self-registration, logged

    # the run is unaffected: exactly the two registered sites, every round complete
    assert summary["status"] == "ok"
    assert set(summary["personalized"]["per_site"]) == {"site-0", "site-1"}
    registered = json.loads((home / "registered.json").read_text())
    assert set(registered) == {"site-0", "site-1"}
    supernode_log = (cfg.run_dir() / "logs" / "supernode-site-0.log").read_text(errors="replace")
    assert f"SuperNode ID: {registered['site-0']}" in supernode_log  # the id fixed at registration


NGINX = local.nginx_exe()
ROOT = Path(__file__).resolve().parents[1]


def _flwr(tmp_path: Path, env: dict, address: str, ca: Path, *args: str, cert: tuple[Path, Path] | None = None):
    """The operator's ``flwr`` CLI against ``address`` (with ``cert``: presenting that client certificate)."""
    home = tmp_path / f"home-{len(list(tmp_path.glob('home-*')))}"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fed"\n[superlink.fed]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    env = {**env, "FLWR_HOME": str(home)}
    if cert:
        env.update(KUMIKI_CLIENT_CERT=str(cert[0]), KUMIKI_CLIENT_KEY=str(cert[1]))
    r = subprocess.run([*local.flwr_cli(), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    return r.returncode == 0 and '"success": false' not in r.stdout, local._ANSI.sub("", r.stdout + r.stderr)


@pytest.mark.deploy
@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; `make setup` does as root)")
def test_only_the_operators_certificate_reaches_the_control_api(tmp_path):
    """The SuperLink behind deploy/proxy.py's nginx, as the local engine runs it. Through the factories' port, with no
    client certificate, or with a certificate from another CA, registering a SuperNode key and submitting a run both
    fail, and the SuperLink sees neither; with the operator's certificate from `kumiki certs` both work."""
    certs = make_certs(tmp_path / "certs", ["site-0", "site-1"])
    attacker = make_certs(tmp_path / "attacker", [])  # a CA and an "operator" certificate of the attacker's own
    link, fleet, control = local.free_ports(3)
    env = {**local.FLWR_ENV, "PATH": f"{local.venv_bin()}:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONUNBUFFERED": "1"}
    cluster = local._Cluster(tmp_path)
    try:
        link_proc = cluster.start("superlink", [
            local.exe("flower-superlink"), *local.security_args("superlink", certs), "--isolation", "process",
            "--host", local.HOST, "--port", str(link), "--disable-runtime-dependency-installation"], env)
        proxy = local.start_proxy(cluster, NGINX, tmp_path / "proxy", certs, link, fleet, control, env)
        local._wait("the SuperLink and the proxy", lambda: all(map(local.port_open, (link, fleet, control))),
                    [link_proc, proxy], 90)
        operator = (certs.operator_crt, certs.operator_key)
        app_run = ("run", str(ROOT), "fed", "--run-config", "config='/nonexistent.toml'")
        refused = {}
        for who, port, cert in (("factory port", fleet, operator), ("no certificate", control, None),
                                ("another CA", control, (attacker.operator_crt, attacker.operator_key))):
            address = f"{local.HOST}:{port}"
            refused[who] = (_flwr(tmp_path, env, address, certs.ca_crt, "supernode", "register",
                                  str(certs.site_pub("site-0")), "fed", "--format", "json", cert=cert),
                            _flwr(tmp_path, env, address, certs.ca_crt, *app_run, cert=cert))
        control_addr = f"{local.HOST}:{control}"
        ok_ls, runs = _flwr(tmp_path, env, control_addr, certs.ca_crt, "ls", "fed", "--format", "json", cert=operator)
        ok_list, nodes = _flwr(tmp_path, env, control_addr, certs.ca_crt, "supernode", "list", "fed", "--format",
                               "json", cert=operator)
        ok_reg, reg = _flwr(tmp_path, env, control_addr, certs.ca_crt, "supernode", "register",
                            str(certs.site_pub("site-1")), "fed", "--format", "json", cert=operator)
    finally:
        cluster.stop_all()
    for who, ((reg_ok, reg_out), (run_ok, run_out)) in refused.items():
        assert not reg_ok and not run_ok, f"{who}: register {reg_ok} {reg_out[-600:]}; run {run_ok} {run_out[-600:]}"
    assert ok_ls and json.loads(runs)["runs"] == [], runs  # no run was submitted
    assert ok_list and json.loads(nodes)["nodes"] == [], nodes  # no key was registered
    assert ok_reg and '"node-id"' in reg, reg  # the operator's certificate does both
    access = (tmp_path / "proxy" / "access.log").read_text()
    assert '"POST /v1/control/register-node HTTP/1.1" 403' in access  # the factory port: never forwarded
    assert '"POST /v1/control/register-node HTTP/1.1" 400' in access  # no (valid) client certificate
    link_log = (tmp_path / "superlink.log").read_text(errors="replace")
    assert link_log.count("/v1/control/register-node") == 1 and "/v1/control/start-run" not in link_log


def test_insecure_only_by_the_explicit_flag(tmp_path, monkeypatch):
    """`kumiki run/pilot` are secure unless --insecure is given; the flag reaches the engine."""
    from typer.testing import CliRunner

    import launch.engines as engines
    from launch.cli import cli
    from tests.conftest import config_file

    seen = []

    def fake_run(cfg, engine, quiet=False, overwrite=False, insecure=False, **kw):
        seen.append(insecure)
        raise RuntimeError("stop here")

    monkeypatch.setattr(engines, "run", fake_run)
    conf = config_file(tmp_path, "flag", 1)
    for extra in ([], ["--insecure"]):
        CliRunner().invoke(cli, ["run", str(conf), "--engine", "local", *extra])
    CliRunner().invoke(cli, ["pilot", "--engine", "local"])
    assert seen == [False, True, False]


# --------------------------------------------------------------------------- signed apps
#: the attacker's pyproject and folder: deploy/attacker_app.py (shared with deploy/compose_test.py)
ATTACKER_CLIENT = """from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

MARKS = Path({marks!r})
(MARKS / "clientapp-imported").write_text("any code of this app ran at a site")  # at import: the earliest point
app = ClientApp()


@app.query()
def query(msg, context):
    (MARKS / f"clientapp-ran-{{context.node_id}}").write_text("pwned")
    return Message(RecordDict(), reply_to=msg)
"""
ATTACKER_SERVER = """import json
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

MARKS = Path({marks!r})
app = ServerApp()


@app.main()
def main(grid, context):
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=60))
    codes = [r.error.code if r.has_error() else "ok" for r in replies]
    (MARKS / f"serverapp-{{len(list(MARKS.glob('serverapp-*')))}}.json").write_text(json.dumps(codes))
"""


@pytest.mark.deploy
def test_sites_run_only_apps_the_operator_signed(tmp_path):
    """With Control API access (the proxy aside), an attacker submits its own app twice, unsigned and signed with
    its own key: no code of it runs at any site (not even its imports), each site logs the refusal and answers
    INVALID_FAB, and the operator's signed run completes with both sites."""
    marks = tmp_path / "marks"
    marks.mkdir()
    app = attacker_app.write(tmp_path / "attacker-app", ATTACKER_CLIENT.format(marks=str(marks)),
                             ATTACKER_SERVER.format(marks=str(marks)))
    other = make_certs(tmp_path / "attacker-keys", [])
    cfg = make_config(tmp_path, rounds=1, sites=2, arch="mlp", name="signed")
    home = cfg.run_dir().resolve() / "flwr"
    submitted = []

    def on_start(pids):  # the cluster is up; the operator's run is not submitted yet
        env = {k: v for k, v in os.environ.items() if k not in local._TUNING_ENV}
        env.update({**local.FLWR_ENV, "FLWR_HOME": str(home), "PATH": f"{local.venv_bin()}:{env.get('PATH', '')}"})
        operator = local.operator_env(env, make_certs(home / "certs", []))
        for key in (None, other.app_signing_key):  # unsigned; signed by another key
            run_env = {k: v for k, v in operator.items() if k != "KUMIKI_APP_SIGNING_KEY"}
            if key is not None:
                run_env["KUMIKI_APP_SIGNING_KEY"] = str(key)
            r = subprocess.run([*local.flwr_cli(), "run", str(app), local.FEDERATION], env=run_env, cwd=str(tmp_path),
                               capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
            submitted.append((r.returncode, local._ANSI.sub("", r.stdout + r.stderr)))
        deadline = time.monotonic() + 120  # both of the attacker's ServerApps have their answers
        while time.monotonic() < deadline and len(list(marks.glob("serverapp-*.json"))) < 2:
            time.sleep(0.5)

    summary = local.run_local(cfg, quiet=True, timeout_s=300, ready_timeout_s=120, on_start=on_start)
    assert all(rc == 0 and "Successfully started run" in out for rc, out in submitted), submitted
    assert not [p.name for p in marks.iterdir() if p.name.startswith("clientapp")], "attacker code ran at a site"
    answers = [json.loads(p.read_text()) for p in sorted(marks.glob("serverapp-*.json"))]
    assert len(answers) == 2 and all(len(a) == 2 and a == [answers[0][0]] * 2 and a[0] != "ok" for a in answers), answers
    for site in ("site-0", "site-1"):
        text = (cfg.run_dir() / "logs" / f"supernode-{site}.log").read_text(errors="replace")
        assert "refused app" in text and "it is not signed" in text and "not the operator key" in text, text[-1500:]
        assert "FAB verification failed" in text
    assert summary["status"] == "ok" and set(summary["personalized"]["per_site"]) == {"site-0", "site-1"}


def test_a_signed_fab_verifies_only_with_the_operators_key_and_unaltered(tmp_path):
    """launch/fastpath.py's signature (Flower's ed25519 message over the FAB, carried in the zip comment): the FAB
    stays a zip with the same files; unsigned, another key's, a re-signed copy and one altered byte all fail."""
    import io
    import zipfile

    from launch import fastpath

    ours, theirs = make_certs(tmp_path / "ours", []), make_certs(tmp_path / "theirs", [])
    pub = ours.app_signing_pub.read_text().split(" kumiki-app-signing")[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", "[project]\nname = 'x'\n")
        z.writestr("app.py", "print('hi')\n")
    fab = buf.getvalue()
    signed = fastpath.sign_fab(fab, str(ours.app_signing_key))
    assert zipfile.ZipFile(io.BytesIO(signed)).read("app.py") == b"print('hi')\n"
    assert fastpath.split_signature(signed)[0] == fab
    assert fastpath.fab_signed_by(signed, pub)
    assert not fastpath.fab_signed_by(fab, pub)  # unsigned
    assert not fastpath.fab_signed_by(fastpath.sign_fab(fab, str(theirs.app_signing_key)), pub)  # another key
    altered = bytearray(signed)
    altered[40] ^= 1
    assert not fastpath.fab_signed_by(bytes(altered), pub)  # changed after signing
    assert fastpath.fab_signed_by(fastpath.sign_fab(signed, str(ours.app_signing_key)), pub)  # re-signing replaces


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_the_proxy_config_forwards_only_the_fleet_and_control_prefixes(tmp_path):
    """deploy/proxy.py's config is valid for Debian's nginx, and forwards exactly two prefixes, one per listener."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kumiki_proxy", ROOT / "deploy" / "proxy.py")
    proxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proxy)
    certs = make_certs(tmp_path / "certs", [])
    conf = proxy.write_conf(tmp_path / "nginx.conf", superlink="127.0.0.1:9093", fleet_listen="127.0.0.1:9092",
                            control_listen="127.0.0.1:9094", certs=certs.root, runtime_dir=tmp_path / "rt")
    r = subprocess.run([NGINX, "-t", "-p", str(tmp_path / "rt"), "-c", str(conf), "-e", str(tmp_path / "rt" / "e.log")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = conf.read_text()
    assert text.count("proxy_pass") == 2 and "location /v1/fleet/" in text and "location /v1/control/" in text
    assert text.count("ssl_verify_client on;") == 1 and "/v1/runtime" not in text
