"""One TAO round, top to bottom: snapshot → generate → score → select → train → evaluate → register.

    tao round                      # resumes an unfinished round, else starts one on a fresh snapshot
    tao round --new generate.n=8   # always a fresh round
    tao loop --rounds 3            # rounds on the growing prompt log, under the round lock

Each stage is a module with the same entry, ``run(tables, rnd, cfg) -> StageResult``, that reads its inputs
from the tables and writes its outputs by key; it is also its own command (``tao generate --round R``).
This module keeps the round's bookkeeping: it pins the snapshot, runs the stages in order, and records
each stage's result in ``rounds`` (``tao_spark.rounds``), so a round re-run after a crash continues where
it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from tao_spark import coverage, evaluate, generate, registry, score, select, train
from tao_spark.config import STAGES as NAMES
from tao_spark.config import Config, UserError
from tao_spark.locks import acquire, release
from tao_spark.rounds import Generated, Round, Selected, StageResult, count_new, finished, latest_open, save
from tao_spark.tables import TableNotFound, Tables

log = logging.getLogger("tao.loop")

# Each stage's entry, in the order config.STAGES gives: a Delta table in, a Delta table out (ARCHITECTURE.md).
STAGES: dict[str, Callable[[Tables, Round, Config], StageResult]] = dict(zip(
    NAMES, (generate.run, score.run, select.run, train.run, evaluate.run, registry.run), strict=True))


def start(tables: Tables, cfg: Config) -> Round | None:
    """Pin the prompt log's current version and the policies; write the round's first row.

    Returns None when no prompt arrived since the last promoted round: tuning again on the same data would
    only repeat that round.
    """
    try:
        version = tables.snapshot("prompts")
    except TableNotFound:
        raise UserError("no prompts yet: run `tao ingest FILE` (or `tao ingest --table NAME`) first") from None
    done = finished(tables)
    promoted = [r for r in done if r.promoted]
    if promoted and count_new(tables, version, promoted[-1].prompts_version) == 0:
        log.warning(f"tao: no new prompts since round {promoted[-1].round_id} "
                    f"(prompts@v{promoted[-1].prompts_version}) was promoted; nothing to do")
        return None
    champion = registry.champion_uri(cfg)
    now = datetime.now(UTC)
    previous = done[-1].prompts_version if done else None
    rnd = Round(
        round_id=f"r{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}", status="started", prompts_version=version,
        base_model=champion if cfg.loop.start_from == "champion" and champion else cfg.model.path,
        baseline_model=champion or cfg.model.path, started_at=now, previous_version=previous,
        first_version=(done[0].prompts_version if done[0].first_version is None else done[0].first_version)
        if done else version,
        new_prompts=count_new(tables, version, previous),
    )
    log.info(f"tao: round {rnd.round_id} on prompts@v{version} ({rnd.new_prompts} new), policy {rnd.base_model}, "
             f"baseline {rnd.baseline_model}")
    # Before generating: which rewards will read these prompts, and which tasks would be tuned on the floor only.
    cov = coverage.measure(tables, cfg, version)
    for line in coverage.warnings(cov):
        log.warning(f"tao: coverage: {line}")
    rnd.metrics["coverage"] = cov
    # One write of the row (a MERGE: seconds on a cluster), before the run: the run's id reaches `rounds` with the
    # first stage's result, and a round resumed before that finds its run again by the round's tag (open_run).
    save(tables, rnd, cfg)
    rnd.mlflow_run_id = registry.open_run(cfg, rnd.round_id)
    registry.log_stage(cfg, rnd.mlflow_run_id, coverage.metrics(cov))
    return rnd


def run_stage(tables: Tables, rnd: Round, stage: str, cfg: Config) -> Round:
    """Run one stage of a round and record its result; a stage already done is skipped."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    if rnd.done(stage):
        log.info(f"tao: {stage}: already done for {rnd.round_id}")
        return rnd
    names = list(STAGES)
    before = names[names.index(stage) - 1] if stage != names[0] else None
    if before and not rnd.done(before):
        raise UserError(f"round {rnd.round_id}: run `tao {before} --round {rnd.round_id}` first")
    if not rnd.mlflow_run_id:
        rnd = dataclasses.replace(rnd, mlflow_run_id=registry.open_run(cfg, rnd.round_id))
    log.info(f"tao: {stage}: started for {rnd.round_id}")
    t0 = time.perf_counter()
    res = STAGES[stage](tables, rnd, cfg)
    m = {**rnd.metrics, **res.metrics}
    m["table_versions"] = {**m.get("table_versions", {}), **res.versions}
    m[f"time_{stage}_s"] = m.get(f"time_{stage}_s", 0.0) + time.perf_counter() - t0
    rnd = dataclasses.replace(rnd, **res.fields, metrics=m, status="done" if stage == names[-1] else stage)
    if stage != names[-1]:  # register logs everything itself, and has just ended the run
        registry.log_stage(cfg, rnd.mlflow_run_id, {f"time_{stage}_s": m[f"time_{stage}_s"]})
    save(tables, rnd, cfg, stage=stage, seconds=time.perf_counter() - t0)
    log.info(f"tao: {stage}: done in {time.perf_counter() - t0:.1f} s")
    return rnd


def run_round(tables: Tables, cfg: Config, *, new: bool = False,
              on_stage: Callable[[str, Round], None] | None = None) -> Round | None:
    """Run every stage of a round: the unfinished one if there is one (unless ``new``), else a fresh one.

    Returns None when there is nothing to do (no new prompts since the last promoted round).
    """
    train.check_trl(cfg.train.trl, cfg.train.method, "train.trl")  # a misspelt option fails now, not at train
    rnd = None if new else latest_open(tables)
    if rnd is None:
        rnd = start(tables, cfg)
        if rnd is None:
            return None
    else:
        log.info(f"tao: resuming round {rnd.round_id} after stage {rnd.status}")
    for stage in STAGES:
        rnd = run_stage(tables, rnd, stage, cfg)
        if on_stage:
            on_stage(stage, rnd)
    return rnd


def run_loop(tables: Tables, cfg: Config, *, rounds: int | None = None) -> list[Round]:
    """Rounds until ``rounds`` have been attempted (None: until interrupted), each under the round lock."""
    done: list[Round] = []
    attempt = 0
    while rounds is None or attempt < rounds:
        attempt += 1
        holder = acquire(tables, "round", cfg.loop.lock_lease_s)
        try:
            rnd = run_round(tables, cfg)
        finally:
            release(tables, "round", holder)
        if rnd is None:
            if rounds is None:
                time.sleep(60)  # waiting for prompts to arrive
            continue
        print(report(rnd, cfg))
        done.append(rnd)
    return done


def report(rnd: Round, cfg: Config) -> str:
    """The few lines a person wants after a round."""
    m = rnd.metrics
    lines = [f"TAO round {rnd.round_id} on prompts@v{rnd.prompts_version} ({rnd.n_prompts} prompts: "
             f"{rnd.n_train} train, {rnd.n_holdout} held out)"]
    gen, sel = rnd.record(Generated), rnd.record(Selected)
    if gen:
        lines.append(f"  candidates      {gen.candidates} ({gen.tokens_generated} tokens, "
                     f"{100 * (gen.candidates_length_capped or 0):.0f}% hit max_new_tokens; "
                     f"{gen.candidates_mended} of them mends)")
    lines.append(f"  pairs built     {sel.pairs if sel else 0}")
    if m.get("coverage"):
        cov = m["coverage"]
        per_task = ", ".join(f"{t} {v['floor_only']}/{v['prompts']}" for t, v in cov["tasks"].items())
        lines.append(f"  floor-only      {per_task} (read by no reward but length and coherence; "
                     f"{cov['instructions']['recognised']} instructions recognised)")
    ev = rnd.evaluation()
    if ev:
        f = ev.overall
        lines.append(f"  reward          {f.champion_reward:.3f} -> {f.challenger_reward:.3f} "
                     f"(held-out, greedy; baseline {rnd.baseline_model})")
        if f.champion_compliance is not None:
            lines.append(f"  compliance      {f.champion_compliance:.3f} -> "
                         f"{f.challenger_compliance if f.challenger_compliance is not None else float('nan'):.3f} "
                         "(share of prompts meeting every stated constraint)")
        lines.append(f"  answer tokens   {f.champion_tokens:.1f} -> {f.challenger_tokens:.1f}")
        if f.challenger_distinct2 is not None and f.champion_distinct2 is not None:
            lines.append(f"  distinct-2      {f.champion_distinct2:.3f} -> {f.challenger_distinct2:.3f}"
                         " (answer diversity; the gate refuses a collapse)")
        if f.challenger_consistency is not None and f.champion_consistency is not None:
            lines.append(f"  consistency     {f.champion_consistency:.3f} -> {f.challenger_consistency:.3f} "
                         f"({f.consistency_prompts} answer-type prompts: share of samples agreeing with the greedy "
                         "answer)")
        lines.append(f"  win rate        {evaluate.fmt_interval(f)} (ties count half)")
        for task, tf in sorted(ev.per_task.items()):
            lines.append(f"    {task:<14}{evaluate.fmt_interval(tf)}  reward {tf.champion_reward:.3f} -> "
                         f"{tf.challenger_reward:.3f}  (n={tf.prompts})")
    if rnd.promoted is not None:
        lines.append(f"  promoted        {'yes' if rnd.promoted else 'no'}: {rnd.gate_reason}")
        lines.append(f"  MLflow          run {rnd.mlflow_run_id}, {cfg.mlflow.model_name} version "
                     f"{rnd.model_version}")
        lines.append(f"                  open with: mlflow ui --backend-store-uri {cfg.tracking_uri}")
    times = ", ".join(f"{s} {m[f'time_{s}_s']:.0f}s" for s in STAGES if f"time_{s}_s" in m)
    lines.append(f"  stage times     {times}")
    return "\n".join(lines)
