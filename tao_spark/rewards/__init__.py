"""Rewards: plain callables ``(prompts, completions) -> list[float]``, one of the two extension points.

    from tao_spark.config import RewardSpec
    from tao_spark.rewards import load_reward
    fn = load_reward(RewardSpec(name="len", fn="length_penalty", params={"target_words": 60}))
    fn(["Explain tides."], ["Tides follow the moon."])   # [1.0]

``prompts`` are the text of the last user turn, preceded by the system turn if there is one (joined by a blank
line); ``completions`` are the model's answers. A reward returns NaN for a prompt it does not apply to (say,
``json_key`` on a prompt that asks for no JSON); the score stage stores NaN as NULL and averages only the
components that apply.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import TYPE_CHECKING, Protocol

from tao_spark.rewards import verifiers

if TYPE_CHECKING:
    from tao_spark.config import RewardSpec

BUILTINS = ("instruction_following", "json_key", "numeric_answer", "length_penalty", "coherence", "sql_executes",
            "json_schema", "regex_match", "majority_vote", "self_consistency")
# Rewards every prompt gets whatever it asks: a prompt with nothing else is tuned towards short and fluent only.
FLOOR = ("length_penalty", "coherence")
# Rewards that hold state (a model, an HTTP client) and are built from their params, not called with them.
JUDGE = "judge"
MLFLOW_JUDGE = "mlflow_judge"


def reward_text(messages: list[dict[str, str]]) -> str:
    """What a reward reads of a prompt: the system turn (if any) and the last user turn."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    return "\n\n".join([*system[:1], messages[-1]["content"]])


class RewardFn(Protocol):
    """One score per (prompt, completion) pair: higher is better, NaN where the reward does not apply."""

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]: ...


def check(specs: list[RewardSpec]) -> None:
    """Load each function reward here, on the driver, so a misspelt module, name or param is one line before any
    Spark task starts. Judges and reward models are left to the workers: building them costs a model or a client."""
    from tao_spark.config import UserError

    for spec in specs:
        if spec.fn and spec.fn not in (JUDGE, MLFLOW_JUDGE):
            try:
                load_reward(spec)
            except ValueError as e:
                raise UserError(f"score.rewards: {e}") from None


def load_reward(spec: RewardSpec) -> RewardFn:
    """The callable ``spec`` names (a built-in or ``package.module:function``) with ``spec.params`` bound.

    ``fn: judge`` builds an LLM judge (``tao_spark.rewards.judge``), ``fn: mlflow_judge`` an MLflow judge, and a
    ``package.module:name`` that is an MLflow scorer is called as one (``tao_spark.rewards.mlflow_genai``); a spec
    with ``model`` and no ``fn`` loads a trained reward model (``tao_spark.rewards.model``). Parameters are checked
    against the function's signature here, so a misspelt one fails on the driver (``check``) rather than inside a
    Spark task.
    """
    if spec.fn == JUDGE:
        from tao_spark.rewards.judge import Judge

        return _build(Judge, spec, {"model": spec.model} if spec.model else {})
    if spec.fn == MLFLOW_JUDGE:
        from tao_spark.rewards.mlflow_genai import MlflowJudge

        return _build(MlflowJudge, spec, {"model": spec.model} if spec.model else {})
    if not spec.fn:
        from tao_spark.rewards.model import RewardModel

        return _build(RewardModel, spec, {"model": spec.model})
    if ":" in spec.fn:
        module_name, _, attr = spec.fn.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward '{spec.name}': cannot load {spec.fn!r}: {e}") from e
    elif spec.fn in BUILTINS:
        fn = getattr(verifiers, spec.fn)
    else:
        raise ValueError(f"reward '{spec.name}': unknown fn {spec.fn!r}; built-ins are {', '.join(BUILTINS)}, "
                         "or give package.module:function")
    if not callable(fn):
        raise ValueError(f"reward '{spec.name}': {spec.fn!r} is not callable")
    if ":" in spec.fn:
        from tao_spark.rewards.mlflow_genai import ScorerReward, is_scorer

        if is_scorer(fn):  # an MLflow @scorer function or judge: called per answer with inputs and outputs
            return _build(ScorerReward, spec, {"scorer": fn})
    try:
        inspect.signature(fn).bind([], [], **spec.params)
    except TypeError as e:
        raise ValueError(f"reward '{spec.name}': params {spec.params} do not fit {spec.fn}: {e}") from e
    except ValueError:
        pass  # a C callable may publish no signature; its params are then checked on the first call
    return functools.partial(fn, **spec.params) if spec.params else fn


def _build(cls: type, spec: RewardSpec, base: dict[str, object]) -> RewardFn:
    try:
        return cls(**{**base, **spec.params})  # type: ignore[no-any-return]
    except TypeError as e:
        raise ValueError(f"reward '{spec.name}': params {spec.params} do not fit {cls.__name__}: {e}") from e
