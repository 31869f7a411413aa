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
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tao_spark import evaluate, generate, registry, score, select
from tao_spark.config import Config
from tao_spark.models import model_id, resolve_model
from tao_spark.tables import SCHEMAS, TableNotFound, Tables, columns

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
    previous_version: int | None = None  # the last finished round's snapshot: what "new prompts" are new against
    first_version: int | None = None  # the first round's snapshot: its held-out prompts are the forgetting check
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    new_prompts: int | None = None
    reused_candidates: int = 0
    new_candidates: int = 0
    pairs: int | None = None
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


def finished(tables: Tables) -> list[Round]:
    """Finished rounds, oldest first."""
    if not tables.exists("rounds"):
        return []
    rows = tables.read("rounds").where(F.col("status") == "done").orderBy("started_at").select("round_id").collect()
    return [load(tables, r.round_id) for r in rows]


def count_new(tables: Tables, version: int, since: int | None) -> int:
    """Prompts in ``prompts@version`` that were not in ``prompts@since`` (all of them when since is None)."""
    now = tables.read("prompts", version=version).select("prompt_id")
    if since is None:
        return now.count()
    return now.join(tables.read("prompts", version=since).select("prompt_id"), "prompt_id", "left_anti").count()


def start(tables: Tables, cfg: Config) -> Round | None:
    """Pin the prompt log's current version and the policies; write the round's first row.

    Returns None when no prompt arrived since the last promoted round: tuning again on the same data would
    only repeat that round.
    """
    version = tables.snapshot("prompts")
    done = finished(tables)
    promoted = [r for r in done if r.promoted]
    if promoted and count_new(tables, version, promoted[-1].prompts_version) == 0:
        print(f"tao: no new prompts since round {promoted[-1].round_id} (prompts@v{promoted[-1].prompts_version}) "
              "was promoted; nothing to do", file=sys.stderr)
        return None
    champion = registry.champion_uri(cfg)
    now = datetime.now(timezone.utc)
    previous = done[-1].prompts_version if done else None
    rnd = Round(
        round_id=f"r{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", status="started", prompts_version=version,
        base_model=champion if cfg.loop.start_from == "champion" and champion else cfg.model.path,
        baseline_model=champion or cfg.model.path, started_at=now, previous_version=previous,
        first_version=(done[0].prompts_version if done[0].first_version is None else done[0].first_version)
        if done else version,
        new_prompts=count_new(tables, version, previous),
    )
    rnd.mlflow_run_id = registry.open_run(cfg, rnd.round_id)
    save(tables, rnd, cfg)
    print(f"tao: round {rnd.round_id} on prompts@v{version} ({rnd.new_prompts} new), policy {rnd.base_model}, "
          f"baseline {rnd.baseline_model}", file=sys.stderr)
    return rnd


def _uniform(col: str, salt: str = "") -> Any:
    """A stable pseudo-random number in [0, 1) per prompt_id."""
    h = F.sha2(F.concat(F.lit(salt), F.col(col)), 256) if salt else F.col(col)
    return (F.conv(F.substring(h, 1, 8), 16, 10).cast("long") % HOLDOUT_BUCKETS) / HOLDOUT_BUCKETS


def is_holdout(cfg: Config) -> Any:
    # By prompt_id, never by row order: a prompt stays on its side of the split in every round.
    return _uniform("prompt_id") < cfg.evaluate.holdout_fraction


def split(tables: Tables, rnd: Round, cfg: Config) -> tuple[DataFrame, DataFrame]:
    """Training and held-out prompts of the pinned snapshot, training prompts mixed by ``loop.mix``."""
    prompts = tables.read("prompts", version=rnd.prompts_version)
    train, holdout = prompts.where(~is_holdout(cfg)), prompts.where(is_holdout(cfg))
    if cfg.loop.mix == "latest" and rnd.previous_version is not None:
        seen = tables.read("prompts", version=rnd.previous_version).select("prompt_id")
        train = train.join(seen, "prompt_id", "left_anti")
    elif cfg.loop.mix == "recency":
        age_days = (F.unix_timestamp(F.lit(rnd.started_at)) - F.unix_timestamp("received_at")) / 86400.0
        keep = F.pow(F.lit(0.5), F.greatest(age_days, F.lit(0.0)) / cfg.loop.half_life_days)
        train = train.where(_uniform("prompt_id", "recency") < keep)
    # Ordering by prompt_id is a stable pseudo-random order, so a cap takes the same prompts every time.
    if cfg.generate.max_prompts:
        train = train.orderBy("prompt_id").limit(cfg.generate.max_prompts)
    if cfg.evaluate.max_prompts:
        holdout = holdout.orderBy("prompt_id").limit(cfg.evaluate.max_prompts)
    if rnd.first_version is None or rnd.first_version == rnd.prompts_version:
        return train, holdout  # the first round: no earlier held-out prompts to re-check
    return train, holdout.unionByName(forgetting_sample(tables, rnd, cfg)).dropDuplicates(["prompt_id"])


def forgetting_sample(tables: Tables, rnd: Round, cfg: Config) -> DataFrame:
    """A fixed sample of the first round's held-out prompts, evaluated again in every later round."""
    first = tables.read("prompts", version=rnd.first_version if rnd.first_version is not None
                        else rnd.prompts_version)
    return first.where(is_holdout(cfg)).orderBy("prompt_id").limit(cfg.loop.forgetting_prompts)


def _model(cfg: Config, uri: str) -> tuple[str, str, str]:
    path = resolve_model(uri, cfg.home, cfg.tracking_uri, cfg.registry_uri)
    return uri, path, model_id(path)


def _figures(ev: pd.DataFrame, per_task: dict[str, dict[str, float]]) -> dict[str, Any]:
    from tao_spark.rewards.plots import reward_length_figure

    tuned = pd.DataFrame({"task": ev.task, "reward": ev.challenger_reward, "tokens": ev.challenger_tokens})
    return {**evaluate.figures(ev, per_task),
            "reward_vs_length": reward_length_figure(tuned, "tuned model: reward vs. answer length (held out)")}


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
        rnd.reused_candidates = cands.where(F.col("reused_from").isNotNull()).count()
        rnd.new_candidates = agg.n - rnd.reused_candidates
        m.update({"candidates": agg.n, "candidates_reused": rnd.reused_candidates,
                  "candidates_new": rnd.new_candidates, "tokens_generated": agg.tok or 0,
                  "candidates_length_capped": agg.capped, "generate_tokens_per_s_last_run": res.tokens_per_second})
    elif stage == "score":
        m["scores_reused"] = m.get("scores_reused", 0) + score.run(
            tables, train_prompts, round_id=rnd.round_id, purpose="train", cfg=cfg.score).reused
        comb = tables.read("scores").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train")
                                           & (F.col("reward_name") == score.COMBINED))
        m["candidate_reward_mean"] = comb.agg(F.avg("value")).first()[0]
    elif stage == "select":
        rnd.pairs = m["pairs"] = select.run(tables, round_id=rnd.round_id, cfg=cfg.select)
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
        m["train_curves"] = result.curves
    elif stage == "evaluate":
        if not rnd.tuned_model:
            raise RuntimeError(f"round {rnd.round_id}: train has not produced a model")
        challenger = (rnd.tuned_model, rnd.tuned_model, model_id(rnd.tuned_model))
        ev = evaluate.run(tables, holdout, round_id=rnd.round_id, cfg=cfg, challenger=challenger,
                          champion=_model(cfg, rnd.baseline_model))
        m.update({f"eval_{k}": v for k, v in ev.metrics.items()})
        m["eval_per_task"] = ev.per_task
        m["eval_task_drops"] = ev.task_drops()
        old = {r.prompt_id for r in forgetting_sample(tables, rnd, cfg).select("prompt_id").collect()}
        sample = ev.frame[ev.frame.prompt_id.isin(old)]
        if len(sample):
            m["forgetting_prompts"] = len(sample)
            m["forgetting"] = float(sample.champion_reward.mean() - sample.challenger_reward.mean())
    elif stage == "register":
        ev_frame = tables.read("evaluations").where(F.col("round_id") == rnd.round_id).toPandas()
        flat = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        decision = registry.gate({k.removeprefix("eval_"): v for k, v in flat.items() if k.startswith("eval_")},
                                 m.get("eval_task_drops", {}), cfg.gate, forgetting=m.get("forgetting"))
        reg = registry.register(
            cfg, round_id=rnd.round_id, prompts_source=tables.lineage("prompts"), prompts_version=rnd.prompts_version,
            metrics=flat, per_task=m.get("eval_per_task", {}), decision=decision,
            adapter_dir=str(out_dir / "train" / "adapter"), merged_dir=rnd.tuned_model or "",
            tags={"tao.base_model": rnd.base_model, "tao.baseline_model": rnd.baseline_model,
                  "tao.policy_id": rnd.policy_id or ""},
            figures=_figures(ev_frame, m.get("eval_per_task", {})), run_id=rnd.mlflow_run_id,
            curves={f"train.{k}": v for k, v in (m.get("train_curves") or {"loss": m.get("train_loss_history", [])}
                                                 ).items()},
        )
        rnd.mlflow_run_id, rnd.model_version = reg.run_id, reg.model_version
        rnd.promoted, rnd.gate_reason = reg.decision.promote, reg.decision.reason
        rnd.finished_at = datetime.now(timezone.utc)
    else:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")

    m[f"time_{stage}_s"] = m.get(f"time_{stage}_s", 0.0) + time.perf_counter() - t0
    if stage != "register":  # register logs everything itself, and has just ended the run
        registry.log_stage(cfg, rnd.mlflow_run_id, {f"time_{stage}_s": m[f"time_{stage}_s"]})
    rnd.status = "done" if stage == STAGES[-1] else stage
    save(tables, rnd, cfg)
    return rnd


def run_round(tables: Tables, cfg: Config, *, new: bool = False,
              on_stage: Callable[[str, Round], None] | None = None) -> Round | None:
    """Run every stage of a round: the unfinished one if there is one (unless ``new``), else a fresh one.

    Returns None when there is nothing to do (no new prompts since the last promoted round).
    """
    rnd = None if new else latest_open(tables)
    if rnd is None:
        try:
            rnd = start(tables, cfg)
        except TableNotFound:
            raise RuntimeError("no prompts yet: run `tao ingest FILE` first") from None
        if rnd is None:
            return None
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
        eval_metrics = {k.removeprefix("eval_"): v for k, v in m.items() if k.startswith("eval_")}
        lines.append(f"  win rate        {evaluate.fmt_interval(eval_metrics)}"
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


class Busy(RuntimeError):
    """Another process holds the round lock."""


def acquire(tables: Tables, name: str, lease_s: int) -> str:
    """Take the lock ``name`` (a row in ``locks``) or raise ``Busy``; returns this holder's id.

    Every contender inserts its own row, then the row that appeared in the earliest Delta version among the
    live ones wins. Commit order is the same for everyone who looks, so exactly one contender wins even if
    the engine rebased the two commits instead of failing one. A holder that died stops counting when its
    lease expires.
    """
    holder = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    now = datetime.now(timezone.utc)
    live = F.col("expires_at") > F.lit(now)
    tables.ensure("locks")
    others = tables.read("locks").where((F.col("name") == name) & live).collect()
    if others:
        raise Busy(f"a round is in progress: lock {name!r} held by {others[0].holder} since "
                   f"{others[0].acquired_at:%Y-%m-%d %H:%M:%S} (lease until {others[0].expires_at:%H:%M:%S})")
    row = pd.DataFrame([{"name": name, "holder": holder, "acquired_at": now,
                         "expires_at": now + timedelta(seconds=lease_s)}], columns=columns("locks"))
    tables.merge("locks", tables.spark.createDataFrame(row, SCHEMAS["locks"]))
    winner = _first_live_holder(tables, name, now)
    if winner != holder:
        release(tables, name, holder)
        raise Busy(f"a round is in progress: lock {name!r} taken by {winner}")
    return holder


def _first_live_holder(tables: Tables, name: str, now: datetime) -> str | None:
    version = tables.snapshot("locks")
    first: str | None = None
    while version >= 0:
        rows = (tables.read("locks", version=version)
                .where((F.col("name") == name) & (F.col("expires_at") > F.lit(now))).collect())
        if not rows:
            break
        first = sorted(rows, key=lambda r: (r.acquired_at, r.holder))[0].holder if len(rows) > 1 else rows[0].holder
        version -= 1
    return first


def release(tables: Tables, name: str, holder: str) -> None:
    tables.spark.sql(f"DELETE FROM {tables.ref('locks')} WHERE name = '{name}' AND holder = '{holder}'").collect()


def run_loop(tables: Tables, cfg: Config, *, rounds: int | None = None) -> list[Round]:
    """Rounds until ``rounds`` have been attempted (None: until interrupted), each under the round lock."""
    done: list[Round] = []
    attempt = 0
    while rounds is None or attempt < rounds:
        attempt += 1
        holder = acquire(tables, "round", cfg.loop.lock_lease_s)
        try:
            rnd = run_round(tables, cfg)
        finally:
            release(tables, "round", holder)
        if rnd is None:
            if rounds is None:
                time.sleep(60)  # waiting for prompts to arrive
            continue
        print(report(rnd, cfg))
        done.append(rnd)
    return done


def history(tables: Tables) -> pd.DataFrame:
    """One row per round with the figures a person compares across rounds."""
    if not tables.exists("rounds"):
        return pd.DataFrame()
    pdf = tables.read("rounds").orderBy("started_at").toPandas()
    metrics = [json.loads(m or "{}") for m in pdf.metrics]
    out = pdf[["round_id", "status", "prompts_version", "new_prompts", "reused_candidates", "new_candidates",
               "pairs", "promoted", "model_version"]].copy()
    for key in ("eval_win_rate", "eval_win_rate_low", "eval_win_rate_high", "eval_champion_reward",
                "eval_challenger_reward", "forgetting"):
        out[key.removeprefix("eval_")] = [m.get(key) for m in metrics]
    return out


def history_figure(frame: pd.DataFrame) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = frame[frame.status == "done"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(1, len(done) + 1)
    a.plot(x, done.win_rate, marker="o", label="win rate")
    a.fill_between(x, done.win_rate_low, done.win_rate, alpha=0.2, label="to interval low end")
    a.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    a.set_xlabel("round")
    a.set_ylabel("challenger win rate")
    a.legend()
    b.plot(x, done.champion_reward, marker="o", label="baseline")
    b.plot(x, done.challenger_reward, marker="o", label="tuned")
    b.set_xlabel("round")
    b.set_ylabel("mean reward, held-out")
    b.legend()
    fig.tight_layout()
    return fig
