"""The library declares ranges; the exact versions tested live in constraints.txt, which pins every dependency."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

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


@pytest.mark.integration
def test_the_wheel_runs_without_the_checkout(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv (this venv's dependencies visible, the checkout not), and from
    a directory outside the checkout: the packaged default config, `tao ingest`, a tiny `tao round` without
    --config, and the DeepSpeed JSONs the bundle's configs name."""
    import site
    import subprocess
    import sys
    import venv

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("tao_spark-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    target = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies from this venv, after the new one's own packages; its editable tao_spark comes later on the
    # path than the wheel's, and the assertion below checks which one is imported.
    (target / "_deps.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TAO_CONFIG", "MLFLOW_TRACKING_URI")}
    env.update(TAO_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")

    def run(*args: str) -> str:
        p = subprocess.run([py, *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    where = run("-c", "import tao_spark, tao_spark.config as c, tao_spark.train as t; "
                      "print(tao_spark.__file__); print(c.default_config_path()); "
                      "print((t.DEEPSPEED_CONF_DIR / 'zero2.json').is_file())").split()
    assert all(str(target) in w for w in where[:2]) and where[2] == "True", where
    data = target / "tao_spark" / "data" / "prompts.jsonl"
    cli = ["-m", "tao_spark.cli"]
    assert json.loads(run(*cli, "ingest", str(data), "--json"))["accepted"] > 0  # stdout is the JSON alone
    # The default model (SmolLM2 from its package) at a tiny budget: a random tiny model's samples tie on every
    # default reward, so it would give no pairs.
    out = run(*cli, "round", "--json", "generate.n=2", "generate.max_new_tokens=16", "generate.max_prompts=8",
              "evaluate.max_prompts=4", "evaluate.max_new_tokens=8", "evaluate.bootstrap=100", "select.min_margin=0.0",
              "train.trl.max_steps=1", "train.trl.per_device_train_batch_size=2")
    result = json.loads(out)  # the training subprocess's output went to stderr, not into the JSON
    assert result["status"] == "done" and result["metrics"]["pairs"] > 0, result
