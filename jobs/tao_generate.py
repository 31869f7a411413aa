"""Stage entry point for spark-submit and lakehouse jobs:

    spark-submit jobs/tao_generate.py [--config FILE] [key=value ...]

Thin on purpose: it is `tao generate`; the logic lives in tao_spark.
"""

from __future__ import annotations

import sys

from tao_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
