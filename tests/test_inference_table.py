"""Prompts from a Model Serving inference table: the payload schema, every quarantine reason, incremental reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from pyspark.sql import functions as F

from tao_spark.config import IngestConfig
from tao_spark.data import SAMPLE_INFERENCE_TABLE
from tao_spark.data import build_inference_table as sample
from tao_spark.inference_table import chat_of, ingest_table, watermark
from tao_spark.ingest import Reject

# The sample's rows by what they are (tao_spark/data/build_inference_table.py).
REASONS = {"request failed": 15, "not a chat request": 13, "logged with an error": 8, "unparsable request JSON": 5,
           "no request body": 5, "text too long": 4, "malformed chat": 2, "unsupported role": 1}


def _copy(tmp: Path, cdf: bool = True) -> Path:
    if cdf:
        return Path(shutil.copytree(SAMPLE_INFERENCE_TABLE, tmp / "acme_assistant_payload"))
    out = tmp / "nocdf" / "acme_assistant_payload"
    write_deltalake(str(out), pa.Table.from_pylist(sample.rows(), schema=sample.PAYLOAD_SCHEMA))
    return out


def _more(n: int, offset: int) -> list[dict]:
    """``n`` new chat requests, later than every row of the sample."""
    last = max(r["request_time"] for r in sample.rows())
    return [{**sample.rows()[0], "databricks_request_id": f"new-{offset + i}", "status_code": 200,
             "request_time": last + timedelta(minutes=i + 1), "logging_error_codes": [],
             "request": json.dumps({"messages": [{"role": "user", "content": f"New question number {offset + i}?"}]})}
            for i in range(n)]


def test_the_shipped_table_is_what_the_builder_writes() -> None:
    shipped = DeltaTable(str(SAMPLE_INFERENCE_TABLE)).to_pyarrow_table().sort_by("databricks_request_id")
    built = pa.Table.from_pylist(sample.rows(), schema=sample.PAYLOAD_SCHEMA).sort_by("databricks_request_id")
    assert shipped.equals(built)
    assert DeltaTable(str(SAMPLE_INFERENCE_TABLE)).metadata().configuration["delta.enableChangeDataFeed"] == "true"


def test_sample_table_reconciles_with_every_reason(spark, tables, tmp_path) -> None:
    src = str(_copy(tmp_path))
    r = ingest_table(spark, tables, src, IngestConfig())
    assert r.offered == len(sample.rows()) == r.source_rows
    assert r.offered == r.accepted + r.duplicates + r.quarantined
    assert r.reasons == REASONS and r.quarantined == sum(REASONS.values())
    quarantine = tables.read("quarantine").where(F.col("target") == "prompts")
    assert quarantine.count() == r.quarantined
    assert {row.reason.split(":")[0] for row in quarantine.collect()} == set(REASONS)
    assert tables.read("prompts").count() == r.accepted and r.duplicates >= 10

    rows = {row.client_id: row for row in tables.read("prompts").collect()}
    source = {x["databricks_request_id"]: x for x in sample.rows()}
    for cid, row in rows.items():
        req = source[cid]
        assert row.received_at.astimezone(req["request_time"].tzinfo) == req["request_time"]
        assert row.task == "acme_assistant" and row.source == "inference_table"
        meta = json.loads(row.metadata)
        assert meta["endpoint"] == "acme_assistant" and meta["served_entity_id"] == sample.ENTITY
        assert meta["requester"] == req["requester"]
        body = json.loads(req["request"])["messages"]
        # The prompt ends at the request's last user turn: an assistant prefill is not part of it.
        assert row.messages[-1].role == "user"
        assert len(row.messages) == len(body) - (body[-1]["role"] == "assistant")
    parts = [x for x in source.values() if x["request"] and '"type": "text"' in x["request"]]
    assert parts and all(rows[x["databricks_request_id"]].messages[-1].content
                         == json.loads(x["request"])["messages"][-1]["content"][0]["text"].strip()
                         for x in parts if x["databricks_request_id"] in rows)
    assert watermark(tables, src) == 0


@pytest.mark.parametrize("cdf", [True, False], ids=["change-data-feed", "version-diff"])
def test_second_run_reads_nothing_and_an_append_reads_exactly_it(spark, tables, tmp_path, cdf) -> None:
    src = str(_copy(tmp_path, cdf))
    first = ingest_table(spark, tables, src, IngestConfig())
    again = ingest_table(spark, tables, src, IngestConfig())
    assert again.source_rows == again.offered == again.accepted == 0
    assert tables.read("prompts").count() == first.accepted

    sample.write(Path(src), _more(20, 0), mode="append")
    r = ingest_table(spark, tables, src, IngestConfig())
    assert r.source_rows == r.offered == r.accepted == 20 and r.quarantined == 0
    assert r.source_version == 1 and watermark(tables, src) == 1
    assert tables.read("prompts").count() == first.accepted + 20


def test_a_rerun_of_a_range_doubles_nothing(spark, tables, tmp_path) -> None:
    """A crash after the prompts were written but before the watermark: the next run reads the range again."""
    src = str(_copy(tmp_path))
    first = ingest_table(spark, tables, src, IngestConfig())
    again = ingest_table(spark, tables, src, IngestConfig(), since_version=0)
    assert again.offered == first.offered and again.accepted == 0
    assert again.duplicates == first.accepted + first.duplicates and again.quarantined == first.quarantined
    assert tables.read("prompts").count() == first.accepted
    assert tables.read("quarantine").count() == first.quarantined  # same (range, row) keys: matched, not doubled


def test_legacy_schema_is_read_and_a_foreign_table_is_refused(spark, tables, tmp_path) -> None:
    legacy = [{"databricks_request_id": f"old-{i}", "client_request_id": None, "date": None,
               "timestamp_ms": 1_764_000_000_000 + i * 1000, "status_code": 200 if i else 500,
               "execution_time_ms": 100, "request": json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"}]}),
               "response": "{}", "sampling_fraction": 1.0,
               "request_metadata": [("endpoint_name", "legacy_ep"), ("model_version", "3")]} for i in range(5)]
    schema = pa.schema([("databricks_request_id", pa.string()), ("client_request_id", pa.string()),
                        ("date", pa.date32()), ("timestamp_ms", pa.int64()), ("status_code", pa.int32()),
                        ("execution_time_ms", pa.int64()), ("request", pa.string()), ("response", pa.string()),
                        ("sampling_fraction", pa.float64()), ("request_metadata", pa.map_(pa.string(), pa.string()))])
    write_deltalake(str(tmp_path / "old_payload"), pa.Table.from_pylist(legacy, schema=schema))
    r = ingest_table(spark, tables, str(tmp_path / "old_payload"), IngestConfig())
    assert (r.accepted, r.quarantined) == (4, 1)
    meta = [json.loads(x.metadata) for x in tables.read("prompts").collect()]
    assert {m["endpoint"] for m in meta} == {"legacy_ep"} and {m["served_entity_id"] for m in meta} == {"3"}

    write_deltalake(str(tmp_path / "other"), pa.table({"prompt": ["hi"], "ts": [1]}))
    with pytest.raises(ValueError, match="not an inference table: expected the payload columns"):
        ingest_table(spark, tables, str(tmp_path / "other"), IngestConfig())


@pytest.mark.parametrize(("body", "reason"), [
    ({"prompt": "x"}, "not a chat request: completions"),
    ({"input": "x"}, "not a chat request: Responses API or embeddings"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "unsupported content"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "malformed chat: no user turn"),
    ([1, 2], "not a chat request: body is a JSON list"),
])
def test_chat_of_refuses_what_is_not_a_chat(body, reason) -> None:
    with pytest.raises(Reject, match=reason):
        chat_of(body)


def test_cli_table_and_files_are_exclusive(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "tao_spark.cli", "ingest", "x.jsonl", "--table", "t"],
                         capture_output=True, text=True, env={"TAO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == "tao ingest: give files or --table, not both"
