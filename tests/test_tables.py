"""Tables: keyed MERGE, pinned snapshots (VERSION AS OF), history, and what reading a missing table does."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pyspark.sql import DataFrame, SparkSession

from tao_spark.tables import KEYS, SCHEMAS, TableNotFound, Tables, columns

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def prompt_rows(spark: SparkSession, items: list[tuple[str, str]]) -> DataFrame:
    """``prompts`` rows from (prompt_id, text) pairs."""
    data = [{"prompt_id": pid, "task": "t", "messages": [{"role": "user", "content": text}], "prompt": text,
             "client_id": None, "source": "test", "source_file": None, "received_at": NOW, "ingested_at": NOW,
             "batch_id": "b", "metadata": "{}"} for pid, text in items]
    return spark.createDataFrame([tuple(d[c] for c in columns("prompts")) for d in data], SCHEMAS["prompts"])


def texts(df: DataFrame) -> dict[str, str]:
    return {r["prompt_id"]: r["prompt"] for r in df.collect()}


def test_columns_split_only_on_top_level_commas() -> None:
    assert columns("prompts")[:4] == ["prompt_id", "task", "messages", "prompt"]
    assert "role:string" not in " ".join(columns("prompts"))
    for name in SCHEMAS:
        assert set(KEYS[name]) <= set(columns(name)), name


def test_missing_table_raises_table_not_found(tables: Tables) -> None:
    assert not tables.exists("prompts")
    with pytest.raises(TableNotFound, match="prompts"):
        tables.read("prompts")
    with pytest.raises(TableNotFound):
        tables.snapshot("prompts")
    with pytest.raises(TableNotFound):
        tables.history("prompts")
    with pytest.raises(KeyError, match="unknown table"):
        tables.path("no_such_table")
    assert tables.register() == []


def test_ensure_creates_an_empty_table_with_the_schema_once(tables: Tables) -> None:
    tables.ensure("candidates")
    tables.ensure("candidates")
    assert tables.snapshot("candidates") == 0
    df = tables.read("candidates")
    assert df.columns == columns("candidates")
    assert df.count() == 0


def test_merge_inserts_new_keys_and_skips_or_updates_matched(spark: SparkSession, tables: Tables) -> None:
    assert tables.merge("prompts", prompt_rows(spark, [("a", "one"), ("b", "two")])) == 2
    v1 = tables.snapshot("prompts")
    assert tables.merge("prompts", prompt_rows(spark, [("b", "TWO"), ("c", "three")])) == 1
    assert texts(tables.read("prompts")) == {"a": "one", "b": "two", "c": "three"}  # matched key left alone
    tables.merge("prompts", prompt_rows(spark, [("b", "TWO"), ("d", "four")]), update=True)
    assert texts(tables.read("prompts")) == {"a": "one", "b": "TWO", "c": "three", "d": "four"}
    assert tables.snapshot("prompts") > v1
    assert not any(t.name.startswith("tao_src_") for t in spark.catalog.listTables())  # source views dropped


def test_read_version_is_the_old_snapshot_after_later_appends(spark: SparkSession, tables: Tables) -> None:
    tables.merge("prompts", prompt_rows(spark, [("a", "one")]))
    pinned = tables.snapshot("prompts")
    tables.merge("prompts", prompt_rows(spark, [("b", "two")]))
    tables.merge("prompts", prompt_rows(spark, [("c", "three")]))
    assert tables.snapshot("prompts") == pinned + 2
    assert texts(tables.read("prompts", version=pinned)) == {"a": "one"}
    assert texts(tables.read("prompts", version=pinned + 1)) == {"a": "one", "b": "two"}
    assert set(texts(tables.read("prompts"))) == {"a", "b", "c"}
    (row,) = spark.sql(f"SELECT count(*) AS n FROM {tables.ref('prompts')} VERSION AS OF {pinned}").collect()
    assert row["n"] == 1


def test_history_lists_create_and_merge(spark: SparkSession, tables: Tables) -> None:
    tables.merge("prompts", prompt_rows(spark, [("a", "one")]))
    tables.merge("prompts", prompt_rows(spark, [("b", "two")]))
    hist = tables.history("prompts")
    ops = {h["version"]: h["operation"] for h in hist}
    assert ops == {0: "CREATE TABLE", 1: "MERGE", 2: "MERGE"}


def test_merge_on_a_composite_key(spark: SparkSession, tables: Tables) -> None:
    def df(vals: list[tuple[str, int, str]]) -> DataFrame:
        return spark.createDataFrame([("prompts", sha, line, "b", "f.jsonl", "raw", reason, NOW)
                                      for sha, line, reason in vals], SCHEMAS["quarantine"])

    assert tables.merge("quarantine", df([("s1", 1, "a"), ("s1", 2, "b"), ("s2", 1, "c")])) == 3
    assert tables.merge("quarantine", df([("s1", 2, "changed"), ("s2", 2, "d")])) == 1
    got = {(r["source_sha256"], r["line"]): r["reason"] for r in tables.read("quarantine").collect()}
    assert got == {("s1", 1): "a", ("s1", 2): "b", ("s2", 1): "c", ("s2", 2): "d"}


def test_register_exposes_tables_by_plain_name(spark: SparkSession, tables: Tables) -> None:
    tables.merge("prompts", prompt_rows(spark, [("a", "one"), ("b", "two")]))
    assert tables.register() == ["prompts"]
    (row,) = spark.sql("SELECT count(*) AS n FROM prompts WHERE prompt = 'two'").collect()
    assert row["n"] == 1


def test_commit_conflicts_are_told_apart_from_other_errors() -> None:
    from tao_spark.tables import is_conflict

    class Captured(Exception):  # the shape of PySpark's captured JVM errors: SQLSTATE and condition getters
        def __init__(self, msg: str, state: str | None, condition: str | None) -> None:
            super().__init__(msg)
            self.state, self.condition = state, condition

        def getSqlState(self) -> str | None:
            return self.state

        def getCondition(self) -> str | None:
            return self.condition

    assert is_conflict(Captured("[DELTA_CONCURRENT_APPEND] files were added", "2D521", "DELTA_CONCURRENT_APPEND"))
    assert is_conflict(Captured("metadata changed", None, "DELTA_METADATA_CHANGED"))
    assert is_conflict(RuntimeError("io.delta.exceptions.ConcurrentAppendException: retry"))
    assert is_conflict(RuntimeError("Transaction 7 already exists"))  # Sail / delta-rs
    assert is_conflict(RuntimeError("Missing commit file: expected version 0, found 8"))  # Sail mid-commit listing
    assert not is_conflict(Captured("[TABLE_OR_VIEW_NOT_FOUND] no table", "42P01", "TABLE_OR_VIEW_NOT_FOUND"))
    assert not is_conflict(ValueError("bad value"))
