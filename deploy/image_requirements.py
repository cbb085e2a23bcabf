"""Print the requirements the Kumiki SuperExec image installs: [project].dependencies minus flwr.

    python deploy/image_requirements.py [pyproject.toml]

Used by deploy/Dockerfile and by ``deploy/images.sh wheelhouse`` (which downloads exactly these,
for the image's platform, into deploy/wheelhouse/ on a machine with a registry).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].strip().lower() != "flwr"]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))))
