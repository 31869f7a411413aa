"""MLflow GenAI both ways, with a real tracking store and a real OpenAI-compatible server on loopback: an MLflow
scorer and an MLflow judge as rewards by name, and the project's rewards as scorers in ``mlflow.genai.evaluate``."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from mlflow.genai.scorers import scorer

from tao_spark.config import RewardSpec, load_config
from tao_spark.registry import mlflow_evaluate
from tao_spark.rewards import load_reward
from tao_spark.rewards.mlflow_genai import as_scorer, feedback_value
from tao_spark.tables import SCHEMAS, Tables
from tests.test_judge import Canned


@scorer
def concise(inputs, outputs) -> bool:
    return len(str(outputs).split()) <= 5


def test_an_mlflow_scorer_is_a_reward_by_name():
    fn = load_reward(RewardSpec(name="concise", fn="tests.test_mlflow_genai:concise"))
    assert fn(["Say hi."] * 2, ["hi there", "a much longer answer than five words here"]) == [1.0, 0.0]
    assert fn.last_failures == [False, False]


def test_an_mlflow_judge_is_a_reward_and_its_failures_are_recorded(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "none")

    def answer(question: str) -> str | None:
        if "crash" in question:  # a reply that is no verdict (a 500 would cost MLflow's retry backoff)
            return json.dumps({"result": "the answer is a poem", "rationale": "?"})
        return json.dumps({"result": "yes" if "please" in question else "no", "rationale": "read the reply"})

    s = Canned(answer)
    try:
        fn = load_reward(RewardSpec(name="polite", fn="mlflow_judge", params={
            "instructions": "Is {{ outputs }} a polite reply to {{ inputs }}? Answer yes or no.",
            "model": "openai:/judge-1", "base_url": s.url + "/v1", "feedback_value_type": "str"}))
        out = fn(["Ask for salt."] * 3, ["Salt, please.", "Give me salt.", "crash"])
        assert out[:2] == [1.0, 0.0] and math.isnan(out[2])
        assert fn.last_failures == [False, False, True]
        assert any("Salt, please." in r["messages"][-1]["content"] for r in s.requests)
    finally:
        s.server.shutdown()
    with pytest.raises(ValueError, match="outputs"):
        load_reward(RewardSpec(name="bad", fn="mlflow_judge", params={"instructions": "Rate it."}))


def test_feedback_values():
    from mlflow.entities import Feedback

    assert [feedback_value(v) for v in [True, 0.25, "Yes", "fail", "maybe", None]] == [1.0, 0.25, 1.0, 0.0, None, None]
    assert feedback_value(Feedback(name="x", value=0.5)) == 0.5
    assert feedback_value(Feedback(name="x", error="timeout")) is None


def test_the_rewards_as_scorers_over_a_rounds_evaluations(spark, tmp_path):
    cfg = load_config(Path(__file__).resolve().parent.parent / "conf" / "local.yaml", [f"home={tmp_path / 'home'}"])
    tables = Tables(spark, cfg.lakehouse)
    now = datetime.now(UTC)
    prompts = [("p1", "Describe tea. Do not use any commas."), ("p2", "What is 6 * 7? Answer with a single number.")]
    tables.merge("prompts", spark.createDataFrame(
        [(pid, "t", [{"role": "user", "content": text}], text, None, "test", None, now, now, "b1", "{}")
         for pid, text in prompts], SCHEMAS["prompts"]))
    answers = {"p1": "Tea is a warm drink.", "p2": "The answer is 42."}
    tables.merge("evaluations", spark.createDataFrame(
        [("r1", pid, "t", answers[pid], "x, y", 1.0, 0.0, 5, 2, "{}", "{}", "challenger", now) for pid, _ in prompts],
        SCHEMAS["evaluations"]))
    result = mlflow_evaluate(tables, cfg, "r1")
    assert result.run_id
    table = result.result_df
    by_prompt = {row["request"]["prompt"]: row for row in table.to_dict("records")}
    tea, arithmetic = by_prompt[prompts[0][1]], by_prompt[prompts[1][1]]
    assert tea["instruct/value"] == 1.0 and arithmetic["numeric/value"] == 1.0
    assert result.metrics["instruct/mean"] == 1.0
    # One scorer by itself, as mlflow.genai.evaluate calls it.
    assert as_scorer("n", load_reward(RewardSpec(name="n", fn="numeric_answer")))(
        inputs={"prompt": prompts[1][1]}, outputs="I do not know") == 0.0
