"""The library declares ranges; the exact versions tested live in constraints.txt, which pins every dependency."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_ranges_and_constraints_pin_each_of_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert not [d for d in deps if "==" in d], "exact pins belong in constraints.txt"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[_name(name)] = version
    assert {_name(d) for d in deps} <= set(pins), sorted({_name(d) for d in deps} - set(pins))
