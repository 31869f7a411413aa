"""Ingest from a Model Serving inference table, against the bare libraries.

    .venv/bin/python bench/inference_table_bench.py            # 100k rows
    .venv/bin/python bench/inference_table_bench.py --rows 20000

Writes an inference table of N rows in the AI Gateway payload schema (the sample's mix: ~80% distinct chats,
the rest failed, oversize or non-chat requests; Change Data Feed on) and prints rows/s for:

- ``ingest_table()`` on a warm Sail session, first run: read the snapshot, turn requests into chats, validate,
  hash, MERGE into ``prompts`` and ``quarantine``, advance the watermark;
- the second run with nothing committed since (the cost of a scheduled run on a quiet day);
- a run after 1% more rows were appended (read through the Change Data Feed);
- the baseline: ``deltalake`` reading the same table plus ``json.loads`` of every request and one
  ``write_deltalake`` of the parsed rows (no validation, dedup or MERGE);

and the ratio of the first run's time to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from tao_spark.config import IngestConfig, SparkConfig
from tao_spark.data import build_inference_table as sample
from tao_spark.inference_table import ingest_table
from tao_spark.session import get_spark
from tao_spark.tables import Tables


def rows(n: int, offset: int = 0) -> list[dict]:
    """``n`` rows cycling through the sample's, each chat made distinct by its index."""
    base = sample.rows()
    out = []
    for i in range(offset, offset + n):
        r = dict(base[i % len(base)])
        r["databricks_request_id"] = f"bench-{i}"
        if r["request"] and r["status_code"] == 200 and '"messages"' in r["request"]:
            try:
                body = json.loads(r["request"])
                for m in body["messages"]:
                    if m["role"] == "user" and isinstance(m["content"], str):
                        m["content"] = f"[{i}] {m['content']}"
                r["request"] = json.dumps(body)
            except (json.JSONDecodeError, TypeError, KeyError):
                pass
        out.append(r)
    return out


def baseline(src: str, out: str) -> float:
    t0 = time.perf_counter()
    table = DeltaTable(src).to_pyarrow_table()
    parsed = []
    for req in table.column("request").to_pylist():
        try:
            parsed.append(json.dumps(json.loads(req)["messages"]) if req else None)
        except (json.JSONDecodeError, KeyError, TypeError):
            parsed.append(None)
    write_deltalake(out, pa.table({"id": table.column("databricks_request_id"), "messages": parsed}))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        src = str(Path(d) / "bench_payload")
        sample.write(Path(src), rows(a.rows))
        spark = get_spark(SparkConfig(shuffle_partitions=2))
        spark.sql("SELECT 1").collect()
        tables = Tables(spark, str(Path(d) / "lakehouse"))

        t0 = time.perf_counter()
        r = ingest_table(spark, tables, src, IngestConfig())
        first = time.perf_counter() - t0
        print(f"first run:  {first:7.2f} s  {a.rows / first:8.0f} rows/s  accepted={r.accepted} "
              f"duplicates={r.duplicates} quarantined={r.quarantined}")
        t0 = time.perf_counter()
        r2 = ingest_table(spark, tables, src, IngestConfig())
        print(f"second run (nothing new): {time.perf_counter() - t0:.3f} s, {r2.source_rows} rows read")
        more = max(1, a.rows // 100)
        sample.write(Path(src), rows(more, offset=a.rows), mode="append")
        t0 = time.perf_counter()
        r3 = ingest_table(spark, tables, src, IngestConfig())
        print(f"after appending {more} rows: {time.perf_counter() - t0:.3f} s, {r3.source_rows} rows read, "
              f"{r3.accepted} accepted")
        base = baseline(src, str(Path(d) / "baseline"))
        print(f"baseline deltalake + json.loads + write_deltalake: {base:.2f} s  {a.rows / base:8.0f} rows/s")
        print(f"ratio first run / baseline: {first / base:.1f}x")


if __name__ == "__main__":
    main()
