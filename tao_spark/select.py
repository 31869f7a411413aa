"""Select: turn scored candidates into preference pairs, best vs. worst per prompt.

    tao select --round ROUND_ID

Pure Spark SQL. A prompt yields a pair only when its best candidate beats its worst by at least
``select.min_margin``; ties and all-equal groups are dropped, so every row has chosen_score > rejected_score.
Candidates with the same text are one candidate (identical samples carry no preference). The ``chosen``
column alone is the best-of-N set that ``train.method=sft`` trains on.
"""

from __future__ import annotations

import sys

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from tao_spark.config import Config, SelectConfig
from tao_spark.rounds import Round, StageResult, versions
from tao_spark.tables import Tables


def pairs(candidates: DataFrame, combined: DataFrame, cfg: SelectConfig, round_id: str) -> DataFrame:
    """Best-vs-worst pairs from candidates and their combined scores (prompt_id, candidate_idx, value)."""
    scored = (candidates.join(combined, ["prompt_id", "candidate_idx"])
              .where(F.col("value").isNotNull()))
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
    return (
        b.join(w, "prompt_id")
        .withColumn("margin", F.col("chosen_score") - F.col("rejected_score"))
        .where((F.col("margin") > 0) & (F.col("margin") >= cfg.min_margin) & (F.col("chosen") != F.col("rejected")))
        .select(F.lit(round_id).alias("round_id"), "prompt_id", "task", "chosen_idx", "rejected_idx", "chosen",
                "rejected", "chosen_score", "rejected_score", "margin", F.lit(cfg.strategy).alias("strategy"),
                F.current_timestamp().alias("created_at"))
    )


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The select stage: the round's scored candidates become preference pairs."""
    n = write_pairs(tables, round_id=rnd.round_id, cfg=cfg.select)
    return StageResult(fields={"pairs": n}, counts={"pairs": n}, versions=versions(tables, "preferences"))


def write_pairs(tables: Tables, *, round_id: str, cfg: SelectConfig) -> int:
    """Write this round's preference pairs; returns how many the round has."""
    cands = tables.read("candidates").where((F.col("round_id") == round_id) & (F.col("purpose") == "train"))
    combined = (tables.read("scores")
                .where((F.col("round_id") == round_id) & (F.col("purpose") == "train")
                       & (F.col("reward_name") == "combined"))
                .select("prompt_id", "candidate_idx", "value"))
    tables.merge("preferences", pairs(cands, combined, cfg, round_id))
    n = tables.read("preferences").where(F.col("round_id") == round_id).count()
    prompts = cands.select("prompt_id").distinct().count()
    print(f"tao: select: {n} pairs from {prompts} prompts (min_margin={cfg.min_margin})", file=sys.stderr)
    return n
