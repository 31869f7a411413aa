"""Training: DPO through Spark's TorchDistributor against TRL in one process, on the same pairs.

    .venv/bin/python bench/training_bench.py                    # SmolLM2-135M, 16 pairs, 8 steps
    .venv/bin/python bench/training_bench.py --tiny --pairs 32

In-process: ``train.train_worker`` called in this (warm) interpreter. Distributor: ``train.train_on_pairs``, which
launches the same worker under torchrun (``TorchDistributor(local_mode=True)``) from the embedded Sail session.
Both train the same LoRA DPO on the same pairs with the same TRL arguments, merge off. Samples/s is pairs over the
wall time of the whole call (model load, tokenisation, training, adapter save); TRL's own samples/s over the
training loop alone is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

CHOSEN = "{} Here is a short, exact answer that does what was asked."
REJECTED = "I do not know. I do not know. I do not know."


def pairs(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame([{"prompt": r["messages"], "chosen": CHOSEN.format(f"Answer {i}."), "rejected": REJECTED}
                         for i, r in enumerate(common.prompts(n))])


def config(batch: int) -> Any:
    from tao_spark.config import TrainConfig

    return TrainConfig(method="dpo", merge=False, trl={"per_device_train_batch_size": batch, "max_length": 192})


def run(model: str, n_pairs: int = 16, batch: int = 2) -> dict[str, Any]:
    from tao_spark.config import SparkConfig
    from tao_spark.session import get_spark
    from tao_spark.train import _records, train_on_pairs, train_worker, worker_spec

    cfg = config(batch)
    df = pairs(n_pairs)
    get_spark(SparkConfig(shuffle_partitions=2))
    with tempfile.TemporaryDirectory() as d:
        # In-process: the same spec train_on_pairs builds, handed straight to the worker.
        out = Path(d) / "inproc"
        spec = worker_spec(_records(df, "dpo"), model, str(out), cfg, 0)
        import torch  # noqa: F401  (warm interpreter: a notebook user has these imported already)
        import trl  # noqa: F401

        t0 = time.perf_counter()
        train_worker(spec)
        inproc_s = time.perf_counter() - t0
        inproc = json.loads((out / "metrics.json").read_text())["metrics"]

        t0 = time.perf_counter()
        result = train_on_pairs(df, model, str(Path(d) / "dist"), cfg, seed=0)
        dist_s = time.perf_counter() - t0
    dist = result.metrics
    out_d = {
        "pairs": n_pairs, "batch": batch, "steps": dist["steps"],
        "in_process": {"seconds": inproc_s, "samples_per_s": n_pairs / inproc_s, "trl_runtime_s": inproc["runtime_s"],
                       "trl_samples_per_s": inproc["samples_per_second"], "loss_last": inproc["train_loss_last"]},
        "distributor": {"seconds": dist_s, "samples_per_s": n_pairs / dist_s, "trl_runtime_s": dist["runtime_s"],
                        "trl_samples_per_s": dist["samples_per_second"], "loss_last": dist["train_loss_last"]},
        "training_distributor_ratio": inproc_s / dist_s,
        "training_distributor_ratio_trl_loop": dist["samples_per_second"] / inproc["samples_per_second"],
        "distributor_overhead_s": dist_s - dist["runtime_s"] - (inproc_s - inproc["runtime_s"]),
    }
    print(f"training: {n_pairs} pairs, {int(dist['steps'])} steps; in-process {inproc_s:.1f}s (TRL loop "
          f"{inproc['runtime_s']:.1f}s), distributor {dist_s:.1f}s (TRL loop {dist['runtime_s']:.1f}s) -> ratio "
          f"{out_d['training_distributor_ratio']:.3f} (loop only {out_d['training_distributor_ratio_trl_loop']:.3f})")
    return out_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    common.dump(run(common.model_path(a.tiny), a.pairs, a.batch), a.json)


if __name__ == "__main__":
    main()
