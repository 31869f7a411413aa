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

    .venv/bin/python bench/fixed_costs.py --modes connect --profile

``--profile`` turns on the SQL server's Spark event log (a ``spark-defaults.conf`` in ``SPARK_CONF_DIR``, so the
server is started exactly as ``tao cluster start`` starts it) and writes ``fixed_costs_profile.json``: per stage of
the Connect round, the SQL executions the server ran (count, seconds, the slowest with their descriptions) and the
seconds outside any of them (the client's own Python: model loads, torchrun, pandas).
"""

from __future__ import annotations

import argparse
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


def profile(events: Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Where each stage's seconds went on the SQL server, from its event log: ``stages`` are round_stages rows
    (stage, seconds, recorded_at as epoch seconds) in order."""
    starts: dict[int, tuple[float, str]] = {}
    execs: list[tuple[float, float, str, int]] = []
    jobs: dict[int, int] = {}
    for f in sorted(p for p in events.rglob("*") if p.is_file() and not p.name.startswith("appstatus")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            kind = e.get("Event", "")
            if kind.endswith("SQLExecutionStart"):
                what = (e.get("description") or "").strip() or (e.get("details") or "").split("\n")[0]
                starts[e["executionId"]] = (e["time"] / 1000, what[:160])
            elif kind.endswith("SQLExecutionEnd") and e["executionId"] in starts:
                t0, what = starts.pop(e["executionId"])
                execs.append((t0, e["time"] / 1000, what, e["executionId"]))
            elif kind == "SparkListenerJobStart":
                sql = (e.get("Properties") or {}).get("spark.sql.execution.id")
                if sql is not None:
                    jobs[int(sql)] = jobs.get(int(sql), 0) + 1
    out: dict[str, Any] = {}
    for st in stages:
        end = st["recorded_at"]
        begin = end - st["seconds"]
        mine = [(max(a, begin), min(b, end), w, i) for a, b, w, i in execs if b > begin and a < end]
        # Seconds covered by at least one execution (executions can overlap: a MERGE's inner queries).
        covered, last = 0.0, begin
        for a, b, _, _ in sorted(mine):
            covered += max(0.0, b - max(a, last))
            last = max(last, b)
        slow = sorted(mine, key=lambda x: x[0] - x[1])[:6]
        out[st["stage"]] = {"seconds": round(st["seconds"], 1), "sql_executions": len(mine),
                            "spark_jobs": sum(jobs.get(i, 0) for *_, i in mine), "sql_seconds": round(covered, 1),
                            "outside_sql_s": round(st["seconds"] - covered, 1),
                            "slowest": [{"s": round(b - a, 2), "jobs": jobs.get(i, 0), "what": w}
                                        for a, b, w, i in slow]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="embedded,cluster,connect", help="which of embedded, cluster, connect")
    ap.add_argument("--profile", action="store_true", help="the Connect round's SQL executions per stage")
    a = ap.parse_args()
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
    events = work / "events"
    if a.profile:
        events.mkdir()
        (work / "spark-conf").mkdir()
        (work / "spark-conf" / "spark-defaults.conf").write_text(
            f"spark.eventLog.enabled true\nspark.eventLog.dir file://{events}\nspark.eventLog.compress false\n"
            "spark.eventLog.rolling.enabled false\n")
        os.environ["SPARK_CONF_DIR"] = str(work / "spark-conf")
    _, state = tao(cluster_home, "cluster", "start", "--connect", "--json")
    os.environ.pop("SPARK_CONF_DIR", None)  # only the SQL server logs events: the other ways are timed as ever
    modes = (("embedded", []),
             # A JVM driver of its own per command (spark-submit's way): JVM start and executors every time.
             ("cluster", [f"spark.master={state['master_url']}", "train.num_processes=2",
                          "spark.shuffle_partitions=2"]),
             # Thin clients of the long-lived Connect server, tables in its catalog: the README's cluster way.
             ("connect", [f"spark.remote={state['connect_url']}", "lakehouse=tao", "train.num_processes=2",
                          "spark.shuffle_partitions=2"]))
    wanted = {m.strip() for m in a.modes.split(",")}
    try:
        for mode, extra in (m for m in modes if m[0] in wanted):
            home = work / mode
            ingest_s, counts = tao(home, "ingest", str(PROMPTS), "--json", "--config", str(conf), *extra)
            began = time.time()
            round_s, rnd = tao(home, "round", "--json", *round_args, *extra)
            ended = time.time()
            m = rnd["metrics"]
            out[mode] = {"ingest_s": round(ingest_s, 1), "ingested": counts["accepted"], "round_s": round(round_s, 1),
                         "stages_s": {s: round(m.get(f"time_{s}_s", float("nan")), 1) for s in STAGES},
                         "pairs": m.get("pairs")}
            print(f"bench/fixed_costs: {mode}: {json.dumps(out[mode])}", file=sys.stderr, flush=True)
            if mode == "connect" and a.profile:
                from pyspark.sql import SparkSession

                spark = SparkSession.builder.remote(state["connect_url"]).getOrCreate()
                rows = [r.asDict() for r in spark.sql(
                    "SELECT stage, seconds, unix_micros(recorded_at) / 1e6 AS recorded_at FROM tao.round_stages "
                    "ORDER BY recorded_at").collect()]
                spark.stop()
                # The command's seconds outside its stages: process start, the round's start, the report.
                first, last = rows[0]["recorded_at"] - rows[0]["seconds"], rows[-1]["recorded_at"]
                rows = [{"stage": "(before the stages)", "seconds": first - began, "recorded_at": first}, *rows,
                        {"stage": "(after the stages)", "seconds": ended - last, "recorded_at": ended}]
                prof = profile(events, rows)
                dump(prof, str(ROOT / "bench" / "results" / "fixed_costs_profile.json"))
                print(json.dumps(prof, indent=1), file=sys.stderr)
    finally:
        tao(cluster_home, "cluster", "stop", "--json")
    if "embedded" not in out:
        print(json.dumps(out, indent=1))
        return
    for mode in ("cluster", "connect"):
        if mode not in out:
            continue
        out[mode]["round_ratio"] = round(out[mode]["round_s"] / out["embedded"]["round_s"], 2)
        out[mode]["met"] = out[mode]["round_ratio"] <= 2.0 and out[mode]["ingest_s"] <= 10.0
    out["targets"] = {"round_ratio_max": 2.0, "ingest_s_max": 10.0}
    dump(out, str(ROOT / "bench" / "results" / "fixed_costs.json"))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
