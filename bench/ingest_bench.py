"""Ingest throughput, against the bare libraries.

    .venv/bin/python bench/ingest_bench.py            # 100k rows
    .venv/bin/python bench/ingest_bench.py --rows 20000
    .venv/bin/python bench/ingest_bench.py --memory 100000 1000000   # peak RSS of `tao ingest` per file size

Writes N JSONL prompts (a mix of plain prompts and chats, 5 tasks, 1% duplicates, 0.1% bad lines) to a
temp dir and prints rows/s for:

- ``tao ingest`` as a subprocess: wall time including Python start-up and the embedded Sail start;
- ``ingest()`` in this process on a warm Sail session: read, validate, hash, MERGE into ``prompts``,
  write ``quarantine``;
- the baseline: plain ``json.loads`` over the same lines plus one ``deltalake.write_deltalake`` of the
  parsed rows (no validation, no dedup, no MERGE);

and the ratio of ``ingest()`` time to baseline time. ``--memory`` instead runs ``tao ingest`` on files of each size
and prints the peak resident memory of that process (Sail runs inside it): flat when ingest streams its input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from tao_spark.config import IngestConfig, SparkConfig
from tao_spark.ingest import ingest
from tao_spark.session import get_spark
from tao_spark.tables import Tables

WORDS = "the model should answer briefly and exactly with a number or a json object when asked to".split()


def make_file(path: Path, n: int, seed: int = 0) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if i % 1000 == 999:
                f.write('{"prompt": "broken\n')
                continue
            j = i - 1 if i % 100 == 50 else i  # 1% duplicates of the previous line
            rnd = random.Random(seed * 1_000_003 + j)  # text depends on j only, so a repeated j is a duplicate
            text = f"#{j} " + " ".join(rnd.choice(WORDS) for _ in range(30))
            task = f"task{j % 5}"
            if j % 3 == 0:
                rec = {"task": task, "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": text}]}
            else:
                rec = {"task": task, "prompt": text, "id": f"r{j}", "app": "bench"}
            f.write(json.dumps(rec) + "\n")


def baseline(path: Path, out: str) -> float:
    t0 = time.perf_counter()
    with path.open("rb") as f:
        recs = []
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    table = pa.Table.from_pylist([{"task": r.get("task"), "prompt": r.get("prompt"), "messages": r.get("messages"),
                                   "id": r.get("id")} for r in recs])
    write_deltalake(out, table)
    return time.perf_counter() - t0


_PEAK = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.stdout.strip())
"""


def peak_memory(sizes: list[int]) -> None:
    """Peak RSS of a ``tao ingest`` process per file size, each measured from its own parent."""
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "prompts.jsonl"
            make_file(path, n)
            env = {**os.environ, "TAO_HOME": str(Path(d) / "home")}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "tao_spark.cli", "ingest",
                                  str(path), "--json"], capture_output=True, text=True, env=env, check=True).stdout
            rc, kb, js = out.split(" ", 2)
            assert rc == "0", out
            print(f"{n:>9} lines {path.stat().st_size / 1e6:7.1f} MB  peak RSS {int(kb) / 1024:7.0f} MB  "
                  f"{time.perf_counter() - t0:6.1f} s  {js}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--memory", type=int, nargs="+", metavar="LINES", help="peak RSS of tao ingest per file size")
    a = ap.parse_args()
    if a.memory:
        peak_memory(a.memory)
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "prompts.jsonl"
        make_file(path, a.rows)
        print(f"{a.rows} lines, {path.stat().st_size / 1e6:.1f} MB")

        env = {**os.environ, "TAO_HOME": str(Path(d) / "cli-home")}
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "tao_spark.cli", "ingest", str(path), "--json"],
                           capture_output=True, text=True, env=env, check=True)
        cli_s = time.perf_counter() - t0
        print(f"tao ingest (subprocess, incl. Sail start): {cli_s:6.2f} s  {a.rows / cli_s:9.0f} rows/s  "
              f"{p.stdout.strip()}")

        from tao_spark import session

        t0 = time.perf_counter()
        spark = get_spark(SparkConfig(shuffle_partitions=2))
        spark.sql("SELECT 1").collect()
        print(f"Sail start: session.start_seconds={session.start_seconds:.3f} s (server spawn); get_spark() to the "
              f"first answered query {time.perf_counter() - t0:.3f} s")
        tables = Tables(spark, str(Path(d) / "lakehouse"))
        t0 = time.perf_counter()
        r = ingest(spark, tables, [path], IngestConfig())
        ing_s = time.perf_counter() - t0
        print(f"ingest() (warm session):                   {ing_s:6.2f} s  {a.rows / ing_s:9.0f} rows/s  "
              f"accepted={r.accepted} duplicates={r.duplicates} quarantined={r.quarantined}")

        base_s = baseline(path, str(Path(d) / "baseline"))
        print(f"baseline json.loads + write_deltalake:     {base_s:6.2f} s  {a.rows / base_s:9.0f} rows/s")
        print(f"ratio ingest() / baseline: {ing_s / base_s:.1f}x slower; tao ingest / baseline: {cli_s / base_s:.1f}x")


if __name__ == "__main__":
    main()
