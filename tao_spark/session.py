"""Spark sessions: an embedded Sail server by default, a Spark Connect URL, classic Spark, or the active session.

    from tao_spark.session import get_spark
    spark = get_spark(cfg.spark)
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from typing import Any

from pyspark.sql import SparkSession

from tao_spark.config import SparkConfig

_lock = threading.Lock()
_server: Any = None
_sessions: dict[tuple[str | None, str | None], SparkSession] = {}
start_seconds: float | None = None


def _start_sail() -> str:
    """Start Sail in this process on a free loopback port, once; return its sc:// URL."""
    global _server, start_seconds
    if _server is None:
        os.environ.setdefault("RUST_LOG", "error")  # Sail logs every session at INFO otherwise
        # Sail ends a session after 900 s without a request, and a train stage makes none while torchrun works: a
        # 12-minute training job found its session gone. The server lives and dies with this process anyway.
        os.environ.setdefault("SAIL_SPARK__SESSION_TIMEOUT_SECS", str(7 * 24 * 3600))
        try:
            from pysail.spark import SparkConnectServer
        except ImportError:
            raise RuntimeError("the embedded engine needs pysail: pip install 'tao_spark[local]', or point "
                               "spark.master / spark.remote at a Spark of your own") from None

        t0 = time.perf_counter()
        server = SparkConnectServer(ip="127.0.0.1", port=0)
        server.start(background=True)
        _server = server
        start_seconds = time.perf_counter() - t0
        atexit.register(server.stop)
    host, port = _server.listening_address
    return f"sc://{host}:{port}"


DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def delta_package() -> str:
    """The Maven coordinate of delta-spark's jars matching the installed ``delta-spark`` Python package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"io.delta:delta-spark_2.13:{version('delta-spark')}"
    except PackageNotFoundError:
        raise RuntimeError("Delta on JVM Spark needs delta-spark: pip install 'tao_spark[jvm]', or give its jars "
                           "in spark.jars") from None


def delta_conf(conf: dict[str, str], shuffle_partitions: int) -> dict[str, str]:
    """Spark conf for JVM Spark: Delta (delta-spark) and tao's worker daemon, under ``conf`` (the user's keys win).

    The jars come from Maven through ``spark.jars.packages`` unless ``conf`` already names jars (``spark.jars``,
    for example ones fetched with ``mvn dependency:get`` where Spark's own resolver cannot reach a registry).
    """
    out = {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        # Delta rebuilds a table's state with 50 tasks by default: most of a small read's time on a few cores.
        "spark.databricks.delta.snapshotPartitions": str(max(2, shuffle_partitions)),
        "spark.ui.showConsoleProgress": "false",  # the stages print their own progress
        # Executors fork Python workers from a daemon that has torch and transformers imported already.
        "spark.python.daemon.module": "tao_spark.worker_daemon",
    }
    if "spark.jars" not in conf and "delta-spark" not in conf.get("spark.jars.packages", ""):
        packages = [p for p in conf.get("spark.jars.packages", "").split(",") if p]
        out["spark.jars.packages"] = ",".join([*packages, delta_package()])
    return {**out, **conf}


def get_spark(cfg: SparkConfig | None = None) -> SparkSession:
    """Return a Spark session for ``cfg``, reusing one already made in this process.

    Order: ``spark.remote`` (Spark Connect: a JVM server, Databricks), ``spark.master`` (classic JVM Spark with
    delta-spark: ``local[2]``, ``spark://host:7077``, yarn), the session of a running Spark application
    (spark-submit, a Databricks job), else an embedded Sail server.
    """
    cfg = cfg or SparkConfig()
    key = (cfg.remote, cfg.master)
    with _lock:
        cached = _sessions.get(key)
        if cached is not None and not _is_stopped(cached):
            return cached
        conf = dict(cfg.conf)
        if cfg.remote:
            builder = SparkSession.builder.appName(cfg.app_name).remote(cfg.remote)
        elif cfg.master:
            builder = SparkSession.builder.appName(cfg.app_name).master(cfg.master)
            # Workers must run the driver's interpreter, or they import a different pyspark/pandas.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = builder.config("spark.ui.enabled", "false")
            conf = delta_conf(conf, cfg.shuffle_partitions)
        else:
            active = SparkSession.getActiveSession()
            if active is not None:
                return active
            if os.environ.get("PYSPARK_GATEWAY_PORT"):
                # Under spark-submit: its JVM, master and --packages are in place; the session is ours to make.
                builder = SparkSession.builder.appName(cfg.app_name)
                conf = {k: v for k, v in delta_conf(conf, cfg.shuffle_partitions).items()
                        if k != "spark.jars.packages"}
            else:
                builder = SparkSession.builder.remote(_start_sail())
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        for k, v in conf.items():
            builder = builder.config(k, v)
        spark = builder.getOrCreate()
        _sessions[key] = spark
        return spark


def _is_stopped(spark: SparkSession) -> bool:
    try:
        return bool(getattr(spark, "is_stopped", False))
    except Exception:  # a session whose server went away counts as stopped
        return True
