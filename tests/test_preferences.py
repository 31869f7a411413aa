"""Preference pairs in Delta: validation, quarantine, dedup and the bundled synthetic set."""

from __future__ import annotations

import json

from tao_spark.config import IngestConfig
from tao_spark.data.build_preferences import build_preferences, write_preferences
from tao_spark.data.build_samples import build_samples
from tao_spark.ingest import ingest_preferences, pair_id
from tao_spark.rewards.verifiers import instruction_following, numeric_answer

CFG = IngestConfig()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_ingest_preferences_quarantines_dedups_and_reconciles(spark, tables, tmp_path):
    good = {"prompt": "Explain tides.", "chosen": "The moon pulls the sea.", "rejected": "Tides tides tides.",
            "task": "support", "id": "c1"}
    rows = [
        good,
        {**good, "chosen": " The moon pulls the sea. "},  # the same pair after stripping: a duplicate
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Explain tides."}],
         "chosen": "Moon.", "rejected": "I do not know.", "source": "labelers"},
        {"prompt": "Explain tides.", "chosen": "Same answer", "rejected": "Same answer\u0020"},
        {"prompt": "Explain tides.", "chosen": "", "rejected": "x"},
        {"prompt": "Explain tides.", "chosen": "x"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "Explain tides.", "chosen": 3, "rejected": "b"},
        "{not json",
    ]
    r = ingest_preferences(spark, tables, [_write(tmp_path / "p.jsonl", rows)], CFG)
    assert (r.offered, r.accepted, r.duplicates, r.quarantined) == (9, 2, 1, 6)
    assert r.offered == r.accepted + r.duplicates + r.quarantined
    reasons = {q.reason for q in tables.read("quarantine").collect()}
    assert {"identical chosen and rejected", "empty text in chosen", "missing field: rejected",
            "missing field: prompt or messages", "chosen must be a string"} <= reasons
    assert {q.target for q in tables.read("quarantine").collect()} == {"preference_pairs"}
    stored = {p.source: p for p in tables.read("preference_pairs").collect()}
    assert set(stored) == {"file", "labelers"}
    assert stored["file"].pair_id == pair_id("support", [{"role": "user", "content": "Explain tides."}],
                                             "The moon pulls the sea.", "Tides tides tides.")
    assert stored["labelers"].task == "default" and stored["labelers"].prompt == "Explain tides."
    again = ingest_preferences(spark, tables, [tmp_path / "p.jsonl"], CFG)
    assert (again.accepted, again.duplicates, again.version) == (0, 3, r.version)


def test_ingest_preferences_reads_parquet(spark, tables, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Hi?", "chosen": "Hello!", "rejected": "...", "task": "chat"},
                                         {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Hello!"}]),
                   tmp_path / "p.parquet")
    r = ingest_preferences(spark, tables, [tmp_path / "p.parquet"], CFG)
    assert (r.offered, r.accepted, r.quarantined) == (2, 1, 1)


def test_bundled_preferences_are_deterministic_checked_and_off_the_demo_log(tmp_path):
    assert write_preferences(tmp_path).read_bytes() == (
        __import__("tao_spark.data.build_preferences", fromlist=["HERE"]).HERE / "preferences.jsonl").read_bytes()
    pairs = build_preferences()
    demo = {s.text() for s in build_samples()}
    assert len(pairs) >= 300 and {p["task"] for p in pairs} == {"instruct", "arithmetic", "support"}
    for p in pairs:
        text = p["prompt"] if "prompt" in p else "\n\n".join(m["content"] for m in p["messages"])
        assert text not in demo
        if p["task"] == "instruct":
            assert instruction_following([text, text], [p["chosen"], p["rejected"]], strict=True) == [1.0, 0.0]
        if p["task"] == "arithmetic":
            assert numeric_answer([text, text], [p["chosen"], p["rejected"]]) == [1.0, 0.0]
    # Length does not give the preferred side away.
    longer = sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in pairs) / len(pairs)
    assert 0.2 < longer < 0.8
