"""The continuous loop: rounds on a growing prompt log reuse earlier work, check forgetting, take a lock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from tao_spark import locks, loop, rounds
from tao_spark.config import load_config
from tao_spark.ingest import ingest
from tao_spark.tables import SCHEMAS, Tables, columns
from tests.test_round import _config_file, _overrides

SAMPLE = Path(__file__).resolve().parent.parent / "tao_spark" / "data" / "prompts.jsonl"


def _slice(tmp: Path, name: str, lo: int, hi: int) -> Path:
    out = tmp / name
    out.write_text("\n".join(SAMPLE.read_text().splitlines()[lo:hi]) + "\n")
    return out


def _loop_overrides(home: Path, model: Path) -> list[str]:
    kept = [o for o in _overrides(home, model) if not o.startswith(("generate.max_prompts", "evaluate.max_prompts"))]
    return kept + [
        "generate.n=2", "generate.max_new_tokens=6", "evaluate.max_new_tokens=6", "loop.forgetting_prompts=4",
        "generate.max_prompts=0",
        "gate.min_win_rate_low=0.0", "gate.max_task_drop=1.0", "gate.max_forgetting=1.0", "train.trl.max_steps=1",
    ]


@pytest.mark.integration
def test_two_rounds_on_a_growing_log_reuse_work(spark, tmp_path, tiny_model):
    cfg = load_config(_config_file(tmp_path), _loop_overrides(tmp_path / "home", tiny_model))
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_slice(tmp_path, "a.jsonl", 0, 60)], cfg.ingest)

    r1 = loop.run_round(tables, cfg)
    assert r1.new_prompts == 60 and r1.reused_candidates == 0 and r1.new_candidates == r1.n_train * 2
    if not r1.promoted:
        pytest.skip(f"round 1 was not promoted ({r1.gate_reason}); the rest needs a champion")
    # Nothing new since the promoted round: the next round does nothing and says so.
    assert loop.run_round(tables, cfg) is None

    ingest(spark, tables, [_slice(tmp_path, "b.jsonl", 60, 66)], cfg.ingest)  # 10% more prompts
    r2 = loop.run_round(tables, cfg)
    assert r2.new_prompts == 6 and r2.previous_version == r1.prompts_version
    assert r2.first_version == r1.prompts_version
    assert r2.base_model == cfg.model.path  # start_from=base
    assert r2.baseline_model.startswith("models:/") and r2.baseline_model.endswith("@champion")
    # Same base policy, sampling and seed: every earlier training candidate is copied, only new prompts sampled.
    assert r2.reused_candidates == r1.new_candidates
    assert r2.new_candidates == (r2.n_train - r1.n_train) * 2
    assert r2.new_candidates <= 0.12 * r1.new_candidates
    n_components = len(cfg.score.rewards) + 1
    assert r2.metrics["scores_reused"] == r1.new_candidates * n_components
    c2 = tables.read("candidates").where((F.col("round_id") == r2.round_id) & (F.col("purpose") == "train")
                                         & (F.col("finish_reason") != "mend"))
    assert c2.count() == r2.n_train * 2 == c2.select("prompt_id", "candidate_idx").distinct().count()
    # The champion's greedy answers were generated in round 1 as the challenger's: reused, not regenerated.
    champ = tables.read("candidates").where((F.col("round_id") == r2.round_id) & (F.col("purpose") == "eval_champion"))
    assert champ.where(F.col("reused_from") == f"{r1.round_id}/eval_challenger").count() > 0
    # So were its samples for the consistency check (same policy, sampling and seeds).
    samples = tables.read("candidates").where((F.col("round_id") == r2.round_id)
                                              & (F.col("purpose") == "eval_champion_samples"))
    assert samples.where(F.col("reused_from") == f"{r1.round_id}/eval_challenger_samples").count() > 0
    # Forgetting check on the first round's held-out sample, recorded and gated on.
    ev2 = r2.evaluation()
    assert ev2 and ev2.forgetting_prompts == 4 and ev2.forgetting is not None

    # Each stage recorded the Delta version it wrote: reading that version gives back the round's rows.
    at = r2.metrics["table_versions"]
    assert set(at) >= {"candidates", "scores", "preferences", "evaluations"}
    kept = tables.read("candidates", version=at["candidates"]).where(F.col("round_id") == r2.round_id)
    assert kept.count() == tables.read("candidates").where(F.col("round_id") == r2.round_id).count()
    assert tables.read("evaluations", version=at["evaluations"]).where(F.col("round_id") == r2.round_id).count() > 0

    hist = rounds.history(tables)
    assert list(hist.round_id) == [r1.round_id, r2.round_id]
    assert list(hist.new_prompts) == [60, 6] and hist.reused_candidates.iloc[1] == r1.new_candidates
    assert hist.challenger_consistency.iloc[1] == pytest.approx(ev2.overall.challenger_consistency)


def test_mix_latest_and_recency(spark, tmp_path, tiny_model):
    cfg = load_config(_config_file(tmp_path), _loop_overrides(tmp_path / "home", tiny_model))
    tables = Tables(spark, cfg.lakehouse)
    old = tmp_path / "old.jsonl"
    old.write_text("".join(f'{{"prompt": "old {i}", "received_at": "2020-01-01T00:00:00Z"}}\n' for i in range(200)))
    ingest(spark, tables, [old], cfg.ingest)
    v1 = tables.snapshot("prompts")
    ingest(spark, tables, [_slice(tmp_path, "new.jsonl", 0, 50)], cfg.ingest)
    v2 = tables.snapshot("prompts")
    rnd = rounds.Round("r", "started", v2, "m", "m", datetime.now(UTC), previous_version=v1, first_version=v1)

    latest = rounds.split(tables, rnd, load_config(_config_file(tmp_path), _loop_overrides(tmp_path, tiny_model)
                                                 + ["loop.mix=latest"]))[0]
    assert latest.where(F.col("prompt").startswith("old ")).count() == 0 and latest.count() > 30
    every = rounds.split(tables, rnd, cfg)[0]
    assert every.where(F.col("prompt").startswith("old ")).count() > 100
    recent = rounds.split(tables, rnd, load_config(_config_file(tmp_path), _loop_overrides(tmp_path, tiny_model)
                                                 + ["loop.mix=recency", "loop.half_life_days=365"]))[0]
    kept_old = recent.where(F.col("prompt").startswith("old ")).count()
    # ~7 years old at a one-year half-life: kept with probability ~1%; today's prompts all kept.
    assert kept_old < 15 and recent.where(~F.col("prompt").startswith("old ")).count() == latest.count()


def test_lock_is_exclusive_and_expires(tables):
    holder = locks.acquire(tables, "round", 600)
    with pytest.raises(locks.Busy, match="in progress"):
        locks.acquire(tables, "round", 600)
    locks.release(tables, "round", holder)
    again = locks.acquire(tables, "round", 600)
    locks.release(tables, "round", again)
    # A holder that died: its lease ran out, so it no longer blocks.
    past = datetime.now(UTC) - timedelta(hours=2)
    dead = pd.DataFrame([{"name": "round", "holder": "dead", "acquired_at": past,
                          "expires_at": past + timedelta(hours=1)}], columns=columns("locks"))
    tables.merge("locks", tables.spark.createDataFrame(dead, SCHEMAS["locks"]))
    locks.release(tables, "round", locks.acquire(tables, "round", 600))


def test_a_lock_whose_process_died_on_this_host_is_taken_over(tables):
    """A SIGKILLed scheduler leaves its row with hours of lease; its PID is gone, so the next one proceeds."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # an exited (and reaped) process: its PID no longer runs
    now = datetime.now(UTC)
    host = os.uname().nodename
    rows = pd.DataFrame([{"name": "round", "holder": f"{host}:{gone.pid}:deadbeef", "acquired_at": now,
                          "expires_at": now + timedelta(hours=6)}], columns=columns("locks"))
    tables.merge("locks", tables.spark.createDataFrame(rows, SCHEMAS["locks"]))
    holder = locks.acquire(tables, "round", 600)
    assert [r.holder for r in tables.read("locks").collect()] == [holder]
    # A live holder on this host (this very process) is not taken over.
    with pytest.raises(locks.Busy):
        locks.acquire(tables, "round", 600)
    locks.release(tables, "round", holder)
    # Another host's holder cannot be checked: its lease decides.
    other = pd.DataFrame([{"name": "round", "holder": "elsewhere:1:abc", "acquired_at": now,
                           "expires_at": now + timedelta(hours=6)}], columns=columns("locks"))
    tables.merge("locks", tables.spark.createDataFrame(other, SCHEMAS["locks"]))
    with pytest.raises(locks.Busy, match="elsewhere"):
        locks.acquire(tables, "round", 600)


def test_release_binds_its_values_so_quotes_cannot_change_the_statement(tables):
    now = datetime.now(UTC)
    names = ["round", "it's", 'say "hi"', "back\\slash", "x' OR '1'='1"]
    rows = pd.DataFrame([{"name": n, "holder": h, "acquired_at": now, "expires_at": now + timedelta(hours=1)}
                         for n in names for h in ("a", "b'--")], columns=columns("locks"))
    tables.merge("locks", tables.spark.createDataFrame(rows, SCHEMAS["locks"]))
    for n in names[1:]:
        locks.release(tables, n, "b'--")
    left = {(r.name, r.holder) for r in tables.read("locks").collect()}
    # Exactly the named rows went; an injected OR matched nothing else.
    assert left == {(n, "a") for n in names} | {("round", "b'--")}


@pytest.mark.integration
def test_two_loops_at_once_one_runs(spark, tmp_path, tiny_model):
    home = tmp_path / "home"
    conf = _config_file(tmp_path)
    overrides = _loop_overrides(home, tiny_model)
    cfg = load_config(conf, overrides)
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_slice(tmp_path, "a.jsonl", 0, 30)], cfg.ingest)
    cmd = [sys.executable, "-m", "tao_spark.cli", "--config", str(conf), "loop", "--once", *overrides]
    env = {**os.environ, "TAO_HOME": str(home)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in outs)
    assert codes == [0, 3], outs
    assert "a round is in progress" in next(err for rc, err in outs if rc == 3)
    assert tables.read("rounds").where(F.col("status") == "done").count() == 1
    assert tables.read("locks").count() == 0
