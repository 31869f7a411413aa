"""Score: every configured reward on every candidate, as a Spark UDF, into ``scores``.

    tao score --round ROUND_ID
    score.run(tables, rnd, cfg)      # the stage; score.score_candidates(...) for any purpose

One row per (candidate, reward) plus a ``combined`` row: the weighted mean of the components that apply
to that prompt (a reward returns NaN where it does not apply, stored as NULL). Rewards are loaded once
per Python worker.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tao_spark.config import RewardSpec, ScoreConfig, UserError
from tao_spark.rewards import reward_text
from tao_spark.tables import SCHEMAS, Tables, columns

log = logging.getLogger("tao.score")

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from tao_spark.config import Config
    from tao_spark.rounds import Round, StageResult

COMBINED = "combined"
# Bumped when a built-in reward's values change for the same config (see reward_key).
SEMANTICS = "rewards-3"
COMBINED_RAW = "combined_raw"
_lock = threading.Lock()
_rewards: dict[str, Any] = {}
load_counts: dict[str, int] = {}


def get_reward(spec: RewardSpec) -> Any:
    """Load a reward once per worker process (model-based rewards are expensive to load)."""
    key = json.dumps([spec.name, spec.fn, spec.model, spec.params], sort_keys=True, default=str)
    with _lock:
        if key not in _rewards:
            from tao_spark.rewards import load_reward

            _rewards[key] = load_reward(spec)
            load_counts[key] = load_counts.get(key, 0) + 1
        return _rewards[key]


def takes(fn: Any, arg: str) -> bool:
    """Whether a reward takes ``arg``: each row's task (``tasks=``, as the judge does for per-task guidelines), or
    which rows are the policy's greedy answer (``greedy=``, self-consistency's anchor)."""
    try:
        return arg in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def combine(values: pd.DataFrame, weights: dict[str, float]) -> np.ndarray:
    """Per row, the weighted mean over the components that apply (not NaN, weight > 0); NaN where none does."""
    vals = values.to_numpy(dtype="float64")
    w = np.array([weights[c] for c in values.columns], dtype="float64")
    applies = ~np.isnan(vals) & (w > 0)
    den = np.where(applies, w, 0.0).sum(axis=1)
    num = np.where(applies, np.nan_to_num(vals) * w, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def score_frame(pdf: pd.DataFrame, specs: list[RewardSpec], cfg: ScoreConfig | None = None) -> pd.DataFrame:
    """Score a frame of (prompt messages_json, completion[, task]) rows; one column per reward plus ``combined``.

    The frame holds every candidate of each of its prompts (rewards that compare them need all); a reward that
    takes ``tasks`` gets each row's task, one that takes ``greedy`` whether the row is the policy's greedy answer
    (the frame's optional ``greedy`` column).

    A reward that records failures (an LLM judge whose answer did not parse) adds ``<name>_failed`` (1.0 where it
    failed; the reward itself is NaN there). With ``cfg.length_control`` on, ``combined`` is the length-adjusted
    value and ``combined_raw`` the weighted mean before adjustment.
    """
    # A prompt's N candidates share its messages: parse each distinct one once.
    texts = {m: reward_text(json.loads(m)) for m in pdf["messages_json"].unique()}
    prompts = [texts[m] for m in pdf["messages_json"]]
    completions = [c or "" for c in pdf["completion"]]
    out = pd.DataFrame(index=pdf.index)
    failed: dict[str, list[float]] = {}
    extra = {}
    if "task" in pdf.columns:
        extra["tasks"] = [str(t) for t in pdf["task"]]
    if "greedy" in pdf.columns:
        extra["greedy"] = [bool(g) for g in pdf["greedy"]]
    for spec in specs:
        fn = get_reward(spec)
        vals = fn(prompts, completions, **{k: v for k, v in extra.items() if takes(fn, k)})
        if len(vals) != len(completions):
            raise ValueError(f"reward {spec.name!r} returned {len(vals)} values for {len(completions)} rows")
        out[spec.name] = np.array(vals, dtype="float64")  # None -> NaN: the reward does not apply
        failures = getattr(fn, "last_failures", None)  # per thread: Sail runs a worker's partitions as threads
        if failures is not None:
            failed[f"{spec.name}_failed"] = [float(bool(f)) for f in failures]
    weights = {s.name: s.weight for s in specs}
    combined = combine(out[[s.name for s in specs]], weights)
    for name, flags in failed.items():
        out[name] = flags
    control = cfg.length_control if cfg is not None else "none"
    if control != "none":
        assert cfg is not None
        out[COMBINED_RAW] = combined
        words = [len(c.split()) for c in completions]
        if control == "penalty":
            combined = np.array(length_penalized(list(combined), words, cfg), dtype="float64")
        else:  # per prompt: pairs are drawn within a prompt, and a prompt's rows are all in this frame
            adjusted = combined.copy()
            for rows in pdf.groupby("messages_json", sort=False).indices.values():
                vals = length_decorrelated([float(combined[i]) for i in rows], [words[i] for i in rows])
                adjusted[rows] = np.array(vals, dtype="float64")
            combined = adjusted
    out[COMBINED] = combined
    return out


def length_penalized(values: list[float | None], words: list[int], cfg: ScoreConfig) -> list[float | None]:
    """``length_penalty``'s factor (1 up to the target, 0 at twice it), multiplied in or subtracted."""
    out: list[float | None] = []
    for v, w in zip(values, words, strict=True):
        factor = max(0.0, min(1.0, 2.0 - w / cfg.length_target_words))
        if v is None:
            out.append(None)
        elif cfg.length_penalty_mode == "multiply":
            out.append(v * factor)
        else:
            out.append(v - cfg.length_penalty_weight * (1.0 - factor))
    return out


def length_decorrelated(values: list[float | None], words: list[int]) -> list[float | None]:
    """Remove the least-squares slope of ``values`` on answer length: the result has zero correlation with length.

    ArmoRM-style, over the rows given (the score stage gives one prompt's candidates): ``v - b * (words -
    mean(words))`` with ``b`` the OLS slope, so the mean reward is unchanged and only the part that length explains
    linearly goes. Fewer than 3 scored rows, or rows all of one length, are returned as they are.
    """
    idx = [i for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if len(idx) < 3:
        return list(values)
    x = [float(words[i]) for i in idx]
    y = [float(values[i]) for i in idx]  # type: ignore[arg-type]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((a - mx) ** 2 for a in x)
    if var == 0:
        return list(values)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / var
    out = list(values)
    for i in idx:
        out[i] = float(values[i]) - slope * (words[i] - mx)  # type: ignore[arg-type]
    return out


def reward_key(specs: list[RewardSpec], cfg: ScoreConfig | None = None) -> str:
    """Hash of the whole reward configuration: a score row can be reused only under the same one.

    ``SEMANTICS`` is part of it: when what a built-in reward computes changes (the instruction reader reading more
    phrasings, length control per prompt), scores of earlier rounds are recomputed rather than reused.
    """
    parts: list[Any] = [SEMANTICS, *(dataclasses.asdict(s) for s in specs)]
    if cfg is not None and cfg.length_control != "none":  # appended only when on: existing keys stay valid
        parts.append({k: getattr(cfg, k) for k in ("length_control", "length_target_words", "length_penalty_mode",
                                                   "length_penalty_weight")})
    canon = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


_IDS = ("round_id", "purpose", "prompt_id", "candidate_idx")


def components(specs: list[RewardSpec], cfg: ScoreConfig | None = None) -> list[str]:
    """The value columns the worker returns: each reward, each reward's failure flag, then the combined values.

    A ``<name>_failed`` column exists for every reward (names ending so are reserved); it stays NaN for rewards that
    record no failures, and those rows are dropped after the unpivot.
    """
    names = [s.name for s in specs] + [f"{s.name}_failed" for s in specs]
    if cfg is not None and cfg.length_control != "none":
        names.append(COMBINED_RAW)
    return [*names, COMBINED]


def wide_schema(specs: list[RewardSpec], cfg: ScoreConfig | None = None) -> str:
    """The worker's output: the candidate's key and one double per component."""
    types = dict(f.split(" ", 1) for f in SCHEMAS["scores"].split(", "))
    return ", ".join([f"{c} {types[c]}" for c in _IDS] + [f"`{c}` double" for c in components(specs, cfg)])


def _score_partition(batches: Iterator[pd.DataFrame], *, specs: list[RewardSpec],
                     cfg: ScoreConfig | None = None) -> Iterator[pd.DataFrame]:
    """mapInPandas worker: candidates in, one wide row per candidate out (its key and every component's value).

    Wide rather than one row per (candidate, component): the long rows, with their repeated keys, were six times
    the Arrow payload and a pandas reshape per batch; Spark unpivots them instead (``scored``).
    """
    cols = components(specs, cfg)

    def score(pdf: pd.DataFrame) -> pd.DataFrame:
        # One purpose at a time: the same prompt's answers from another model must not vote with these.
        parts = []
        for _, part in pdf.groupby("purpose", sort=False):
            part = part.reset_index(drop=True)
            scored = score_frame(part, specs, cfg).reindex(columns=cols).astype("float64")
            scored.index = part.index
            parts.append(pd.concat([part[list(_IDS)], scored], axis=1))
        return pd.concat(parts, ignore_index=True)

    # Rewards that compare a prompt's candidates (majority vote, a pairwise judge, per-prompt length control) must
    # see all of them in one call, whatever the Arrow batch size: the rows come sorted by prompt, so the last
    # prompt of a batch is held back until the next batch shows whether it goes on.
    carry: pd.DataFrame | None = None
    for pdf in batches:
        if carry is not None:
            pdf = pd.concat([carry, pdf], ignore_index=True)
        if pdf.empty:
            continue
        tail = ((pdf["prompt_id"] == pdf["prompt_id"].iloc[-1]) & (pdf["purpose"] == pdf["purpose"].iloc[-1])
                ).to_numpy()
        carry = pdf[tail]
        if (~tail).any():
            yield score(pdf[~tail])
    if carry is not None and not carry.empty:
        yield score(carry)


def scored(cands: DataFrame, specs: list[RewardSpec], cfg: ScoreConfig | None = None) -> DataFrame:
    """Score rows for ``cands`` (the candidate key, ``completion``, ``messages_json``), in ``scores``' columns."""
    from pyspark.sql import functions as F

    cols = components(specs, cfg)
    wide = cands.mapInPandas(functools.partial(_score_partition, specs=specs, cfg=cfg), wide_schema(specs, cfg))
    long = wide.unpivot(list(_IDS), cols, "reward_name", "value")
    value = F.when(F.isnan("value"), None).otherwise(F.col("value"))  # a reward that does not apply: NULL
    return (long.withColumn("value", value)
            .where(~(F.col("reward_name").endswith("_failed") & F.col("value").isNull()))
            .withColumn("reward_key", F.lit(reward_key(specs, cfg)))
            .withColumn("reused_from", F.lit(None).cast("string"))
            .withColumn("created_at", F.current_timestamp())
            .select(*columns("scores")))


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The score stage: every reward of ``score.rewards`` on each of the round's training candidates."""
    from pyspark.sql import functions as F

    from tao_spark.rounds import Scored, StageResult, split, versions

    res = score_candidates(tables, split(tables, rnd, cfg)[0], round_id=rnd.round_id, purpose="train",
                           cfg=cfg.score)
    comb = tables.read("scores").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train")
                                       & (F.col("reward_name") == COMBINED))
    before = rnd.record(Scored)
    return StageResult(record=Scored(scores_reused=(before.scores_reused if before else 0) + res.reused,
                                     candidate_reward_mean=comb.agg(F.avg("value")).first()[0]),
                       versions=versions(tables, "scores"))


def score_candidates(tables: Tables, prompts: DataFrame, *, round_id: str, purpose: str | list[str],
                     cfg: ScoreConfig) -> ScoreResult:
    """Score the round's candidates of ``purpose`` (one, or several in one pass) that have no combined score yet.

    Scores of candidates copied from an earlier round are copied too when the reward config is the same.
    """
    from pyspark.sql import functions as F  # here, not at the top: score_frame runs where pyspark is absent

    from tao_spark.rewards import check

    if not cfg.rewards:
        raise UserError("score.rewards is empty: configure at least one reward")
    check(cfg.rewards)
    purposes = [purpose] if isinstance(purpose, str) else list(purpose)
    label = "+".join(purposes)
    tables.ensure("scores")
    ours = (F.col("round_id") == round_id) & F.col("purpose").isin(purposes)
    cands = tables.read("candidates").where(ours)
    reused = _reuse(tables, cands, round_id=round_id, key=reward_key(cfg.rewards, cfg))
    done = (tables.read("scores").where(ours & (F.col("reward_name") == COMBINED))
            .select("purpose", "prompt_id", "candidate_idx"))
    # Every candidate of a prompt with any unscored one: rewards that compare a prompt's candidates must see all of
    # them, so a resumed run scores them as a run never stopped would.
    unfinished = (cands.join(done, ["purpose", "prompt_id", "candidate_idx"], "left_anti")
                  .select("purpose", "prompt_id").distinct())
    todo = (cands.join(unfinished, ["purpose", "prompt_id"])
            .join(prompts.select("prompt_id", F.to_json("messages").alias("messages_json")), "prompt_id")
            .select("round_id", "purpose", "prompt_id", "candidate_idx", "task", "completion", "messages_json",
                    # generate.greedy_answer made candidate 0 greedy (on the prompts that ask for a short answer).
                    ((F.col("candidate_idx") == 0)
                     & F.coalesce(F.get_json_object("sampling", "$.greedy_answer") == "true", F.lit(False)))
                    .alias("greedy")))
    t0 = time.perf_counter()
    # By prompt: rewards that compare a prompt's candidates (majority vote) need them in one partition, sorted so
    # the worker can keep each prompt's rows together across Arrow batches. A prompt's candidates of another
    # purpose (the other model's answers) are another group.
    out = scored(todo.repartition(cfg.partitions, "purpose", "prompt_id").sortWithinPartitions("purpose", "prompt_id"),
                 cfg.rewards, cfg)
    written = tables.merge("scores", out)
    log.info(f"tao: score[{label}]: {written} score rows in {time.perf_counter() - t0:.1f}s "
             f"({reused} reused from earlier rounds)")
    return ScoreResult(written, reused)


@dataclasses.dataclass
class ScoreResult:
    written: int
    reused: int


def _reuse(tables: Tables, cands: DataFrame, *, round_id: str, key: str) -> int:
    """Copy the scores of candidates this round reused, when they were scored under the same reward config."""
    from pyspark.sql import functions as F  # here, not at the top: score_frame runs where pyspark is absent

    src = (cands.where(F.col("reused_from").isNotNull())
           .select("prompt_id", "candidate_idx", "reused_from", F.col("purpose").alias("dst_purpose"),
                   F.split("reused_from", "/").getItem(0).alias("src_round"),
                   F.split("reused_from", "/").getItem(1).alias("src_purpose")))
    rows = (tables.read("scores").where((F.col("reward_key") == key) & F.col("reused_from").isNull())
            .drop("reused_from")
            .join(src, ["prompt_id", "candidate_idx"])
            .where((F.col("round_id") == F.col("src_round")) & (F.col("purpose") == F.col("src_purpose")))
            .withColumn("round_id", F.lit(round_id)).withColumn("purpose", F.col("dst_purpose"))
            .select(*columns("scores")))
    return 0 if src.isEmpty() else tables.merge("scores", rows)  # most rounds reuse nothing: skip the MERGE
