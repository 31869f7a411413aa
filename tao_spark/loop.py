"""One TAO round, top to bottom: snapshot → generate → score → select → train → evaluate → register.

    tao round                      # resumes an unfinished round, else starts one on a fresh snapshot
    tao round --new generate.n=8   # always a fresh round

Each stage is also its own command (``tao generate --round R`` ...). The ``rounds`` table holds one row per
round: what it was pinned to, where each stage got to, metrics, and the gate decision. Every stage writes
by key, so re-running a round after a crash continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tao_spark import evaluate, generate, registry, score, select
from tao_spark.config import Config
from tao_spark.models import model_id, resolve_model
from tao_spark.tables import SCHEMAS, Tables, TableNotFound, columns

STAGES = ("generate", "score", "select", "train", "evaluate", "register")
HOLDOUT_BUCKETS = 10_000


@dataclasses.dataclass
class Round:
    """A row of ``rounds``: the round's pins and progress."""

    round_id: str
    status: str
    prompts_version: int
    base_model: str
    baseline_model: str
    started_at: datetime
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    policy_id: str | None = None
    tuned_model: str | None = None
    mlflow_run_id: str | None = None
    model_version: str | None = None
    promoted: bool | None = None
    gate_reason: str | None = None
    n_prompts: int | None = None
    n_train: int | None = None
    n_holdout: int | None = None
    finished_at: datetime | None = None

    def done(self, stage: str) -> bool:
        return self.status == "done" or (self.status in STAGES and STAGES.index(self.status) >= STAGES.index(stage))


def save(tables: Tables, rnd: Round, cfg: Config) -> None:
    row = {**dataclasses.asdict(rnd), "metrics": json.dumps(rnd.metrics, default=float),
           "config_hash": cfg.digest(), "git_commit": registry.git_commit()}
    pdf = pd.DataFrame([row], columns=columns("rounds"))
    tables.merge("rounds", tables.spark.createDataFrame(pdf, SCHEMAS["rounds"]), update=True)


def load(tables: Tables, round_id: str) -> Round:
    rows = tables.read("rounds").where(F.col("round_id") == round_id).collect()
    if not rows:
        raise LookupError(f"no round {round_id!r} in rounds")
    d = rows[0].asDict()
    fields = {f.name for f in dataclasses.fields(Round)}
    return Round(**{**{k: v for k, v in d.items() if k in fields}, "metrics": json.loads(d["metrics"] or "{}")})


def latest_open(tables: Tables) -> Round | None:
    if not tables.exists("rounds"):
        return None
    rows = (tables.read("rounds").where(F.col("status") != "done").orderBy(F.desc("started_at"))
            .select("round_id").limit(1).collect())
    return load(tables, rows[0].round_id) if rows else None


def start(tables: Tables, cfg: Config) -> Round:
    """Pin the prompt log's current version and the policies; write the round's first row."""
    version = tables.snapshot("prompts")
    now = datetime.now(timezone.utc)
    rnd = Round(
        round_id=f"r{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", status="started", prompts_version=version,
        base_model=cfg.model.path, baseline_model=registry.champion_uri(cfg) or cfg.model.path, started_at=now,
    )
    save(tables, rnd, cfg)
    print(f"tao: round {rnd.round_id} on prompts@v{version}, policy {rnd.base_model}, "
          f"baseline {rnd.baseline_model}", file=sys.stderr)
    return rnd


def split(tables: Tables, rnd: Round, cfg: Config) -> tuple[DataFrame, DataFrame]:
    """Training and held-out prompts of the pinned snapshot, split stably by prompt_id (never by row order)."""
    prompts = tables.read("prompts", version=rnd.prompts_version)
    bucket = F.conv(F.substring("prompt_id", 1, 8), 16, 10).cast("long") % HOLDOUT_BUCKETS
    is_holdout = bucket < int(cfg.evaluate.holdout_fraction * HOLDOUT_BUCKETS)
    train, holdout = prompts.where(~is_holdout), prompts.where(is_holdout)
    # Ordering by prompt_id is a stable pseudo-random order, so a cap takes the same prompts every time.
    if cfg.generate.max_prompts:
        train = train.orderBy("prompt_id").limit(cfg.generate.max_prompts)
    if cfg.evaluate.max_prompts:
        holdout = holdout.orderBy("prompt_id").limit(cfg.evaluate.max_prompts)
    return train, holdout


def _model(cfg: Config, uri: str) -> tuple[str, str, str]:
    path = resolve_model(uri, cfg.home)
    return uri, path, model_id(path)


def run_stage(tables: Tables, rnd: Round, stage: str, cfg: Config) -> Round:
    """Run one stage of a round and record it; a stage already done is skipped."""
    if rnd.done(stage):
        print(f"tao: {stage}: already done for {rnd.round_id}", file=sys.stderr)
        return rnd
    before = STAGES[STAGES.index(stage) - 1] if stage in STAGES and stage != STAGES[0] else None
    if before and not rnd.done(before):
        raise RuntimeError(f"round {rnd.round_id}: run `tao {before} --round {rnd.round_id}` first")
    t0 = time.perf_counter()
    train_prompts, holdout = split(tables, rnd, cfg)
    out_dir = Path(cfg.home) / "rounds" / rnd.round_id
    m = rnd.metrics

    if stage == "generate":
        uri, path, pid = _model(cfg, rnd.base_model)
        rnd.policy_id = pid
        res = generate.run(tables, train_prompts, round_id=rnd.round_id, purpose="train", model=cfg.model,
                           model_path=path, policy_id=pid, cfg=cfg.generate)
        cands = tables.read("candidates").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train"))
        agg = cands.agg(F.count("*").alias("n"), F.sum("tokens").alias("tok"),
                        F.avg((F.col("finish_reason") == "length").cast("double")).alias("capped")).first()
        rnd.n_train, rnd.n_holdout = train_prompts.count(), holdout.count()
        rnd.n_prompts = tables.read("prompts", version=rnd.prompts_version).count()
        m.update({"candidates": agg.n, "tokens_generated": agg.tok or 0, "candidates_length_capped": agg.capped,
                  "generate_tokens_per_s_last_run": res.tokens_per_second})
    elif stage == "score":
        score.run(tables, train_prompts, round_id=rnd.round_id, purpose="train", cfg=cfg.score)
        comb = tables.read("scores").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train")
                                           & (F.col("reward_name") == score.COMBINED))
        m["candidate_reward_mean"] = comb.agg(F.avg("value")).first()[0]
    elif stage == "select":
        m["pairs"] = select.run(tables, round_id=rnd.round_id, cfg=cfg.select)
    elif stage == "train":
        from tao_spark.train import train_on_pairs

        prefs = (tables.read("preferences").where(F.col("round_id") == rnd.round_id)
                 .join(train_prompts.select("prompt_id", F.to_json("messages").alias("messages_json")), "prompt_id")
                 .select("prompt_id", "messages_json", "chosen", "rejected", "margin").orderBy("prompt_id").toPandas())
        if prefs.empty:
            raise RuntimeError(f"round {rnd.round_id}: no preference pairs to train on "
                               f"(lower select.min_margin or raise generate.n)")
        pairs = pd.DataFrame({"prompt": [json.loads(x) for x in prefs.messages_json], "chosen": prefs.chosen,
                              "rejected": prefs.rejected})
        _, base_path, _ = _model(cfg, rnd.base_model)
        result = train_on_pairs(pairs, base_path, str(out_dir / "train"), cfg.train, seed=cfg.generate.seed,
                                spark=tables.spark)
        rnd.tuned_model = result.merged_dir or result.adapter_dir
        m.update({f"train_{k}": v for k, v in result.metrics.items()})
        m["train_loss_history"] = result.loss_history
    elif stage == "evaluate":
        if not rnd.tuned_model:
            raise RuntimeError(f"round {rnd.round_id}: train has not produced a model")
        challenger = (rnd.tuned_model, rnd.tuned_model, model_id(rnd.tuned_model))
        ev = evaluate.run(tables, holdout, round_id=rnd.round_id, cfg=cfg, challenger=challenger,
                          champion=_model(cfg, rnd.baseline_model))
        m.update({f"eval_{k}": v for k, v in ev.metrics.items()})
        m["eval_per_task"] = ev.per_task
        m["eval_task_drops"] = ev.task_drops()
    elif stage == "register":
        ev_frame = tables.read("evaluations").where(F.col("round_id") == rnd.round_id).toPandas()
        flat = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        decision = registry.gate({k.removeprefix("eval_"): v for k, v in flat.items() if k.startswith("eval_")},
                                 m.get("eval_task_drops", {}), cfg.gate)
        reg = registry.register(
            cfg, round_id=rnd.round_id, prompts_path=tables.path("prompts"), prompts_version=rnd.prompts_version,
            metrics=flat, per_task=m.get("eval_per_task", {}), decision=decision,
            adapter_dir=str(out_dir / "train" / "adapter"), merged_dir=rnd.tuned_model or "",
            tags={"tao.base_model": rnd.base_model, "tao.baseline_model": rnd.baseline_model,
                  "tao.policy_id": rnd.policy_id or ""},
            figures=evaluate.figures(ev_frame, m.get("eval_per_task", {})), run_id=rnd.mlflow_run_id,
        )
        rnd.mlflow_run_id, rnd.model_version = reg.run_id, reg.model_version
        rnd.promoted, rnd.gate_reason = reg.decision.promote, reg.decision.reason
        rnd.finished_at = datetime.now(timezone.utc)
    else:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")

    m[f"time_{stage}_s"] = m.get(f"time_{stage}_s", 0.0) + time.perf_counter() - t0
    rnd.status = "done" if stage == STAGES[-1] else stage
    save(tables, rnd, cfg)
    return rnd


def run_round(tables: Tables, cfg: Config, *, new: bool = False,
              on_stage: Callable[[str, Round], None] | None = None) -> Round:
    """Run every stage of a round: the unfinished one if there is one (unless ``new``), else a fresh one."""
    rnd = None if new else latest_open(tables)
    if rnd is None:
        try:
            rnd = start(tables, cfg)
        except TableNotFound:
            raise RuntimeError("no prompts yet: run `tao ingest FILE` first") from None
    else:
        print(f"tao: resuming round {rnd.round_id} after stage {rnd.status}", file=sys.stderr)
    for stage in STAGES:
        rnd = run_stage(tables, rnd, stage, cfg)
        if on_stage:
            on_stage(stage, rnd)
    return rnd


def report(rnd: Round, cfg: Config) -> str:
    """The few lines a person wants after a round."""
    m = rnd.metrics
    lines = [f"TAO round {rnd.round_id} on prompts@v{rnd.prompts_version} ({rnd.n_prompts} prompts: "
             f"{rnd.n_train} train, {rnd.n_holdout} held out)"]
    lines.append(f"  candidates      {m.get('candidates', 0)} ({m.get('tokens_generated', 0)} tokens, "
                 f"{100 * (m.get('candidates_length_capped') or 0):.0f}% hit max_new_tokens)")
    lines.append(f"  pairs built     {m.get('pairs', 0)}")
    if "eval_challenger_reward" in m:
        lines.append(f"  reward          {m['eval_champion_reward']:.3f} -> {m['eval_challenger_reward']:.3f} "
                     f"(held-out, greedy; baseline {rnd.baseline_model})")
        if "eval_champion_compliance" in m:
            lines.append(f"  compliance      {m['eval_champion_compliance']:.3f} -> "
                         f"{m.get('eval_challenger_compliance', float('nan')):.3f} "
                         "(share of prompts meeting every stated constraint)")
        lines.append(f"  answer tokens   {m['eval_champion_tokens']:.1f} -> {m['eval_challenger_tokens']:.1f}")
        lines.append(f"  win rate        {evaluate.fmt_interval({k[5:]: v for k, v in m.items() if k.startswith('eval_')})}"
                     " (ties count half)")
        for task, tm in sorted(m.get("eval_per_task", {}).items()):
            lines.append(f"    {task:<14}{evaluate.fmt_interval(tm)}  reward {tm['champion_reward']:.3f} -> "
                         f"{tm['challenger_reward']:.3f}  (n={int(tm['prompts'])})")
    if rnd.promoted is not None:
        lines.append(f"  promoted        {'yes' if rnd.promoted else 'no'}: {rnd.gate_reason}")
        lines.append(f"  MLflow          run {rnd.mlflow_run_id}, {cfg.mlflow.model_name} version "
                     f"{rnd.model_version}")
        lines.append(f"                  open with: mlflow ui --backend-store-uri {cfg.tracking_uri}")
    times = ", ".join(f"{s} {m[f'time_{s}_s']:.0f}s" for s in STAGES if f"time_{s}_s" in m)
    lines.append(f"  stage times     {times}")
    return "\n".join(lines)
