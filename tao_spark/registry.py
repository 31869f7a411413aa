"""Register: one MLflow run per round, a registered model version, and the promotion gate.

    tao register --round ROUND_ID

The run holds the resolved config, metrics, plots, the prompt snapshot as a dataset input (Delta path, or
table name in catalog mode, and version), the adapter and the merged model. The version gets alias
``challenger``; ``champion`` moves to it only when the gate passes, and the run records why or why not.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tao_spark.config import Config, GateConfig

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"


@dataclass
class GateDecision:
    promote: bool
    reason: str


def gate(metrics: dict[str, float], task_drops: dict[str, float], cfg: GateConfig,
         forgetting: float | None = None) -> GateDecision:
    """Promote only when the win-rate interval sits above the bar and nothing got worse by too much.

    ``forgetting`` is how much mean reward fell on the earlier rounds' held-out sample.
    """
    low = metrics.get("win_rate_low", float("nan"))
    if not low > cfg.min_win_rate_low:  # NaN (no evaluated prompts) fails too
        return GateDecision(False, f"win-rate interval low end {low:.3f} <= gate.min_win_rate_low "
                                   f"{cfg.min_win_rate_low}")
    worst = max(task_drops.items(), key=lambda kv: kv[1], default=None)
    if worst and worst[1] > cfg.max_task_drop:
        return GateDecision(False, f"task {worst[0]!r} mean reward dropped {worst[1]:.3f} > gate.max_task_drop "
                                   f"{cfg.max_task_drop}")
    if forgetting is not None and forgetting > cfg.max_forgetting:
        return GateDecision(False, f"mean reward on earlier rounds' held-out prompts dropped {forgetting:.3f} > "
                                   f"gate.max_forgetting {cfg.max_forgetting}")
    return GateDecision(True, f"win-rate interval low end {low:.3f} > {cfg.min_win_rate_low}; "
                              f"no task dropped more than {cfg.max_task_drop}")


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store; create the experiment with artifacts under TAO_HOME."""
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        location = None
        if cfg.tracking_uri.startswith("sqlite:"):
            # Otherwise artifacts land in ./mlruns of whatever directory the job was started from.
            location = (Path(cfg.home) / "mlartifacts").as_uri()
        exp_id = mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def champion_uri(cfg: Config) -> str | None:
    """``models:/<name>@champion`` if the registry has a champion, else None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup(cfg)
    try:
        MlflowClient().get_model_version_by_alias(cfg.mlflow.model_name, ALIAS_CHAMPION)
    except MlflowException:
        return None
    return f"models:/{cfg.mlflow.model_name}@{ALIAS_CHAMPION}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


@dataclass
class Registration:
    run_id: str
    model_version: str
    model_uri: str
    decision: GateDecision


def register(
    cfg: Config, *, round_id: str, prompts_source: dict[str, str], prompts_version: int, metrics: dict[str, float],
    per_task: dict[str, dict[str, float]], decision: GateDecision, adapter_dir: str, merged_dir: str,
    tags: dict[str, str], figures: dict[str, Any], run_id: str | None = None,
) -> Registration:
    """Log the round to MLflow, register the merged model, move aliases by ``decision``. Resumes ``run_id``."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    setup(cfg)
    client = MlflowClient()
    with mlflow.start_run(run_id=run_id, run_name=round_id) as run:
        params = _flatten(cfg.to_dict())
        logged = run.data.params if run_id else {}
        mlflow.log_params({k: v[:6000] for k, v in params.items() if k not in logged})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
        for task, m in per_task.items():
            mlflow.log_metrics({f"task.{task}.{k}": v for k, v in m.items() if v == v})
        source = DeltaDatasetSource(**prompts_source, delta_table_version=prompts_version)
        mlflow.log_input(MetaDataset(source=source, name=f"prompts@v{prompts_version}",
                                     digest=f"{prompts_version:08d}"), context="training")
        mlflow.set_tags({**tags, "tao.round_id": round_id, "tao.prompts_version": str(prompts_version),
                         "tao.gate": "promote" if decision.promote else "hold", "tao.gate_reason": decision.reason,
                         "git_commit": tags.get("git_commit", git_commit()), "config_hash": cfg.digest()})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            mlflow.log_artifact(str(Path(tmp) / "config.json"))
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"plots/{name}.png")
        mlflow.log_artifacts(adapter_dir, "adapter")
        mlflow.log_artifacts(merged_dir, "model")
        try:
            client.create_registered_model(cfg.mlflow.model_name)
        except mlflow.exceptions.MlflowException:
            pass  # already registered
        version = client.create_model_version(
            cfg.mlflow.model_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
            tags={"tao.round_id": round_id, "tao.prompts_version": str(prompts_version),
                  "config_hash": cfg.digest(), "git_commit": tags.get("git_commit", git_commit())},
            description=f"TAO round {round_id} on prompts@v{prompts_version}: {decision.reason}",
        )
        client.set_registered_model_alias(cfg.mlflow.model_name, ALIAS_CHALLENGER, version.version)
        if decision.promote:
            client.set_registered_model_alias(cfg.mlflow.model_name, ALIAS_CHAMPION, version.version)
        mlflow.set_tag("tao.model_version", version.version)
    return Registration(run.info.run_id, str(version.version), f"models:/{cfg.mlflow.model_name}/{version.version}",
                        decision)
