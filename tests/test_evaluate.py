"""evaluate and the gate: bootstrap win rate, per-task summaries, promotion decisions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tao_spark.config import Config, GateConfig, RewardSpec, ScoreConfig
from tao_spark.evaluate import summarize, win_rate
from tao_spark.registry import gate as gate_on
from tao_spark.rounds import Evaluation, Figures


def gate(overall: dict[str, float], task_drops: dict[str, float], cfg: GateConfig):
    """The gate on an evaluation with these figures (the rest neutral) and tasks that dropped by these amounts."""
    neutral = {"prompts": 10, "win_rate": 0.6, "win_rate_low": 0.5, "win_rate_high": 0.7, "ties": 0.0,
               "challenger_reward": 0.5, "champion_reward": 0.5, "challenger_tokens": 50.0, "champion_tokens": 50.0,
               "challenger_length_capped": 0.0, "champion_length_capped": 0.0}
    per_task = {t: Figures(**{**neutral, "champion_reward": 0.5 + d}) for t, d in task_drops.items()}
    return gate_on(Evaluation(overall=Figures(**{**neutral, **overall}), per_task=per_task), cfg)


def test_win_rate_interval_covers_and_ties_count_half():
    wr, lo, hi = win_rate(np.array([1.0] * 70 + [0.0] * 30), resamples=2000, seed=1)
    assert wr == pytest.approx(0.7) and lo < 0.7 < hi and 0.55 < lo and hi < 0.85
    wr, lo, hi = win_rate(np.array([0.5] * 50))
    assert wr == lo == hi == 0.5
    assert np.isnan(win_rate(np.array([]))[0])


def test_summarize_per_task_and_compliance():
    cfg = Config(score=ScoreConfig(rewards=[RewardSpec(name="ifx", fn="instruction_following")]))
    frame = pd.DataFrame({
        "task": ["a", "a", "b", "b"],
        "challenger_reward": [1.0, 0.5, 0.2, 0.2], "champion_reward": [0.0, 0.5, 0.9, 0.2],
        "challenger_tokens": [10, 20, 30, 40], "champion_tokens": [10, 10, 10, 10],
        "challenger_finish": ["stop", "length", "stop", "stop"], "champion_finish": ["stop"] * 4,
        "challenger_scores": [json.dumps({"ifx": 1.0}), json.dumps({"ifx": 0.5}), "{}", "{}"],
        "champion_scores": [json.dumps({"ifx": 0.0}), json.dumps({"ifx": 1.0}), "{}", "{}"],
    })
    ev = summarize(frame, cfg)
    m, per_task = ev.overall, ev.per_task
    assert m.win_rate == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert per_task["a"].win_rate == pytest.approx(0.75) and per_task["b"].win_rate == pytest.approx(0.25)
    assert m.challenger_compliance == pytest.approx(0.5) and m.champion_compliance == pytest.approx(0.5)
    assert m.challenger_length_capped == pytest.approx(0.25)
    assert m.challenger_tokens == pytest.approx(25.0)
    # The record the round stores reads back to the same figures, and a damaged one is a one-line error.
    from tao_spark.config import UserError
    from tao_spark.rounds import read_evaluation

    stored = json.loads(json.dumps(ev.model_dump()))
    assert read_evaluation({"evaluation": stored}, "r1") == ev
    assert ev.task_drops() == pytest.approx({"a": -0.5, "b": 0.35})
    with pytest.raises(UserError, match="round r1: its evaluation record"):
        read_evaluation({"evaluation": {**stored, "overall": {**stored["overall"], "win_rate_low": "high"}}}, "r1")


def test_gate_promotes_only_above_the_bar():
    cfg = GateConfig(min_win_rate_low=0.5, max_task_drop=0.05)
    assert gate({"win_rate_low": 0.55}, {"a": 0.01}, cfg).promote
    no = gate({"win_rate_low": 0.45}, {"a": 0.0}, cfg)
    assert not no.promote and "0.450" in no.reason
    drop = gate({"win_rate_low": 0.6}, {"a": 0.0, "b": 0.2}, cfg)
    assert not drop.promote and "'b'" in drop.reason
    assert not gate({"win_rate_low": float("nan")}, {}, cfg).promote


def test_distinct_n_sees_a_template_repeated():
    from tao_spark.evaluate import distinct_n

    varied = ["the cat sat on the mat", "a dog ran in the park", "rain falls on green hills"]
    template = ["I am happy to help you with that"] * 3
    assert distinct_n(varied, 2) > 0.9
    assert distinct_n(template, 2) == pytest.approx(1 / 3)
    assert np.isnan(distinct_n(["one"], 2))


def test_gate_refuses_a_collapsed_model_whatever_its_win_rate():
    """Diversity gone, answers exploding in length or hitting the cap: refused with the reason, even at a
    winning interval (reward hacking wins on the reward by construction)."""
    cfg = GateConfig()
    healthy = {"win_rate_low": 0.7, "challenger_distinct2": 0.6, "champion_distinct2": 0.62,
               "challenger_tokens": 60.0, "champion_tokens": 80.0, "challenger_length_capped": 0.3,
               "champion_length_capped": 0.6}
    assert gate(healthy, {}, cfg).promote
    same = gate({**healthy, "challenger_distinct2": 0.2}, {}, cfg)
    assert not same.promote and same.reason.startswith("answers collapsed: distinct-2 0.200")
    longer = gate({**healthy, "challenger_tokens": 200.0}, {}, cfg)
    assert not longer.promote and "gate.max_length_ratio" in longer.reason
    capped = gate({**healthy, "challenger_length_capped": 0.95}, {}, cfg)
    assert not capped.promote and "max_new_tokens 95%" in capped.reason
    off = GateConfig(min_distinct_ratio=0, max_length_ratio=0, max_capped_increase=1)
    assert gate({**healthy, "challenger_distinct2": 0.01, "challenger_tokens": 900.0,
                 "challenger_length_capped": 1.0}, {}, off).promote
    # An evaluation from before these metrics existed is judged on the rest.
    assert gate({"win_rate_low": 0.7}, {}, cfg).promote


def test_summarize_reports_distinct_n_per_arm():
    cfg = Config()
    frame = pd.DataFrame({
        "task": ["a", "a"], "challenger_reward": [1.0, 1.0], "champion_reward": [0.0, 0.0],
        "challenger_tokens": [5, 5], "champion_tokens": [5, 5], "challenger_finish": ["stop"] * 2,
        "champion_finish": ["stop"] * 2, "challenger_scores": ["{}"] * 2, "champion_scores": ["{}"] * 2,
        "challenger_text": ["same words every time", "same words every time"],
        "champion_text": ["first answer here", "another reply there"],
    })
    m = summarize(frame, cfg).overall
    assert m.challenger_distinct2 == pytest.approx(0.5) and m.champion_distinct2 == pytest.approx(1.0)
    assert m.challenger_distinct1 == pytest.approx(0.5)


def test_mlflow_filter_values_with_quotes_are_refused_not_spliced():
    from tao_spark.registry import _literal

    assert _literal("r20261201-151918-e72df7") == "r20261201-151918-e72df7"
    for bad in ("r1' OR '1'='1", "back\\slash"):
        with pytest.raises(ValueError, match="not a plain identifier"):
            _literal(bad)


def test_a_round_recorded_before_the_typed_record_still_reads_and_gates():
    """Rounds written by earlier versions kept their figures as flat ``eval_*`` keys: they read as the record."""
    from tao_spark.rounds import read_evaluation

    arms = {f"{arm}_{k}": v for arm in ("challenger", "champion")
            for k, v in (("reward", 0.5), ("tokens", 40.0), ("length_capped", 0.1))}
    flat = {"prompts": 12.0, "win_rate": 0.7, "win_rate_low": 0.6, "win_rate_high": 0.8, "ties": 0.1, **arms}
    legacy = {**{f"eval_{k}": v for k, v in flat.items()}, "eval_per_task": {"a": {**flat, "champion_reward": 0.9}},
              "forgetting": 0.01, "forgetting_prompts": 4, "pairs": 30}
    ev = read_evaluation(legacy, "r0")
    assert ev and ev.overall.win_rate_low == 0.6 and ev.overall.prompts == 12 and ev.forgetting_prompts == 4
    assert ev.task_drops() == pytest.approx({"a": 0.4})
    decision = gate_on(ev, GateConfig(min_win_rate_low=0.5, max_task_drop=0.05))
    assert not decision.promote and "'a'" in decision.reason
    assert read_evaluation({"pairs": 30}, "r0") is None


def test_gate_refuses_answers_that_stop_agreeing_with_their_own_samples():
    """The label-free proxy for accuracy on answer-type prompts: per prompt, the share of a model's samples whose
    final answer equals its greedy one. A drop whose whole interval sits above gate.max_consistency_drop refuses
    the round, whatever its win rate; a drop within the noise does not."""
    cfg = Config()
    n = 12
    frame = pd.DataFrame({
        "task": ["math"] * n + ["chat"] * 2, "challenger_reward": [1.0] * (n + 2), "champion_reward": [0.0] * (n + 2),
        "challenger_tokens": [5] * (n + 2), "champion_tokens": [5] * (n + 2),
        "challenger_finish": ["stop"] * (n + 2), "champion_finish": ["stop"] * (n + 2),
        "challenger_scores": ["{}"] * (n + 2), "champion_scores": ["{}"] * (n + 2),
        # Not an answer-type prompt: NaN, left out of the figures.
        "challenger_consistency": [0.25] * n + [np.nan] * 2, "champion_consistency": [0.75] * n + [np.nan] * 2,
    })
    ev = summarize(frame, cfg)
    f = ev.overall
    assert f.consistency_prompts == n and f.challenger_consistency == pytest.approx(0.25)
    assert f.consistency_drop_low == pytest.approx(0.5) == f.consistency_drop_high
    assert ev.per_task["math"].consistency_prompts == n and ev.per_task["chat"].consistency_prompts == 0
    win = GateConfig(min_win_rate_low=0.0, max_task_drop=1.0)
    refused = gate_on(ev, win)
    assert not refused.promote and refused.reason.startswith(f"answers to {n} answer-type prompts agree")
    assert gate_on(ev, GateConfig(min_win_rate_low=0.0, max_task_drop=1.0, max_consistency_drop=1.0)).promote
    # Half the prompts lose agreement, half gain it: the interval straddles zero and the round passes.
    noisy = frame.assign(challenger_consistency=[0.25, 1.0] * (n // 2) + [np.nan] * 2,
                         champion_consistency=[0.75, 0.5] * (n // 2) + [np.nan] * 2)
    ev = summarize(noisy, cfg)
    assert ev.overall.consistency_drop_low < 0 < ev.overall.consistency_drop_high and gate_on(ev, win).promote
