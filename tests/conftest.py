from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from tao_spark.tables import Tables

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def spark() -> SparkSession:
    """One embedded Sail session for the whole run (starting it is the slow part)."""
    from tao_spark.config import SparkConfig
    from tao_spark.session import get_spark

    return get_spark(SparkConfig(shuffle_partitions=2))


@pytest.fixture
def tables(spark: SparkSession, tmp_path: Path) -> Tables:
    """A fresh, empty lakehouse per test."""
    from tao_spark.tables import Tables

    return Tables(spark, str(tmp_path / "lakehouse"))
