"""Coverage: which of the configured rewards apply to which prompts, before a round spends hours on them.

    tao coverage [--json]            # the current snapshot of the prompt log
    coverage.measure(tables, cfg)    # the same figures as a dict; tao round logs them when it starts

A reward applies to a prompt when it scores probe answers to it (it returns NaN where it does not apply). A
prompt that only the floor rewards (``length_penalty``, ``coherence``) apply to is tuned towards short and fluent,
not towards what it asks; when most of a task's prompts are so, the round says so and names what to configure.
The instruction reader's findings are counted by kind (the public taxonomy's ids), with the kinds whose checker
cannot run on this machine listed apart. Computed as a Spark job over the prompts, one parse per prompt.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pandas as pd

from tao_spark.config import RewardSpec
from tao_spark.rewards import FLOOR, JUDGE, MLFLOW_JUDGE, check, reward_text

if TYPE_CHECKING:
    from tao_spark.config import Config
    from tao_spark.tables import Tables

# Two different answers: rewards that compare a prompt's candidates need at least two to apply.
_PROBES = ("The answer is 42.", "Here is my reply, in two sentences. It ends here.")
# A task is "mostly floor-only" above this share of its prompts.
WARN_SHARE = 0.5


def _always(spec: RewardSpec) -> bool:
    """Rewards that read every prompt (a judge, a reward model, an MLflow scorer); asking them about probes would
    cost a model call."""
    from tao_spark.rewards.mlflow_genai import ScorerReward
    from tao_spark.score import get_reward

    return spec.fn in (JUDGE, MLFLOW_JUDGE) or not spec.fn or isinstance(get_reward(spec), ScorerReward)


def _floor(spec: RewardSpec) -> bool:
    return (spec.fn or "").rsplit(":", 1)[-1] in FLOOR


def applies(specs: list[RewardSpec], text: str) -> list[bool]:
    """Per reward, whether it scores a prompt with this reward text."""
    from tao_spark.score import get_reward

    out = []
    for spec in specs:
        if _always(spec):
            out.append(True)
            continue
        vals = get_reward(spec)([text, text], list(_PROBES))
        out.append(any(v == v for v in vals))  # NaN != NaN: not applicable
    return out


def _partition(batches: Iterator[pd.DataFrame], *, specs: list[RewardSpec]) -> Iterator[pd.DataFrame]:
    from tao_spark.rewards.instructions import checkable
    from tao_spark.rewards.verifiers import parse_constraints

    floor = [_floor(s) for s in specs]
    for pdf in batches:
        rows = []
        for task, messages_json in zip(pdf["task"], pdf["messages_json"], strict=True):
            text = reward_text(json.loads(messages_json))
            flags = applies(specs, text)
            found = parse_constraints(text)
            rows.append({"task": task, "floor_only": not any(a for a, f in zip(flags, floor, strict=True) if not f),
                         "kinds": json.dumps([c.instruction_id for c in found]),
                         # library kinds have taxonomy ids as kinds; the bundled log's are checked here, always
                         "unchecked": json.dumps([c.kind for c in found if ":" in c.kind and not checkable(c.kind)]),
                         **{f"r{i}": a for i, a in enumerate(flags)}})
        yield pd.DataFrame(rows, columns=["task", "floor_only", "kinds", "unchecked",
                                          *[f"r{i}" for i in range(len(specs))]])


def measure(tables: Tables, cfg: Config, version: int | None = None) -> dict[str, Any]:
    """Coverage of ``score.rewards`` on the prompt log at ``version`` (default: its current version).

    ``{"prompts", "prompts_version", "tasks": {TASK: {"prompts", "rewards": {NAME: applies}, "floor_only"}},
    "instructions": {"recognised", "by_kind": {KIND: n}, "not_checkable_here": {KIND: n}}}``.
    """
    from pyspark.sql import functions as F

    specs = list(cfg.score.rewards)
    check(specs)
    version = tables.snapshot("prompts") if version is None else version
    prompts = tables.read("prompts", version=version).select("task", F.to_json("messages").alias("messages_json"))
    schema = ", ".join(["task string", "floor_only boolean", "kinds string", "unchecked string",
                        *[f"r{i} boolean" for i in range(len(specs))]])
    rows = prompts.mapInPandas(functools.partial(_partition, specs=specs), schema).cache()
    agg = [F.count(F.lit(1)).alias("prompts"), F.sum(F.col("floor_only").cast("int")).alias("floor_only"),
           *[F.sum(F.col(f"r{i}").cast("int")).alias(f"r{i}") for i in range(len(specs))]]
    tasks: dict[str, Any] = {}
    for r in rows.groupBy("task").agg(*agg).collect():
        tasks[r["task"]] = {"prompts": int(r["prompts"]), "floor_only": int(r["floor_only"] or 0),
                            "rewards": {s.name: int(r[f"r{i}"] or 0) for i, s in enumerate(specs)}}

    def by_kind(column: str) -> dict[str, int]:
        # Counted in Spark: a log of millions of prompts never comes to the driver, only one row per kind.
        kinds = rows.select(F.explode(F.from_json(column, "array<string>")).alias("kind"))
        return {r["kind"]: int(r["n"]) for r in kinds.groupBy("kind").agg(F.count(F.lit(1)).alias("n")).collect()}

    by_kind_all, unchecked = by_kind("kinds"), by_kind("unchecked")
    rows.unpersist()
    return {"prompts": sum(t["prompts"] for t in tasks.values()), "prompts_version": version,
            "tasks": dict(sorted(tasks.items())),
            "instructions": {"recognised": sum(by_kind_all.values()), "by_kind": dict(sorted(by_kind_all.items())),
                             "not_checkable_here": dict(sorted(unchecked.items()))}}


def warnings(cov: dict[str, Any]) -> list[str]:
    """One line per task whose prompts are mostly floor-only, naming what to configure."""
    out = []
    for task, t in cov["tasks"].items():
        if t["prompts"] and t["floor_only"] / t["prompts"] > WARN_SHARE:
            out.append(f"task {task!r}: {t['floor_only']} of {t['prompts']} prompts get only the floor rewards "
                       f"({', '.join(FLOOR)}), so a round tunes them towards short and fluent answers, not what they "
                       "ask; add a reward that reads them: an LLM judge with guidelines for the task "
                       "(score.rewards: {name: judge, fn: judge, params: {base_url: ..., guidelines: ...}}), "
                       "a verifier (json_schema, regex_match, sql_executes or package.module:function), or a "
                       "reward model trained on your preferences (tao train-reward)")
    return out


def metrics(cov: dict[str, Any]) -> dict[str, float]:
    """The figures as flat MLflow metrics: per task, the share of prompts each reward reads and the floor-only share."""
    out: dict[str, float] = {"coverage_instructions": float(cov["instructions"]["recognised"])}
    for task, t in cov["tasks"].items():
        n = max(t["prompts"], 1)
        key = re.sub(r"[^\w.\- /]", "_", task)  # the characters MLflow allows in a metric name
        out[f"coverage_{key}_floor_only"] = t["floor_only"] / n
        out.update({f"coverage_{key}_{name}": v / n for name, v in t["rewards"].items()})
    return out


def summary(cov: dict[str, Any]) -> str:
    """The coverage table a person reads."""
    lines = [f"prompts@v{cov['prompts_version']}: {cov['prompts']} prompts"]
    names = list(next(iter(cov["tasks"].values()))["rewards"]) if cov["tasks"] else []
    width = max([len("task"), *(len(t) for t in cov["tasks"])])
    lines.append("  ".join(["task".ljust(width), "prompts".rjust(7), *(n.rjust(max(len(n), 6)) for n in names),
                            "floor-only".rjust(10)]))
    for task, t in cov["tasks"].items():
        lines.append("  ".join([task.ljust(width), str(t["prompts"]).rjust(7),
                                *(str(t["rewards"][n]).rjust(max(len(n), 6)) for n in names),
                                str(t["floor_only"]).rjust(10)]))
    ins = cov["instructions"]
    lines.append(f"instructions recognised: {ins['recognised']}")
    for kind, n in sorted(ins["by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<48}{n:>7}")
    if ins["not_checkable_here"]:
        lines.append("not checkable on this machine (nltk data missing; left out of the scores): "
                     + ", ".join(f"{k} ({n})" for k, n in ins["not_checkable_here"].items()))
    lines.extend(f"warning: {w}" for w in warnings(cov))
    return "\n".join(lines)
