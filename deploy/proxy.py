"""The SuperLink's front door: an nginx configuration that lets factories reach the Fleet API only.

Flower 1.41's SuperLink serves all of its APIs over HTTP on one port (``--host``/``--port``; the
``--fleet-api-address``/``--control-api-address`` flags are deprecated and only start legacy gRPC
servers behind internal switches): ``/v1/fleet/`` (SuperNodes), ``/v1/control/`` (``flwr run``,
``flwr supernode register``, ``flwr ls``: whoever reaches it runs code at every factory and admits
SuperNode keys), ``/v1/runtime/`` (the SuperExec that runs the ServerApp) and ``/health``. It has
no account authentication without Flower's paid plugins. So the SuperLink listens on loopback (or
an internal network only the proxy and the server's SuperExec share), and nginx listens for others:

* the **factory listener** (``fleet_listen``, the port factories dial): TLS with the SuperLink's own
  certificate (the factories' ``ca.crt`` and names do not change), forwards ``/v1/fleet/`` only;
  every other path is answered 403 by nginx and never reaches the SuperLink;
* the **operator listener** (``control_listen``, loopback or the operator's network): mutual TLS,
  the client must present a certificate of the federation's CA whose subject is the operator's
  (``kumiki certs`` writes ``operator.crt``/``operator.key``); forwards ``/v1/control/`` only.

Why nginx: it is in Debian (``nginx-light``; the compose image installs it the same way), proxies
HTTP/1.1 and HTTP/2 with TLS on both sides, verifies client certificates, and routes by path prefix
in a few lines; haproxy would do as well, envoy is not packaged in Debian 12.

    python deploy/proxy.py --certs DIR --superlink 127.0.0.1:9093 --fleet 0.0.0.0:9092 \\
        --control 127.0.0.1:9094 --runtime-dir /var/lib/kumiki-proxy > nginx.conf
    nginx -p /var/lib/kumiki-proxy -c $PWD/nginx.conf        # runs in the foreground (daemon off)

The compose server host's ``proxy`` service (deploy/Dockerfile's ``proxy`` stage) does both in one step:
``--out FILE --exec`` writes the configuration, then replaces itself with nginx (PID 1 of the container, so
``docker stop`` and the restart policy reach nginx itself).

Standard library only (the images and the native path run it from a checkout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: the subject common name of the operator's client certificate (``launch/certs.py``)
OPERATOR_CN = "kumiki-operator"
FLEET_PREFIX, CONTROL_PREFIX = "/v1/fleet/", "/v1/control/"


def _proxy_block(prefix: str, ca: Path, upstream_name: str, upstream_tls: bool, extra: str = "") -> str:
    scheme = "https" if upstream_tls else "http"
    tls = (f"            proxy_ssl_trusted_certificate {ca};\n"
           "            proxy_ssl_verify on;\n"
           f"            proxy_ssl_name {upstream_name};\n"
           "            proxy_ssl_server_name on;\n") if upstream_tls else ""
    return (f"        location {prefix} {{\n{extra}"
            f"            proxy_pass {scheme}://superlink;\n{tls}"
            "            proxy_set_header Connection \"\";\n"
            "            proxy_set_header X-Forwarded-For $remote_addr;\n"
            "        }\n")


def nginx_conf(*, superlink: str, fleet_listen: str, control_listen: str | None, certs: str | Path,
               runtime_dir: str | Path, upstream_tls: bool = True, upstream_name: str = "superlink",
               user: str | None = None, env: tuple[str, ...] = ()) -> str:
    """The whole ``nginx.conf`` (foreground, logs and temp files under ``runtime_dir``).

    ``superlink``: where the SuperLink listens (host:port); ``fleet_listen``/``control_listen``: the
    factory and operator listeners (``None``: no operator listener, the Control API is not reachable
    through the proxy at all); ``certs``: the ``kumiki certs`` directory (``superlink.crt``/``.key``
    are served, ``ca.crt`` verifies operators and the SuperLink); ``upstream_tls``: the SuperLink
    itself speaks TLS (Kumiki's default); ``user``: the workers' user where nginx starts as root;
    ``env``: environment variables the workers keep (nginx clears the rest).
    """
    certs, run = Path(certs).resolve(), Path(runtime_dir).resolve()
    ca, crt, key = certs / "ca.crt", certs / "superlink.crt", certs / "superlink.key"
    tls = (f"        ssl_certificate {crt};\n        ssl_certificate_key {key};\n"
           "        ssl_protocols TLSv1.2 TLSv1.3;\n")
    deny = "        location / {\n            return 403;\n        }\n"
    head = "".join(f"env {name};\n" for name in env) + (f"user {user};\n" if user else "")
    control = ""
    if control_listen:
        check = (f"            if ($ssl_client_s_dn !~ \"CN={OPERATOR_CN}(,|$)\") {{\n"
                 "                return 403;\n            }\n")
        control = ("    # operators: the Control API, mutual TLS (the operator's certificate from `kumiki certs`)\n"
                   f"    server {{\n        listen {control_listen} ssl;\n{tls}"
                   f"        ssl_client_certificate {ca};\n        ssl_verify_client on;\n        ssl_verify_depth 1;\n"
                   + _proxy_block(CONTROL_PREFIX, ca, upstream_name, upstream_tls, check) + deny + "    }\n")
    return f"""# generated by deploy/proxy.py: factories reach the Fleet API only; operators reach the Control API with a
# client certificate; nothing else of the SuperLink (Runtime API, health) is reachable through this proxy.
{head}worker_processes 1;
daemon off;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {run}/access.log;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    client_max_body_size 0;          # a model's tensors travel as objects of any size
    proxy_http_version 1.1;
    proxy_request_buffering off;     # stream both ways: no disk, no added latency
    proxy_buffering off;
    proxy_read_timeout 1h;           # log streams and long polls
    proxy_send_timeout 1h;
    upstream superlink {{
        server {superlink};
        keepalive 16;
    }}
    # factories: the Fleet API only
    server {{
        listen {fleet_listen} ssl;
{tls}{_proxy_block(FLEET_PREFIX, ca, upstream_name, upstream_tls)}{deny}    }}
{control}}}
"""


def write_conf(path: str | Path, **kw) -> Path:
    """``nginx_conf(**kw)`` to ``path``, and the runtime dir created."""
    Path(kw["runtime_dir"]).mkdir(parents=True, exist_ok=True)
    path = Path(path)
    path.write_text(nginx_conf(**kw))
    return path


def parser() -> argparse.ArgumentParser:
    """The command line (also what tests/test_compose.py checks the compose proxy service's command against)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--certs", required=True, help="the `kumiki certs` directory")
    ap.add_argument("--superlink", required=True, help="where the SuperLink listens, host:port (not public)")
    ap.add_argument("--fleet", required=True, help="the factory listener, e.g. 0.0.0.0:9092")
    ap.add_argument("--control", help="the operator listener, e.g. 127.0.0.1:9094 (omit: no Control API via the proxy)")
    ap.add_argument("--runtime-dir", required=True, help="nginx's pid, logs and temp files")
    ap.add_argument("--superlink-name", default="superlink", help="the name the SuperLink's certificate is checked for")
    ap.add_argument("--plain-upstream", action="store_true", help="the SuperLink runs --insecure behind the proxy")
    ap.add_argument("--user", help="workers' user when nginx starts as root")
    ap.add_argument("--out", help="write here (default: stdout)")
    ap.add_argument("--exec", dest="exec_", action="store_true",
                    help="with --out: then run nginx (in the foreground) with that configuration, in place of this process")
    ap.add_argument("--nginx", default="nginx", help="the nginx executable for --exec (default: nginx on PATH)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    a = ap.parse_args(argv)
    if a.exec_ and not a.out:
        ap.error("--exec needs --out")
    kw = dict(superlink=a.superlink, fleet_listen=a.fleet, control_listen=a.control, certs=a.certs,
              runtime_dir=a.runtime_dir, upstream_tls=not a.plain_upstream, upstream_name=a.superlink_name,
              user=a.user)
    if a.out:
        conf = write_conf(a.out, **kw)
        print(conf, flush=True)
        if a.exec_:
            import os
            import shutil

            nginx = shutil.which(a.nginx) or shutil.which(a.nginx, path="/usr/sbin:/sbin:/usr/local/sbin") or a.nginx
            run = str(Path(a.runtime_dir).resolve())
            os.execv(nginx, [nginx, "-p", run, "-c", str(conf.resolve()), "-e", f"{run}/error.log"])
    else:
        sys.stdout.write(nginx_conf(**kw))


if __name__ == "__main__":
    main()
