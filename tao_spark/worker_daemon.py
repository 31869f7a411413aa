"""Spark's Python worker daemon with the generation stack imported once per executor, not once per worker.

JVM Spark runs ``python -m <spark.python.daemon.module>`` on each executor and forks a Python worker from it
for each task that needs one. With ``pyspark.daemon`` a worker imports torch and transformers itself (3-4 s
here) the first time a generate, evaluate or reward-model UDF runs in it; and an executor discards a worker
idle for a minute, so each stage of a round met fresh workers and paid that again. Imported here, before the
fork, every worker starts with them (copy-on-write). Importing torch starts no threads and touches no GPU, so
forking after it is safe. Where they are not installed nothing is preloaded and the daemon runs as pyspark's.
"""

from __future__ import annotations

import contextlib

with contextlib.suppress(ImportError):
    import torch  # noqa: F401
    import transformers  # noqa: F401

    # transformers resolves its classes lazily: pay for the ones every engine load needs here too.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from pyspark import daemon

if __name__ == "__main__":
    daemon.manager()
