"""Peak memory (RSS) of each stage, each run alone in a fresh process on the embedded Sail session.

    .venv/bin/python bench/memory_bench.py                      # generate, score, train with SmolLM2-135M
    .venv/bin/python bench/memory_bench.py --stage train        # one stage, in this process

Per stage, a child process runs a small instance of the stage's Spark path (generate: the mapInPandas fan-out,
2 partitions; score: 20k candidates through the scoring UDF; train: DPO through TorchDistributor, 2 steps).
Reported: the peak of the summed RSS of the child and all its descendants (torchrun and its worker for train),
and the peak of the largest single process, sampled every 50 ms with psutil. (``ru_maxrss`` from ``wait4`` is no
use here: a child forked from this large process inherits its high-water mark across exec.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

STAGES = ("generate", "score", "train")


def stage(name: str, tiny: bool) -> None:
    from tao_spark.config import SparkConfig
    from tao_spark.session import get_spark

    spark = get_spark(SparkConfig(shuffle_partitions=2))
    if name == "generate":
        import pandas as pd
        from generation_bench import _udf

        from tao_spark.config import GenerateConfig

        pdf = pd.DataFrame([{"prompt_id": r["prompt_id"], "task": r["task"], "messages_json": json.dumps(r["messages"])}
                            for r in common.prompts(8)])
        _udf(spark, pdf, common.model_path(tiny), GenerateConfig(n=4, max_new_tokens=32, partitions=2))
    elif name == "score":
        from scoring_bench import candidates

        from tao_spark.score import scored

        scored(spark.createDataFrame(candidates(20_000)).repartition(2), common.reward_specs()).toPandas()
    else:
        from training_bench import config, pairs

        from tao_spark.train import train_on_pairs

        with tempfile.TemporaryDirectory() as d:
            train_on_pairs(pairs(4), common.model_path(tiny), d, config(2))


def _tree_rss(proc: Any) -> tuple[int, int]:
    """Summed and largest RSS of ``proc`` and its descendants, in bytes."""
    import psutil

    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def measure(name: str, tiny: bool) -> dict[str, float]:
    import psutil

    cmd = [sys.executable, os.path.abspath(__file__), "--stage", name] + (["--tiny"] if tiny else [])
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc, peak, largest, t0 = psutil.Process(child.pid), 0, 0, time.perf_counter()
    while child.poll() is None:
        try:
            tree, one = _tree_rss(proc)
            peak, largest = max(peak, tree), max(largest, one)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if child.returncode:
        raise RuntimeError(f"stage {name} failed (exit {child.returncode}): {' '.join(cmd)}")
    return {"tree_peak_mb": peak / 2**20, "largest_process_mb": largest / 2**20, "seconds": time.perf_counter() - t0}


def run(tiny: bool = False) -> dict[str, Any]:
    common.model_path(tiny)  # convert once here, not inside a measured child
    out = {name: measure(name, tiny) for name in STAGES}
    for name, m in out.items():
        print(f"memory: {name:8s} peak RSS {m['tree_peak_mb']:7.0f} MB (process tree), largest process "
              f"{m['largest_process_mb']:7.0f} MB, {m['seconds']:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=STAGES, help="run this stage in this process (what each child does)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    a = ap.parse_args()
    if a.stage:
        stage(a.stage, a.tiny)
    else:
        run(a.tiny)


if __name__ == "__main__":
    main()
