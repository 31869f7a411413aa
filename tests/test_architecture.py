"""ARCHITECTURE.md stays true: its table contract is the one tao_spark/tables.py writes."""

from __future__ import annotations

import re
from pathlib import Path

from tao_spark.tables import KEYS, SCHEMAS, columns

DOC = Path(__file__).resolve().parent.parent / "ARCHITECTURE.md"


def _documented() -> dict[str, tuple[list[str], list[str]]]:
    rows = {}
    for m in re.finditer(r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|$", DOC.read_text(), re.M):
        rows[m[1]] = ([c.strip() for c in m[2].split(",")], [c.strip() for c in m[3].split(",")])
    return rows


def test_every_table_is_documented_with_its_key_and_columns() -> None:
    doc = _documented()
    assert set(doc) == set(SCHEMAS)
    for name, (key, cols) in doc.items():
        assert tuple(key) == KEYS[name], name
        # The key first, then the other columns in schema order (a key column may sit later in the schema).
        assert set(key) <= set(columns(name)) and cols == [c for c in columns(name) if c not in key], name


def test_every_stage_has_the_same_entry() -> None:
    import inspect

    from tao_spark import loop
    from tao_spark.config import STAGES

    assert tuple(loop.STAGES) == tuple(STAGES)
    for name, run in loop.STAGES.items():
        assert run.__name__ == "run", name
        assert list(inspect.signature(run).parameters) == ["tables", "rnd", "cfg"], name
        assert inspect.signature(run).return_annotation in ("StageResult", "rounds.StageResult"), name
