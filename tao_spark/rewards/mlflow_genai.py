"""MLflow GenAI both ways: any MLflow scorer or judge as a reward, and the project's rewards as MLflow scorers.

    score:
      rewards:
        # an MLflow judge (mlflow.genai.judges.make_judge) as a reward, by name
        - {name: polite, fn: mlflow_judge, params: {instructions: "Is {{ outputs }} a polite reply to {{ inputs }}?",
                                                    model: "openai:/gpt-4o-mini"}}
        # any @scorer function or judge object of yours
        - {name: concise, fn: my_pkg.scorers:concise}

    from tao_spark.registry import mlflow_evaluate
    mlflow_evaluate(tables, cfg, round_id)   # mlflow.genai.evaluate over a round's evaluations, rewards as scorers

A scorer is called with ``inputs={"prompt": <reward text>}`` and ``outputs=<answer>``; what it returns becomes the
reward: a number as it is, a bool or yes/no/pass/fail as 1.0/0.0. A ``Feedback`` with an error, or a value that is
none of these, is a recorded failure (NaN, ``last_failures``), as for the project's own judge.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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


def as_scorer(name: str, fn: Any) -> Any:
    """A reward (``load_reward``'s callable) as an MLflow scorer called ``name``: ``inputs["prompt"]`` and
    ``outputs`` in, its value out (``None`` where the reward does not apply to the prompt)."""
    from mlflow.genai.scorers import scorer

    def score(inputs: dict[str, Any], outputs: Any) -> float | None:
        value = fn([str(inputs.get("prompt", ""))], [outputs if isinstance(outputs, str) else str(outputs)])[0]
        return None if value != value else float(value)

    return scorer(score, name=name)
