"""Generation: the Spark UDF fan-out against the same engine called directly, and against the machine's limit.

    .venv/bin/python bench/generation_bench.py                  # 16 prompts x 4 samples x 48 tokens, SmolLM2-135M
    .venv/bin/python bench/generation_bench.py --prompts 8 --tiny

Same prompts (the first N of tao_spark/data/prompts.jsonl), same sampling, same batches, same thread layout, on
the embedded Sail session. UDF: ``mapInPandas`` with ``generate._generate_partition`` (what ``generate.sample`` runs
before its MERGE) with ``generate.partitions=2``, so cores // 2 torch threads per partition; Sail runs the two
partitions as two threads of this process, sharing one engine. Direct: one ``TransformersGenerator`` shared by two
Python threads, each generating every other prompt in batches of ``batch_size`` on the same torch thread count:
the same compute with Spark taken out. The UDF's engine is loaded by a warm-up job first, as a long run amortises
it; direct runs before and after the UDF and counts both, so drifting machine load falls on both sides.
The roofline is tokens/s over (fp32 matmul FLOP/s measured here, the better of one pool of all cores and one
pool per partition) / (2 x parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def matmul_flops(threads: int, seconds: float = 2.0, size: int = 1024, dtype: str = "float32") -> float:
    """FLOP/s of back-to-back ``size``-square matmuls in ``dtype`` on ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def _udf(spark: Any, pdf: Any, model: str, cfg: Any, dtype: str = "float32") -> tuple[float, int, int]:
    """The fan-out as ``generate.sample`` builds it for ``cfg`` (a GenerateConfig), collected instead of MERGEd."""
    from tao_spark.generate import CANDIDATE_SCHEMA, Job, Sampling, _generate_partition, torch_threads

    job = Job(model, dtype, cfg.engine, cfg.batch_size, cfg.vllm_args(), Sampling.of(cfg, dtype), "train", "bench",
              "bench")
    worker = functools.partial(_generate_partition, jobs=[job], threads=torch_threads(cfg), round_id="bench")
    df = spark.createDataFrame(pdf.assign(req=0)).repartition(cfg.partitions)
    t0 = time.perf_counter()
    rows = df.mapInPandas(worker, CANDIDATE_SCHEMA).toPandas()
    return time.perf_counter() - t0, int(rows["tokens"].sum()), len(rows)


def _probe(batches: Any) -> Any:
    """Each Python worker that answers: its pid and its engine load counts."""
    import pandas as pd

    from tao_spark.engines import load_counts

    for _ in batches:
        yield pd.DataFrame({"pid": [os.getpid()], "loads": [json.dumps(load_counts())]})


def _lanes(fn: Any, lanes: int) -> list[Any]:
    """Run ``fn(lane)`` on ``lanes`` Python threads at once, as Sail runs a job's partitions; return the results."""
    out: list[Any] = [None] * lanes

    def go(i: int) -> None:
        out[i] = fn(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run(model: str, n_prompts: int = 16, n: int = 4, max_new_tokens: int = 48, batch_size: int = 8,
        partitions: int = 2, dtype: str = "float32") -> dict[str, Any]:
    import pandas as pd
    import torch

    from tao_spark.config import GenerateConfig, SparkConfig
    from tao_spark.engines import TransformersGenerator, set_torch_threads
    from tao_spark.generate import prompt_seed, torch_threads
    from tao_spark.session import get_spark

    cores = os.cpu_count() or 1
    spark = get_spark(SparkConfig(shuffle_partitions=2))
    rows = common.prompts(n_prompts)
    pdf = pd.DataFrame([{"prompt_id": r["prompt_id"], "task": r["task"], "messages_json": json.dumps(r["messages"])}
                        for r in rows])
    cfg = GenerateConfig(n=n, temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens, seed=0,
                         batch_size=batch_size, partitions=partitions)
    threads = torch_threads(cfg)

    gen = TransformersGenerator(model, dtype=dtype, batch_size=batch_size)
    params = gen.model.num_parameters()
    gen.generate([rows[0]["messages"]], n=n, temperature=0.8, top_p=0.95, max_new_tokens=4, seeds=[1])  # warm-up

    def lane(i: int) -> int:
        """One partition's share of the prompts, in the worker's batches, on the worker's thread count."""
        set_torch_threads(threads)
        mine, tokens = rows[i::partitions], 0
        for s in range(0, len(mine), batch_size):
            part = mine[s:s + batch_size]
            outs = gen.generate([r["messages"] for r in part], n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_new_tokens=max_new_tokens, seeds=[prompt_seed(0, r["prompt_id"]) for r in part])
            tokens += sum(c.tokens for cands in outs for c in cands)
        return tokens

    def direct() -> tuple[float, int]:
        t0 = time.perf_counter()
        tokens = sum(_lanes(lane, partitions))
        return time.perf_counter() - t0, tokens

    # Warm-up job: loads the engine once in the worker (Sail: a thread of this process) with a 2-token run.
    _udf(spark, pdf.iloc[:2], model, dataclasses.replace(cfg, n=1, max_new_tokens=2), dtype)
    # Direct runs before and after the UDF and counts twice, so a drift in machine load hits both sides alike.
    direct_a = direct()
    udf_s, udf_tokens, cands = _udf(spark, pdf, model, cfg, dtype)
    direct_b = direct()
    direct_s, direct_tokens = direct_a[0] + direct_b[0], direct_a[1] + direct_b[1]

    probe: Any = spark.range(0, 4, 1, 4).mapInPandas(_probe, "pid long, loads string").toPandas()
    per_worker = {int(p): json.loads(v) for p, v in zip(probe["pid"], probe["loads"], strict=True)}
    loads = max((c for counts in per_worker.values() for c in counts.values()), default=0)

    # The machine's fp32 matmul rate on the same cores, laid out both ways; the higher one is the limit.
    one_pool = matmul_flops(cores)
    lanes_flops = sum(_lanes(lambda i: matmul_flops(threads), partitions))
    torch.set_num_threads(cores)
    flops = max(one_pool, lanes_flops)
    limit = flops / (2 * params)  # tokens/s if every token cost 2 x parameters FLOPs at matmul speed
    direct_tps, udf_tps = direct_tokens / direct_s, udf_tokens / udf_s
    out = {
        "dtype": dtype, "prompts": n_prompts, "n": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "partitions": partitions, "threads_per_partition": threads, "candidates": cands, "parameters": params,
        "direct": {"seconds": direct_s, "tokens": direct_tokens, "tokens_per_s": direct_tps,
                   "runs_tokens_per_s": [direct_a[1] / direct_a[0], direct_b[1] / direct_b[0]]},
        "udf": {"seconds": udf_s, "tokens": udf_tokens, "tokens_per_s": udf_tps},
        "generation_udf_ratio": udf_tps / direct_tps,
        "engine_loads_per_worker": per_worker,
        "model_loads_per_worker": loads,
        "matmul_gflops": {"one_pool": one_pool / 1e9, "per_partition_lanes": lanes_flops / 1e9},
        "roofline_tokens_per_s": limit,
        "generation_roofline_fraction": udf_tps / limit,
        "generation_roofline_fraction_direct": direct_tps / limit,
    }
    if dtype != "float32":  # the fp32 limit is the goal's yardstick; the model's own dtype has its own
        same = max(matmul_flops(cores, dtype=dtype), sum(_lanes(lambda i: matmul_flops(threads, dtype=dtype),
                                                                 partitions)))
        torch.set_num_threads(cores)
        out[f"roofline_tokens_per_s_{dtype}"] = same / (2 * params)
        out[f"generation_roofline_fraction_{dtype}"] = udf_tps * 2 * params / same
        print(f"generation: {dtype} matmul {same / 1e9:.1f} GFLOP/s -> limit {same / (2 * params):.0f} tok/s; "
              f"fraction UDF {out[f'generation_roofline_fraction_{dtype}']:.3f}")
    print(f"generation: {partitions} partitions x {threads} torch threads; direct {direct_tps:.1f} tok/s (2 runs: "
          f"{out['direct']['runs_tokens_per_s'][0]:.1f}, {out['direct']['runs_tokens_per_s'][1]:.1f}); UDF "
          f"{udf_tps:.1f} tok/s ({udf_tokens} tokens, {udf_s:.1f}s) -> ratio {out['generation_udf_ratio']:.3f}")
    print(f"generation: matmul {one_pool / 1e9:.1f} GFLOP/s ({cores} threads), {lanes_flops / 1e9:.1f} GFLOP/s "
          f"({partitions} lanes x {threads}); {params / 1e6:.1f}M params -> limit {limit:.0f} tok/s; roofline "
          f"fraction UDF {out['generation_roofline_fraction']:.3f}, direct "
          f"{out['generation_roofline_fraction_direct']:.3f}; loads per worker {per_worker}")
    return out


def main() -> None:
    from tao_spark.config import GenerateConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--partitions", type=int, default=2, help="generate.partitions (cores // this torch threads each)")
    ap.add_argument("--batch-size", type=int, help="generate.batch_size: sequences decoded together (default: the "
                    "config's)")
    ap.add_argument("--dtype", default="float32", help="model.dtype (the limit stays fp32 matmuls; a bf16 or fp16 "
                    "run also reports its own dtype's)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2 (smoke run)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    common.dump(run(common.model_path(a.tiny), a.prompts, a.n, a.max_new_tokens,
                     batch_size=a.batch_size or GenerateConfig().batch_size, partitions=a.partitions,
                     dtype=a.dtype), a.json)


if __name__ == "__main__":
    main()
