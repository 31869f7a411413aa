"""MLflow GenAI both ways: any MLflow scorer or judge as a reward, and the project's rewards as MLflow scorers.

    score:
      rewards:
        # an MLflow judge (mlflow.genai.judges.make_judge) as a reward, by name
        - {name: polite, fn: mlflow_judge, params: {instructions: "Is {{ outputs }} a polite reply to {{ inputs }}?",
                                                    model: "openai:/gpt-4o-mini"}}
        # any @scorer function or judge object of yours
        - {name: concise, fn: my_pkg.scorers:concise}

    from tao_spark.rewards.mlflow_genai import evaluate_round
    evaluate_round(tables, cfg, round_id)   # mlflow.genai.evaluate over a round's evaluations, the rewards as scorers

A scorer is called with ``inputs={"prompt": <reward text>}`` and ``outputs=<answer>``; what it returns becomes the
reward: a number as it is, a bool or yes/no/pass/fail as 1.0/0.0. A ``Feedback`` with an error, or a value that is
none of these, is a recorded failure (NaN, ``last_failures``), as for the project's own judge.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tao_spark.config import Config, RewardSpec
    from tao_spark.tables import Tables

log = logging.getLogger(__name__)
NAN = float("nan")
_YES = {"yes": 1.0, "true": 1.0, "pass": 1.0, "no": 0.0, "false": 0.0, "fail": 0.0}


def is_scorer(obj: Any) -> bool:
    from mlflow.genai.scorers import Scorer

    return isinstance(obj, Scorer)


def feedback_value(result: Any) -> float | None:
    """A scorer's result as a reward in [0, 1] or as returned; None when it carries no usable value."""
    from mlflow.entities import Feedback

    if isinstance(result, Feedback):
        if result.error is not None:
            return None
        result = result.value
    if isinstance(result, bool):
        return float(result)
    if isinstance(result, (int, float)):
        return None if math.isnan(float(result)) else float(result)
    if isinstance(result, str):
        return _YES.get(result.strip().lower().rstrip("."))
    return None


class ScorerReward:
    """A ``RewardFn`` over an MLflow ``Scorer`` (a ``@scorer`` function or a judge), ``concurrency`` calls at once."""

    def __init__(self, scorer: Any, concurrency: int = 4) -> None:
        self.scorer, self.concurrency = scorer, concurrency
        self._failures: list[bool] = []

    @property
    def last_failures(self) -> list[bool]:
        return list(self._failures)

    def _one(self, pc: tuple[str, str]) -> float | None:
        try:
            return feedback_value(self.scorer(inputs={"prompt": pc[0]}, outputs=pc[1]))
        except Exception as e:  # noqa: BLE001 - a user's scorer may raise anything; the row is a recorded failure
            log.warning("scorer %s failed: %s", getattr(self.scorer, "name", self.scorer), str(e)[:200])
            return None

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
            values = list(pool.map(self._one, zip(prompts, completions, strict=True)))
        self._failures = [v is None for v in values]
        return [NAN if v is None else v for v in values]


class MlflowJudge(ScorerReward):
    """``fn: mlflow_judge``: ``mlflow.genai.judges.make_judge`` with these params, as a reward."""

    def __init__(self, instructions: str, model: str | None = None, name: str = "tao_judge",
                 base_url: str | None = None, feedback_value_type: str = "float", concurrency: int = 4) -> None:
        from mlflow.genai.judges import make_judge

        types = {"float": float, "bool": bool, "int": int, "str": str}
        if feedback_value_type not in types:
            raise TypeError(f"feedback_value_type must be one of {', '.join(types)}")
        if "{{ outputs }}" not in instructions:
            raise TypeError("instructions must name the answer as {{ outputs }} (and may name {{ inputs }})")
        super().__init__(make_judge(name=name, instructions=instructions, model=model, base_url=base_url,
                                    feedback_value_type=types[feedback_value_type]), concurrency)


def as_scorer(spec: RewardSpec) -> Any:
    """The reward ``spec`` as an MLflow scorer named after it: ``inputs["prompt"]`` and ``outputs`` in, its value
    out (``None`` where the reward does not apply to the prompt)."""
    from mlflow.genai.scorers import scorer

    from tao_spark.rewards import load_reward

    fn = load_reward(spec)

    def score(inputs: dict[str, Any], outputs: Any) -> float | None:
        value = fn([str(inputs.get("prompt", ""))], [outputs if isinstance(outputs, str) else str(outputs)])[0]
        return None if value != value else float(value)

    return scorer(score, name=spec.name)


def evaluate_round(tables: Tables, cfg: Config, round_id: str | None = None, arm: str = "challenger") -> Any:
    """``mlflow.genai.evaluate`` of one arm's held-out answers in ``evaluations`` (default: the latest round),
    with every configured reward as a scorer; the result's run is in the configured experiment."""
    import json

    import mlflow
    import pandas as pd
    from pyspark.sql import functions as F

    from tao_spark import registry
    from tao_spark.rewards import reward_text

    if arm not in ("challenger", "champion"):
        raise ValueError(f"arm must be challenger or champion, got {arm!r}")
    if not cfg.score.rewards:
        raise ValueError("score.rewards is empty: no reward to evaluate with")
    ev = tables.read("evaluations")
    if round_id is None:
        latest = ev.agg(F.max("created_at")).first()[0]
        round_id = ev.where(F.col("created_at") == latest).select("round_id").first()[0]
    rows = (ev.where(F.col("round_id") == round_id)
            .join(tables.read("prompts").select("prompt_id", F.to_json("messages").alias("messages_json")),
                  "prompt_id")
            .select("prompt_id", "task", F.col(arm).alias("answer"), "messages_json").toPandas())
    data = pd.DataFrame({"inputs": [{"prompt": reward_text(json.loads(m))} for m in rows["messages_json"]],
                         "outputs": list(rows["answer"])})
    registry.setup(cfg)
    with mlflow.start_run(run_name=f"{round_id}-{arm}-scorers"):
        return mlflow.genai.evaluate(data=data, scorers=[as_scorer(s) for s in cfg.score.rewards])
