"""The lakehouse: the Delta tables that are the only contract between stages.

    from tao_spark.tables import Tables
    tables = Tables(spark, cfg.lakehouse)
    v = tables.snapshot("prompts")          # current Delta version, pinned by later stages
    df = tables.read("prompts", version=v)  # exactly that version (VERSION AS OF)

Writes are ``MERGE INTO`` on each table's key, so any stage can be re-run without doubling rows. The same code
serves Sail (history and versions through delta-rs, ``deltalake``, since Sail has no ``DESCRIBE HISTORY``),
delta-spark on JVM Spark and Databricks (``DESCRIBE HISTORY``), by path or, with a catalog, by name.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_spark.config import UserError, is_namespace

log = logging.getLogger("tao.tables")

if TYPE_CHECKING:  # types only: SCHEMAS and columns serve the workers, which may run where pyspark is absent
    import pandas as pd
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

SCHEMAS: dict[str, str] = {
    "prompts": (
        "prompt_id string, task string, messages array<struct<role:string,content:string>>, prompt string, "
        "client_id string, source string, source_file string, received_at timestamp, ingested_at timestamp, "
        "batch_id string, metadata string"
    ),
    "quarantine": (
        "target string, source_sha256 string, line long, batch_id string, source_file string, raw string, "
        "reason string, ingested_at timestamp"
    ),
    "candidates": (
        "round_id string, purpose string, prompt_id string, candidate_idx int, task string, completion string, "
        "tokens int, "
        "finish_reason string, policy string, policy_id string, sampling string, seed long, reused_from string, "
        "created_at timestamp"
    ),
    "scores": (
        "round_id string, purpose string, prompt_id string, candidate_idx int, reward_name string, value double, "
        "reward_key string, reused_from string, created_at timestamp"
    ),
    "preferences": (
        "round_id string, prompt_id string, task string, chosen_idx int, rejected_idx int, chosen string, "
        "rejected string, chosen_score double, rejected_score double, margin double, strategy string, "
        "created_at timestamp"
    ),
    "locks": "name string, holder string, acquired_at timestamp, expires_at timestamp",
    # How far each inference table has been ingested: the next run reads only later commits.
    "ingest_watermarks": "source string, version long, rows long, batch_id string, updated_at timestamp",
    # Pairwise preferences from outside the loop (human labels, another system's logs): reward-model training data.
    "preference_pairs": (
        "pair_id string, prompt_id string, task string, messages array<struct<role:string,content:string>>, "
        "prompt string, chosen string, rejected string, client_id string, source string, source_file string, "
        "ingested_at timestamp, batch_id string, metadata string"
    ),
    "evaluations": (
        "round_id string, prompt_id string, task string, challenger string, champion string, "
        "challenger_reward double, champion_reward double, challenger_tokens int, champion_tokens int, "
        "challenger_scores string, champion_scores string, winner string, created_at timestamp"
    ),
    # One row per answered request of `tao serve`; the prompt itself goes to `prompts` (source serving).
    "serving_log": (
        "request_id string, arm string, model_version string, prompt_id string, response string, "
        "prompt_tokens int, completion_tokens int, latency_ms double, user_hash string, created_at timestamp"
    ),
    # A user's rating of one served answer (POST /v1/feedback); a later rating of the same request replaces it.
    "feedback": "request_id string, rating int, comment string, user_hash string, created_at timestamp",
    "rounds": (
        "round_id string, status string, prompts_version long, previous_version long, first_version long, "
        "n_prompts long, n_train long, n_holdout long, "
        "new_prompts long, reused_candidates long, new_candidates long, pairs long, "
        "base_model string, baseline_model string, policy_id string, tuned_model string, mlflow_run_id string, "
        "model_version string, "
        "promoted boolean, gate_reason string, metrics string, config_hash string, git_commit string, "
        "started_at timestamp, finished_at timestamp"
    ),
}
# One row per stage a round finished: the round's row as that stage left it, appended (a blind append is one
# commit, a fraction of a second on a cluster, where updating the round's row in place is a MERGE of seconds).
# `rounds` is written when a round starts and when it is done; a running round's progress is its latest row here.
SCHEMAS["round_stages"] = "stage string, seconds double, recorded_at timestamp, " + SCHEMAS["rounds"]

KEYS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt_id",),
    "quarantine": ("target", "source_sha256", "line"),
    # purpose: train (sampled for selection), eval_challenger / eval_champion (greedy answers to held-out prompts)
    # or eval_<arm>_samples (samples of the held-out prompts asking for a short answer: the consistency check)
    "candidates": ("round_id", "purpose", "prompt_id", "candidate_idx"),
    "scores": ("round_id", "purpose", "prompt_id", "candidate_idx", "reward_name"),
    "preferences": ("round_id", "prompt_id", "chosen_idx", "rejected_idx"),
    "evaluations": ("round_id", "prompt_id"),
    "rounds": ("round_id",),
    "round_stages": ("round_id", "stage", "recorded_at"),
    "locks": ("name", "holder"),
    "ingest_watermarks": ("source",),
    "preference_pairs": ("pair_id",),
    "serving_log": ("request_id",),
    "feedback": ("request_id",),
}

# delta-spark's commit conflicts (ConcurrentAppendException and friends) all carry SQLSTATE 2D521; their error
# classes and Java/Python class names are matched too, then, for Sail and delta-rs, which raise plain errors, the
# message text.
_CONFLICT_SQLSTATE = "2D521"
_CONFLICT_CLASSES = ("DELTA_CONCURRENT_", "DELTA_METADATA_CHANGED", "DELTA_PROTOCOL_CHANGED")
_CONFLICT_TYPES = {"ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
                   "ConcurrentTransactionException", "ConcurrentWriteException", "MetadataChangedException",
                   "ProtocolChangedException", "DeltaConcurrentModificationException"}
# "missing commit file": Sail lists the log while another writer's commit lands and reads an inconsistent listing
# ("expected version 0, found 8"); nothing was written, so it is retried like a conflict.
_CONFLICT_MARKERS = ("conflict", "concurrent", "already exists", "commit failed", "failed to commit",
                     "missing commit file")


def is_conflict(e: BaseException) -> bool:
    """Whether ``e`` is a Delta commit conflict with a concurrent writer (worth retrying)."""
    for get in ("getSqlState", "getCondition"):
        try:
            value = getattr(e, get)() if hasattr(e, get) else None
        except Exception:  # a captured error without the field
            value = None
        if value and (value == _CONFLICT_SQLSTATE or str(value).startswith(_CONFLICT_CLASSES)):
            return True
    names = {t.__name__ for t in type(e).__mro__}
    if names & _CONFLICT_TYPES or any(f".{n}" in str(e) for n in _CONFLICT_TYPES):
        return True
    return any(m in str(e).lower() for m in _CONFLICT_MARKERS)


def is_jvm_spark(spark: SparkSession) -> bool:
    """JVM Spark with delta-spark (classic, a Spark Connect server, Databricks) rather than Sail.

    Both answer Spark Connect; ``version()`` tells them apart: Spark's starts with its own version, Sail's is
    Sail's version.
    """
    if type(spark).__module__ == "pyspark.sql.session":
        return True
    known = _engines.get(spark)
    if known is None:
        version = spark.sql("SELECT version()").collect()[0][0]
        known = _engines[spark] = str(version).split(" ")[0] == spark.version
    return known


_engines: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def columns(name: str) -> list[str]:
    """Column names of a table, in schema order (for building pandas frames that match it)."""
    parts, depth, cur = [], 0, ""
    for ch in SCHEMAS[name]:  # split on top-level commas only, not those inside struct<...>
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip().split(" ")[0] for p in parts]


class TableNotFound(UserError, LookupError):
    """A table that no stage has written yet."""


class UnknownTable(UserError, KeyError):
    """A name that is not one of the tao tables (``SCHEMAS``)."""

    def __str__(self) -> str:  # KeyError's own quotes the message
        return str(self.args[0])


# What writes each table first: the command a user who reads an empty one should run.
MADE_BY = {"prompts": "tao ingest FILE (or --table NAME)",
           "preference_pairs": "tao ingest-preferences FILE (the bundled set: tao_spark/data/preferences.jsonl)",
           "rounds": "tao round", "round_stages": "tao round", "candidates": "tao generate", "scores": "tao score",
           "preferences": "tao select",
           "evaluations": "tao evaluate", "serving_log": "tao serve", "feedback": "tao serve (POST /v1/feedback)"}


class Tables:
    """Named Delta tables under one lakehouse: a folder (``/data/lake``, ``s3://…``) or a catalog namespace.

    Path mode (the default, and the only mode on Sail) addresses a table as ``delta.`<root>/<name>```. With
    ``root`` a namespace (``tao``, ``main.tao``) every table is a managed Delta table of that catalog, created
    with its schema by name and visible to any other session of the catalog (Unity Catalog on Databricks, a
    Hive metastore elsewhere).
    """

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root.rstrip("/")
        self.namespace = self.root if is_namespace(self.root) else None
        self.jvm = is_jvm_spark(spark)
        if self.namespace:
            if not self.jvm:
                raise ValueError(f"lakehouse {root!r} is a catalog namespace, but the embedded engine (Sail) keeps "
                                 "tables by path: give lakehouse a folder, or use JVM Spark with a catalog "
                                 "(spark.master or spark.remote)")
            spark.sql(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.namespace)}").collect()
        elif "://" not in self.root and not self.root.startswith("dbfs:"):
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        """Where ``name`` lives: its folder in path mode, its three-part name in catalog mode."""
        if name not in SCHEMAS:
            raise UnknownTable(f"unknown table {name!r} (known: {', '.join(SCHEMAS)})")
        return f"{self.namespace}.{name}" if self.namespace else f"{self.root}/{name}"

    def ref(self, name: str) -> str:
        """The SQL name of a table, valid in MERGE, SELECT and VERSION AS OF."""
        return _quote(self.path(name)) if self.namespace else f"delta.`{self.path(name)}`"

    def lineage(self, name: str) -> dict[str, str]:
        """Keyword arguments of MLflow's ``DeltaDatasetSource`` that name this table.

        A table name is fully qualified with the session's catalog: MLflow takes a two-part ``tao.prompts`` for a
        Unity Catalog table (and asks Databricks for its id, warning on every call outside Databricks); as
        ``spark_catalog.tao.prompts`` it is the local metastore's, and on Databricks ``main.tao.prompts`` is UC's.
        """
        if not self.namespace:
            return {"path": self.path(name)}
        table = self.path(name)
        if table.count(".") == 1:
            table = f"{self.spark.catalog.currentCatalog()}.{table}"
        return {"delta_table_name": table}

    def _local(self) -> bool:
        return self.namespace is None and "://" not in self.root and not self.root.startswith("dbfs:")

    def exists(self, name: str) -> bool:
        if self.namespace:
            return bool(self.spark.catalog.tableExists(self.path(name)))
        if self._local():  # no Spark job: a folder with a Delta log
            from deltalake import DeltaTable

            return DeltaTable.is_deltatable(self.path(name))
        try:
            return self.spark.sql(f"DESCRIBE DETAIL {self.ref(name)}").collect()[0]["format"] == "delta"
        except Exception:  # not there, or not Delta
            return False

    def ensure(self, name: str) -> None:
        """Create ``name`` empty with its schema if it does not exist; safe when two writers race."""
        if self.exists(name):
            return
        try:
            if self.namespace or self.jvm:
                # A metadata-only commit: on a JVM cluster writing an empty DataFrame instead is a job (3x slower).
                self.spark.sql(f"CREATE TABLE IF NOT EXISTS {self.ref(name)} ({SCHEMAS[name]}) USING DELTA").collect()
            else:
                self.spark.createDataFrame([], SCHEMAS[name]).write.format("delta").save(self.path(name))
        except Exception:
            # Another writer creating it at the same moment: its folder is there before its first commit is, and
            # delta-spark refuses a non-empty folder that is not yet a table. Give that commit time to land.
            for _ in range(100):
                if self.exists(name):
                    return
                time.sleep(0.1)
            raise

    def _require(self, name: str) -> None:
        if not self.exists(name):
            fix = f": run `{MADE_BY[name]}` first" if name in MADE_BY else ""
            raise TableNotFound(f"table {name!r} does not exist yet in {self.root}{fix}")

    def snapshot(self, name: str) -> int:
        """The current Delta version of ``name``: what a stage pins for lineage."""
        self._require(name)
        if self.jvm and not self._local():  # a local folder's log is read directly: on a JVM cluster it is a job
            return int(self.spark.sql(f"DESCRIBE HISTORY {self.ref(name)} LIMIT 1").collect()[0]["version"])
        from deltalake import DeltaTable

        return int(DeltaTable(self.path(name)).version())

    def read(self, name: str, version: int | None = None) -> DataFrame:
        self._require(name)
        if self.namespace:
            at = f" VERSION AS OF {int(version)}" if version is not None else ""
            return self.spark.sql(f"SELECT * FROM {self.ref(name)}{at}")
        reader = self.spark.read.format("delta")
        if version is not None:
            reader = reader.option("versionAsOf", int(version))
        return reader.load(self.path(name))

    def history(self, name: str) -> list[dict[str, Any]]:
        """Commits newest first, as delta-rs reports them (``timestamp`` in ms since the epoch)."""
        self._require(name)
        if self.jvm:
            rows = self.spark.sql(f"DESCRIBE HISTORY {self.ref(name)}").collect()
            out = []
            for r in rows:
                d = r.asDict(recursive=True)
                d["timestamp"] = int(d["timestamp"].timestamp() * 1000)
                out.append({k: v for k, v in d.items() if v is not None})
            return out
        from deltalake import DeltaTable

        return list(DeltaTable(self.path(name)).history())

    def merge(self, name: str, df: DataFrame, *, update: bool = False, retries: int = 8) -> int:
        """MERGE ``df`` into ``name`` on the table's key; insert new keys, update matched ones only if ``update``.

        Returns the number of rows the MERGE wrote. Retries on a Delta commit conflict with another writer
        (optimistic concurrency): the MERGE re-reads the table, so a key another writer just inserted is
        then matched instead of doubled.
        """
        clauses = ("WHEN MATCHED THEN UPDATE SET * " if update else "") + "WHEN NOT MATCHED THEN INSERT *"
        return self._merge(name, df, clauses, retries)

    def append(self, name: str, df: DataFrame) -> None:
        """Append ``df`` to ``name``: no key lookup, so one commit (for logs whose rows are never updated)."""
        self.ensure(name)
        if self.namespace:
            df.write.insertInto(self.path(name))
        else:
            df.write.format("delta").mode("append").save(self.path(name))

    def delete(self, name: str, keys: DataFrame, *, retries: int = 8) -> int:
        """Delete the rows of ``name`` whose key is a row of ``keys``; returns how many went.

        The values travel as rows of a DataFrame, never as SQL text, so a quote in a value cannot change
        the statement.
        """
        return self._merge(name, keys, "WHEN MATCHED THEN DELETE", retries)

    def frame(self, name: str, rows: list[dict[str, Any]] | pd.DataFrame) -> DataFrame:
        """Rows (dicts or a pandas frame) as a DataFrame with table ``name``'s schema, sent as one Arrow table: half
        the time of pandas or pickled rows, and on a JVM cluster no RDD of Python objects to unpickle."""
        import pandas as pd
        import pyarrow as pa

        schema = arrow_schema(self.spark, name)
        if isinstance(rows, pd.DataFrame) and rows.attrs:
            # Spark Connect's toPandas leaves its plan metrics in attrs, which Arrow cannot keep (it warns).
            rows = rows.copy(deep=False)
            rows.attrs = {}
        data = (pa.Table.from_pandas(rows, schema=schema, preserve_index=False) if isinstance(rows, pd.DataFrame)
                else pa.Table.from_pylist(rows, schema=schema))
        return self.spark.createDataFrame(data)

    def _merge(self, name: str, df: DataFrame, clauses: str, retries: int) -> int:
        self.ensure(name)
        view = f"tao_src_{name}_{uuid.uuid4().hex[:8]}"
        df.createOrReplaceTempView(view)
        on = " AND ".join(f"t.{k} <=> s.{k}" for k in KEYS[name])
        sql = f"MERGE INTO {self.ref(name)} AS t USING {view} AS s ON {on} {clauses}"
        try:
            for attempt in range(retries + 1):
                try:
                    row = self.spark.sql(sql).collect()
                    return _written(row)
                except Exception as e:
                    if attempt == retries or not is_conflict(e):
                        raise
                    # Jittered backoff so two racing writers do not collide again on the next version.
                    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
                    log.warning(f"tao: {name}: commit conflict ({type(e).__name__}), retrying "
                                f"({attempt + 1}/{retries})")
            raise AssertionError("unreachable")
        finally:
            self.spark.catalog.dropTempView(view)

    def register(self) -> list[str]:
        """Expose every existing table under its plain name so ``SELECT ... FROM prompts`` works.

        Temporary views rather than catalog tables: they are per session, so two lakehouses used from one
        process never point a name at the wrong root, and dropping one never touches data.
        """
        names = []
        for name in SCHEMAS:
            if self.exists(name):
                self.read(name).createOrReplaceTempView(name)
                names.append(name)
        return names


_ARROW: dict[str, pa.Schema] = {}


def arrow_schema(spark: SparkSession, name: str) -> pa.Schema:
    """Table ``name``'s schema in Arrow (parsed by Spark once per process)."""
    if name not in _ARROW:
        from pyspark.sql.pandas.types import to_arrow_schema

        _ARROW[name] = to_arrow_schema(spark.createDataFrame([], SCHEMAS[name]).schema, timestamp_utc=True)
    return _ARROW[name]


def _quote(dotted: str) -> str:
    return ".".join(f"`{part}`" for part in dotted.split("."))


def _written(rows: list[Any]) -> int:
    if not rows:
        return 0
    d = rows[0].asDict()
    # delta-spark reports num_affected_rows; Sail reports count.
    for k in ("num_affected_rows", "count"):
        if k in d and d[k] is not None:
            return int(d[k])
    return 0
