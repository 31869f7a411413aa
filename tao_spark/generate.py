"""Generate: sample N candidate answers per prompt with the current policy, fanned out over Spark.

    tao generate --round ROUND_ID

The engine is loaded once per Python worker (``tao_spark.engines.get_generator``) and each partition's
prompts go to it in batches. Prompts are processed in chunks, one Delta MERGE each, so a crashed run
keeps what it finished and a re-run generates only the prompts still missing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from tao_spark.config import GenerateConfig, ModelConfig
from tao_spark.tables import SCHEMAS, Tables, columns

CANDIDATE_SCHEMA = SCHEMAS["candidates"]


@dataclass(frozen=True)
class Sampling:
    """What, besides the policy, decides a candidate: part of every row, so rows can be reused exactly."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    @classmethod
    def of(cls, cfg: GenerateConfig) -> Sampling:
        return cls(cfg.n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Per-prompt seed: a prompt's samples do not depend on which partition or batch it lands in."""
    return int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:12], 16)


def torch_threads(cfg: GenerateConfig) -> int:
    # Threads x concurrent partitions must not exceed the cores: oversubscribed CPU runs were 5-10x slower.
    return cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.partitions)


def _generate_partition(
    batches: Iterator[pd.DataFrame], *, model_path: str, dtype: str, engine: str, batch_size: int,
    threads: int, sampling: Sampling, round_id: str, purpose: str, policy: str, policy_id: str,
) -> Iterator[pd.DataFrame]:
    """mapInPandas worker: prompts in, one row per candidate out."""
    from tao_spark.engines import get_generator, set_torch_threads

    set_torch_threads(threads)
    gen = get_generator(engine, model_path, dtype=dtype, batch_size=batch_size)
    sampling_json = sampling.to_json()
    for pdf in batches:
        for start in range(0, len(pdf), batch_size):
            part = pdf.iloc[start:start + batch_size]
            chats = [json.loads(m) for m in part["messages_json"]]
            seeds = [prompt_seed(sampling.seed, pid) for pid in part["prompt_id"]]
            outs = gen.generate(chats, n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_new_tokens=sampling.max_new_tokens, seeds=seeds)
            now = datetime.now(timezone.utc)
            rows = [
                {"round_id": round_id, "purpose": purpose, "prompt_id": pid, "candidate_idx": i, "task": task,
                 "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason, "policy": policy,
                 "policy_id": policy_id, "sampling": sampling_json, "seed": seed, "created_at": now}
                for pid, task, seed, cands in zip(part["prompt_id"], part["task"], seeds, outs)
                for i, c in enumerate(cands)
            ]
            yield pd.DataFrame(rows, columns=columns("candidates"))


@dataclass
class GenerateResult:
    prompts: int
    generated_prompts: int
    candidates: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def run(
    tables: Tables, prompts: DataFrame, *, round_id: str, purpose: str, model: ModelConfig, model_path: str,
    policy_id: str, cfg: GenerateConfig, chunk_prompts: int | None = None,
) -> GenerateResult:
    """Generate ``cfg.n`` candidates for every prompt of ``prompts`` that this round does not have yet.

    ``prompts`` has at least prompt_id, task and messages. Returns counts for this call (0 when all done).
    """
    sampling = Sampling.of(cfg)
    spark = tables.spark
    tables.ensure("candidates")
    done = (
        tables.read("candidates")
        .where((F.col("round_id") == round_id) & (F.col("purpose") == purpose))
        .groupBy("prompt_id").count().where(F.col("count") >= sampling.n).select("prompt_id")
    )
    todo = prompts.select("prompt_id", "task", F.to_json("messages").alias("messages_json")).join(
        done, "prompt_id", "left_anti")
    ids = sorted(r.prompt_id for r in todo.select("prompt_id").collect())
    total = prompts.count()
    if not ids:
        print(f"tao: generate[{purpose}]: all {total} prompts already have candidates", file=sys.stderr)
        return GenerateResult(total, 0, 0, 0, 0.0)
    worker = functools.partial(
        _generate_partition, model_path=model_path, dtype=model.dtype, engine=cfg.engine,
        batch_size=cfg.batch_size, threads=torch_threads(cfg), sampling=sampling, round_id=round_id,
        purpose=purpose, policy=model.path, policy_id=policy_id,
    )
    # A chunk is one Spark job and one commit: small enough to lose little on a crash, large enough
    # that every partition gets whole batches.
    chunk = chunk_prompts or cfg.partitions * cfg.batch_size * 4
    t0 = time.perf_counter()
    tokens = cands = 0
    for start in range(0, len(ids), chunk):
        part_ids = ids[start:start + chunk]
        src = todo.where(F.col("prompt_id").isin(part_ids)).repartition(min(cfg.partitions, len(part_ids)))
        # Materialise the chunk once, then MERGE from those rows: a MERGE whose source is the UDF may
        # evaluate its source twice (delta-spark does), which would sample twice. A chunk is small.
        rows = src.mapInPandas(worker, CANDIDATE_SCHEMA).toPandas()
        tables.merge("candidates", spark.createDataFrame(rows, CANDIDATE_SCHEMA))
        tokens += int(rows["tokens"].sum())
        cands += len(rows)
        el = time.perf_counter() - t0
        print(f"tao: generate[{purpose}]: {min(start + chunk, len(ids))}/{len(ids)} prompts, {cands} candidates, "
              f"{tokens / el:.0f} tokens/s", file=sys.stderr)
    return GenerateResult(total, len(ids), cands, tokens, time.perf_counter() - t0)
