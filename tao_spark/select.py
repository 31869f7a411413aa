"""Select: turn scored candidates into preference pairs, one or more per prompt.

    tao select --round ROUND_ID

Pure Spark SQL. ``select.strategy`` decides which two candidates of a prompt make its pair:

- ``best_worst``: the best against the worst (among equally bad ones the longest, the clearest contrast);
- ``consensus``: the widest pair that no reward component contradicts (chosen scores at least as well as
  rejected on every component both have), so a pair never teaches "worse on X" for a gain on Y;
- ``length_band``: the widest pair whose answers are of similar length (``select.length_band``), so the
  preference cannot be learnt as "be shorter" or "be longer".

``select.pairs_per_prompt`` = k > 1 keeps a prompt's k widest allowed pairs instead of its widest one (with
``best_worst``: every pair is allowed), so a prompt with several distinct failure modes teaches each of them.

A prompt yields a pair only when chosen beats rejected by at least ``select.min_margin``; ties and all-equal
groups are dropped, so every row has chosen_score > rejected_score. Candidates with the same text are one
candidate (identical samples carry no preference). The ``chosen`` column alone is the best-of-N set that
``train.method=sft`` trains on. Re-running select replaces the round's pairs: a pair the current settings no
longer make is deleted, so the table always says what the settings of the last run chose.
"""

from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from tao_spark.config import Config, SelectConfig
from tao_spark.rounds import Round, Selected, StageResult, versions
from tao_spark.score import COMBINED, COMBINED_RAW
from tao_spark.tables import KEYS, SCHEMAS, Tables

log = logging.getLogger("tao.select")


def pairs(candidates: DataFrame, combined: DataFrame, cfg: SelectConfig, round_id: str,
          components: DataFrame | None = None) -> DataFrame:
    """Up to ``cfg.pairs_per_prompt`` pairs per prompt from candidates and their combined scores (prompt_id,
    candidate_idx, value); ``consensus`` also needs the per-component scores (prompt_id, candidate_idx,
    reward_name, value)."""
    scored = (candidates.join(combined, ["prompt_id", "candidate_idx"])
              .where(F.col("value").isNotNull()))
    if cfg.strategy != "best_worst" or cfg.pairs_per_prompt > 1:
        return _finish(_widest(scored, cfg, components), cfg, round_id)
    best = Window.partitionBy("prompt_id").orderBy(F.desc("value"), F.asc("candidate_idx"))
    # Among equally bad candidates prefer the longest as rejected: it is the clearest contrast.
    worst = Window.partitionBy("prompt_id").orderBy(F.asc("value"), F.desc("tokens"), F.asc("candidate_idx"))
    ranked = scored.withColumn("best_rank", F.row_number().over(best)).withColumn("worst_rank",
                                                                                 F.row_number().over(worst))
    b = ranked.where("best_rank = 1").select(
        "prompt_id", "task", F.col("candidate_idx").alias("chosen_idx"), F.col("completion").alias("chosen"),
        F.col("value").alias("chosen_score"))
    w = ranked.where("worst_rank = 1").select(
        "prompt_id", F.col("candidate_idx").alias("rejected_idx"), F.col("completion").alias("rejected"),
        F.col("value").alias("rejected_score"))
    return _finish(b.join(w, "prompt_id"), cfg, round_id)


def _widest(scored: DataFrame, cfg: SelectConfig, components: DataFrame | None) -> DataFrame:
    """Among every ordered pair of a prompt's candidates that the strategy allows, the ``pairs_per_prompt`` of
    largest margin (one for best-vs-worst ties: the same order as the window path)."""
    # One candidate per distinct text, so that k pairs are k different contrasts, not one contrast repeated.
    first = Window.partitionBy("prompt_id", "completion").orderBy("candidate_idx")
    scored = scored.withColumn("text_rank", F.row_number().over(first)).where("text_rank = 1").drop("text_rank")
    c, r = scored.alias("c"), scored.alias("r")
    allowed = (c.join(r, (F.col("c.prompt_id") == F.col("r.prompt_id")) & (F.col("c.value") > F.col("r.value"))
                      & (F.col("c.completion") != F.col("r.completion")))
               .select(F.col("c.prompt_id").alias("prompt_id"), F.col("c.task").alias("task"),
                       F.col("c.candidate_idx").alias("chosen_idx"), F.col("c.completion").alias("chosen"),
                       F.col("c.value").alias("chosen_score"), F.col("c.tokens").alias("chosen_tokens"),
                       F.col("r.candidate_idx").alias("rejected_idx"), F.col("r.completion").alias("rejected"),
                       F.col("r.value").alias("rejected_score"), F.col("r.tokens").alias("rejected_tokens")))
    if cfg.strategy == "length_band":
        longer = F.greatest("chosen_tokens", "rejected_tokens")
        shorter = F.greatest(F.least("chosen_tokens", "rejected_tokens"), F.lit(1))
        allowed = allowed.where(longer <= shorter * (1.0 + cfg.length_band))
    elif cfg.strategy == "consensus":
        if components is None:
            raise ValueError("select.strategy=consensus needs the per-component scores")
        comp = components.where(F.col("value").isNotNull() & ~F.isnan("value"))
        a, b = comp.alias("a"), comp.alias("b")
        # A component contradicts the pair where it scores the rejected answer higher than the chosen one.
        against = (a.join(b, (F.col("a.prompt_id") == F.col("b.prompt_id"))
                          & (F.col("a.reward_name") == F.col("b.reward_name"))
                          & (F.col("a.value") < F.col("b.value") - 1e-9))
                   .select(F.col("a.prompt_id").alias("prompt_id"), F.col("a.candidate_idx").alias("chosen_idx"),
                           F.col("b.candidate_idx").alias("rejected_idx")).distinct())
        allowed = allowed.join(against, ["prompt_id", "chosen_idx", "rejected_idx"], "left_anti")
    order = Window.partitionBy("prompt_id").orderBy(
        F.desc(F.col("chosen_score") - F.col("rejected_score")), F.asc("chosen_idx"), F.desc("rejected_tokens"),
        F.asc("rejected_idx"))
    return allowed.withColumn("rank", F.row_number().over(order)).where(F.col("rank") <= cfg.pairs_per_prompt)


def _finish(joined: DataFrame, cfg: SelectConfig, round_id: str) -> DataFrame:
    return (
        joined.withColumn("margin", F.col("chosen_score") - F.col("rejected_score"))
        .where((F.col("margin") > 0) & (F.col("margin") >= cfg.min_margin) & (F.col("chosen") != F.col("rejected")))
        .select(F.lit(round_id).alias("round_id"), "prompt_id", "task", "chosen_idx", "rejected_idx", "chosen",
                "rejected", "chosen_score", "rejected_score", "margin", F.lit(cfg.strategy).alias("strategy"),
                F.current_timestamp().alias("created_at"))
    )


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The select stage: the round's scored candidates become preference pairs."""
    n = write_pairs(tables, round_id=rnd.round_id, cfg=cfg.select)
    return StageResult(fields={"pairs": n}, record=Selected(pairs=n), versions=versions(tables, "preferences"))


def write_pairs(tables: Tables, *, round_id: str, cfg: SelectConfig) -> int:
    """Write this round's preference pairs; returns how many the round has."""
    cands = tables.read("candidates").where((F.col("round_id") == round_id) & (F.col("purpose") == "train"))
    scores = tables.read("scores").where((F.col("round_id") == round_id) & (F.col("purpose") == "train"))
    combined = scores.where(F.col("reward_name") == COMBINED).select("prompt_id", "candidate_idx", "value")
    # The components: every reward the stage wrote except the combined values and the failure flags.
    components = (scores.where(~F.col("reward_name").isin(COMBINED, COMBINED_RAW)
                               & ~F.col("reward_name").endswith("_failed"))
                  .select("prompt_id", "candidate_idx", "reward_name", "value"))
    # Collected once (a round's pairs are few): the MERGE and the stale-pair check read these rows, not the pair
    # query twice (each pass of it is several jobs on a cluster).
    made = pairs(cands, combined, cfg, round_id, components).toPandas()
    key = list(KEYS["preferences"])
    tables.ensure("preferences")
    if len(made):
        # Update matched pairs too: another strategy may make the same pair, and its row must name that strategy.
        tables.merge("preferences", tables.frame("preferences", made), update=True)
    # Pairs an earlier run of this round made under other settings; merge-then-delete, so a run killed between
    # the two ends, when re-run, in the same table as a run never killed.
    had = tables.read("preferences").where(F.col("round_id") == round_id).select(*key).toPandas()
    gone = had.merge(made[key], on=key, how="left", indicator=True).query("_merge == 'left_only'")[key]
    if len(gone):
        types = dict(f.split(" ", 1) for f in SCHEMAS["preferences"].split(", "))
        tables.delete("preferences", tables.spark.createDataFrame(gone.reset_index(drop=True),
                                                                  ", ".join(f"{k} {types[k]}" for k in key)))
        log.info(f"tao: select: removed {len(gone)} pairs an earlier run of round {round_id} made")
    n = len(made)
    log.info(f"tao: select: {n} pairs from {made.prompt_id.nunique()} prompts (strategy={cfg.strategy}, "
             f"min_margin={cfg.min_margin}, pairs_per_prompt={cfg.pairs_per_prompt})")
    return n
