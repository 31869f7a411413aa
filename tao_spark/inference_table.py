"""Prompts from a Model Serving inference table, read incrementally.

    tao ingest --table main.serving.acme_assistant_payload       # a catalog table (JVM Spark, Databricks)
    tao ingest --table /Volumes/main/serving/payload --since-version 12

An endpoint with inference tables (AI Gateway) logs every request to ``<catalog>.<schema>.<endpoint>_payload``.
Each chat request becomes a prompt through the same validation, dedup and quarantine as a file: the request's
turns up to its last user turn are the prompt (a trailing assistant turn is a prefill, not part of it),
``request_time`` is ``received_at``, ``databricks_request_id`` the client id, and the endpoint, served entity
and requester go into ``metadata``. Failed requests, rows the gateway logged with an error code, missing or
unparsable bodies and requests that are not chats go to ``quarantine`` with the reason.

Each run records the source version it read up to in ``ingest_watermarks``; the next run reads only later
commits: the Change Data Feed where the table has it on (inference tables do), else the files added since
(delta-rs) or a diff of the two versions (JVM Spark). Rows read twice after a crash between the writes are
duplicates by prompt id, and their quarantine rows are keyed by (source range, row), so nothing doubles.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from pyspark.sql import SparkSession

from tao_spark.config import IngestConfig, UserError
from tao_spark.ingest import IngestResult, Reject, append, build_row
from tao_spark.tables import Tables, _quote, is_jvm_spark

log = logging.getLogger("tao.inference_table")

PAYLOAD_COLUMNS = ("databricks_request_id", "client_request_id", "request_date", "request_time", "status_code",
                   "sampling_fraction", "execution_duration_ms", "request", "response", "logging_error_codes",
                   "served_entity_id", "requester")
LEGACY_COLUMNS = ("databricks_request_id", "client_request_id", "date", "timestamp_ms", "status_code",
                  "execution_time_ms", "request", "response", "sampling_fraction", "request_metadata")
CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")


def is_path(source: str) -> bool:
    return "/" in source or "://" in source or source.startswith(".")


def endpoint_of(source: str) -> str:
    """The endpoint a payload table belongs to, from its name (``<endpoint>_payload``)."""
    last = source.rstrip("/").replace("\\", "/").split("/")[-1].split(".")[-1]
    return last.removesuffix("_payload") or last


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text parts only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise Reject(f"unsupported content: messages[{i}] has a {kind!r} part (text only)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise Reject(f"malformed chat: messages[{i}].content must be a string or a list of text parts")


def chat_of(body: Any) -> list[dict[str, str]]:
    """The prompt of an OpenAI-style chat request body: its turns up to the last user turn."""
    if not isinstance(body, dict):
        raise Reject(f"not a chat request: body is a JSON {type(body).__name__}")
    if "messages" not in body:
        kind = ("completions (prompt)" if "prompt" in body else
                "Responses API or embeddings (input)" if "input" in body else "no messages")
        raise Reject(f"not a chat request: {kind}")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise Reject("malformed chat: messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise Reject(f"unsupported role: messages[{i}].role is {role!r} (system, user, assistant)")
        turns.append({"role": m["role"], "content": _text(m.get("content"), i)})
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns or turns[-1]["role"] != "user":
        raise Reject("malformed chat: no user turn to answer")
    return turns


def record(row: dict[str, Any], endpoint: str, max_bytes: int) -> dict[str, Any]:
    """One payload row as an ingest record (``prompt``/``messages``, id, received_at, metadata); raise ``Reject``."""
    status = row.get("status_code")
    if status != 200:
        raise Reject(f"request failed: status_code {status}")
    codes = [c for c in (row.get("logging_error_codes") or []) if c]
    if codes:
        raise Reject(f"logged with an error: {', '.join(codes)}")
    raw = row.get("request")
    if raw is None:
        raise Reject("no request body")
    if len(raw) > max_bytes:
        raise Reject(f"request too long: {len(raw)} bytes > ingest.max_line_bytes={max_bytes}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise Reject(f"unparsable request JSON: {getattr(e, 'msg', type(e).__name__)}") from None
    when = row.get("request_time")
    if when is None and row.get("timestamp_ms") is not None:
        when = datetime.fromtimestamp(row["timestamp_ms"] / 1000, tz=UTC)
    meta = dict(row.get("request_metadata") or {})  # an Arrow map arrives as (key, value) pairs
    metadata = {"endpoint": meta.get("endpoint_name") or endpoint,
                "served_entity_id": row.get("served_entity_id") or meta.get("model_version"),
                "requester": row.get("requester"), "client_request_id": row.get("client_request_id")}
    return {"messages": chat_of(body), "id": row.get("databricks_request_id"),
            "received_at": when.astimezone(UTC).isoformat() if when else None,
            "metadata": {k: v for k, v in metadata.items() if v is not None}}


def check_schema(columns: list[str], source: str) -> str:
    """``payload`` or ``legacy``; a table with neither schema is refused, naming the columns expected."""
    have = set(columns) - set(CDF_COLUMNS)
    if have >= {"request", "status_code", "databricks_request_id", "request_time"}:
        return "payload"
    if have >= {"request", "status_code", "databricks_request_id", "timestamp_ms"}:
        return "legacy"
    raise ValueError(f"{source}: not an inference table: expected the payload columns ({', '.join(PAYLOAD_COLUMNS)}) "
                     f"or the legacy ones ({', '.join(LEGACY_COLUMNS)}); found {', '.join(sorted(have))}")


class Source:
    """A Delta table read by version: a path (Sail or JVM Spark) or a catalog name (JVM Spark)."""

    def __init__(self, spark: SparkSession, name: str) -> None:
        self.spark, self.name = spark, name
        self.jvm = is_jvm_spark(spark)
        if not is_path(name) and not self.jvm:
            raise ValueError(f"{name}: a catalog table needs JVM Spark (spark.master or spark.remote); "
                             "on the embedded engine give the table's path")
        self.ref = f"delta.`{name}`" if is_path(name) else _quote(name)
        if is_path(name) and "://" not in name:
            from deltalake import DeltaTable

            if not DeltaTable.is_deltatable(name):
                raise UserError(f"{name}: no Delta table there (give an inference table's path or, on JVM Spark, "
                                "its catalog name)")

    def version(self) -> int:
        if self.jvm:
            return int(self.spark.sql(f"DESCRIBE HISTORY {self.ref} LIMIT 1").collect()[0]["version"])
        from deltalake import DeltaTable

        return int(DeltaTable(self.name).version())

    def columns(self) -> list[str]:
        """The table's columns, from its schema alone: a table of another kind is refused before any row is read."""
        if self.jvm:
            return self.spark.sql(f"SELECT * FROM {self.ref} LIMIT 0").columns
        from deltalake import DeltaTable

        return [f.name for f in DeltaTable(self.name).schema().fields]

    def cdf(self) -> bool:
        if self.jvm:
            props = self.spark.sql(f"DESCRIBE DETAIL {self.ref}").collect()[0]["properties"] or {}
        else:
            from deltalake import DeltaTable

            props = DeltaTable(self.name).metadata().configuration
        return str(props.get("delta.enableChangeDataFeed", "false")).lower() == "true"

    def rows(self, start: int | None, end: int) -> tuple[pa.Table, str]:
        """Rows committed in versions ``start..end`` (all of ``end`` when start is None) and how they were read."""
        if start is None or start <= 0:
            return self._snapshot(end), "snapshot"
        if self.cdf():
            try:
                return self._changes(start, end), "change data feed"
            except Exception as e:  # CDF switched on after ``start``, or its files vacuumed
                log.warning(f"tao: ingest --table: no change data for v{start}..v{end} ({type(e).__name__}); "
                            "reading the version diff")
        return self._diff(start, end), "version diff"

    def _snapshot(self, version: int) -> pa.Table:
        if self.jvm:
            return self.spark.sql(f"SELECT * FROM {self.ref} VERSION AS OF {version}").toArrow()
        from deltalake import DeltaTable

        return DeltaTable(self.name, version=version).to_pyarrow_table()

    def _changes(self, start: int, end: int) -> pa.Table:
        keep = ("insert", "update_postimage")
        if self.jvm:
            reader = (self.spark.read.format("delta").option("readChangeFeed", "true")
                      .option("startingVersion", start).option("endingVersion", end))
            df = reader.load(self.name) if is_path(self.name) else reader.table(self.name)
            return df.where(df["_change_type"].isin(*keep)).drop(*CDF_COLUMNS).toArrow()
        import pyarrow.compute as pc
        from deltalake import DeltaTable

        table = _plain(pa.table(DeltaTable(self.name).load_cdf(starting_version=start, ending_version=end).read_all()))
        table = table.filter(pc.is_in(table["_change_type"], pa.array(keep)))
        return table.drop_columns([c for c in CDF_COLUMNS if c in table.column_names])

    def _diff(self, start: int, end: int) -> pa.Table:
        if self.jvm:
            at = f"SELECT * FROM {self.ref} VERSION AS OF"
            return self.spark.sql(f"{at} {end} EXCEPT ALL {at} {start - 1}").toArrow()
        import pyarrow.dataset as ds
        from deltalake import DeltaTable

        # Appends add files: the files of ``end`` that ``start - 1`` did not have hold the new rows. A rewrite
        # (OPTIMIZE) re-adds old rows too; they come back as duplicates by prompt id, never as new prompts.
        new = sorted(set(DeltaTable(self.name, version=end).file_uris())
                     - set(DeltaTable(self.name, version=start - 1).file_uris()))
        if not new:  # commits that added no data (properties, OPTIMIZE of nothing)
            return pa.schema(DeltaTable(self.name, version=end).schema().to_arrow()).empty_table()
        return ds.dataset(new, format="parquet").to_table()


def _plain(table: pa.Table) -> pa.Table:
    """delta-rs reads change data with ``string_view`` columns, which pyarrow's sort and filter kernels lack."""
    fields = [pa.field(f.name, pa.string()) if pa.types.is_string_view(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))


def watermark(tables: Tables, source: str) -> int | None:
    """The last version of ``source`` a run ingested, or None."""
    if not tables.exists("ingest_watermarks"):
        return None
    from pyspark.sql import functions as F

    rows = tables.read("ingest_watermarks").where(F.col("source") == source).collect()
    return int(rows[0].version) if rows else None


def ingest_table(spark: SparkSession, tables: Tables, source: str, cfg: IngestConfig, *,
                 since_version: int | None = None, task: str | None = None) -> IngestResult:
    """Append the chats committed to inference table ``source`` since the last run (or from ``since_version``,
    inclusive) to ``prompts``; quarantine the rest with a reason; advance the watermark."""
    src = Source(spark, source)
    kind = check_schema(src.columns(), source)
    end = src.version()
    last = watermark(tables, source)
    start = since_version if since_version is not None else (last + 1 if last is not None else None)
    span = f"v{start if start is not None else 0}..v{end}"
    table = None
    if start is not None and start > end:
        log.warning(f"tao: ingest --table {source}: nothing committed after v{end}")
    else:
        table, how = src.rows(start, end)
        log.info(f"tao: ingest --table {source}: {table.num_rows} rows of {span} ({kind} schema, {how})")
    n = table.num_rows if table is not None else 0
    endpoint = endpoint_of(source)

    def records() -> Iterator[tuple[int, bytes, Any]]:
        if table is None:
            return
        order = [c for c in ("request_time", "timestamp_ms", "databricks_request_id") if c in table.column_names]
        ordered = table.sort_by([(c, "ascending") for c in order]) if order else table
        line = 0  # the row's place in a total order (time, then request id): the same on every re-read
        for batch in ordered.to_batches(max_chunksize=10_000):
            for row in batch.to_pylist():
                line += 1
                raw = json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", errors="backslashreplace")
                try:
                    yield line, raw, record(row, endpoint, cfg.max_line_bytes)
                except Reject as r:
                    yield line, raw, r

    # A range is read once per run; its quarantine rows are keyed by (range, row), so a re-read matches them.
    key = hashlib.sha256(f"{source}@{span}".encode()).hexdigest()
    result = append(spark, tables, [(f"{source}@{span}", key, records())], cfg, target="prompts", key="prompt_id",
                    build=build_row, task=task or endpoint, source="inference_table")
    if table is not None:
        mark = {"source": source, "version": end, "rows": n, "batch_id": result.batch_id,
                "updated_at": datetime.now(UTC)}
        tables.merge("ingest_watermarks", tables.frame("ingest_watermarks", [mark]), update=True,
                     retries=cfg.commit_retries)
    result.source_version, result.source_rows = end, n
    return result
