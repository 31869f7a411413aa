"""One TAO round as a job: spark-submit jobs/tao_round.py --config conf/databricks.yaml [key=value ...]

Also runs with plain python on the embedded default: python jobs/tao_round.py generate.n=8
"""

from __future__ import annotations

import sys

from tao_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["round", *sys.argv[1:]]))
