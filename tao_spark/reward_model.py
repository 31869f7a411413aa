"""Train a Bradley-Terry reward model on ``preference_pairs``: TorchDistributor + TRL's RewardTrainer + LoRA.

    tao ingest-preferences tao_spark/data/preferences.jsonl
    tao train-reward                   # reward_model.backbone=smollm2-135m-instruct to try the causal LM
    # score with it:  score.rewards: [{name: rm, model: "models:/tao-reward@champion"}]

The driver pins a Delta version of ``preference_pairs``, splits it stably by ``pair_id`` into training and
held-out pairs, writes both to ``<home>/reward_models/<run>/`` and launches ``reward_worker`` through Spark's
``TorchDistributor``. The worker trains a one-scalar sequence classifier (``num_labels=1``) with a PEFT LoRA
adapter (``task_type="SEQ_CLS"``, the head trained in full), merges it, and scores the held-out pairs; rank 0
writes ``model/``, ``metrics.json`` and ``holdout_scores.jsonl``. The driver computes the held-out metrics
(pairwise accuracy overall, per task and by length bucket; reward-length correlation), logs them to MLflow with
the Delta version as the dataset lineage, registers the model, and moves alias ``champion`` to it only when its
held-out accuracy beats the current champion's.

A prompt is encoded as the score stage shows it to a reward (``rewards.reward_text``: system turn and last user
turn): with the tokenizer's chat template when it has one, else as a sentence pair (prompt, answer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_spark.config import Config, RewardModelConfig, git_commit
from tao_spark.mlflow_reward_model import encode, score_texts

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from tao_spark.tables import Tables

ALIAS_CHAMPION = "champion"
ACCURACY_TAG = "tao.holdout_accuracy"
LENGTH_BUCKETS = (20, 50, 100)  # words of the longer answer of a pair: <20, 20-49, 50-99, >=100

# CPU defaults, measured on the bundled preferences (2 cores); any key can be overridden through reward_model.trl.
_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,  # pairs per step (32 sequences)
    "learning_rate": 5e-4,  # LoRA + a fresh head; TRL's 1e-4 leaves MiniLM at ~0.6 accuracy after two epochs
    "lr_scheduler_type": "linear",
    "warmup_steps": 5,
    "logging_steps": 1,
    "save_strategy": "no",  # the worker saves the merged model itself, once
    "report_to": [],  # the driver logs to MLflow
    "eval_strategy": "no",  # held-out pairs are scored once by the worker, after training
    "gradient_checkpointing": False,
    "ddp_find_unused_parameters": False,
    "dataloader_num_workers": 0,
    "max_length": None,  # the worker truncates (keeping the answer's end) instead of TRL dropping long pairs
    "disable_dropout": True,
}
_LORA_TARGETS = {"bert": ["query", "key", "value", "dense"]}
_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def is_holdout(pair_id: str, fraction: float) -> bool:
    """Stable split: the pair id is a hex hash, so its first 8 digits are a uniform draw."""
    return int(pair_id[:8], 16) / 16**8 < fraction


@dataclasses.dataclass
class RewardModelResult:
    run_id: str
    model_version: str
    model_uri: str
    promoted: bool
    pairs_version: int
    metrics: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def holdout_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Pairwise accuracy (overall, ``task.<t>.accuracy``, ``length.<bucket>.accuracy``) and reward-length correlation.

    ``rows``: one per held-out pair with task, chosen_score, rejected_score, chosen_words, rejected_words. A tie
    counts as half right.
    """
    def acc(rs: list[dict[str, Any]]) -> float:
        return sum(1.0 if r["chosen_score"] > r["rejected_score"] else 0.5 if r["chosen_score"] == r["rejected_score"]
                   else 0.0 for r in rs) / len(rs) if rs else math.nan

    m: dict[str, float] = {"holdout_accuracy": acc(rows), "holdout_pairs": float(len(rows))}
    for task in sorted({r["task"] for r in rows}):
        m[f"task.{task}.accuracy"] = acc([r for r in rows if r["task"] == task])
    edges = [0, *LENGTH_BUCKETS, None]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        rs = [r for r in rows if max(r["chosen_words"], r["rejected_words"]) >= lo
              and (hi is None or max(r["chosen_words"], r["rejected_words"]) < hi)]
        if rs:
            m[f"length.{lo}-{hi if hi is not None else 'inf'}.accuracy"] = acc(rs)
    scores = [r[f"{s}_score"] for r in rows for s in ("chosen", "rejected")]
    words = [r[f"{s}_words"] for r in rows for s in ("chosen", "rejected")]
    m["reward_length_corr"] = correlation(words, scores)
    m["chosen_longer_share"] = sum(r["chosen_words"] > r["rejected_words"] for r in rows) / len(rows) if rows \
        else math.nan
    return m


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 3 points."""
    if len(x) < 3:
        return math.nan
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def train(pairs: list[dict[str, Any]], backbone_path: str, out_dir: str, cfg: RewardModelConfig) -> dict[str, Any]:
    """Train on ``pairs`` (pair_id, task, prompt text, chosen, rejected) through TorchDistributor.

    Returns ``{"metrics": {...}, "loss_history": [...], "holdout": [...rows for holdout_metrics]}``; the merged
    model is in ``<out_dir>/model``. Needs an active SparkSession (the distributor reads its conf from it).
    """
    from tao_spark.config import TrainConfig
    from tao_spark.train import launch

    train_rows = [p for p in pairs if not is_holdout(p["pair_id"], cfg.holdout_fraction)]
    holdout_rows = [p for p in pairs if is_holdout(p["pair_id"], cfg.holdout_fraction)]
    if not train_rows or not holdout_rows:
        raise ValueError(f"{len(pairs)} preference pairs give {len(train_rows)} to train on and {len(holdout_rows)} "
                         "held out: ingest more (tao ingest-preferences) or change reward_model.holdout_fraction")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    for name, rows in (("train.jsonl", train_rows), ("holdout.jsonl", holdout_rows)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    args = {**_DEFAULTS, "output_dir": str(out / "trainer"), "seed": cfg.seed, "use_cpu": not cfg.use_gpu,
            "bf16": cfg.use_gpu, **cfg.trl}
    spec = {"model_path": backbone_path, "out_dir": str(out), "max_length": cfg.max_length, "args": args,
            "use_gpu": cfg.use_gpu,
            "lora": cfg.lora_args()}
    # The policy's launcher: on a cluster the reward model trains on the executors too (its folder must then be
    # on storage they share, as the policy's is). The encoding it scores with travels with the worker.
    launch(reward_worker, spec, TrainConfig(num_processes=cfg.num_processes, use_gpu=cfg.use_gpu,
                                            local_mode=cfg.local_mode),
           by_value=[sys.modules[encode.__module__]], what="reward model")
    if not (out / "metrics.json").exists():
        raise RuntimeError(f"reward training finished without writing {out / 'metrics.json'}; see the worker log")
    report = json.loads((out / "metrics.json").read_text())
    report["holdout"] = [json.loads(line) for line in (out / "holdout_scores.jsonl").read_text().splitlines()]
    return report


def _accept_use_cache(model: Any) -> None:
    """TRL's RewardTrainer passes ``use_cache=False`` to every model; encoders of transformers 4.x (BERT, MiniLM)
    take no such argument (5.x models take any keyword). Drop it for those, so both lines of releases train."""
    import inspect

    params = inspect.signature(model.forward).parameters.values()
    if any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params):
        return
    forward = model.forward

    def without_use_cache(*args: Any, use_cache: Any = None, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    model.forward = without_use_cache


def reward_worker(spec: dict[str, Any]) -> None:
    """One torchrun process: LoRA reward training; rank 0 merges, saves, and scores the held-out pairs."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    if not spec["use_gpu"]:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    out = Path(spec["out_dir"])
    torch.manual_seed(int(spec["args"]["seed"]))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    _accept_use_cache(model)

    def load(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    max_len = int(spec["max_length"])
    train_rows = load("train.jsonl")
    dataset = Dataset.from_list([{"chosen_ids": encode(tokenizer, r["prompt"], r["chosen"], max_len),
                                  "rejected_ids": encode(tokenizer, r["prompt"], r["rejected"], max_len)}
                                 for r in train_rows])
    lora = dict(spec["lora"])
    lora["target_modules"] = lora["target_modules"] or _LORA_TARGETS.get(model.config.model_type, _DEFAULT_TARGETS)
    trainer = RewardTrainer(model=model, args=RewardConfig(**spec["args"]), train_dataset=dataset,
                            processing_class=tokenizer, peft_config=LoraConfig(task_type="SEQ_CLS", **lora))
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return
    trained: Any = trainer.model
    merged = trained.merge_and_unload().eval()
    merged.save_pretrained(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))

    holdout = load("holdout.jsonl")
    texts = [(r["prompt"], r[side]) for r in holdout for side in ("chosen", "rejected")]
    scores = score_texts(merged, tokenizer, texts, max_len)
    with open(out / "holdout_scores.jsonl", "w") as f:
        for i, r in enumerate(holdout):
            f.write(json.dumps({"pair_id": r["pair_id"], "task": r["task"], "chosen_score": scores[2 * i],
                                "rejected_score": scores[2 * i + 1], "chosen_words": len(r["chosen"].split()),
                                "rejected_words": len(r["rejected"].split())}) + "\n")
    losses = [float(log["loss"]) for log in trainer.state.log_history if "loss" in log]
    metrics = {"train_loss": float(result.training_loss), "train_loss_first": losses[0] if losses else math.nan,
               "train_loss_last": losses[-1] if losses else math.nan, "steps": float(trainer.state.global_step),
               "train_pairs": float(len(train_rows)), "train_s": train_s}
    accuracies = [float(log["accuracy"]) for log in trainer.state.log_history if "accuracy" in log]
    if accuracies:
        metrics["train_accuracy_last"] = accuracies[-1]
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "loss_history": losses}, indent=1))


def run(spark: SparkSession, tables: Tables, cfg: Config, *, name: str | None = None) -> RewardModelResult:
    """``tao train-reward``: train on the current ``preference_pairs``, log to MLflow, register, maybe promote."""
    from tao_spark.models import resolve_model
    from tao_spark.rewards import reward_text
    from tao_spark.train import check_trl

    rm = cfg.reward_model
    check_trl(rm.trl, "reward", "reward_model.trl")
    version = tables.snapshot("preference_pairs")
    frame: Any = (tables.read("preference_pairs", version=version)
             .select("pair_id", "task", "messages", "chosen", "rejected").toPandas())
    pairs = [{"pair_id": r.pair_id, "task": r.task, "chosen": r.chosen, "rejected": r.rejected,
              "prompt": reward_text([{"role": m["role"], "content": m["content"]} for m in r.messages])}
             for r in frame.itertuples(index=False)]
    run_name = f"reward-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out = Path(cfg.home) / "reward_models" / run_name
    backbone = resolve_model(rm.backbone, cfg.home, cfg.tracking_uri, cfg.registry_uri)
    t0 = time.perf_counter()
    report = train(pairs, backbone, str(out), rm)
    wall_s = time.perf_counter() - t0
    metrics = {**report["metrics"], **holdout_metrics(report["holdout"]), "wall_s": wall_s}
    metrics["accuracy_per_minute"] = metrics["holdout_accuracy"] / (wall_s / 60)
    return register(cfg, name or rm.name, out, metrics, report["holdout"], tables.lineage("preference_pairs"), version,
                    run_name)


def register(cfg: Config, name: str, out: Path, metrics: dict[str, float], holdout: list[dict[str, Any]],
             pairs_source: dict[str, str], pairs_version: int, run_name: str) -> RewardModelResult:
    """Log the training run to MLflow, register ``out/model`` as ``name``; ``champion`` only if accuracy beats it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    from tao_spark import registry
    from tao_spark.rewards.plots import reward_length_figure

    registry.setup(cfg)
    client = MlflowClient()
    accuracy = metrics["holdout_accuracy"]
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({f"reward_model.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                           for k, v in dataclasses.asdict(cfg.reward_model).items()})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
        source = DeltaDatasetSource(**pairs_source, delta_table_version=pairs_version)
        mlflow.log_input(MetaDataset(source=source, name=f"preference_pairs@v{pairs_version}",
                                     digest=f"{pairs_version:08d}"), context="training")
        rows = [{"task": r["task"], "words": r[f"{s}_words"], "reward": r[f"{s}_score"], "side": s}
                for r in holdout for s in ("chosen", "rejected")]
        import pandas as pd

        mlflow.log_figure(reward_length_figure(pd.DataFrame(rows)), "plots/reward_length.png")
        mlflow.set_tags({"tao.kind": "reward_model", "tao.preference_pairs_version": str(pairs_version),
                         "git_commit": git_commit(), "config_hash": cfg.digest()})
        try:
            champion = client.get_model_version_by_alias(name, ALIAS_CHAMPION)
            best = float(champion.tags.get(ACCURACY_TAG, "nan"))
        except MlflowException:
            best = -math.inf
        promoted = accuracy > best or best != best
        mv = registry.model_version(
            name, run.info.run_id, lambda: log_reward_model(out / "model", cfg.reward_model.max_length),
            tags={ACCURACY_TAG: f"{accuracy:.6f}", "tao.preference_pairs_version": str(pairs_version),
                  "tao.backbone": cfg.reward_model.backbone, "config_hash": cfg.digest()},
            description=f"Bradley-Terry reward model on preference_pairs@v{pairs_version}: held-out pairwise "
                        f"accuracy {accuracy:.3f} (champion had {best:.3f})")
        if promoted:
            client.set_registered_model_alias(name, ALIAS_CHAMPION, mv.version)
        mlflow.set_tags({"tao.model_version": str(mv.version), "tao.promoted": str(promoted)})
        mlflow.log_metric("promoted", float(promoted))
    return RewardModelResult(run.info.run_id, str(mv.version), f"models:/{name}/{mv.version}", promoted,
                             pairs_version, metrics)


def log_reward_model(folder: Path, max_length: int) -> Any:
    """Log the merged reward model as an MLflow model from code (``tao_spark/mlflow_reward_model.py``) with a
    signature (``prompt``, ``response`` -> score) and an input example; only safetensors/JSON/text inside."""
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    from tao_spark import mlflow_reward_model, registry

    example = [{"prompt": "Explain tides in one sentence.", "response": "The moon's gravity pulls the oceans."}]
    with tempfile.TemporaryDirectory() as tmp:
        hf = registry.safe_copy(str(folder), Path(tmp) / "hf")
        return mlflow.pyfunc.log_model(
            name="model", python_model=mlflow_reward_model.__file__, artifacts={"hf": str(hf)},
            signature=infer_signature(example, [0.0]), input_example=example,
            pip_requirements=registry.requirements(), model_config={"max_length": max_length})


def report(r: RewardModelResult) -> str:
    m = r.metrics
    lines = [f"reward model {r.model_uri} on preference_pairs@v{r.pairs_version}: held-out accuracy "
             f"{m['holdout_accuracy']:.3f} over {int(m['holdout_pairs'])} pairs in {m['wall_s']:.0f} s; "
             f"{'promoted to champion' if r.promoted else 'champion kept (not more accurate)'}",
             f"  reward-length correlation {m['reward_length_corr']:+.3f}; MLflow run {r.run_id}"]
    lines += [f"  {k}: {v:.3f}" for k, v in sorted(m.items()) if k.startswith(("task.", "length."))]
    return "\n".join(lines)
