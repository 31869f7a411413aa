"""Ingestion: the JSONL/CSV/Parquet contract, quarantine reasons, dedup, idempotence, concurrent writers."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession

from tao_spark.config import IngestConfig, UserError
from tao_spark.ingest import IngestResult, ingest, prompt_id
from tao_spark.tables import Tables

ROOT = Path(__file__).resolve().parent.parent


def jl(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.write_bytes(b"".join(line + end for line in lines))
    return path


def rows(tables: Tables, name: str) -> list[dict[str, Any]]:
    return [r.asDict(recursive=True) for r in tables.read(name).collect()]


def by_text(tables: Tables) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["task"], r["prompt"]): r for r in rows(tables, "prompts")}


def run(spark: SparkSession, tables: Tables, paths: list[Path], cfg: IngestConfig | None = None,
        **kw: Any) -> IngestResult:
    r = ingest(spark, tables, list(paths), cfg or IngestConfig(), **kw)
    assert r.offered == r.accepted + r.duplicates + r.quarantined
    return r


# ---------------------------------------------------------------- quarantine: one file, every reason
LIMIT = 100
ZOO: list[tuple[str, bytes, str | None]] = [  # (case id, raw line, expected reason or None = accepted)
    ("good_first", jl({"prompt": "good one"}), None),
    ("unparsable", b'{"prompt": "unterminated', "unparsable JSON"),
    ("trailing_garbage", b'{"prompt": "x"} trailing', "unparsable JSON"),
    ("array", b"[1, 2]", "not a JSON object"),
    ("string", b'"just a string"', "not a JSON object"),
    ("null", b"null", "not a JSON object"),
    ("missing_prompt", jl({"task": "t"}), "missing field"),
    ("prompt_int", jl({"prompt": 5}), "prompt must be a string"),
    ("both_prompt_and_messages", jl({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}),
     "both prompt and messages"),
    ("task_int", jl({"prompt": "x", "task": 5}), "task must be a non-empty string"),
    ("task_blank", jl({"prompt": "x", "task": "  "}), "task must be a non-empty string"),
    ("id_int", jl({"prompt": "x", "id": 5}), "id must be a string"),
    ("metadata_list", jl({"prompt": "x", "metadata": [1]}), "metadata must be an object"),
    ("empty_prompt", jl({"prompt": ""}), "empty text"),
    ("whitespace_prompt", jl({"prompt": " \t\n\u3000 "}), "empty text"),
    ("too_long", jl({"prompt": "a" * (LIMIT + 1)}), "text too long"),
    ("nul", jl({"prompt": "a\u0000b"}), "NUL character"),
    ("lone_surrogate", b'{"prompt": "a\\ud800b"}', "invalid unicode"),
    ("good_before_bad_utf8", jl({"prompt": "before bad bytes"}), None),
    ("bad_utf8", b'{"prompt": "caf\xe9 \xff"}', "invalid UTF-8"),
    ("good_after_bad_utf8", jl({"prompt": "after bad bytes"}), None),
    ("messages_string", jl({"messages": "hi"}), "malformed chat: messages must be a non-empty list"),
    ("messages_empty", jl({"messages": []}), "malformed chat: messages must be a non-empty list"),
    ("turn_not_object", jl({"messages": ["hi"]}), "malformed chat: messages[0] must be an object"),
    ("bad_role", jl({"messages": [{"role": "bot", "content": "x"}]}), "malformed chat: messages[0].role"),
    ("last_turn_assistant", jl({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}),
     "malformed chat: the last turn must be from the user"),
    ("extra_turn_key", jl({"messages": [{"role": "user", "content": "x", "name": "bob"}]}),
     "malformed chat: messages[0] must be an object with exactly role and content"),
    ("missing_content", jl({"messages": [{"role": "user"}]}), "malformed chat: messages[0] must be an object"),
    ("content_list", jl({"messages": [{"role": "user", "content": ["x"]}]}),
     "malformed chat: messages[0].content must be a string"),
    ("blank_system_turn", jl({"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "q"}]}),
     "empty text in messages[0]"),
    ("received_at_word", jl({"prompt": "x", "received_at": "yesterday"}), "unparsable received_at"),
    ("received_at_number", jl({"prompt": "x", "received_at": 1700000000}), "received_at must be an ISO-8601 string"),
    ("megabyte_line", jl({"prompt": "z" * 1_100_000}), "line too long"),
    ("nesting_bomb", b"[" * 100_000, "nested deeper"),
    ("deep_metadata", jl({"prompt": "x", "metadata": {"a": json.loads("[" * 40 + "]" * 40)}}), "nested deeper"),
    ("good_last", jl({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"}]}),
     None),
]


@pytest.fixture(scope="module")
def zoo(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IngestResult, Tables]:
    d = tmp_path_factory.mktemp("zoo")
    path = write(d / "zoo.jsonl", [raw for _, raw, _ in ZOO])
    tables = Tables(spark, str(d / "lakehouse"))
    return path, run(spark, tables, [path], IngestConfig(max_prompt_chars=LIMIT)), tables


def test_zoo_counts(zoo: tuple[Path, IngestResult, Tables]) -> None:
    _, r, tables = zoo
    good = [raw for _, raw, why in ZOO if why is None]
    assert (r.offered, r.accepted, r.duplicates, r.quarantined) == (len(ZOO), len(good), 0, len(ZOO) - len(good))
    assert len(rows(tables, "prompts")) == len(good)
    assert len(rows(tables, "quarantine")) == len(ZOO) - len(good)
    assert r.prompts_version == tables.snapshot("prompts")


@pytest.mark.parametrize(("lineno", "case"), [(i, c) for i, c in enumerate(ZOO, start=1) if c[2]],
                         ids=[c[0] for c in ZOO if c[2]])
def test_zoo_line_is_quarantined_with_its_reason(zoo: tuple[Path, IngestResult, Tables], lineno: int,
                                                 case: tuple[str, bytes, str]) -> None:
    path, r, tables = zoo
    _, raw, why = case
    q = {row["line"]: row for row in rows(tables, "quarantine")}[lineno]
    assert why in q["reason"]
    assert q["batch_id"] == r.batch_id
    assert q["source_file"] == str(path)
    assert q["target"] == "prompts"
    assert q["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    expected_raw = raw.decode("utf-8", errors="backslashreplace")
    if len(raw) <= 4096:
        assert q["raw"] == expected_raw  # the line itself, bad bytes escaped
    else:  # a huge line keeps its head only
        assert expected_raw.startswith(q["raw"]) and 100 <= len(q["raw"]) <= 4096


def test_zoo_neighbours_of_bad_lines_land(zoo: tuple[Path, IngestResult, Tables]) -> None:
    _, _, tables = zoo
    prompts = {r["prompt"] for r in rows(tables, "prompts")}
    assert prompts == {"good one", "before bad bytes", "after bad bytes", "q?"}
    quarantine = {r["raw"] for r in rows(tables, "quarantine")}
    assert '{"prompt": "caf\\xe9 \\xff"}' in quarantine


# ---------------------------------------------------------------- accepted rows: what is stored
def test_prompt_and_chat_are_stored_as_chats_with_their_fields(spark: SparkSession, tables: Tables,
                                                               tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [
        jl({"prompt": "  Hello there  ", "id": "c-1", "metadata": {"k": 1}, "app": "web",
            "received_at": "2024-01-02T03:04:05+02:00"}),
        jl({"task": "math", "messages": [{"role": "system", "content": "Answer with a number."},
                                         {"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "4"},
                                         {"role": "user", "content": " and 3+3? "}],
            "received_at": "2024-05-06T07:08:09"}),
        jl({"prompt": "null optionals", "task": None, "id": None, "metadata": None, "received_at": None}),
        jl({"prompt": "zulu", "received_at": "2024-03-04T05:06:07.250Z"}),
    ])
    before = datetime.now(UTC)
    r = run(spark, tables, [path], source="serving-log")
    after = datetime.now(UTC)
    assert r.accepted == 4
    got = by_text(tables)
    hello = got[("default", "Hello there")]
    assert hello["messages"] == [{"role": "user", "content": "Hello there"}]
    assert hello["client_id"] == "c-1"
    assert json.loads(hello["metadata"]) == {"k": 1, "app": "web"}  # unknown top-level fields kept
    assert hello["source"] == "serving-log" and hello["source_file"] == str(path)
    assert hello["batch_id"] == r.batch_id
    assert hello["prompt_id"] == prompt_id("default", hello["messages"])
    chat = got[("math", "and 3+3?")]
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "user"]
    assert chat["messages"][-1]["content"] == "and 3+3?"
    assert chat["client_id"] is None and json.loads(chat["metadata"]) == {}
    epochs = {row["prompt"]: row["t"] for row in tables.read("prompts").selectExpr(
        "prompt", "unix_timestamp(received_at) AS t", ).collect()}
    assert epochs["Hello there"] == int(datetime(2024, 1, 2, 1, 4, 5, tzinfo=UTC).timestamp())
    assert epochs["and 3+3?"] == int(datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC).timestamp())  # naive = UTC
    assert epochs["zulu"] == int(datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())
    # no received_at: the ingest time
    assert int(before.timestamp()) <= epochs["null optionals"] <= int(after.timestamp()) + 1
    assert got[("default", "null optionals")]["client_id"] is None


def test_task_comes_from_row_then_argument_then_config(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [jl({"prompt": "a"}), jl({"prompt": "b", "task": "own"})])
    run(spark, tables, [path], IngestConfig(default_task="cfg-default"))
    run(spark, tables, [path], task="support")
    assert set(by_text(tables)) == {("cfg-default", "a"), ("own", "b"), ("support", "a")}


def test_prompt_id_is_stable() -> None:
    # Pinned: a changed hash would make every earlier prompt look new and double the prompt log.
    assert prompt_id("default", [{"role": "user", "content": "hi"}]) == "93662598e9d3c4d1538bbd1744718dc4"
    assert prompt_id("other", [{"role": "user", "content": "hi"}]) != prompt_id(
        "default", [{"role": "user", "content": "hi"}])
    assert prompt_id("default", [{"role": "system", "content": "hi"}, {"role": "user", "content": "x"}]) != (
        prompt_id("default", [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]))


@pytest.mark.parametrize("extra_chars", [0, 1])
def test_max_prompt_chars_is_inclusive(spark: SparkSession, tables: Tables, tmp_path: Path, extra_chars: int) -> None:
    cfg = IngestConfig(max_prompt_chars=10)
    n = 10 + extra_chars
    path = write(tmp_path / "l.jsonl", [
        jl({"prompt": "a" * n}),
        jl({"prompt": "  " + "b" * n + "\n"}),  # surrounding whitespace is stripped before counting
        jl({"messages": [{"role": "system", "content": "s" * 5}, {"role": "user", "content": "u" * (n - 5)}]}),
        jl({"prompt": "é" * n}),  # characters, not bytes
    ])
    r = run(spark, tables, [path], cfg)
    assert (r.accepted, r.quarantined) == ((4, 0) if extra_chars == 0 else (0, 4))
    if extra_chars:
        assert all(q["reason"].startswith("text too long: 11 > ingest.max_prompt_chars=10")
                   for q in rows(tables, "quarantine"))


def test_bom_crlf_and_blank_lines(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\r\n\r\n   \r\n{"prompt": "second"}\r\n{oops}\r\n\n')
    r = run(spark, tables, [path])
    assert (r.offered, r.accepted, r.quarantined) == (3, 2, 1)
    assert {row["prompt"] for row in rows(tables, "prompts")} == {"first", "second"}
    (q,) = rows(tables, "quarantine")
    assert (q["line"], q["raw"]) == (5, "{oops}")  # blank lines still count, the CR is gone


def test_gzip_jsonl(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "zipped"}\n{"prompt": "also zipped", "task": "z"}\nnope\n'))
    r = run(spark, tables, [path])
    assert (r.accepted, r.quarantined) == (2, 1)
    assert set(by_text(tables)) == {("default", "zipped"), ("z", "also zipped")}


def test_csv(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "prompt,task,id,lang\n"
        "plain,,r1,en\n"
        '"with, comma",math,,de\n'
        '"two\nlines",,r3,\n'
        ",,r4,en\n",
        encoding="utf-8-sig",
    )
    path.write_bytes(path.read_bytes() + b"caf\xe9,,r5,fr\nlast,,r6,\n")
    r = run(spark, tables, [path], task="csv-task")
    assert (r.offered, r.accepted, r.quarantined) == (6, 4, 2)
    got = by_text(tables)
    assert got[("csv-task", "plain")]["client_id"] == "r1"
    assert json.loads(got[("csv-task", "plain")]["metadata"]) == {"lang": "en"}
    assert json.loads(got[("math", "with, comma")]["metadata"]) == {"lang": "de"}
    assert got[("csv-task", "two\nlines")]["messages"] == [{"role": "user", "content": "two\nlines"}]
    assert ("csv-task", "last") in got  # the row after the bad bytes lands
    q = {row["line"]: row for row in rows(tables, "quarantine")}
    assert set(q) == {6, 7}
    assert "empty text" in q[6]["reason"] and "r4" in q[6]["raw"]
    assert q[7]["reason"] == "invalid UTF-8" and "caf\\xe9" in q[7]["raw"]


def test_csv_without_prompt_column_is_refused(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("text,task\nhello,a\n")
    with pytest.raises(UserError, match="prompt"):
        ingest(spark, tables, [path], IngestConfig())


def test_parquet(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({
        "prompt": ["from parquet", None, "third"],
        "task": ["pq", "pq", None],
        "id": ["p1", "p2", None],
        "score": [0.5, 1.0, None],
        "received_at": [datetime(2024, 1, 2, 3, 4, 5), None, None],
    }), path)
    r = run(spark, tables, [path])
    assert (r.offered, r.accepted, r.quarantined) == (3, 2, 1)
    got = by_text(tables)
    assert got[("pq", "from parquet")]["client_id"] == "p1"
    assert json.loads(got[("pq", "from parquet")]["metadata"]) == {"score": 0.5}
    assert ("default", "third") in got
    (t,) = tables.read("prompts").where("prompt = 'from parquet'").selectExpr("unix_timestamp(received_at)").first()
    assert t == int(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())
    (q,) = rows(tables, "quarantine")
    assert q["line"] == 2 and "missing field" in q["reason"]


def test_unsupported_file_type(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match="unsupported file type"):
        ingest(spark, tables, [path], IngestConfig())


# ---------------------------------------------------------------- dedup and idempotence
def test_rerun_inserts_nothing_and_does_not_double_quarantine(spark: SparkSession, tables: Tables,
                                                              tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", [jl({"prompt": f"q{i}"}) for i in range(5)] + [b"bad", jl({"prompt": ""})])
    first = run(spark, tables, [path])
    assert (first.accepted, first.duplicates, first.quarantined) == (5, 0, 2)
    second = run(spark, tables, [path])
    assert (second.offered, second.accepted, second.duplicates, second.quarantined) == (7, 0, 5, 2)
    assert second.batch_id != first.batch_id
    assert len(rows(tables, "prompts")) == 5
    assert len(rows(tables, "quarantine")) == 2
    assert {r["batch_id"] for r in rows(tables, "prompts")} == {first.batch_id}


def test_dedup_strip_nfc_per_task_across_batches_and_files(spark: SparkSession, tables: Tables,
                                                           tmp_path: Path) -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed
    a = write(tmp_path / "a.jsonl", [
        jl({"prompt": composed}),
        jl({"prompt": f"  {decomposed}\n"}),  # same after NFC + strip: duplicate in this batch
        jl({"messages": [{"role": "user", "content": composed}]}),  # the same chat, spelled as messages
        jl({"prompt": composed, "task": "other"}),  # same text, another task: another prompt
        jl({"prompt": composed.upper()}),  # case is content: another prompt
    ])
    b = write(tmp_path / "b.jsonl", [jl({"prompt": decomposed}), jl({"prompt": "new in b"})])
    r1 = run(spark, tables, [a, b])
    assert (r1.offered, r1.accepted, r1.duplicates) == (7, 4, 3)
    c = write(tmp_path / "c.jsonl", [jl({"prompt": composed + " "}), jl({"prompt": "new in c"}),
                                     jl({"prompt": "new in c", "task": "other"})])
    r2 = run(spark, tables, [c])
    assert (r2.offered, r2.accepted, r2.duplicates) == (3, 2, 1)
    got = by_text(tables)
    assert set(got) == {("default", composed), ("other", composed), ("default", composed.upper()),
                        ("default", "new in b"), ("default", "new in c"), ("other", "new in c")}
    assert got[("default", composed)]["batch_id"] == r1.batch_id  # the first copy wins
    assert len({r["prompt_id"] for r in got.values()}) == 6


def test_sql_injection_text_is_stored_verbatim(spark: SparkSession, tables: Tables, tmp_path: Path) -> None:
    evil = "'; DROP TABLE prompts; --"
    path = write(tmp_path / "e.jsonl", [jl({"prompt": evil, "task": "x'); DELETE FROM prompts; --",
                                            "id": "\"`]}"}), jl({"prompt": "other"})])
    assert run(spark, tables, [path]).accepted == 2
    got = by_text(tables)
    assert got[("x'); DELETE FROM prompts; --", evil)]["client_id"] == "\"`]}"
    assert len(got) == 2


def test_two_cli_processes_at_once_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    two_ingesters_at_once(tmp_path, [])


def two_ingesters_at_once(tmp_path: Path, overrides: list[str], timeout_s: int = 120, n: int = 2500) -> list[str]:
    """Two ``tao ingest`` processes on one lakehouse at once, committing small chunks so their commits interleave:
    every row once, and at least one commit conflict met and retried (else the test proved nothing). ``n`` rows
    each, half of them the other's too."""
    overrides = [*overrides, "ingest.chunk_rows=40", "ingest.commit_retries=20"]
    a = write(tmp_path / "a.jsonl", [jl({"prompt": f"prompt {i}"}) for i in range(0, n)])
    b = write(tmp_path / "b.jsonl", [jl({"prompt": f"prompt {i}"}) for i in range(n // 2, n + n // 2)])
    shared = write(tmp_path / "shared.jsonl", [jl({"prompt": f"shared {i}"}) for i in range(300)]
                   + [b"not json", jl({"prompt": ""})])
    env = {**os.environ, "TAO_HOME": str(tmp_path / "home"), "TAO_CONFIG": str(ROOT / "conf" / "local.yaml")}
    procs = [subprocess.Popen([sys.executable, "-m", "tao_spark.cli", "ingest", str(f), str(shared), "--json",
                               *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for f in (a, b)]
    outs = [p.communicate(timeout=timeout_s) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out) for out, _ in outs]
    union = n + n // 2 + 300
    assert sum(r["accepted"] for r in results) == union
    for r in results:
        assert r["offered"] == n + 302 == r["accepted"] + r["duplicates"] + r["quarantined"]
        assert r["quarantined"] == 2

    from deltalake import DeltaTable

    prompts = DeltaTable(str(tmp_path / "home" / "lakehouse" / "prompts")).to_pyarrow_table().to_pylist()
    assert len(prompts) == union
    assert len({r["prompt_id"] for r in prompts}) == union
    assert {r["prompt"] for r in prompts} == {f"prompt {i}" for i in range(n + n // 2)} | {
        f"shared {i}" for i in range(300)}
    quarantine = DeltaTable(str(tmp_path / "home" / "lakehouse" / "quarantine")).to_pyarrow_table().to_pylist()
    assert sorted(q["line"] for q in quarantine) == [301, 302]
    errs = [err for _, err in outs]
    conflicts = sum(e.count("commit conflict") for e in errs)
    print(f"commit conflicts retried: {conflicts}", file=sys.stderr)
    assert conflicts >= 1, "the two writers never conflicted: the concurrent path was not exercised"
    return errs


# ---------------------------------------------------------------- chunks: bounded memory, exact counts, a crash
def _mixed_file(path: Path, n: int) -> Path:
    """``n`` lines: every 10th repeats the prompt 17 lines up (a chunk or more back), every 13th is broken."""
    def record(i: int) -> bytes:
        return jl({"prompt": f"prompt {i}", "task": f"t{i % 3}" if i % 4 else None})

    lines = []
    for i in range(n):
        if i % 13 == 12:
            lines.append(b'{"prompt": "broken')
        elif i % 10 == 9 and (i - 17) % 13 != 12 and i >= 17:
            lines.append(record(i - 17))
        else:
            lines.append(record(i))
    return write(path, lines)


def _state(tables: Tables) -> tuple[list[tuple[str, str, str]], list[tuple[str, int, str]]]:
    prompts = sorted((r["prompt_id"], r["task"], r["prompt"]) for r in rows(tables, "prompts"))
    quarantine = sorted((r["source_sha256"], r["line"], r["reason"]) for r in rows(tables, "quarantine"))
    return prompts, quarantine


def test_chunks_give_the_counts_and_rows_of_one_pass(spark: SparkSession, tmp_path: Path) -> None:
    path = _mixed_file(tmp_path / "mixed.jsonl", 200)
    whole = Tables(spark, str(tmp_path / "whole"))
    chunked = Tables(spark, str(tmp_path / "chunked"))
    a = run(spark, whole, [path])
    b = run(spark, chunked, [path], IngestConfig(chunk_rows=7))
    assert (a.offered, a.accepted, a.duplicates, a.quarantined) == (b.offered, b.accepted, b.duplicates, b.quarantined)
    assert a.duplicates > 0 and a.quarantined > 0
    assert _state(whole) == _state(chunked)
    # One batch however many chunks: every row of the run carries its batch_id.
    assert {r["batch_id"] for r in rows(chunked, "prompts")} == {b.batch_id}
    assert chunked.snapshot("prompts") > whole.snapshot("prompts")  # one commit per chunk


def test_a_batch_cut_between_chunks_then_rerun_ends_as_one_whole_run(spark: SparkSession, tmp_path: Path) -> None:
    """The process dies after some chunks committed (simulated by the source failing mid-file; the fault suite
    does it with SIGKILL): re-running the same file inserts exactly the rest and doubles no quarantine row."""
    from tao_spark import ingest as ing

    path = _mixed_file(tmp_path / "mixed.jsonl", 200)
    reference = Tables(spark, str(tmp_path / "reference"))
    ref = run(spark, reference, [path])

    cut = Tables(spark, str(tmp_path / "cut"))
    cfg = IngestConfig(chunk_rows=20)

    def dies_at_line_90(paths: list[Path], c: IngestConfig, records: Any) -> Any:
        for name, sha, recs in ing.files(paths, c, records):
            def until(recs: Any = recs) -> Any:
                for item in recs:
                    if item[0] == 90:
                        raise KeyboardInterrupt
                    yield item
            yield name, sha, until()

    with pytest.raises(KeyboardInterrupt):
        ing.append(spark, cut, dies_at_line_90([path], cfg, ing.iter_records), cfg, target="prompts",
                   key="prompt_id", build=ing.build_row, task=None, source="file")
    partial = cut.read("prompts").count()
    assert 0 < partial < ref.accepted
    again = run(spark, cut, [path], cfg)
    assert again.accepted == ref.accepted - partial
    assert again.offered == ref.offered and again.quarantined == ref.quarantined
    assert _state(cut) == _state(reference)


def test_an_overlong_line_is_skipped_without_reading_it_whole(spark: SparkSession, tables: Tables,
                                                              tmp_path: Path) -> None:
    cfg = IngestConfig(max_line_bytes=1024)
    big = jl({"prompt": "x" * 5000})
    path = write(tmp_path / "big.jsonl", [jl({"prompt": "before"}), big, jl({"prompt": "after"})], end=b"\r\n")
    r = run(spark, tables, [path], cfg)
    assert (r.accepted, r.quarantined) == (2, 1)
    [q] = rows(tables, "quarantine")
    assert q["line"] == 2 and q["reason"] == f"line too long: {len(big)} bytes > ingest.max_line_bytes=1024"
    assert q["raw"].startswith('{"prompt": "xxx') and len(q["raw"]) <= 1026
    assert {p["prompt"] for p in rows(tables, "prompts")} == {"before", "after"}
