"""The tables as other tools read them, without Spark: DuckDB over deltalake's Arrow datasets, at a version too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import ROOT, tao

duckdb = pytest.importorskip("duckdb")  # in the dev extra; the README shows this path to users


def test_duckdb_reads_the_prompt_log_and_its_versions(tmp_path: Path) -> None:
    from deltalake import DeltaTable

    home = tmp_path / "home"
    lines = (ROOT / "tao_spark" / "data" / "prompts.jsonl").read_text().splitlines()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("\n".join(lines[:40]) + "\n")
    second.write_text("\n".join(lines[40:100]) + "\n")
    tao(home, "ingest", str(first))
    tao(home, "ingest", str(second))
    path = str(home / "lakehouse" / "prompts")
    now = DeltaTable(path).to_pyarrow_dataset()  # noqa: F841 (DuckDB finds it by its Python name)
    v1 = DeltaTable(path, version=1).to_pyarrow_dataset()  # noqa: F841
    assert duckdb.sql("SELECT count(*) FROM now").fetchall()[0][0] == 100
    assert duckdb.sql("SELECT count(*) FROM v1").fetchall()[0][0] == 40
    by_task = dict(duckdb.sql("SELECT task, count(*) FROM now GROUP BY task").fetchall())
    want: dict[str, int] = {}
    for line in lines[:100]:
        task = json.loads(line)["task"]
        want[task] = want.get(task, 0) + 1
    assert by_task == want
    # The nested chat column reads as DuckDB structs: the last user turn is the prompt column.
    got = duckdb.sql("SELECT count(*) FROM now WHERE messages[len(messages)].content = prompt").fetchall()[0][0]
    assert got == 100
