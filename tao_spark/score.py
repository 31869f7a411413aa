"""Score: every configured reward on every candidate, as a Spark UDF, into ``scores``.

    tao score --round ROUND_ID

One row per (candidate, reward) plus a ``combined`` row: the weighted mean of the components that apply
to that prompt (a reward returns NaN where it does not apply, stored as NULL). Rewards are loaded once
per Python worker.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pandas as pd

from tao_spark.config import RewardSpec, ScoreConfig
from tao_spark.tables import SCHEMAS, Tables, columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

COMBINED = "combined"
_lock = threading.Lock()
_rewards: dict[str, Any] = {}
load_counts: dict[str, int] = {}


def reward_text(messages: list[dict[str, str]]) -> str:
    """What a reward reads of a prompt: the system turn (if any) and the last user turn."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    return "\n\n".join([*system[:1], messages[-1]["content"]])


def get_reward(spec: RewardSpec) -> Any:
    """Load a reward once per worker process (model-based rewards are expensive to load)."""
    key = json.dumps([spec.name, spec.fn, spec.model, spec.params], sort_keys=True, default=str)
    with _lock:
        if key not in _rewards:
            from tao_spark.rewards import load_reward

            _rewards[key] = load_reward(spec)
            load_counts[key] = load_counts.get(key, 0) + 1
        return _rewards[key]


def combine(values: dict[str, float], weights: dict[str, float]) -> float | None:
    """Weighted mean over the components that apply; None when none does."""
    num = den = 0.0
    for name, v in values.items():
        if v is not None and not math.isnan(v) and weights[name] > 0:
            num += weights[name] * v
            den += weights[name]
    return num / den if den > 0 else None


def score_frame(pdf: pd.DataFrame, specs: list[RewardSpec]) -> pd.DataFrame:
    """Score a frame of (prompt messages_json, completion) rows; one column per reward plus ``combined``."""
    prompts = [reward_text(json.loads(m)) for m in pdf["messages_json"]]
    completions = [c or "" for c in pdf["completion"]]
    out = pd.DataFrame(index=pdf.index)
    for spec in specs:
        vals = get_reward(spec)(prompts, completions)
        if len(vals) != len(completions):
            raise ValueError(f"reward {spec.name!r} returned {len(vals)} values for {len(completions)} rows")
        out[spec.name] = [float("nan") if v is None else float(v) for v in vals]
    weights = {s.name: s.weight for s in specs}
    out[COMBINED] = [combine(row, weights) for row in out[[s.name for s in specs]].to_dict("records")]
    return out


def reward_key(specs: list[RewardSpec]) -> str:
    """Hash of the whole reward configuration: a score row can be reused only under the same one."""
    canon = json.dumps([dataclasses.asdict(s) for s in specs], sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def _score_partition(batches: Iterator[pd.DataFrame], *, specs: list[RewardSpec]) -> Iterator[pd.DataFrame]:
    """mapInPandas worker: candidates in, one row per (candidate, reward) out."""
    names = [s.name for s in specs] + [COMBINED]
    key = reward_key(specs)
    for pdf in batches:
        scored = score_frame(pdf, specs)
        now = datetime.now(timezone.utc)
        rows = [
            {"round_id": r.round_id, "purpose": r.purpose, "prompt_id": r.prompt_id,
             "candidate_idx": r.candidate_idx, "reward_name": name,
             "value": None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v),
             "reward_key": key, "reused_from": None, "created_at": now}
            for r, (_, s) in zip(pdf.itertuples(), scored.iterrows())
            for name, v in zip(names, (s[n] for n in names))
        ]
        yield pd.DataFrame(rows, columns=columns("scores"))


def run(tables: Tables, prompts: DataFrame, *, round_id: str, purpose: str, cfg: ScoreConfig) -> ScoreResult:
    """Score the round's candidates of ``purpose`` that have no combined score yet.

    Scores of candidates copied from an earlier round are copied too when the reward config is the same.
    """
    from pyspark.sql import functions as F  # here, not at the top: score_frame runs where pyspark is absent

    if not cfg.rewards:
        raise ValueError("score.rewards is empty: configure at least one reward")
    tables.ensure("scores")
    cands = tables.read("candidates").where((F.col("round_id") == round_id) & (F.col("purpose") == purpose))
    reused = _reuse(tables, cands, round_id=round_id, purpose=purpose, key=reward_key(cfg.rewards))
    scored = (tables.read("scores").where((F.col("round_id") == round_id) & (F.col("purpose") == purpose)
                                          & (F.col("reward_name") == COMBINED))
              .select("prompt_id", "candidate_idx"))
    todo = (cands.join(scored, ["prompt_id", "candidate_idx"], "left_anti")
            .join(prompts.select("prompt_id", F.to_json("messages").alias("messages_json")), "prompt_id")
            .select("round_id", "purpose", "prompt_id", "candidate_idx", "completion", "messages_json"))
    t0 = time.perf_counter()
    # By prompt: rewards that compare a prompt's candidates (majority vote) need them in one partition.
    out = todo.repartition(cfg.partitions, "prompt_id").sortWithinPartitions("prompt_id").mapInPandas(
        functools.partial(_score_partition, specs=cfg.rewards), SCHEMAS["scores"])
    written = tables.merge("scores", out)
    print(f"tao: score[{purpose}]: {written} score rows in {time.perf_counter() - t0:.1f}s "
          f"({reused} reused from earlier rounds)", file=sys.stderr)
    return ScoreResult(written, reused)


@dataclasses.dataclass
class ScoreResult:
    written: int
    reused: int


def _reuse(tables: Tables, cands: DataFrame, *, round_id: str, purpose: str, key: str) -> int:
    """Copy the scores of candidates this round reused, when they were scored under the same reward config."""
    from pyspark.sql import functions as F  # here, not at the top: score_frame runs where pyspark is absent

    src = (cands.where(F.col("reused_from").isNotNull())
           .select("prompt_id", "candidate_idx", "reused_from",
                   F.split("reused_from", "/").getItem(0).alias("src_round"),
                   F.split("reused_from", "/").getItem(1).alias("src_purpose")))
    rows = (tables.read("scores").where((F.col("reward_key") == key) & F.col("reused_from").isNull())
            .drop("reused_from")
            .join(src, ["prompt_id", "candidate_idx"])
            .where((F.col("round_id") == F.col("src_round")) & (F.col("purpose") == F.col("src_purpose")))
            .withColumn("round_id", F.lit(round_id)).withColumn("purpose", F.lit(purpose))
            .select(*columns("scores")))
    return tables.merge("scores", rows)
