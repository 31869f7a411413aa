"""The embedded Sail server outlives a long stage that makes no Spark calls (a train stage while torchrun works)."""

from __future__ import annotations

import os
import subprocess
import sys

# Each case in its own interpreter: the server is started once per process and reads its settings then.
IDLE = """
import os, sys, time
from tao_spark.config import SparkConfig
from tao_spark.session import get_spark
spark = get_spark(SparkConfig(shuffle_partitions=1))
assert spark.range(3).count() == 3
time.sleep(float(sys.argv[1]))
try:
    spark.range(3).count()
    print("alive", os.environ["SAIL_SPARK__SESSION_TIMEOUT_SECS"])
except Exception as e:
    print("gone", type(e).__name__)
"""


def idle(seconds: float, timeout: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SAIL_SPARK__SESSION_TIMEOUT_SECS"}
    if timeout is not None:
        env["SAIL_SPARK__SESSION_TIMEOUT_SECS"] = timeout
    out = subprocess.run([sys.executable, "-c", IDLE, str(seconds)], env=env, capture_output=True, text=True,
                         timeout=180, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_the_timeout_setting_governs_the_embedded_server_and_its_default_is_long() -> None:
    # The setting reaches the in-process server: with Sail's idle timeout at 2 s, a 5 s pause loses the session...
    assert idle(5, "2").startswith("gone")
    # ...and without one set, the server starts with a timeout far beyond any stage (Sail's own is 900 s).
    state, seconds = idle(3, None).split()
    assert state == "alive" and int(seconds) >= 24 * 3600
