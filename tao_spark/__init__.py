"""tao_spark: Test-time Adaptive Optimization on Spark — tune a language model from prompts alone."""

import logging
import sys

__version__ = "0.1.0"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to ``sys.stderr`` as it is when a record is emitted (a notebook's, a test's capture), not at import."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


# Progress and warnings of every module go to the "tao" logger ("tao.generate", "tao.train", ...) as one plain line on
# stderr, at INFO: what a round is doing is the package's output, in a notebook as in the CLI (`tao -q` keeps the
# warnings only, `tao -v` adds debug lines). An application that configures logging itself may replace the handler:
# logging.getLogger("tao").handlers.clear(); logging.getLogger("tao").propagate = True.
_log = logging.getLogger("tao")
if not _log.handlers:
    _handler = _Stderr()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
