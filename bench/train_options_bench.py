"""Training options on the demo's pairs: the reference pass computed once vs. every step, and what a checkpoint costs.

    .venv/bin/python bench/train_options_bench.py                 # 16 pairs of the latest demo round in $TAO_HOME
    .venv/bin/python bench/train_options_bench.py --pairs 8 --tiny

Runs ``train.train_worker`` in this process (as ``bench/training_bench.py`` does) with the demo's DPO arguments
(batch 8, two epochs, ``max_length`` 384) three times on the same pairs: TRL's reference log-probabilities every
step, precomputed once per dataset (``precompute_ref_log_probs``), and precomputed with a checkpoint after every
step (``train.checkpoint_steps=1``). Pairs come from the latest round in ``$TAO_HOME`` (``make demo`` writes one),
else from the bundled prompts with synthetic answers of the demo's length.
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


def demo_pairs(n: int) -> Any:
    import pandas as pd
    from deltalake import DeltaTable

    lake = Path(os.environ.get("TAO_HOME", ".tao")) / "lakehouse"
    if DeltaTable.is_deltatable(str(lake / "preferences")):
        prefs = DeltaTable(str(lake / "preferences")).to_pandas()
        prompts = DeltaTable(str(lake / "prompts")).to_pandas()[["prompt_id", "messages"]]
        latest = prefs[prefs.round_id == prefs.round_id.max()].merge(prompts, on="prompt_id").sort_values("prompt_id")
        if len(latest) >= n:
            rows = latest.head(n)
            return pd.DataFrame({"prompt": [[dict(m) for m in ms] for ms in rows.messages],
                                 "chosen": list(rows.chosen), "rejected": list(rows.rejected)}), "demo round"
    filler = " ".join(["The answer follows the instructions exactly and stays short."] * 5)
    return pd.DataFrame([{"prompt": r["messages"], "chosen": f"Answer {i}. {filler}", "rejected": filler[::-1]}
                         for i, r in enumerate(common.prompts(n))]), "synthetic"


def one(model: str, df: Any, d: Path, name: str, precompute: bool, checkpoint_steps: int) -> dict[str, Any]:
    from tao_spark.config import TrainConfig
    from tao_spark.train import _records, train_worker, worker_spec

    cfg = TrainConfig(method="dpo", merge=False, checkpoint_steps=checkpoint_steps,
                      trl={"per_device_train_batch_size": 8, "num_train_epochs": 2, "learning_rate": 3e-4,
                           "precompute_ref_log_probs": precompute})
    out = d / name
    spec = worker_spec(_records(df, "dpo"), model, str(out), cfg, 0)
    t0 = time.perf_counter()
    train_worker(spec)
    seconds = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    ckpts = sorted((out / "trainer").glob("checkpoint-*"))
    size = sum(f.stat().st_size for c in ckpts[-1:] for f in c.rglob("*") if f.is_file())
    res = {"seconds": seconds, "trl_runtime_s": m["metrics"]["runtime_s"], "steps": m["metrics"]["steps"],
           "loss": m["loss_history"], "checkpoint_mb": size / 1e6}
    ckpt = f", checkpoint {size / 1e6:.1f} MB" if ckpts else ""
    print(f"{name:<28} {seconds:7.1f} s (TRL loop {res['trl_runtime_s']:.1f} s), {int(res['steps'])} steps, "
          f"loss {res['loss'][0]:.4f} -> {res['loss'][-1]:.4f}{ckpt}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    model = common.model_path(a.tiny)
    df, origin = demo_pairs(a.pairs)
    print(f"{len(df)} pairs ({origin}), batch 8, 2 epochs")
    import torch  # noqa: F401  (a warm interpreter for every variant)
    import trl  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        every = one(model, df, d, "reference every step", False, 0)
        once = one(model, df, d, "reference precomputed", True, 0)
        ckpt = one(model, df, d, "precomputed + checkpoints", True, 1)
    out = {"pairs": len(df), "origin": origin, "every_step": every, "precomputed": once, "checkpointed": ckpt,
           "s_per_pair_every_step": every["seconds"] / len(df), "s_per_pair_precomputed": once["seconds"] / len(df),
           "checkpoint_s": (ckpt["seconds"] - once["seconds"]) / max(1, ckpt["steps"]),
           "checkpoint_mb": ckpt["checkpoint_mb"]}
    print(f"s per pair: every step {out['s_per_pair_every_step']:.2f}, precomputed {out['s_per_pair_precomputed']:.2f}"
          f" ({every['seconds'] / once['seconds']:.2f}x); a checkpoint {out['checkpoint_s']:.2f} s, "
          f"{out['checkpoint_mb']:.1f} MB")
    common.dump(out, a.json)


if __name__ == "__main__":
    main()
