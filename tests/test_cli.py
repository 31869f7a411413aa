"""The ``tao`` command, run as a real subprocess against a temporary ``TAO_HOME``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TAO = [str(Path(sys.executable).parent / "tao")] if (Path(sys.executable).parent / "tao").exists() else [
    sys.executable, "-m", "tao_spark.cli"]
RESULT_KEYS = ["batch_id", "offered", "accepted", "duplicates", "quarantined", "prompts_version"]


def tao(home: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TAO_HOME": str(home)}
    env.pop("TAO_CONFIG", None)  # the checkout's conf/local.yaml
    p = subprocess.run([*TAO, *args], capture_output=True, text=True, env=env, timeout=120, cwd=home.parent)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def lines(path: Path, objs: list[object]) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lakehouse with two ingest batches: 3 + 1 prompts, one duplicate, one quarantined line."""
    d = tmp_path_factory.mktemp("cli")
    first = lines(d / "first.jsonl", [{"prompt": "alpha"}, {"prompt": "beta", "task": "math"},
                                      {"prompt": "gamma", "lang": "en"}])
    (d / "first.jsonl").write_text(first.read_text() + "{broken\n")
    lines(d / "second.jsonl", [{"prompt": "alpha"}, {"prompt": "delta"}])
    tao(d / "home", "ingest", str(first), "--json")
    tao(d / "home", "ingest", str(d / "second.jsonl"), "--json")
    return d / "home"


def test_ingest_json_prints_exactly_one_object(tmp_path: Path) -> None:
    f = lines(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "one "}, {"prompt": ""}, {"prompt": "two"}])
    p = tao(tmp_path / "home", "ingest", str(f), "--json")
    out = p.stdout.strip().splitlines()
    assert len(out) == 1
    r = json.loads(out[0])
    assert list(r) == RESULT_KEYS
    assert {k: r[k] for k in RESULT_KEYS[1:]} == {"offered": 4, "accepted": 2, "duplicates": 1, "quarantined": 1,
                                                  "prompts_version": 1}
    assert len(r["batch_id"]) == 32
    assert "4 offered, 2 accepted, 1 duplicates, 1 quarantined" in p.stderr  # the human line goes to stderr

    again = json.loads(tao(tmp_path / "home", "ingest", str(f), "--json", "--task", "other").stdout)
    assert (again["accepted"], again["duplicates"], again["quarantined"]) == (2, 1, 1)  # --task: new prompts


def test_ingest_human_output_and_override(tmp_path: Path) -> None:
    f = lines(tmp_path / "long.jsonl", [{"prompt": "x" * 8000}, {"prompt": "y" * 8001}])
    p = tao(tmp_path / "home", "ingest", str(f), "ingest.max_prompt_chars=8000")
    assert "2 offered, 1 accepted, 0 duplicates, 1 quarantined" in p.stdout
    assert "text too long" in p.stdout
    q = json.loads(tao(tmp_path / "home", "sql", "SELECT line, reason FROM quarantine", "--json").stdout)
    assert q == [{"line": 2, "reason": "text too long: 8001 > ingest.max_prompt_chars=8000"}]


def test_progress_lines_go_to_stderr_and_quiet_keeps_warnings_only(tmp_path: Path) -> None:
    f = lines(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    loud = tao(tmp_path / "home", "ingest", str(f))
    assert "tao: ingest prompts: 2 offered, 2 accepted" in loud.stderr  # progress: the "tao" logger, on stderr
    assert "tao: ingest" not in loud.stdout
    again = tao(tmp_path / "home", "-q", "ingest", str(f))
    assert "tao: ingest" not in again.stderr and "2 offered, 0 accepted, 2 duplicates" in again.stdout
    again = tao(tmp_path / "home", "ingest", str(f), "--quiet")  # after the subcommand too
    assert "tao: ingest" not in again.stderr


def test_sql_json_is_an_array_of_row_objects(home: Path) -> None:
    p = tao(home, "sql", "SELECT p.task, count(*) AS n FROM prompts p WHERE p.task = 'default' "
            "GROUP BY p.task", "--json")
    assert json.loads(p.stdout) == [{"task": "default", "n": 3}]
    rows = json.loads(tao(home, "sql", "SELECT prompt, messages, metadata, received_at FROM prompts "
                          "ORDER BY prompt", "--json").stdout)
    assert [r["prompt"] for r in rows] == ["alpha", "beta", "delta", "gamma"]
    assert rows[0]["messages"] == [{"role": "user", "content": "alpha"}]
    assert json.loads(rows[3]["metadata"]) == {"lang": "en"}
    assert rows[0]["received_at"][:2] == "20"  # ISO-8601 string
    assert json.loads(tao(home, "sql", "SELECT * FROM prompts WHERE false", "--json").stdout) == []


def test_sql_table_output(home: Path) -> None:
    out = tao(home, "sql", "SELECT task, count(*) AS n FROM prompts GROUP BY task ORDER BY task").stdout.splitlines()
    assert out[0].split() == ["task", "n"]
    assert [line.split() for line in out[2:]] == [["default", "3"], ["math", "1"]]


@pytest.mark.parametrize("query", [
    "DELETE FROM prompts", "UPDATE prompts SET task = 'x'", "INSERT OVERWRITE DIRECTORY '/tmp/tao-x' SELECT 1",
    "SELECT * FROM parquet.`/etc`", "SELECT 1; DROP TABLE prompts", "SELEC 1",
])
def test_sql_is_read_only_unless_asked(home: Path, query: str) -> None:
    p = tao(home, "sql", query, ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "refused" in p.stderr and "--write" in p.stderr
    assert tao(home, "sql", "SELECT count(*) AS n FROM prompts", "--json").stdout.strip() == '[{"n": 4}]'


def test_sql_errors_are_one_line_and_debug_shows_the_traceback(home: Path) -> None:
    p = tao(home, "sql", "SELECT nope FROM prompts", ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "nope" in p.stderr
    p = tao(home, "sql", "SELEC 1", "--write", ok=False)  # past the guard: Spark's own parse error, one line
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = tao(home, "sql", "SELECT nope FROM prompts", "--debug", ok=False)
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.parametrize("args", [["coverage"], ["ab", "report"], ["ab", "pairs"], ["history", "prompts"],
                                  ["sql", "SELECT 1 AS one"]])
def test_every_json_command_prints_json_alone(home: Path, args: list[str]) -> None:
    p = tao(home, *args, "--json")
    json.loads(p.stdout)  # the whole of stdout, not its last line


def test_json_mode_gives_stdout_back_when_main_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """A job may call main() in-process: after a --json command, file descriptor 1 is the real stdout again."""
    from tao_spark.cli import main

    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    assert main(["sql", "SELECT 1 AS one", "--json"]) == 0
    os.write(1, b"after\n")
    out, _ = capfd.readouterr()
    assert out.splitlines() == ['[{"one": 1}]', "after"]


def test_tables_lists_rows_and_versions(home: Path) -> None:
    out = tao(home, "tables").stdout
    got = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[2:]}
    assert got == {"prompts": ["4", "2"], "quarantine": ["1", "1"]}
    assert str(home / "lakehouse" / "prompts") in out


def test_tables_on_an_empty_home(tmp_path: Path) -> None:
    assert "no tables yet" in tao(tmp_path / "home", "tables").stdout


def test_history_shows_create_and_merges(home: Path) -> None:
    out = tao(home, "history", "prompts").stdout.splitlines()
    ops = {line.split()[0]: line.split()[2] for line in out[2:]}
    assert ops == {"0": "CREATE", "1": "MERGE", "2": "MERGE"}
    hist = json.loads(tao(home, "history", "prompts", "--json").stdout)
    assert sorted((h["version"], h["operation"]) for h in hist) == [(0, "CREATE TABLE"), (1, "MERGE"), (2, "MERGE")]


def test_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    p = tao(tmp_path / "home", "ingest", str(tmp_path / "nope.jsonl"), ok=False)
    assert p.returncode == 2 and "no such file" in p.stderr
    f = lines(tmp_path / "p.jsonl", [{"prompt": "x"}])
    p = tao(tmp_path / "home", "ingest", str(f), "generate.nn=3", ok=False)
    assert p.returncode == 2 and "config error: generate.nn:" in p.stderr
    p = tao(tmp_path / "home", "ingest", str(f), "ingest.max_prompt_chars=0", ok=False)
    assert p.returncode == 2 and "ingest.max_prompt_chars" in p.stderr
    p = tao(tmp_path / "home", "--config", str(tmp_path / "missing.yaml"), "tables", ok=False)
    assert p.returncode == 2 and "missing.yaml" in p.stderr
    assert not (tmp_path / "home" / "lakehouse" / "prompts").exists()  # nothing ran


def test_config_file_flag(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text(f"lakehouse: {tmp_path / 'elsewhere'}\ningest:\n  default_task: from-file\n")
    f = lines(tmp_path / "p.jsonl", [{"prompt": "x"}])
    tao(tmp_path / "home", "ingest", str(f), "--config", str(conf))
    assert (tmp_path / "elsewhere" / "prompts").exists()
    rows = json.loads(tao(tmp_path / "home", "--config", str(conf), "sql", "SELECT task FROM prompts", "--json").stdout)
    assert rows == [{"task": "from-file"}]
