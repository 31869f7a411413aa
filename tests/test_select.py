"""select: best-vs-worst pairs in pure Spark, with the margin, tie and identical-text rules."""

from __future__ import annotations

import pandas as pd
import pytest

from tao_spark.config import SelectConfig
from tao_spark.select import pairs


def _frames(spark, rows):
    cands = spark.createDataFrame(pd.DataFrame(
        [{"prompt_id": p, "candidate_idx": i, "task": "t", "completion": text, "tokens": tok}
         for p, i, text, tok, _ in rows]), "prompt_id string, candidate_idx int, task string, completion string, "
                                             "tokens int")
    scores = spark.createDataFrame(pd.DataFrame(
        [{"prompt_id": p, "candidate_idx": i, "value": v} for p, i, _, _, v in rows]),
        "prompt_id string, candidate_idx int, value double")
    return cands, scores


def test_best_vs_worst_with_margin_ties_and_nulls(spark):
    rows = [
        ("a", 0, "good", 5, 0.9), ("a", 1, "mid", 5, 0.5), ("a", 2, "bad", 5, 0.1),   # pair good > bad
        ("b", 0, "x", 5, 0.5), ("b", 1, "y", 5, 0.5),                                  # all equal: dropped
        ("c", 0, "p", 5, 0.52), ("c", 1, "q", 5, 0.5),                                 # margin 0.02 < 0.05
        ("d", 0, "same", 5, 0.8), ("d", 1, "same", 5, 0.1),                             # identical text
        ("e", 0, "long bad", 9, 0.0), ("e", 1, "short bad", 2, 0.0), ("e", 2, "fine", 4, 1.0),
        ("f", 0, "n", 3, None), ("f", 1, "m", 3, 0.7),                                  # null ignored
    ]
    cands, scores = _frames(spark, rows)
    out = {r.prompt_id: r for r in pairs(cands, scores, SelectConfig(min_margin=0.05), "r1").collect()}
    assert set(out) == {"a", "e"}
    assert (out["a"].chosen, out["a"].rejected) == ("good", "bad")
    assert out["a"].margin == pytest.approx(0.8)
    # Among equally bad candidates the longer one is the rejected answer.
    assert out["e"].rejected == "long bad" and out["e"].chosen == "fine"
    for r in out.values():
        assert r.chosen_score > r.rejected_score and r.round_id == "r1" and r.strategy == "best_worst"


def test_zero_margin_keeps_any_strict_improvement(spark):
    cands, scores = _frames(spark, [("a", 0, "u", 1, 0.51), ("a", 1, "v", 1, 0.5)])
    assert pairs(cands, scores, SelectConfig(min_margin=0.0), "r").count() == 1
    assert pairs(cands, scores, SelectConfig(min_margin=0.02), "r").count() == 0
