"""A command run in a state it cannot work in says what is missing and what fixes it, in one line, and exits 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tao_spark.config import SparkConfig, default_config_path, load_config
from tao_spark.rounds import Round, save
from tao_spark.session import get_spark
from tao_spark.tables import Tables


def _tao(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TAO_HOME": str(home), "TAO_API_KEYS": "k"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "tao_spark.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize(("args", "expected"), [
    (["round"], "tao round: no prompts yet: run `tao ingest FILE` (or `tao ingest --table NAME`) first"),
    (["train-reward"], "run `tao ingest-preferences FILE (the bundled set: tao_spark/data/preferences.jsonl)` first"),
    (["generate", "--round", "r-nope"], "table 'rounds' does not exist yet"),
    (["ingest", "--table", "/nowhere/x_payload"], "tao ingest: /nowhere/x_payload: no Delta table there"),
    # Checked against TRL's own config class before anything runs (before the missing prompts, too).
    (["round", "train.trl.lerning_rate=0.1"],
     "tao round: train.trl.lerning_rate: not an option of TRL's DPOConfig (did you mean train.trl.learning_rate?)"),
    (["train-reward", "reward_model.trl.beta=0.1"], "tao train-reward: reward_model.trl.beta: not an option of TRL's "
                                                    "RewardConfig"),
    (["history", "nosuch"], "tao history: unknown table 'nosuch' (known: prompts, quarantine,"),
    (["generate"], "tao generate: no prompts yet: run `tao ingest FILE`"),
], ids=["round-without-prompts", "train-reward-without-pairs", "stage-without-rounds", "missing-inference-table",
        "misspelt-trl-option", "trl-option-of-another-trainer", "unknown-table", "first-stage-without-prompts"])
def test_a_fresh_home_gets_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    r = _tao(tmp_path / "home", *args)
    assert r.returncode == 2, r.stderr[-3000:]
    assert expected in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def test_an_unknown_round_id_and_debug(tmp_path: Path) -> None:
    from tao_spark.data import SAMPLE_PROMPTS

    home = tmp_path / "home"
    assert _tao(home, "ingest", str(SAMPLE_PROMPTS)).returncode == 0
    # A rounds table with another round in it: the id itself is unknown.
    cfg = load_config(default_config_path(), [f"home={home}"])
    tables = Tables(get_spark(SparkConfig(shuffle_partitions=2)), cfg.lakehouse)
    save(tables, Round("r-other", "started", 1, "m", "m", datetime.now(UTC)), cfg)
    r = _tao(home, "score", "--round", "r-nope")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "tao score: no round 'r-nope' in rounds: `tao status` lists the rounds")
    # --debug keeps the traceback for whoever needs it.
    d = _tao(home, "--debug", "score", "--round", "r-nope")
    assert d.returncode != 0 and "Traceback" in d.stderr and "RoundNotFound" in d.stderr


def test_a_port_in_use_is_one_line_before_any_model_loads(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _tao(tmp_path / "home", "serve", "--port", str(port), "serve.capture=false", "serve.host=127.0.0.1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"tao serve: port {port} on 127.0.0.1 is in use")
    assert "Traceback" not in r.stderr


def test_ingest_of_files_that_are_not_what_they_say_is_one_line(tmp_path: Path) -> None:
    """Binary files, a corrupt gzip stream, random bytes named .parquet, a directory, a FIFO: one line, exit 2, or
    quarantine rows with a reason; never a traceback."""
    import gzip
    import random

    rng = random.Random(7)
    good = gzip.compress(b'{"prompt": "hello"}\n' * 2000)
    cases = {
        "random.parquet": bytes(rng.getrandbits(8) for _ in range(3000)),
        "corrupt.jsonl.gz": good[: len(good) // 2],
        "notgzip.jsonl.gz": b"plain text, not gzip\n",
        "ls": Path(sys.executable).read_bytes()[:20000],
        "header.csv": b"\xff\xfe\x00bad,header\n1,2\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "fifo.jsonl")
    expected = {"random.parquet": "cannot be read", "corrupt.jsonl.gz": "cannot be read",
                "notgzip.jsonl.gz": "cannot be read", "ls": "unsupported file type", "header.csv": "prompt",
                "adir": "is a directory", "fifo.jsonl": "not a regular file", "missing.jsonl": "no such file"}
    for name, words in expected.items():
        r = _tao(tmp_path / "home", "ingest", str(tmp_path / name))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert words in r.stderr.strip().splitlines()[-1], (name, r.stderr[-500:])
    # A binary file named .jsonl is read line by line: every line quarantined with its reason, nothing lost.
    (tmp_path / "binary.jsonl").write_bytes(Path(sys.executable).read_bytes()[:20000])
    r = _tao(tmp_path / "home", "ingest", str(tmp_path / "binary.jsonl"), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    import json

    counts = json.loads(r.stdout.strip().splitlines()[-1])
    assert counts["offered"] == counts["quarantined"] > 0 and counts["accepted"] == 0


def test_a_custom_reward_that_cannot_load_or_raises_is_one_line(tmp_path: Path) -> None:
    """A reward the driver cannot import is refused before any Spark task; one that raises on the executors is the
    exception it raised, one line, not the worker's traceback."""
    home = tmp_path / "home"
    assert _tao(home, "ingest", str(Path(__file__).parents[1] / "tao_spark" / "data" / "prompts.jsonl")).returncode == 0
    missing = _tao(home, "coverage", "score.rewards=[{name: mine, fn: 'nowhere_mod:score'}]")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == ("tao coverage: score.rewards: reward 'mine': cannot load 'nowhere_mod:score': "
                                      "No module named 'nowhere_mod'")
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, answers):\n    raise ValueError('cannot read answer 3')\n")
    env = {**os.environ, "TAO_HOME": str(home), "PYTHONPATH": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    raised = subprocess.run([sys.executable, "-m", "tao_spark.cli", "coverage",
                             "score.rewards=[{name: mine, fn: 'my_rewards:score'}]"], env=env, capture_output=True,
                            text=True, timeout=180)
    assert raised.returncode == 1 and "Traceback" not in raised.stderr, raised.stderr
    assert raised.stderr.strip().splitlines()[-1] == (
        "tao coverage: a Python function on the executors failed: ValueError: cannot read answer 3 "
        "(--debug for the traceback)")


def test_an_executor_that_cannot_import_a_reward_names_the_fix() -> None:
    from tao_spark.cli import executor_error

    # The shape of a classic / Connect PythonException's message when a worker cannot import the reward's module.
    message = ("\n  An exception was thrown from the Python worker. Please see the stack trace below.\n"
               "Traceback (most recent call last):\n  File \"/x/rewards/__init__.py\", line 71, in load_reward\n"
               "ModuleNotFoundError: No module named 'acme_rewards'\n\nThe above exception was the direct cause of the "
               "following exception:\n\nTraceback (most recent call last):\n  File \"/x/coverage.py\", line 42\n"
               "ValueError: reward 'acme': cannot load 'acme_rewards:f': No module named 'acme_rewards'\n")
    line = executor_error(message)
    assert line.startswith("a Python function on the executors failed: ValueError: reward 'acme': cannot load")
    assert "PYTHONPATH" in line and "\n" not in line
    assert executor_error("java.lang.OutOfMemoryError somewhere") == "a Python function on the executors failed"


def test_a_later_stage_alone_does_not_open_a_round(tmp_path: Path) -> None:
    """Only the first stage starts a round: `tao evaluate` with none open says what to run and writes nothing."""
    home = tmp_path / "home"
    assert _tao(home, "ingest", str(Path(__file__).parents[1] / "tao_spark" / "data" / "prompts.jsonl")).returncode == 0
    r = _tao(home, "evaluate")
    assert r.returncode == 2 and r.stderr.strip() == ("tao evaluate: no unfinished round: `tao round` runs one whole, "
                                                      "`tao generate` starts one to run stage by stage")
    assert not (home / "lakehouse" / "rounds").exists()
