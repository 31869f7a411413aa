"""Evaluate without labels: the tuned model against the deployed one on held-out prompts.

    tao evaluate --round ROUND_ID

Both models answer every held-out prompt (greedy by default, as a deployed model answers); the same
rewards score both; the challenger wins a prompt when its combined reward is higher (ties count half).
The win rate comes with a bootstrap 95% interval over prompts, per task too.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tao_spark import generate, score
from tao_spark.config import Config
from tao_spark.models import model_id
from tao_spark.rewards import reward_text
from tao_spark.rewards.verifiers import answer_key, asks_short_answer
from tao_spark.rounds import Evaluation, Figures, Round, StageResult, forgetting_sample, policy, split, versions
from tao_spark.tables import Tables, columns

ARMS = ("challenger", "champion")


def win_rate(outcomes: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss; any per-prompt figure) and its bootstrap 95%
    percentile interval."""
    if len(outcomes) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = outcomes[rng.integers(0, len(outcomes), size=(resamples, len(outcomes)))].mean(axis=1)
    return float(outcomes.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def compliance_reward(cfg: Config) -> str | None:
    """The reward component that checks stated constraints, if configured: its 1.0 means fully compliant."""
    return next((r.name for r in cfg.score.rewards if r.fn == "instruction_following"), None)


def distinct_n(texts: Any, n: int) -> float:
    """Distinct word n-grams over all n-grams of ``texts`` (one value for the set): 1.0 when no n-gram repeats,
    near 0 when every answer is the same template. NaN without any n-gram."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = str(text).split()
        grams.extend(zip(*(words[i:] for i in range(n)), strict=False))
    return len(set(grams)) / len(grams) if grams else float("nan")


def summarize(frame: pd.DataFrame, cfg: Config) -> Evaluation:
    """Metrics over a frame with task, <arm>_reward, <arm>_tokens, <arm>_finish, <arm>_scores and optionally
    <arm>_text per prompt."""
    ev = cfg.evaluate
    strict = compliance_reward(cfg)

    def block(df: pd.DataFrame, seed: int) -> Figures:
        outcome = np.where(df.challenger_reward > df.champion_reward, 1.0,
                           np.where(df.challenger_reward < df.champion_reward, 0.0, 0.5))
        wr, lo, hi = win_rate(outcome, resamples=ev.bootstrap, seed=seed)
        m: dict[str, Any] = {"prompts": len(df), "win_rate": wr, "win_rate_low": lo, "win_rate_high": hi,
             "ties": float((outcome == 0.5).mean()) if len(df) else float("nan")}
        for arm in ARMS:
            m[f"{arm}_reward"] = float(df[f"{arm}_reward"].mean())
            m[f"{arm}_tokens"] = float(df[f"{arm}_tokens"].mean())
            m[f"{arm}_length_capped"] = float((df[f"{arm}_finish"] == "length").mean())
            if f"{arm}_text" in df:
                m[f"{arm}_distinct1"] = distinct_n(df[f"{arm}_text"], 1)
                m[f"{arm}_distinct2"] = distinct_n(df[f"{arm}_text"], 2)
            if strict:
                vals = [json.loads(s).get(strict) for s in df[f"{arm}_scores"]]
                applicable = [v for v in vals if v is not None]
                if applicable:
                    m[f"{arm}_compliance"] = float(np.mean([v >= 1.0 for v in applicable]))
        if "challenger_consistency" in df:
            c = df.dropna(subset=["challenger_consistency", "champion_consistency"])
            if len(c):
                m["consistency_prompts"] = len(c)
                for arm in ARMS:
                    m[f"{arm}_consistency"] = float(c[f"{arm}_consistency"].mean())
                drop = (c.champion_consistency - c.challenger_consistency).to_numpy(dtype=float)
                _, m["consistency_drop_low"], m["consistency_drop_high"] = win_rate(
                    drop, resamples=ev.bootstrap, seed=seed)
        return Figures(**m)

    return Evaluation(overall=block(frame, ev.seed),
                      per_task={t: block(g, ev.seed + i + 1) for i, (t, g) in enumerate(sorted(frame.groupby("task")))})


def _answers(tables: Tables, round_id: str) -> pd.DataFrame:
    """Each held-out prompt with both arms' greedy answers and scores (``<column>_<arm>``), in one job."""
    ours = ((F.col("round_id") == round_id) & F.col("purpose").isin([f"eval_{arm}" for arm in ARMS])
            & (F.col("candidate_idx") == 0))
    scores = tables.read("scores").where(ours).groupBy("purpose", "prompt_id").agg(
        F.to_json(F.map_from_entries(F.collect_list(F.struct("reward_name", "value")))).alias("scores"))
    both = tables.read("candidates").where(ours).join(scores, ["purpose", "prompt_id"]).select(
        "purpose", "prompt_id", "task", "completion", "tokens", "finish_reason", "policy", "scores").toPandas()
    a, b = (both[both.purpose == f"eval_{arm}"].drop(columns="purpose") for arm in ARMS)
    # In prompt order: the bootstrap's resamples index rows, so the interval does not depend on Spark's row order.
    return (a.merge(b, on=["prompt_id", "task"], suffixes=tuple(f"_{arm}" for arm in ARMS))
            .sort_values("prompt_id", ignore_index=True))


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The evaluate stage: the round's tuned model against its baseline on the held-out prompts, plus the
    forgetting check on the first round's held-out sample."""
    if not rnd.tuned_model:
        raise RuntimeError(f"round {rnd.round_id}: train has not produced a model")
    challenger = (rnd.tuned_model, rnd.tuned_model, model_id(rnd.tuned_model))
    ev, frame = compare(tables, split(tables, rnd, cfg)[1], round_id=rnd.round_id, cfg=cfg, challenger=challenger,
                        champion=policy(cfg, rnd.baseline_model))
    old = {r.prompt_id for r in forgetting_sample(tables, rnd, cfg).select("prompt_id").collect()}
    sample = frame[frame.prompt_id.isin(old)]
    if len(sample):
        ev = ev.model_copy(update={"forgetting_prompts": len(sample), "forgetting": float(
            sample.champion_reward.mean() - sample.challenger_reward.mean())})
    return StageResult(record=ev,
                       versions=versions(tables, "candidates", "scores", "evaluations"))


def compare(
    tables: Tables, holdout: DataFrame, *, round_id: str, cfg: Config, challenger: tuple[str, str, str],
    champion: tuple[str, str, str],
) -> tuple[Evaluation, pd.DataFrame]:
    """Answer, score and compare: the figures and one row per held-out prompt. ``challenger``/``champion`` are
    (model uri, local path, policy id)."""
    arms = dict(zip(ARMS, (challenger, champion), strict=True))
    greedy = dataclasses.replace(cfg.generate, n=1, temperature=cfg.evaluate.temperature,
                                 max_new_tokens=cfg.evaluate.max_new_tokens)
    requests = [generate.Request(holdout, f"eval_{arm}", dataclasses.replace(cfg.model, path=uri), path, pid, greedy)
                for arm, (uri, path, pid) in arms.items()]
    texts, asked = _short_answer_prompts(holdout, cfg)
    if asked:  # the consistency samples: the same pass as the greedy answers, not two more
        # All sampled: they are measured against the greedy answer, so none of them may be it.
        k = dataclasses.replace(cfg.generate, n=cfg.evaluate.consistency_samples, greedy_answer=False,
                                max_new_tokens=cfg.evaluate.max_new_tokens)
        requests += [generate.Request(holdout.where(F.col("prompt_id").isin(asked)), f"eval_{arm}_samples",
                                      dataclasses.replace(cfg.model, path=uri), path, pid, k)
                     for arm, (uri, path, pid) in arms.items()]
    generate.sample_all(tables, requests, round_id=round_id)
    score.score_candidates(tables, holdout, round_id=round_id, purpose=[f"eval_{arm}" for arm in ARMS],
                           cfg=cfg.score)
    frame = _answers(tables, round_id)
    for arm, agree in _consistency(tables, frame, texts, asked, round_id=round_id).items():
        frame[f"{arm}_consistency"] = frame.prompt_id.map(agree).astype(float)
    for arm in ARMS:
        frame[f"{arm}_reward"] = [json.loads(s).get(score.COMBINED) for s in frame[f"scores_{arm}"]]
        frame[f"{arm}_tokens"] = frame[f"tokens_{arm}"]
        frame[f"{arm}_finish"] = frame[f"finish_reason_{arm}"]
        frame[f"{arm}_scores"] = frame[f"scores_{arm}"]
        frame[f"{arm}_text"] = frame[f"completion_{arm}"]
    frame = frame.dropna(subset=["challenger_reward", "champion_reward"])
    ev = summarize(frame, cfg)

    frame["winner"] = np.where(frame.challenger_reward > frame.champion_reward, "challenger",
                               np.where(frame.challenger_reward < frame.champion_reward, "champion", "tie"))
    rows = pd.DataFrame({
        "round_id": round_id, "prompt_id": frame.prompt_id, "task": frame.task,
        "challenger": frame.completion_challenger, "champion": frame.completion_champion,
        "challenger_reward": frame.challenger_reward.astype(float),
        "champion_reward": frame.champion_reward.astype(float),
        "challenger_tokens": frame.challenger_tokens.astype("int32"),
        "champion_tokens": frame.champion_tokens.astype("int32"),
        "challenger_scores": frame.challenger_scores, "champion_scores": frame.champion_scores,
        "winner": frame.winner, "created_at": pd.Timestamp.now(tz="UTC"),
    }, columns=columns("evaluations"))
    if len(rows):
        tables.merge("evaluations", tables.frame("evaluations", rows), update=True)
    return ev, frame


def _short_answer_prompts(holdout: DataFrame, cfg: Config) -> tuple[dict[str, str], list[str]]:
    """The held-out prompts' reward texts, and which of them ask for a short answer (none when
    ``evaluate.consistency_samples`` is 0 or sampling is greedy: greedy samples would only repeat the greedy one)."""
    if not cfg.evaluate.consistency_samples or cfg.generate.temperature <= 0:
        return {}, []
    texts = {r.prompt_id: reward_text(json.loads(r.m))
             for r in holdout.select("prompt_id", F.to_json("messages").alias("m")).collect()}
    return texts, sorted(p for p, t in texts.items() if asks_short_answer(t))


def _consistency(tables: Tables, frame: pd.DataFrame, texts: dict[str, str], asked: list[str], *, round_id: str
                 ) -> dict[str, dict[str, float]]:
    """Per arm, per held-out prompt that asks for a short answer: the share of ``evaluate.consistency_samples``
    samples whose final answer equals the greedy answer's (0 when the greedy answer gives none).

    Without labels, a model whose sampled answers stop agreeing with its own greedy one has most likely lost the
    skill (a right answer is stable under sampling, a guess is not). Both arms draw with the same seeds per prompt.
    """
    answered = set(frame.prompt_id)
    asked = [p for p in asked if p in answered]
    if not asked:
        return {}
    purposes = {f"eval_{arm}_samples": arm for arm in ARMS}
    samples = (tables.read("candidates").where((F.col("round_id") == round_id) & F.col("purpose").isin(list(purposes))
                                               & F.col("prompt_id").isin(asked))
               .select("purpose", "prompt_id", "completion").toPandas())
    greedy = {arm: dict(zip(frame.prompt_id, frame[f"completion_{arm}"], strict=True)) for arm in ARMS}
    out: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
    for (purpose, prompt_id), rows in samples.groupby(["purpose", "prompt_id"]):
        arm = purposes[str(purpose)]
        key = answer_key(texts[str(prompt_id)], greedy[arm][prompt_id])
        out[arm][str(prompt_id)] = 0.0 if key is None else float(
            np.mean([answer_key(texts[str(prompt_id)], c) == key for c in rows.completion]))
    return out


def fmt_interval(f: Figures) -> str:
    if math.isnan(f.win_rate):
        return "n/a"
    return f"{f.win_rate:.3f} [{f.win_rate_low:.3f}, {f.win_rate_high:.3f}]"


def figures(frame: pd.DataFrame, per_task: dict[str, Figures]) -> dict[str, Any]:
    """Reward histogram of both models and per-task win rates with intervals, for the MLflow run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(frame):
        bins = np.linspace(min(frame.champion_reward.min(), frame.challenger_reward.min()),
                           max(frame.champion_reward.max(), frame.challenger_reward.max()) + 1e-9, 21)
        ax.hist(frame.champion_reward, bins=bins, alpha=0.6, label="before (champion)")
        ax.hist(frame.challenger_reward, bins=bins, alpha=0.6, label="after (challenger)")
    ax.set_xlabel("combined reward on held-out prompts")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    figs["reward_histogram"] = fig

    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = sorted(per_task)
    wr = [per_task[t].win_rate for t in tasks]
    err = [[per_task[t].win_rate - per_task[t].win_rate_low for t in tasks],
           [per_task[t].win_rate_high - per_task[t].win_rate for t in tasks]]
    ax.bar(tasks, wr, yerr=err, capsize=4)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("challenger win rate (95% CI)")
    fig.tight_layout()
    figs["win_rate_by_task"] = fig
    return figs
