"""The ``rounds`` record: one row per TAO round, what it is pinned to and where it got to.

    from tao_spark import rounds
    rnd = rounds.load(tables, "r20261201-101500-ab12cd")
    train, holdout = rounds.split(tables, rnd, cfg)

A round pins one version of the prompt log; every stage reads its prompts through ``split`` on that
version, so a stage re-run after a crash, or on another machine, sees exactly the prompts the round started
with. A stage returns a ``StageResult``: the fields of the row it sets and its typed record (``Generated``,
``Scored``, ``Selected``, ``Trained``, ``Evaluation``), which the loop folds into ``rounds.metrics`` and saves with
the row. ``Round.record(Kind)`` reads a record back, validated: ``tao status``, the report, the gate and MLflow all
read the same figures, and a renamed or missing one is an error, not a silent gap.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tao_spark.config import STAGES, Config, UserError, git_commit
from tao_spark.models import model_id, resolve_model
from tao_spark.tables import Tables, columns


class RoundNotFound(UserError, LookupError):
    """A round id that ``rounds`` does not have."""


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

    def evaluation(self) -> Evaluation | None:
        """The evaluate stage's typed result (None before it ran)."""
        return read_evaluation(self.metrics, self.round_id)

    def record(self, kind: type[R]) -> R | None:
        """A stage's typed record (``Generated``, ``Scored``, ``Selected``, ``Trained``), None before it ran."""
        return kind.read(self.metrics, self.round_id)

    def done(self, stage: str) -> bool:
        order = list(STAGES)
        return self.status == "done" or (self.status in STAGES and order.index(self.status) >= order.index(stage))


class Record(BaseModel):
    """A stage's figures. ``rounds.metrics`` keeps them as flat keys (the names MLflow shows and SQL reads:
    ``get_json_object(metrics, '$.pairs')``); a record validates the keys it owns when the stage writes them and
    when anything reads them back."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    prefix: ClassVar[str] = ""  # keys under this prefix that no field names are the record's too (extra="allow")

    def to_metrics(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Keys as an earlier version wrote them, renamed to today's (none unless a record says so)."""
        return raw

    @classmethod
    def read(cls, metrics: dict[str, Any], round_id: str) -> Self | None:
        keys = {f.alias or name for name, f in cls.model_fields.items()}
        raw = cls.upgrade({k: v for k, v in metrics.items() if k in keys or (cls.prefix and k.startswith(cls.prefix))})
        if not raw:
            return None
        return _validated(cls, raw, round_id, cls.__name__.lower())


R = TypeVar("R", bound=Record)


class Generated(Record):
    """The generate stage: the round's training candidates (samples and mends) and what sampling them cost."""

    candidates: int
    candidates_reused: int  # copied from an earlier round with the same policy, sampling and seed
    candidates_new: int
    candidates_mended: int = 0
    tokens_generated: int
    candidates_length_capped: float | None = None  # share of samples cut at max_new_tokens
    generate_tokens_per_s_last_run: float = 0.0


class Scored(Record):
    """The score stage: the mean combined reward of the round's training candidates."""

    scores_reused: int = 0  # over every run of the stage (a re-run after a kill reuses what the first scored)
    candidate_reward_mean: float | None = None


class Selected(Record):
    """The select stage."""

    pairs: int


class Trained(Record):
    """The train stage: TRL's figures under ``train_`` (loss, steps, samples, runtime and, as of the last step,
    every per-step metric the trainer logged, such as ``train_rewards/accuracies``), and the curves MLflow draws."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    prefix: ClassVar[str] = "train_"

    loss: float = Field(alias="train_loss")
    loss_first: float = Field(alias="train_loss_first")
    loss_last: float = Field(alias="train_loss_last")
    steps: float = Field(alias="train_steps")
    samples: float = Field(alias="train_samples")
    loss_history: list[float] = Field(default=[], alias="train_loss_history")
    curves: dict[str, list[float]] = Field(default={}, alias="train_curves")

    @classmethod
    def of(cls, metrics: dict[str, float], loss_history: list[float], curves: dict[str, list[float]]) -> Trained:
        """From the training worker's report (its loss keys already start with ``train_``)."""
        return cls.model_validate({**{k if k.startswith("train_") else f"train_{k}": v for k, v in metrics.items()},
                                   "train_loss_history": loss_history, "train_curves": curves})

    @classmethod
    def upgrade(cls, raw: dict[str, Any]) -> dict[str, Any]:
        # Rounds written before the record was typed doubled the prefix of the loss keys (train_train_loss_last).
        return {k.removeprefix("train_") if k.startswith("train_train_") else k: v for k, v in raw.items()}


class Figures(BaseModel):
    """One block of an evaluation: every held-out prompt, or one task's. Per arm: mean combined reward, answer
    tokens, the share cut at the token cap, distinct-1/2 of the answers, and strict compliance where an instruction
    reward is configured."""

    model_config = ConfigDict(extra="forbid")

    prompts: int
    win_rate: float
    win_rate_low: float
    win_rate_high: float
    ties: float
    challenger_reward: float
    champion_reward: float
    challenger_tokens: float
    champion_tokens: float
    challenger_length_capped: float
    champion_length_capped: float
    challenger_distinct1: float | None = None
    champion_distinct1: float | None = None
    challenger_distinct2: float | None = None
    champion_distinct2: float | None = None
    challenger_compliance: float | None = None
    champion_compliance: float | None = None
    # Prompts asking for a short answer: the mean share of each model's samples whose answer equals its greedy one,
    # and the paired drop (champion minus challenger) with its bootstrap 95% interval.
    consistency_prompts: int = 0
    challenger_consistency: float | None = None
    champion_consistency: float | None = None
    consistency_drop_low: float | None = None
    consistency_drop_high: float | None = None


class Evaluation(BaseModel):
    """The evaluate stage's result as ``rounds`` stores it (``metrics.evaluation``, nested: per task) and the gate
    reads it."""

    model_config = ConfigDict(extra="forbid")

    overall: Figures
    per_task: dict[str, Figures] = {}
    forgetting: float | None = None  # mean reward lost on the first round's held-out sample (positive = worse)
    forgetting_prompts: int = 0

    def task_drops(self) -> dict[str, float]:
        """How much each task's mean reward fell from champion to challenger (positive = worse)."""
        return {t: f.champion_reward - f.challenger_reward for t, f in self.per_task.items()}

    def to_metrics(self) -> dict[str, Any]:
        return {"evaluation": self.model_dump()}

    def flat(self) -> dict[str, float]:
        """``eval_*`` figures (and ``forgetting``) as MLflow metrics; unset ones left out."""
        out = {f"eval_{k}": float(v) for k, v in self.overall.model_dump().items() if v is not None}
        if self.forgetting is not None:
            out.update(forgetting=self.forgetting, forgetting_prompts=float(self.forgetting_prompts))
        return out


def _raw_evaluation(m: dict[str, Any]) -> dict[str, Any] | None:
    if "evaluation" in m:
        return dict(m["evaluation"])
    if "eval_win_rate" not in m:
        return None
    # A round written before the record was typed kept its figures as flat ``eval_*`` keys.
    keys = Figures.model_fields
    return {"overall": {k: m[f"eval_{k}"] for k in keys if f"eval_{k}" in m},
            "per_task": {t: {k: v for k, v in f.items() if k in keys} for t, f in m.get("eval_per_task", {}).items()},
            "forgetting": m.get("forgetting"), "forgetting_prompts": int(m.get("forgetting_prompts", 0))}


def read_evaluation(metrics: dict[str, Any], round_id: str) -> Evaluation | None:
    """A round's evaluation, validated; None before the evaluate stage. A record that does not validate is a
    one-line error naming the round, not a gate deciding on missing figures."""
    raw = _raw_evaluation(metrics)
    if raw is None:
        return None
    return _validated(Evaluation, raw, round_id, "evaluation")


M = TypeVar("M", bound=BaseModel)


def _validated(kind: type[M], raw: dict[str, Any], round_id: str, what: str) -> M:
    """``raw`` as a ``kind``; one that does not validate is a one-line error naming the round and the first field."""
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"round {round_id}: its {what} record does not validate ({e.error_count()} errors, first: "
                        f"{'.'.join(map(str, first['loc']))} {first['msg']}); it was not written by this version "
                        "of tao_spark") from None


@dataclasses.dataclass
class StageResult:
    """What a stage did: ``fields`` of the round's row it sets, its typed ``record`` (folded into the round's
    metrics, and MLflow's), and the Delta ``versions`` of the tables it wrote."""

    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    record: Record | Evaluation | None = None
    versions: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.to_metrics() if self.record else {}


def versions(tables: Tables, *names: str) -> dict[str, int]:
    """The current Delta version of each table a stage wrote, for the round's record."""
    return {n: tables.snapshot(n) for n in names if tables.exists(n)}


def save(tables: Tables, rnd: Round, cfg: Config, *, stage: str | None = None, seconds: float | None = None) -> None:
    """Record the round: its row in ``rounds`` when it starts (``stage`` None) and when it is done; after each
    stage, that stage's row appended to ``round_stages`` (the round's row as the stage left it, with its seconds)."""
    row = {**dataclasses.asdict(rnd), "metrics": json.dumps(rnd.metrics, default=float),
           "config_hash": cfg.digest(), "git_commit": git_commit()}
    if stage is not None:
        log_row = {**row, "stage": stage, "seconds": seconds, "recorded_at": datetime.now(UTC)}
        tables.append("round_stages", tables.frame("round_stages",
                                                   pd.DataFrame([log_row], columns=columns("round_stages"))))
    if stage is None or rnd.status == "done":
        pdf = pd.DataFrame([row], columns=columns("rounds"))
        tables.merge("rounds", tables.frame("rounds", pdf), update=True)


def load(tables: Tables, round_id: str) -> Round:
    rows = tables.read("rounds").where(F.col("round_id") == round_id).collect()
    if not rows:
        raise RoundNotFound(f"no round {round_id!r} in rounds: `tao status` lists the rounds")
    d = rows[0].asDict()
    if d["status"] != "done":
        d = _progress(tables, [round_id]).get(round_id, d)
    return _round(d)


def _round(d: dict[str, Any]) -> Round:
    fields = {f.name for f in dataclasses.fields(Round)}
    return Round(**{**{k: v for k, v in d.items() if k in fields}, "metrics": json.loads(d["metrics"] or "{}")})


def _progress(tables: Tables, round_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The latest ``round_stages`` row of each of these unfinished rounds (those that finished a stage), as
    ``rounds`` rows."""
    if not round_ids or not tables.exists("round_stages"):
        return {}
    from pyspark.sql.window import Window

    newest = Window.partitionBy("round_id").orderBy(F.desc("recorded_at"))
    rows = (tables.read("round_stages").where(F.col("round_id").isin(round_ids))
            .withColumn("rk", F.row_number().over(newest)).where("rk = 1").select(*columns("rounds")).collect())
    return {r.round_id: r.asDict() for r in rows}


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
    # One query for all of them (a done round's row is final in `rounds`), not one per round.
    return [_round(r.asDict()) for r in
            tables.read("rounds").where(F.col("status") == "done").orderBy("started_at").collect()]


def count_new(tables: Tables, version: int, since: int | None) -> int:
    """Prompts in ``prompts@version`` that were not in ``prompts@since`` (all of them when since is None)."""
    now = tables.read("prompts", version=version).select("prompt_id")
    if since is None:
        return now.count()
    return now.join(tables.read("prompts", version=since).select("prompt_id"), "prompt_id", "left_anti").count()


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


def policy(cfg: Config, uri: str) -> tuple[str, str, str]:
    """A model URI of the round as (uri, local path, policy id)."""
    path = resolve_model(uri, cfg.home, cfg.tracking_uri, cfg.registry_uri)
    return uri, path, model_id(path)


def folder(cfg: Config, rnd: Round) -> Path:
    """The round's files under ``home`` (shared storage on a cluster): training output, checkpoints."""
    return Path(cfg.home) / "rounds" / rnd.round_id


def history(tables: Tables) -> pd.DataFrame:
    """One row per round with the figures a person compares across rounds."""
    if not tables.exists("rounds"):
        return pd.DataFrame()
    pdf = tables.read("rounds").orderBy("started_at").toPandas()
    running = _progress(tables, list(pdf.round_id[pdf.status != "done"]))
    if running:  # a running round as its latest stage left it
        later = pd.DataFrame(list(running.values()), columns=pdf.columns)
        pdf = (pd.concat([pdf[~pdf.round_id.isin(running)], later], ignore_index=True)
               .sort_values("started_at", ignore_index=True))
    metrics = [json.loads(m or "{}") for m in pdf.metrics]
    out = pdf[["round_id", "status", "prompts_version", "new_prompts", "reused_candidates", "new_candidates",
               "pairs", "promoted", "model_version"]].copy()
    evals = [read_evaluation(m, rid) for m, rid in zip(metrics, pdf.round_id, strict=True)]
    for key in ("win_rate", "win_rate_low", "win_rate_high", "champion_reward", "challenger_reward",
                "champion_consistency", "challenger_consistency"):
        out[key] = [getattr(e.overall, key) if e else None for e in evals]
    out["forgetting"] = [e.forgetting if e else None for e in evals]
    trained = [Trained.read(m, rid) for m, rid in zip(metrics, pdf.round_id, strict=True)]
    out["train_loss_last"] = [t.loss_last if t else None for t in trained]
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
