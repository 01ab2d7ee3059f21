"""Print pip constraints pinning every dependency of pyproject.toml (and the extras named on the
command line, e.g. `dev`) to its declared floor: `name>=X` becomes `name==X`.

CI installs the project with these constraints in a second environment, so the floors pyproject
declares are the releases that environment tests: one place states them. A requirement without a
`>=` floor is an error, since nothing would pin it.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][^,;\s]*)\s*$")


def floors(requirements: list[str]) -> dict[str, str]:
    pinned = {}
    for requirement in requirements:
        match = FLOOR.match(requirement)
        if match is None:
            sys.exit(f"lowest_constraints: '{requirement}' has no single '>=' floor to pin")
        pinned[match.group(1).lower()] = match.group(2)
    return pinned


def main(extras: list[str]) -> None:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    for name, version in sorted(floors(requirements).items()):
        print(f"{name}=={version}")


if __name__ == "__main__":
    main(sys.argv[1:])
