"""Scoring: the score stage's Spark job (``score.scored``) against the reward functions called directly.

    .venv/bin/python bench/scoring_bench.py                     # 20k candidates, the 5 built-in rewards
    .venv/bin/python bench/scoring_bench.py --rows 2000

Candidates: the bundled prompts, each with answers of the shapes the rewards look at (a bare number, a JSON
object, prose with and without the asked-for words). Direct: every reward on all (prompt, completion) lists,
prompt text prepared beforehand. UDF: ``score.scored`` (``mapInPandas(_score_partition)``, one wide row per
candidate, unpivoted by Spark into ``scores``' rows) over ``score.partitions`` partitions (the embedded default's)
on the Sail session, forced with ``count()`` (``score.score_candidates`` MERGEs the same rows into Delta). An
identity ``mapInPandas`` over the same rows gives Spark's own share.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ANSWERS = [
    "42",
    "The answer is 17.",
    '{"reason": "It is warm, and the sunlight is soft.", "answer": 3}',
    "Great question! Start with three short sessions a week, and add weight slowly. Sunlight and sleep help too.",
    "I am not sure. I am not sure. I am not sure. I am not sure.",
    "To restore an older version, open the file, choose Version history, pick the version and press Restore.",
    "",
]


def candidates(rows: int) -> Any:
    import pandas as pd

    prompts = common.prompts(360)
    return pd.DataFrame([
        {"round_id": "bench", "purpose": "train", "prompt_id": prompts[i % 360]["prompt_id"], "candidate_idx": i // 360,
         "completion": ANSWERS[(i * 7 + i // 360) % len(ANSWERS)] + ("" if i % 3 else f" ({i})"),
         "messages_json": json.dumps(prompts[i % 360]["messages"])}
        for i in range(rows)])


def _identity(batches: Any) -> Any:
    yield from batches


def run(rows: int = 20_000, partitions: int = 2) -> dict[str, Any]:
    from tao_spark import score
    from tao_spark.config import SparkConfig
    from tao_spark.rewards import load_reward, reward_text
    from tao_spark.score import _score_partition, scored
    from tao_spark.session import get_spark

    specs = common.reward_specs()
    pdf = candidates(rows)
    texts = [reward_text(json.loads(m)) for m in pdf["messages_json"]]
    completions = list(pdf["completion"])
    fns = [load_reward(s) for s in specs]
    t0 = time.perf_counter()
    for fn in fns:
        fn(texts, completions)
    direct_s = time.perf_counter() - t0

    spark = get_spark(SparkConfig(shuffle_partitions=2))
    # Through a Parquet file rather than createDataFrame: a million rows is one gRPC message over Connect's limit.
    tmp = tempfile.mkdtemp()
    pq.write_table(pa.Table.from_pandas(pdf, preserve_index=False), f"{tmp}/candidates.parquet")
    df = spark.read.parquet(f"{tmp}/candidates.parquet").repartition(partitions).cache()
    df.count()  # the rows live in Spark before either timed job
    t0 = time.perf_counter()
    df.mapInPandas(_identity, df.schema).count()
    identity_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_rows = scored(df, specs).count()
    udf_s = time.perf_counter() - t0
    df.unpersist()
    if out_rows != rows * (len(specs) + 1):
        raise AssertionError(f"{out_rows} score rows for {rows} candidates")

    # In-process profile of the worker on one partition's rows: where the UDF's time goes besides the rewards.
    t0 = time.perf_counter()
    frame = score.score_frame(pdf, specs)
    frame_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sum(len(f) for f in _score_partition(iter([pdf]), specs=specs))
    worker_s = time.perf_counter() - t0

    loads = dict(score.load_counts)  # Sail runs the UDF as threads of this process: these are the worker's counts
    out = {
        "candidates": rows, "rewards": len(specs), "partitions": partitions, "score_rows": out_rows,
        "direct": {"seconds": direct_s, "rows_per_s": rows / direct_s},
        "udf": {"seconds": udf_s, "rows_per_s": rows / udf_s},
        "identity_udf_seconds": identity_s,
        "in_process": {"score_frame_seconds": frame_s, "score_partition_seconds": worker_s,
                       "combined_nulls": int(frame["combined"].isna().sum())},
        "scoring_udf_ratio": direct_s / udf_s,
        "reward_loads_per_worker": loads,
        "model_loads_per_worker": max(loads.values(), default=0),
    }
    print(f"scoring: {rows} candidates x {len(specs)} rewards; direct {rows / direct_s:.0f} rows/s ({direct_s:.2f}s); "
          f"UDF {rows / udf_s:.0f} rows/s ({udf_s:.2f}s; identity UDF {identity_s:.2f}s) -> ratio "
          f"{out['scoring_udf_ratio']:.3f}; in process: score_frame {frame_s:.2f}s, _score_partition {worker_s:.2f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, help="Spark partitions of the UDF (default: score.partitions of the "
                    "embedded default's config, conf/local.yaml)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if a.partitions is None:
        from tao_spark.config import load_config

        a.partitions = load_config(common.ROOT / "conf" / "local.yaml").score.partitions
    common.dump(run(a.rows, a.partitions), a.json)


if __name__ == "__main__":
    main()
