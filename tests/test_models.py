"""Model resolution: local folders, MLflow URIs against a real SQLite registry, and policy ids."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tao_spark.models import ModelNotFound, model_id, resolve_model


def test_local_folder_passes_through(tiny_model: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model), str(tmp_path)) == str(tiny_model.resolve())


def test_bad_specs_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"), str(tmp_path))
    with pytest.raises(ValueError, match="unknown model spec 'no/such/model'"):
        resolve_model("no/such/model", str(tmp_path))


def test_model_id_is_stable_and_tracks_weights(tiny_model: Path, tmp_path: Path) -> None:
    from tests.tiny import make_tiny_model

    copy = shutil.copytree(tiny_model, tmp_path / "copy")
    assert model_id(str(tiny_model)) == model_id(str(copy))  # same weights, another place: same policy
    assert model_id(str(tiny_model)) != model_id(str(make_tiny_model(tmp_path / "other", seed=1)))
    with pytest.raises(ValueError, match="not a HF model folder"):
        model_id(str(tmp_path))


@pytest.fixture()
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test's registry.setup may have pointed it elsewhere
    yield uri
    mlflow.set_tracking_uri(None)  # monkeypatch then restores the environment variable
    mlflow.set_registry_uri(None)


def test_mlflow_uris_download_once(registry: str, tiny_model: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    # The layout registry code writes: the HF folder as run artifacts under "model", and a model version whose
    # source is that folder (register_model needs a logged model in MLflow 3; create_model_version does not).
    mlflow.set_experiment("models-test")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_model), artifact_path="model")
    client = MlflowClient()
    client.create_registered_model("tiny-policy")
    version = client.create_model_version("tiny-policy", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("tiny-policy", "champion", version.version)

    home = str(tmp_path / "home")
    by_alias = resolve_model("models:/tiny-policy@champion", home, registry)
    assert (Path(by_alias) / "config.json").is_file()
    assert model_id(by_alias) == model_id(str(tiny_model))
    by_run = resolve_model(f"runs:/{run.info.run_id}/model", home, registry)
    assert model_id(by_run) == model_id(str(tiny_model))

    # Threads resolving one new URI at once download it once (the lock), and nobody sees a partial folder.
    calls: list[str] = []
    real_download = mlflow.artifacts.download_artifacts

    def counting_download(**kw: str) -> str:
        calls.append(kw["artifact_uri"])
        return real_download(**kw)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting_download)
    home2 = str(tmp_path / "home2")
    barrier = threading.Barrier(3)
    got: list[str] = []

    def worker() -> None:
        barrier.wait()
        got.append(resolve_model("models:/tiny-policy@champion", home2, registry))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 3 and len(set(got)) == 1
    assert model_id(got[0]) == model_id(str(tiny_model))

    def no_download(**_: object) -> None:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert resolve_model("models:/tiny-policy@champion", home, registry) == by_alias
    # The alias is keyed by its version.
    assert resolve_model(f"models:/tiny-policy/{version.version}", home, registry) == by_alias
    assert resolve_model(f"runs:/{run.info.run_id}/model", home, registry) == by_run


def test_an_unknown_model_fails_in_one_line_and_creates_no_store(tmp_path: Path) -> None:
    """From any working directory, a models:/ URI resolves in the configured store only, or says what is there."""
    import subprocess
    import sys

    home, cwd = tmp_path / "home", tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "TAO_HOME": str(home), "TAO_API_KEYS": "k"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-m", "tao_spark.cli", "serve", "serve.model=models:/nope@champion",
                        "model.path=models:/nope@champion", "serve.capture=false"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "models:/nope@champion" in last and "no MLflow store" in last and str(home) in last
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("mlflow.db"))  # no store appeared, here or in home

    # With a store that lacks the model: the line names the registry and the models it has.
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{home / 'mlflow.db'}"
    home.mkdir()
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("tao-reward")
    mlflow.set_tracking_uri(None)
    with pytest.raises(ModelNotFound, match=r"not in the model registry at sqlite:.*registered models: tao-reward"):
        resolve_model("models:/nope@champion", str(home))
    assert not (cwd / "mlflow.db").exists()


def test_the_logged_policy_answers_where_tao_spark_is_not_installed(tiny_model: Path, tmp_path: Path) -> None:
    """The registered model decodes through the same engine as `tao serve` (one decode path), and carries that
    engine's file with it: loaded in a process that cannot import tao_spark, as a serving host would, it answers."""
    import json
    import subprocess
    import sys

    import mlflow

    from tao_spark.config import load_config
    from tao_spark.registry import log_policy

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "adapter").mkdir()
    try:
        # Its own experiment: the active one may be another test's, in another store.
        with mlflow.start_run(experiment_id=mlflow.set_experiment("policy-without-tao-spark").experiment_id):
            info = log_policy(load_config(None, [f"home={tmp_path / 'home'}"]), str(tiny_model),
                              str(tmp_path / "adapter"), tmp_path)
    finally:
        mlflow.set_tracking_uri(None)  # the next test finds its store from its own config
    script = (
        "import json, sys\n"
        "sys.modules['tao_spark'] = None  # importing it now fails, as where it is not installed\n"
        "import mlflow\n"
        f"mlflow.set_tracking_uri({f'sqlite:///{tmp_path}/mlflow.db'!r})\n"
        f"m = mlflow.pyfunc.load_model({info.model_uri!r})\n"
        "out = m.predict({'messages': [{'role': 'user', 'content': 'Hi'}]}, params={'max_tokens': 3})\n"
        "print(json.dumps({'out': out, 'engine': sys.modules['engines'].__file__}))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    (answer,) = got["out"]
    assert answer["object"] == "chat.completion" and 1 <= answer["usage"]["completion_tokens"] <= 3
    assert got["engine"].endswith("code/engines.py")  # the copy logged with the model, not an installed package
