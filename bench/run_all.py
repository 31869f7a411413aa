"""Every benchmark of the Spark paths against the bare libraries, into bench/results/latest.json (the run) and
bench/results/history.jsonl (one line per run, kept in git).

    make bench                                   # ingest, then this: ~40 min on 2 cores
    .venv/bin/python bench/run_all.py --tiny     # smoke run on a tiny random model (~2 min)

Runs, in this order, each in a fresh process (an earlier benchmark's threads, engines and torch settings must not
slow a later one's in-process side): generation (UDF vs engine, roofline, loads per worker), scoring (UDF vs
rewards), training (TorchDistributor vs in-process TRL), memory (peak RSS per stage). Every ratio is measured in
this run; the machine and its load average at start and end go into the JSON beside them.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import memory_bench  # noqa: E402

from tao_spark.config import git_commit  # noqa: E402


def child(script: str, tiny: bool, *args: str) -> dict[str, Any]:
    """Run ``bench/<script>`` in a fresh interpreter (its output goes to ours) and return its JSON results."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / script), "--json", str(out), *args]
        rc = subprocess.run(cmd + (["--tiny"] if tiny and script != "scoring_bench.py" else [])).returncode
        if rc != 0:
            # The other benchmarks' figures still count: this one is recorded as failed and the run exits non-zero.
            return {"error": f"{script} {' '.join(args)} exited with {rc}"}
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SmolLM2-135M (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "latest.json"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    machine, date = common.machine(), common.now()
    common.model_path(a.tiny)  # convert the model once, before any timed child
    gen = child("generation_bench.py", a.tiny)
    # Ratios at sizes where a Spark job's or a launcher's fixed cost no longer decides them: a million candidates
    # scored, 256 pairs trained (32 steps of 8); the smoke run keeps the scripts' small defaults.
    sco = child("scoring_bench.py", a.tiny, "--rows", "2000" if a.tiny else "1000000")
    tra = child("training_bench.py", a.tiny, *([] if a.tiny else ["--pairs", "256", "--batch", "8"]))
    try:
        mem: dict[str, Any] = memory_bench.run(a.tiny)
    except RuntimeError as e:  # the ratios above are still this run's figures: record them and the failure
        mem = {"error": str(e)}
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    failed: list[str] = [r["error"] for r in (gen, sco, tra, mem) if "error" in r]
    result = {
        "generation_udf_ratio": gen.get("generation_udf_ratio"),
        "scoring_udf_ratio": sco.get("scoring_udf_ratio"),
        "training_distributor_ratio": tra.get("training_distributor_ratio"),
        "model_loads_per_worker": {"generate": gen.get("model_loads_per_worker"),
                                   "score": sco.get("model_loads_per_worker")},
        "generation_roofline_fraction": gen.get("generation_roofline_fraction"),
        "failed": failed,
        "peak_rss_mb": {k: round(v["tree_peak_mb"]) for k, v in mem.items() if k != "error"},
        "machine": machine,
        "date": date,
        "model": "tiny-random-llama" if a.tiny else "SmolLM2-135M-Instruct",
        "seconds": time.perf_counter() - t0,
        "details": {"generation": gen, "scoring": sco, "training": tra, "memory": mem},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    # One line per run, committed with the code that made it: a change's effect stays visible over time.
    summary = {k: v for k, v in result.items() if k != "details"}
    with (Path(a.out).parent / "history.jsonl").open("a") as f:
        f.write(json.dumps({**summary, "git_commit": git_commit()}, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=1, default=str))
    print(trend(Path(a.out).parent / "history.jsonl"))
    print(f"wrote {a.out} in {result['seconds']:.0f}s")
    if failed:
        sys.exit("failed: " + "; ".join(failed))


def trend(history: Path, last: int = 10) -> str:
    """The last runs of ``history.jsonl`` as a Markdown table: how each stable ratio moved, with the load."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()][-last:]
    keys = ["generation_udf_ratio", "scoring_udf_ratio", "training_distributor_ratio", "generation_roofline_fraction"]
    lines = ["| date | commit | model | load (start/end) | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        load = f"{r['machine'].get('loadavg_start', ['?'])[0]}/{r['machine'].get('loadavg_end', ['?'])[0]}"
        cells = [f"{r[k]:.3f}" if isinstance(r.get(k), (int, float)) else "-" for k in keys]
        lines.append(f"| {r['date']} | {str(r.get('git_commit', ''))[:7]} | {r['model']} | {load} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
