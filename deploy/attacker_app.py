"""The attacker's Flower app, as the security tests submit it (tests/test_security.py on the local engine,
deploy/compose_test.py's `security:unsigned-app` step in containers).

One place for what both attacks share: the app's pyproject.toml (a valid Flower app named `atk`, publisher
`attacker`, a ServerApp `atk_server:app` and a ClientApp `atk_client:app`) and the folder `flwr run` takes.
Each caller brings its own ClientApp and ServerApp source, since each looks for the attacker's traces where its
deployment keeps them (a marks folder on this host; the sites' state volumes and the server's runs volume).
Standard library only: deploy/compose_test.py loads this file by path.
"""

from __future__ import annotations

from pathlib import Path

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "atk"
version = "1.0.0"
license = { file = "LICENSE" }
dependencies = ["flwr>=1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "attacker"
fab-format-version = 1
flwr-version-target = "1.41.0"

[tool.flwr.app.components]
serverapp = "atk_server:app"
clientapp = "atk_client:app"
"""


def write(folder: Path, client_source: str, server_source: str) -> Path:
    """The app's folder for `flwr run`: pyproject.toml, LICENSE, atk_client.py, atk_server.py."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "LICENSE").write_text("attacker\n")
    (folder / "atk_client.py").write_text(client_source)
    (folder / "atk_server.py").write_text(server_source)
    return folder
