"""evaluate and the gate: bootstrap win rate, per-task summaries, promotion decisions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tao_spark.config import Config, GateConfig, RewardSpec, ScoreConfig
from tao_spark.evaluate import summarize, win_rate
from tao_spark.registry import gate


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
    m, per_task = summarize(frame, cfg)
    assert m["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert per_task["a"]["win_rate"] == pytest.approx(0.75) and per_task["b"]["win_rate"] == pytest.approx(0.25)
    assert m["challenger_compliance"] == pytest.approx(0.5) and m["champion_compliance"] == pytest.approx(0.5)
    assert m["challenger_length_capped"] == pytest.approx(0.25)
    assert m["challenger_tokens"] == pytest.approx(25.0)


def test_gate_promotes_only_above_the_bar():
    cfg = GateConfig(min_win_rate_low=0.5, max_task_drop=0.05)
    assert gate({"win_rate_low": 0.55}, {"a": 0.01}, cfg).promote
    no = gate({"win_rate_low": 0.45}, {"a": 0.0}, cfg)
    assert not no.promote and "0.450" in no.reason
    drop = gate({"win_rate_low": 0.6}, {"a": 0.0, "b": 0.2}, cfg)
    assert not drop.promote and "'b'" in drop.reason
    assert not gate({"win_rate_low": float("nan")}, {}, cfg).promote
