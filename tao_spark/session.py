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
        from pysail.spark import SparkConnectServer

        t0 = time.perf_counter()
        server = SparkConnectServer(ip="127.0.0.1", port=0)
        server.start(background=True)
        _server = server
        start_seconds = time.perf_counter() - t0
        atexit.register(server.stop)
    host, port = _server.listening_address
    return f"sc://{host}:{port}"


def get_spark(cfg: SparkConfig | None = None) -> SparkSession:
    """Return a Spark session for ``cfg``, reusing one already made in this process.

    Order: ``spark.remote`` (Spark Connect), ``spark.master`` (classic JVM Spark), the session of a running
    Spark application (a Databricks job, spark-submit), else an embedded Sail server.
    """
    cfg = cfg or SparkConfig()
    key = (cfg.remote, cfg.master)
    with _lock:
        cached = _sessions.get(key)
        if cached is not None and not _is_stopped(cached):
            return cached
        if cfg.remote or cfg.master:
            builder = SparkSession.builder.appName(cfg.app_name)
            builder = builder.remote(cfg.remote) if cfg.remote else builder.master(cfg.master)  # type: ignore[arg-type]
            if cfg.master:
                # Workers must run the driver's interpreter, or they import a different pyspark/pandas.
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                builder = builder.config("spark.ui.enabled", "false")
        else:
            active = SparkSession.getActiveSession()
            if active is not None:
                return active
            builder = SparkSession.builder.remote(_start_sail())
        builder = builder.config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        for k, v in cfg.conf.items():
            builder = builder.config(k, v)
        spark = builder.getOrCreate()
        _sessions[key] = spark
        return spark


def _is_stopped(spark: SparkSession) -> bool:
    try:
        return bool(getattr(spark, "is_stopped", False))
    except Exception:  # a session whose server went away counts as stopped
        return True
