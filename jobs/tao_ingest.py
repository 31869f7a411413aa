"""Ingest prompt files as a job: spark-submit jobs/tao_ingest.py PATH... [--task T] [--config FILE] [key=value ...]"""

from __future__ import annotations

import sys

from tao_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
