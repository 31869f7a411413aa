"""Classic JVM Spark (``spark.master: local[2]``): the UDF fan-out and TorchDistributor beyond local mode.

    make test-classic                                  # .venv/bin/pytest -m classic, ~1-2 min
    .venv/bin/pytest tests/test_classic.py -m classic -k scoring

The same workers the Sail tier runs (``generate._generate_partition``, ``score._score_partition``,
``train.train_worker``), here on a JVM session whose Python workers are separate processes, reused across
tasks. The workers get plain DataFrames here and their output is collected; whole rounds with Delta
(delta-spark) on a multi-process cluster are the cluster tier's (``tests/test_cluster.py``). ``PYSPARK_PYTHON``
points the workers at the driver's interpreter (``tao_spark.session.get_spark`` sets it).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tao_spark.config import GenerateConfig, RewardSpec, SparkConfig, TrainConfig

pytestmark = pytest.mark.classic

# The built-in rewards, as conf/local.yaml configures them.
REWARDS = [
    RewardSpec(name="instruct", fn="instruction_following", weight=1.0),
    RewardSpec(name="json", fn="json_key", weight=1.0),
    RewardSpec(name="numeric", fn="numeric_answer", weight=1.0),
    RewardSpec(name="length", fn="length_penalty", weight=0.2),
    RewardSpec(name="coherence", fn="coherence", weight=0.3),
]


@pytest.fixture(scope="module")
def classic() -> Iterator[Any]:
    """One JVM local[2] session for the module (starting the JVM is the slow part); stopped at the end."""
    if os.environ.get("SPARK_CONNECT_MODE_ENABLED"):
        pytest.skip("a Spark Connect session already lives in this process; run the tier alone: pytest -m classic")
    from pyspark import cloudpickle

    from tao_spark.session import get_spark

    # The workers cannot import this test module (tests/ is not installed): ship its helpers by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spark = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2))
    assert type(spark).__module__ == "pyspark.sql.session"  # classic, not Spark Connect
    yield spark
    spark.stop()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _prompts(n: int) -> pd.DataFrame:
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}: what is {i} + {i}? Answer with a single number."}]
        rows.append({"prompt_id": f"p{i:03d}", "task": "arithmetic", "messages_json": json.dumps(msgs)})
    return pd.DataFrame(rows)


def _with_worker_info(batches: Iterator[pd.DataFrame], *, worker: Any, counts: str) -> Iterator[pd.DataFrame]:
    """Run ``worker`` and tag each output row with this Python worker's pid and its model-load counts."""
    import importlib

    for out in worker(batches):
        module, attr = counts.rsplit(":", 1)
        loads = getattr(importlib.import_module(module), attr)
        loads = loads() if callable(loads) else dict(loads)
        yield out.assign(pid=os.getpid(), loads=json.dumps(loads))


def _loads_per_pid(rows: pd.DataFrame) -> dict[int, dict[str, int]]:
    # A worker's last row carries its final counts; counts only grow, so the max per key is the final one.
    per: dict[int, dict[str, int]] = {}
    for pid, loads in zip(rows["pid"], rows["loads"], strict=True):
        for k, v in json.loads(loads).items():
            per.setdefault(int(pid), {})[k] = max(v, per.get(int(pid), {}).get(k, 0))
    return per


def test_generation_fans_out_and_loads_once_per_worker(classic: Any, tiny_model: Path) -> None:
    from tao_spark.generate import CANDIDATE_SCHEMA, Job, Sampling, _generate_partition
    from tao_spark.tables import columns

    cfg = GenerateConfig(n=2, max_new_tokens=8, batch_size=2, torch_threads=1)
    sampling = Sampling.of(cfg, "float32")
    job = Job(str(tiny_model), "float32", cfg.engine, cfg.batch_size, cfg.vllm_args(), sampling, "train", "tiny",
              "tiny-id")
    # As generate.sample builds it: one request, each prompt tagged with its index.
    worker = functools.partial(_generate_partition, jobs=[job], threads=cfg.torch_threads, round_id="r1")
    tagged = functools.partial(_with_worker_info, worker=worker, counts="tao_spark.engines:load_counts")
    prompts = _prompts(12).assign(req=0)
    partitions = 6  # more partitions than the 2 task slots: workers must be reused across tasks
    df = classic.createDataFrame(prompts).repartition(partitions)
    rows = df.mapInPandas(tagged, CANDIDATE_SCHEMA + ", pid long, loads string").toPandas()

    assert list(rows.columns[:-2]) == columns("candidates")
    assert len(rows) == 12 * 2
    assert sorted(set(rows["prompt_id"])) == sorted(prompts["prompt_id"])
    assert rows.groupby("prompt_id")["candidate_idx"].apply(sorted).map(tuple).tolist() == [(0, 1)] * 12
    assert (rows["tokens"] >= 1).all() and set(rows["finish_reason"]) <= {"stop", "length"}
    assert (rows["round_id"] == "r1").all() and (rows["sampling"] == sampling.to_json()).all()

    per_pid = _loads_per_pid(rows)
    assert os.getpid() not in per_pid  # the work ran in Python worker processes, not in the driver
    assert 1 <= len(per_pid) <= 2  # local[2]: at most two workers, reused across the six tasks
    key = f"transformers:{tiny_model}:float32"
    assert all(loads == {key: 1} for loads in per_pid.values()), per_pid

    # A second job reuses the warm workers: still one load each.
    again = df.mapInPandas(tagged, CANDIDATE_SCHEMA + ", pid long, loads string").toPandas()
    assert all(v == 1 for loads in _loads_per_pid(again).values() for v in loads.values())
    # Per-prompt seeds: the same prompt gives the same samples whichever worker and batch it lands in.
    key_cols = ["prompt_id", "candidate_idx", "completion", "tokens"]
    assert (rows[key_cols].sort_values(key_cols[:2]).reset_index(drop=True)
            .equals(again[key_cols].sort_values(key_cols[:2]).reset_index(drop=True)))


def test_scoring_matches_in_process_and_loads_once_per_worker(classic: Any) -> None:
    from tao_spark.score import COMBINED, _score_partition, score_frame, scored, wide_schema
    from tao_spark.tables import columns

    answers = ["8", "The answer is 8.", '{"answer": 8}', "I do not know, sorry sorry sorry sorry.", ""]
    cands = pd.DataFrame([
        {"round_id": "r1", "purpose": "train", "prompt_id": f"p{i:03d}", "candidate_idx": j,
         "completion": answers[(i + j) % len(answers)],
         "messages_json": json.dumps([{"role": "user", "content": f"What is {i} + 4? Answer with a single number."}])}
        for i in range(20) for j in range(2)
    ])
    df = classic.createDataFrame(cands).repartition(4)
    worker = functools.partial(_score_partition, specs=REWARDS)
    tagged = functools.partial(_with_worker_info, worker=worker, counts="tao_spark.score:load_counts")
    wide = df.mapInPandas(tagged, wide_schema(REWARDS) + ", pid long, loads string").toPandas()
    long = scored(df, REWARDS).toPandas()  # what the score stage MERGEs: Spark unpivots the worker's rows

    assert list(long.columns) == columns("scores")
    names = [s.name for s in REWARDS] + [COMBINED]  # these rewards record no failures: no *_failed rows
    assert len(long) == len(cands) * len(names) and set(long["reward_name"]) == set(names)
    expected = score_frame(cands, REWARDS)  # the same frame scored in this process
    got = long.pivot_table(index=["prompt_id", "candidate_idx"], columns="reward_name", values="value",
                           dropna=False, aggfunc="first")
    keys = cands[["prompt_id", "candidate_idx"]].itertuples(index=False)
    for (pid, idx), want in zip(keys, expected.itertuples(), strict=True):
        for name in names:
            w, g = getattr(want, name), got.loc[(pid, idx), name]
            assert (pd.isna(w) and pd.isna(g)) or abs(w - g) < 1e-12, (pid, idx, name, w, g)

    assert len(wide) == len(cands)
    per_pid = _loads_per_pid(wide)
    assert os.getpid() not in per_pid and 1 <= len(per_pid) <= 2
    for loads in per_pid.values():
        assert len(loads) == len(REWARDS) and set(loads.values()) == {1}, per_pid


def test_torch_distributor_runs_dpo_as_barrier_tasks(classic: Any, tiny_model: Path, tmp_path: Path) -> None:
    from pyspark.ml.torch.distributor import TorchDistributor

    from tao_spark.train import distributor_for, train_on_pairs

    cfg = TrainConfig(method="dpo", local_mode=False, num_processes=2, lora_r=4, lora_alpha=8, merge=False,
                      trl={"per_device_train_batch_size": 2, "num_train_epochs": 1, "learning_rate": 1e-3,
                           "max_length": 64})
    d = distributor_for(cfg, None)
    assert type(d) is TorchDistributor and not d.local_mode and not d.is_remote and d.num_tasks == 2

    pairs = pd.DataFrame([{"prompt": [{"role": "user", "content": f"Tell me about item {i}."}],
                           "chosen": f"Item {i} is fine and useful.", "rejected": f"no {i} bad bad"}
                          for i in range(8)])
    sc = classic.sparkContext
    sc.setJobGroup("tao-classic-train", "DPO through TorchDistributor(local_mode=False)")
    try:
        result = train_on_pairs(pairs, str(tiny_model), str(tmp_path / "out"), cfg, spark=classic)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    # Training ran as a Spark job (two barrier tasks, one torchrun node each), not as torchrun on the driver.
    jobs = sc.statusTracker().getJobIdsForGroup("tao-classic-train")
    assert len(jobs) >= 1
    # 8 pairs, 2 ranks x 2 pairs per step: 2 optimizer steps.
    assert result.metrics["steps"] == 2 and len(result.loss_history) == 2
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").exists()
    assert all(loss == loss for loss in result.loss_history)  # no NaN
