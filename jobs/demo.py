"""The demo: ingest the bundled sample prompt log, then run one TAO round on the embedded default.

    make demo            # or: python jobs/demo.py [key=value ...]

Everything lands under $TAO_HOME (default ./.tao). Re-running resumes an unfinished round, or starts a
new one on the same prompts (which the ingest step leaves unchanged: nothing is inserted twice).
"""

from __future__ import annotations

import sys
import time

from tao_spark.cli import main
from tao_spark.data import SAMPLE_PROMPTS

if __name__ == "__main__":
    t0 = time.perf_counter()
    overrides = sys.argv[1:]
    rc = main(["ingest", str(SAMPLE_PROMPTS), "--source", "sample", *overrides])
    if rc == 0:
        rc = main(["round", *overrides])
    print(f"demo finished in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    sys.exit(rc)
