"""Fixed costs of the cluster path against the embedded default, in one run: `tao ingest` of the bundled 360-prompt
log and the same tiny round (12 prompts x 2 samples, 24 new tokens, the tiny test model) on each, per stage.

    make fixed-costs                       # or: .venv/bin/python bench/fixed_costs.py

Each command runs as a user runs it (its own `tao` process), so a figure includes the process's start: Sail in
process for the embedded default; for the cluster, a JVM driver with delta-spark on a standalone cluster started
by `tao cluster start --connect` (master and two workers on loopback), its executors started for that application
("cluster"); and a thin client of that command's Spark Connect server, tables in its catalog ("connect"): the JVM
and its executors are up already, as they are for a user once the server runs.
Writes bench/results/fixed_costs.json with per-stage seconds (the round's own `time_<stage>_s`) and the ratios the
targets speak of: each cluster way's round / the embedded round, and its ingest in seconds. About 15 minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PROMPTS, dump, machine, now  # noqa: E402
from tao_spark.config import STAGES  # noqa: E402


def tao(home: Path, *args: str) -> tuple[float, Any]:
    """Run one `tao` command in its own process; return its wall seconds and its JSON."""
    env = {**os.environ, "TAO_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tao_spark.cli", *args], env=env, capture_output=True, text=True,
                       timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench/fixed_costs: tao {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")
    return wall, json.loads(r.stdout) if "--json" in args else None


def main() -> None:
    from tests.test_round import e_rate  # noqa: F401  (the reward below must import in every worker)
    from tests.tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="tao-fixed-costs-"))
    model = make_tiny_model(work / "tiny-model")
    conf = work / "conf.yaml"
    import yaml

    data = yaml.safe_load((ROOT / "conf" / "local.yaml").read_text())
    data["score"]["rewards"] = [*data["score"]["rewards"], {"name": "e_rate", "fn": "tests.test_round:e_rate",
                                                           "weight": 1.0}]
    conf.write_text(yaml.safe_dump(data))
    round_args = ["--config", str(conf), f"model.path={model}", "generate.n=2", "generate.max_new_tokens=24",
                  "generate.max_prompts=12", "evaluate.max_prompts=6", "evaluate.max_new_tokens=24",
                  "evaluate.bootstrap=100", "select.min_margin=0.0", "train.trl.max_steps=2",
                  "train.trl.per_device_train_batch_size=2", "gate.min_win_rate_low=0.0", "gate.max_task_drop=1.0"]
    out: dict[str, Any] = {"at": now(), "machine": machine(), "round_args": round_args[2:]}
    cluster_home = work / "cluster"
    _, state = tao(cluster_home, "cluster", "start", "--connect", "--json")
    modes = (("embedded", []),
             # A JVM driver of its own per command (spark-submit's way): JVM start and executors every time.
             ("cluster", [f"spark.master={state['master_url']}", "train.num_processes=2",
                          "spark.shuffle_partitions=2"]),
             # Thin clients of the long-lived Connect server, tables in its catalog: the README's cluster way.
             ("connect", [f"spark.remote={state['connect_url']}", "lakehouse=tao", "train.num_processes=2",
                          "spark.shuffle_partitions=2"]))
    try:
        for mode, extra in modes:
            home = work / mode
            ingest_s, counts = tao(home, "ingest", str(PROMPTS), "--json", "--config", str(conf), *extra)
            round_s, rnd = tao(home, "round", "--json", *round_args, *extra)
            m = rnd["metrics"]
            out[mode] = {"ingest_s": round(ingest_s, 1), "ingested": counts["accepted"], "round_s": round(round_s, 1),
                         "stages_s": {s: round(m.get(f"time_{s}_s", float("nan")), 1) for s in STAGES},
                         "pairs": m.get("pairs")}
            print(f"bench/fixed_costs: {mode}: {json.dumps(out[mode])}", file=sys.stderr, flush=True)
    finally:
        tao(cluster_home, "cluster", "stop", "--json")
    for mode in ("cluster", "connect"):
        out[mode]["round_ratio"] = round(out[mode]["round_s"] / out["embedded"]["round_s"], 2)
        out[mode]["met"] = out[mode]["round_ratio"] <= 2.0 and out[mode]["ingest_s"] <= 10.0
    out["targets"] = {"round_ratio_max": 2.0, "ingest_s_max": 10.0}
    dump(out, str(ROOT / "bench" / "results" / "fixed_costs.json"))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
