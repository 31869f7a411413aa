"""select: best-vs-worst pairs in pure Spark, with the margin, tie and identical-text rules."""

from __future__ import annotations

import pandas as pd
import pytest

from tao_spark.config import ConfigError, SelectConfig, load_config
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


def _components(spark, rows):
    return spark.createDataFrame(pd.DataFrame(
        [{"prompt_id": p, "candidate_idx": i, "reward_name": name, "value": v} for p, i, name, v in rows]),
        "prompt_id string, candidate_idx int, reward_name string, value double")


def test_consensus_takes_the_widest_pair_no_component_contradicts(spark):
    # a: the best is worst on coherence, so best-vs-worst teaches "less coherent"; consensus takes A over D.
    rows = [("a", 0, "A", 5, 0.9), ("a", 1, "B", 5, 0.6), ("a", 2, "C", 5, 0.2), ("a", 3, "D", 5, 0.4),
            ("b", 0, "P", 5, 0.9), ("b", 1, "Q", 5, 0.1)]  # b: every pair contradicted: no pair
    comps = [("a", 0, "instruct", 1.0), ("a", 0, "coherence", 0.1), ("a", 1, "instruct", 0.5),
             ("a", 1, "coherence", 0.5), ("a", 2, "instruct", 0.0), ("a", 2, "coherence", 0.9),
             ("a", 3, "instruct", 0.0), ("a", 3, "coherence", 0.05), ("a", 3, "json", None),
             ("b", 0, "instruct", 1.0), ("b", 0, "coherence", 0.0), ("b", 1, "instruct", 0.0),
             ("b", 1, "coherence", 1.0)]
    cands, scores = _frames(spark, rows)
    cfg = SelectConfig(strategy="consensus", min_margin=0.05)
    out = {r.prompt_id: r for r in pairs(cands, scores, cfg, "r1", _components(spark, comps)).collect()}
    assert set(out) == {"a"}
    assert (out["a"].chosen, out["a"].rejected, out["a"].strategy) == ("A", "D", "consensus")
    assert out["a"].margin == pytest.approx(0.5)
    best_worst = {r.prompt_id: r for r in pairs(cands, scores, SelectConfig(min_margin=0.05), "r1").collect()}
    assert (best_worst["a"].chosen, best_worst["a"].rejected) == ("A", "C") and "b" in best_worst
    with pytest.raises(ValueError, match="per-component"):
        pairs(cands, scores, cfg, "r1")


def test_length_band_pairs_answers_of_similar_length(spark):
    rows = [("a", 0, "A", 10, 0.9), ("a", 1, "B", 12, 0.5), ("a", 2, "C", 40, 0.1),
            ("b", 0, "P", 10, 0.9), ("b", 1, "Q", 30, 0.1)]  # b: nothing within the band
    cands, scores = _frames(spark, rows)
    out = {r.prompt_id: r for r in pairs(cands, scores, SelectConfig(strategy="length_band", length_band=0.5,
                                                                      min_margin=0.05), "r1").collect()}
    assert set(out) == {"a"} and (out["a"].chosen, out["a"].rejected) == ("A", "B")
    wide = {r.prompt_id for r in pairs(cands, scores, SelectConfig(strategy="length_band", length_band=3.0,
                                                                   min_margin=0.05), "r1").collect()}
    assert wide == {"a", "b"}


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match=r"^select\.strategy: .*'best_worst', 'consensus' or 'length_band'"):
        load_config(None, ["select.strategy=random"])  # as a YAML file or an override sets it


def test_several_pairs_per_prompt_are_the_widest_distinct_contrasts(spark):
    rows = [("a", 0, "A", 5, 0.9), ("a", 1, "B", 5, 0.7), ("a", 2, "C", 5, 0.4), ("a", 3, "D", 9, 0.1),
            ("a", 4, "D", 9, 0.1),                       # the same text twice is one candidate, not a second pair
            ("b", 0, "P", 5, 0.9), ("b", 1, "Q", 5, 0.88)]  # b: its only pair is below the margin
    cands, scores = _frames(spark, rows)
    one = pairs(cands, scores, SelectConfig(min_margin=0.05), "r1").collect()
    got = pairs(cands, scores, SelectConfig(min_margin=0.05, pairs_per_prompt=3), "r1").collect()
    # Margins: A>D 0.8, B>D 0.6, A>C 0.5, then A>B 0.2, B>C 0.3, C>D 0.3 are left out at k = 3.
    assert sorted((r.chosen, r.rejected) for r in got) == [("A", "C"), ("A", "D"), ("B", "D")]
    assert {(r.chosen_idx, r.rejected_idx) for r in got} == {(0, 2), (0, 3), (1, 3)}
    assert [(r.chosen, r.rejected) for r in one] == [("A", "D")]
    assert all(r.margin >= 0.05 and r.chosen_score > r.rejected_score for r in got)
    every = pairs(cands, scores, SelectConfig(min_margin=0.05, pairs_per_prompt=10), "r1").collect()
    assert len(every) == 6  # all ordered pairs of the four distinct answers of a: nothing doubled
    with pytest.raises(ConfigError, match=r"^select\.pairs_per_prompt: "):
        load_config(None, ["select.pairs_per_prompt=0"])


def test_rerunning_select_with_other_settings_replaces_the_rounds_pairs(spark, tables):
    from pyspark.sql import functions as F

    from tao_spark.select import write_pairs
    from tao_spark.tables import SCHEMAS, columns

    rows = [("a", 0, "A", 5, 0.9), ("a", 1, "B", 5, 0.6), ("a", 2, "C", 5, 0.1),
            ("b", 0, "P", 5, 0.8), ("b", 1, "Q", 5, 0.2)]
    base = {"purpose": "train", "finish_reason": "stop", "policy": "p", "policy_id": "p", "sampling": "{}",
            "seed": 0, "reused_from": None, "reward_key": "k"}
    for rid in ("r1", "r2"):
        cands = pd.DataFrame([{**base, "round_id": rid, "prompt_id": p, "candidate_idx": i, "task": "t",
                               "completion": text, "tokens": tok} for p, i, text, tok, _ in rows])
        scores = pd.DataFrame([{**base, "round_id": rid, "prompt_id": p, "candidate_idx": i,
                                "reward_name": "combined", "value": v} for p, i, _, _, v in rows])
        for name, df in (("candidates", cands), ("scores", scores)):
            df["created_at"] = pd.Timestamp("2026-01-01")
            tables.merge(name, spark.createDataFrame(df[columns(name)], SCHEMAS[name]))
    assert write_pairs(tables, round_id="r1", cfg=SelectConfig(pairs_per_prompt=3)) == 4  # a: 3, b: 1
    assert write_pairs(tables, round_id="r2", cfg=SelectConfig()) == 2
    # Again with the same settings: nothing changes; with one pair per prompt: a's two narrower pairs go.
    assert write_pairs(tables, round_id="r1", cfg=SelectConfig(pairs_per_prompt=3)) == 4
    assert write_pairs(tables, round_id="r1", cfg=SelectConfig()) == 2
    r1 = tables.read("preferences").where(F.col("round_id") == "r1").collect()
    assert sorted((r.chosen, r.rejected) for r in r1) == [("A", "C"), ("P", "Q")]
    assert tables.read("preferences").where(F.col("round_id") == "r2").count() == 2  # another round untouched
    # The same pairs made by another strategy: the rows say which strategy made them now.
    assert write_pairs(tables, round_id="r1", cfg=SelectConfig(strategy="consensus")) == 2
    assert {r.strategy for r in tables.read("preferences").where(F.col("round_id") == "r1").collect()} == {"consensus"}
    assert {r.strategy for r in tables.read("preferences").where(F.col("round_id") == "r2").collect()} == {"best_worst"}
