"""Register: one MLflow run per round, a registered model version, and the promotion gate.

    tao register --round ROUND_ID

The run holds the resolved config, metrics, plots, the prompt snapshot as a dataset input (Delta path, or
table name in catalog mode, and version), the adapter and the merged model. The version gets alias
``challenger``; ``champion`` moves to it only when the gate passes, and the run records why or why not.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_spark.config import Config, GateConfig, git_commit

if TYPE_CHECKING:
    from tao_spark.rounds import Evaluation, Figures, Round, StageResult
    from tao_spark.tables import Tables

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"


@dataclass
class GateDecision:
    promote: bool
    reason: str


def gate(ev: Evaluation | None, cfg: GateConfig) -> GateDecision:
    """Promote only when the win-rate interval sits above the bar and nothing got worse by too much: no task's
    mean reward, not the earlier rounds' held-out sample (``forgetting``), not the answers' shape."""
    if ev is None:
        return GateDecision(False, "the round has no evaluation")
    low = ev.overall.win_rate_low
    if not low > cfg.min_win_rate_low:  # NaN (no evaluated prompts) fails too
        return GateDecision(False, f"win-rate interval low end {low:.3f} <= gate.min_win_rate_low "
                                   f"{cfg.min_win_rate_low}")
    worst = max(ev.task_drops().items(), key=lambda kv: kv[1], default=None)
    if worst and worst[1] > cfg.max_task_drop:
        return GateDecision(False, f"task {worst[0]!r} mean reward dropped {worst[1]:.3f} > gate.max_task_drop "
                                   f"{cfg.max_task_drop}")
    if ev.forgetting is not None and ev.forgetting > cfg.max_forgetting:
        return GateDecision(False, f"mean reward on earlier rounds' held-out prompts dropped {ev.forgetting:.3f} > "
                                   f"gate.max_forgetting {cfg.max_forgetting}")
    drop = ev.overall.consistency_drop_low
    if drop is not None and drop > cfg.max_consistency_drop:
        f = ev.overall
        return GateDecision(False, f"answers to {f.consistency_prompts} answer-type prompts agree with the model's "
                                   f"own samples less: {f.challenger_consistency:.3f} against the baseline's "
                                   f"{f.champion_consistency:.3f} (drop interval low end {drop:.3f} > "
                                   f"gate.max_consistency_drop {cfg.max_consistency_drop})")
    collapse = collapsed(ev.overall, cfg)
    if collapse:
        return GateDecision(False, collapse)
    return GateDecision(True, f"win-rate interval low end {low:.3f} > {cfg.min_win_rate_low}; "
                              f"no task dropped more than {cfg.max_task_drop}")


def collapsed(f: Figures, cfg: GateConfig) -> str | None:
    """Why the tuned model's answers look collapsed next to the baseline's (less diverse, much longer, more often
    cut at the cap), or None. Diversity missing (an older evaluation) passes."""
    d_new, d_old = f.challenger_distinct2, f.champion_distinct2
    if cfg.min_distinct_ratio and d_new is not None and d_old is not None and d_old > 0 \
            and d_new < cfg.min_distinct_ratio * d_old:
        return (f"answers collapsed: distinct-2 {d_new:.3f} < gate.min_distinct_ratio {cfg.min_distinct_ratio} x "
                f"baseline {d_old:.3f}")
    t_new, t_old = f.challenger_tokens, f.champion_tokens
    if cfg.max_length_ratio and t_old > 0 and t_new > cfg.max_length_ratio * t_old:
        return (f"answers grew: {t_new:.1f} tokens on average > gate.max_length_ratio {cfg.max_length_ratio} x "
                f"baseline {t_old:.1f}")
    c_new, c_old = f.challenger_length_capped, f.champion_length_capped
    if c_new - c_old > cfg.max_capped_increase:
        return (f"answers hit max_new_tokens {c_new:.0%} of the time (baseline {c_old:.0%}): more than "
                f"gate.max_capped_increase {cfg.max_capped_increase} higher")
    return None


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store; create the experiment with artifacts under TAO_HOME."""
    import mlflow

    for uri in (cfg.tracking_uri, cfg.registry_uri):
        if uri.startswith("sqlite:///"):  # some MLflow versions do not create the folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri)
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


def open_run(cfg: Config, round_id: str) -> str:
    """Create the round's MLflow run (status RUNNING) when the round starts; stages log into it, register ends it,
    so the run's duration is the round's."""
    from mlflow import MlflowClient

    exp_id = setup(cfg)
    client = MlflowClient()
    # A round killed after its run was created and before the run's id reached ``rounds`` finds that run again.
    found = client.search_runs([exp_id], filter_string=f"tags.`tao.round_id` = '{_literal(round_id)}'",
                               max_results=1)
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(exp_id, run_name=round_id, tags={"tao.round_id": round_id})
    return str(run.info.run_id)


def _literal(value: str) -> str:
    """A value inside an MLflow filter string's single quotes: refused rather than escaped when it holds a quote
    (round ids and run ids never do)."""
    if "'" in value or "\\" in value:
        raise ValueError(f"not a plain identifier: {value!r}")
    return value


def log_stage(cfg: Config, run_id: str | None, metrics: dict[str, float]) -> None:
    """Metrics of a finished stage (its time, its counts) into the round's run, as the round goes."""
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    setup(cfg)
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])


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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


# What a registered artifact may hold: weights as safetensors, configs and tokenizers as JSON/YAML/text. Anything
# else (the trainer's training_args.bin is a pickle) stays out: loading a pickle runs code.
SAFE_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".yaml", ".yml", ".md", ".model")
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Say hello in one word."}]}
CHAT_PARAMS = {"max_tokens": 256, "temperature": 0.0}


def safe_copy(src: str, dst: Path) -> Path:
    """Copy the files of ``src`` whose type is in ``SAFE_SUFFIXES`` into ``dst`` (same layout)."""
    import shutil

    root = Path(src)
    for f in root.rglob("*"):
        if f.is_file() and f.suffix in SAFE_SUFFIXES:
            out = dst / f.relative_to(root)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out)
    return dst


def chat_signature() -> Any:
    """``{"messages": [{role, content}]}`` in, OpenAI-style chat completions out, ``max_tokens``/``temperature``."""
    from mlflow.models import infer_signature

    completion = {"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "tao-policy",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    return infer_signature(CHAT_EXAMPLE, [completion], params=CHAT_PARAMS)


def requirements() -> list[str]:
    # Given, not inferred: inference loads the model in a subprocess to watch its imports (tens of seconds).
    from importlib.metadata import version

    return [f"mlflow=={version('mlflow')}", f"torch>={version('torch').split('+')[0]}",
            f"transformers=={version('transformers')}"]


def log_policy(cfg: Config, merged_dir: str, adapter_dir: str, tmp: Path) -> Any:
    """Log the merged policy as an MLflow model for chat (a LoggedModel of the active run); returns its ModelInfo.

    A pyfunc model from code (``tao_spark/mlflow_chat_model.py``): the merged HF folder as artifact ``hf``, the LoRA
    adapter as ``adapter``, a chat signature and input example, explicit requirements; no pickle anywhere.
    """
    import mlflow

    hf = safe_copy(merged_dir, tmp / "hf")
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(Path(__file__).with_name("mlflow_chat_model.py")),
        artifacts={"hf": str(hf), "adapter": adapter_dir}, signature=chat_signature(),
        # The decode path serve and the rounds use, for where the model is served without tao_spark installed.
        code_paths=[str(Path(__file__).with_name("engines.py"))],
        input_example=(CHAT_EXAMPLE, {"max_tokens": 8}), pip_requirements=requirements(),
        model_config={"name": cfg.mlflow.model_name},
    )


def model_version(name: str, run_id: str, log_model: Callable[[], Any], tags: dict[str, str],
                  description: str) -> Any:
    """The registered version of ``name`` that run ``run_id`` produced: the one already there when a registration
    is re-run after a kill (one version per run however often it runs), else ``log_model()`` logs the model into
    the active run and a version of it is created. The one registration path of the policy and the reward model."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = [v for v in client.search_model_versions(f"run_id = '{_literal(run_id)}'") if v.name == name]
    if versions:
        return versions[0]
    info = log_model()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # already registered
    return client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
                                       tags=tags, description=description)


@dataclass
class Registration:
    run_id: str
    model_version: str
    model_uri: str
    decision: GateDecision


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The register stage: the gate decides on the round's evaluation; the round is logged to MLflow with
    lineage to its prompt snapshot, its model registered, and the aliases moved by the decision."""
    import pandas as pd
    from pyspark.sql import functions as F

    from tao_spark import evaluate
    from tao_spark.rewards.plots import reward_length_figure
    from tao_spark.rounds import StageResult, Trained, folder

    m = rnd.metrics
    record = rnd.evaluation()
    ev = tables.read("evaluations").where(F.col("round_id") == rnd.round_id).toPandas()
    flat = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat.update(record.flat() if record else {})
    decision = gate(record, cfg.gate)
    per_task = {t: f.model_dump(exclude_none=True) for t, f in record.per_task.items()} if record else {}
    tuned = pd.DataFrame({"task": ev.task, "reward": ev.challenger_reward, "tokens": ev.challenger_tokens})
    figures = {**evaluate.figures(ev, record.per_task if record else {}),
               "reward_vs_length": reward_length_figure(tuned, "tuned model: reward vs. answer length (held out)")}
    trained = rnd.record(Trained)
    curves = (trained.curves or {"loss": trained.loss_history}) if trained else {}
    reg = register(
        cfg, round_id=rnd.round_id, prompts_source=tables.lineage("prompts"), prompts_version=rnd.prompts_version,
        metrics=flat, per_task=per_task, decision=decision,
        adapter_dir=str(folder(cfg, rnd) / "train" / "adapter"), merged_dir=rnd.tuned_model or "",
        tags={"tao.base_model": rnd.base_model, "tao.baseline_model": rnd.baseline_model,
              "tao.policy_id": rnd.policy_id or ""},
        figures=figures, run_id=rnd.mlflow_run_id, curves={f"train.{k}": v for k, v in curves.items()},
    )
    return StageResult(fields={"mlflow_run_id": reg.run_id, "model_version": reg.model_version,
                               "promoted": reg.decision.promote, "gate_reason": reg.decision.reason,
                               "finished_at": datetime.now(UTC)})


def register(
    cfg: Config, *, round_id: str, prompts_source: dict[str, str], prompts_version: int, metrics: dict[str, float],
    per_task: dict[str, dict[str, float]], decision: GateDecision, adapter_dir: str, merged_dir: str,
    tags: dict[str, str], figures: dict[str, Any], run_id: str | None = None,
    curves: dict[str, list[float]] | None = None,
) -> Registration:
    """Log the round to MLflow, register the merged model, move aliases by ``decision``. Resumes ``run_id``.

    ``curves`` are per-step series (the DPO loss, reward margins) logged with their step, so the UI draws them.
    """
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
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(name, value, now, step) for name, series in (curves or {}).items()
                  for step, value in enumerate(series, start=1) if value == value]
        for i in range(0, len(points), 1000):  # one request per thousand points, not one per point
            client.log_batch(run.info.run_id, metrics=points[i:i + 1000])
        source = DeltaDatasetSource(**prompts_source, delta_table_version=prompts_version)
        dataset = MetaDataset(source=source, name=f"prompts@v{prompts_version}", digest=f"{prompts_version:08d}")
        mlflow.log_input(dataset, context="training")
        mlflow.set_tags({**tags, "tao.round_id": round_id, "tao.prompts_version": str(prompts_version),
                         "tao.gate": "promote" if decision.promote else "hold", "tao.gate_reason": decision.reason,
                         "git_commit": tags.get("git_commit", git_commit()), "config_hash": cfg.digest()})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
            mlflow.log_artifact(str(Path(tmp) / "config.json"))
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"plots/{name}.png")

        def log_model() -> Any:
            with tempfile.TemporaryDirectory() as tmp:
                adapter = safe_copy(adapter_dir, Path(tmp) / "adapter")
                mlflow.log_artifacts(str(adapter), "adapter")
                info = log_policy(cfg, merged_dir, str(adapter), Path(tmp))
            # The logged model's own metrics (the UI's model page and comparisons), tied to the prompt snapshot.
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith("eval_") and v == v},
                               model_id=info.model_id, dataset=dataset)
            return info

        version = model_version(
            cfg.mlflow.model_name, run.info.run_id, log_model,
            tags={"tao.round_id": round_id, "tao.prompts_version": str(prompts_version),
                  "config_hash": cfg.digest(), "git_commit": tags.get("git_commit", git_commit())},
            description=f"TAO round {round_id} on prompts@v{prompts_version}: {decision.reason}")
        client.set_registered_model_alias(cfg.mlflow.model_name, ALIAS_CHALLENGER, version.version)
        if decision.promote:
            client.set_registered_model_alias(cfg.mlflow.model_name, ALIAS_CHAMPION, version.version)
        mlflow.set_tag("tao.model_version", version.version)
    return Registration(run.info.run_id, str(version.version), f"models:/{cfg.mlflow.model_name}/{version.version}",
                        decision)


def mlflow_evaluate(tables: Tables, cfg: Config, round_id: str | None = None, arm: str = "challenger") -> Any:
    """``mlflow.genai.evaluate`` of one arm's held-out answers in ``evaluations`` (default: the latest round),
    with every configured reward as a scorer; the result's run is in the configured experiment."""
    import json

    import mlflow
    import pandas as pd
    from pyspark.sql import functions as F

    from tao_spark.rewards import load_reward, reward_text
    from tao_spark.rewards.mlflow_genai import as_scorer

    if arm not in ("challenger", "champion"):
        raise ValueError(f"arm must be challenger or champion, got {arm!r}")
    if not cfg.score.rewards:
        raise ValueError("score.rewards is empty: no reward to evaluate with")
    ev = tables.read("evaluations")
    if round_id is None:
        latest = ev.agg(F.max("created_at")).first()[0]
        round_id = ev.where(F.col("created_at") == latest).select("round_id").first()[0]
    rows = (ev.where(F.col("round_id") == round_id)
            .join(tables.read("prompts").select("prompt_id", F.to_json("messages").alias("messages_json")),
                  "prompt_id")
            .select("prompt_id", "task", F.col(arm).alias("answer"), "messages_json").toPandas())
    data = pd.DataFrame({"inputs": [{"prompt": reward_text(json.loads(m))} for m in rows["messages_json"]],
                         "outputs": list(rows["answer"])})
    setup(cfg)
    with mlflow.start_run(run_name=f"{round_id}-{arm}-scorers"):
        return mlflow.genai.evaluate(data=data, scorers=[as_scorer(s.name, load_reward(s)) for s in cfg.score.rewards])
