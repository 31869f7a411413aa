"""The library declares ranges; the exact versions tested live in constraints.txt, which pins every dependency."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_ranges_and_constraints_pin_each_of_them() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = project["dependencies"] + extras["dev"] + extras["local"] + extras["jvm"]
    assert not [d for d in deps if "==" in d], "exact pins belong in constraints.txt"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[_name(name)] = version
    assert {_name(d) for d in deps} <= set(pins), sorted({_name(d) for d in deps} - set(pins))


def test_spark_is_an_extra_so_a_runtime_keeps_its_own() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(d) for d in project["dependencies"]}
    # Databricks runtimes (serverless too) ship Spark and Delta; installing them again would replace theirs.
    assert not core & {"pyspark", "pysail", "delta-spark"}
    assert {_name(d) for d in project["optional-dependencies"]["local"]} == {"pyspark", "pysail"}
    assert {_name(d) for d in project["optional-dependencies"]["jvm"]} == {"pyspark", "delta-spark"}
