"""The fault suite: real `tao` processes SIGKILLed (by PID, their whole process group) at points drawn from a seeded
RNG, re-run, and compared with a run that was never killed.

    make test-faults                       # TAO_FAULT_SEED=7 make test-faults draws other points

After every scenario: exact rows against the unkilled reference, no duplicate key in any table, the ``rounds`` rows
consistent with MLflow (one run per round, one model version per round, aliases as the gate decided), no
orphaned lock, no pickle among the logged artifacts. The points exercised print at the end of the run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tao_spark.tables import KEYS

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("TAO_FAULT_SEED", "20261201"))
EXERCISED: list[str] = []  # "scenario: where the kill landed", reported by the last test


class Child:
    """A `tao` command in its own process group; its output (stderr, and stdout, where TorchDistributor relays its
    workers) drained by a thread so it never blocks."""

    def __init__(self, args: list[str], home: Path) -> None:
        env = {**os.environ, "TAO_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "tao_spark.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.cursor = 0

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, patterns: list[str], timeout: float = 600) -> str | None:
        """The first of ``patterns`` (regexes) on a line after the cursor; None when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while self.cursor < len(self.lines):
                line = self.lines[self.cursor]
                self.cursor += 1
                for p in patterns:
                    if re.search(p, line):
                        return p
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                if self.cursor >= len(self.lines):
                    return None
                continue
            time.sleep(0.02)
        raise AssertionError(f"none of {patterns} within {timeout} s:\n" + "\n".join(self.lines[-30:]))

    def stage(self) -> str:
        """Where the process is: the last stage started and not yet done, or the step after the last one done."""
        where = "start-up"
        for line in self.lines:
            if m := re.match(r"tao: (\w+): started", line):
                where = m.group(1)
            elif m := re.match(r"tao: (\w+): done in", line):
                where = f"after {m.group(1)}"
            elif m := re.match(r"tao: ingest \w+: chunk (\d+) committed", line):
                where = f"ingest after chunk {m.group(1)}"
        return where

    def kill(self) -> bool:
        """SIGKILL the whole group (the driver, torchrun and its workers); False if it had already exited."""
        if self.proc.poll() is not None:
            return False
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        return True

    def finish(self, timeout: float = 900) -> None:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        assert rc == 0, "\n".join(self.lines[-40:])


def run(args: list[str], home: Path) -> Child:
    child = Child(args, home)
    child.finish()
    return child


# --- state of a home, from the files (deltalake and MLflow's store, no Spark in this process) ---------------------

def rows(home: Path, table: str) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    path = str(home / "lakehouse" / table)
    return DeltaTable(path).to_pyarrow_table().to_pylist() if DeltaTable.is_deltatable(path) else []


def assert_no_duplicate_keys(home: Path) -> None:
    for table, key in KEYS.items():
        keys = [tuple(r[k] for k in key) for r in rows(home, table)]
        assert len(keys) == len(set(keys)), f"{table}: duplicate keys"


def lakehouse_state(home: Path) -> dict[str, Any]:
    """What must equal the unkilled run's: every row, round ids aside (they differ between runs)."""
    order = {r["round_id"]: i for i, r in enumerate(sorted(rows(home, "rounds"), key=lambda r: r["started_at"]))}

    def rid(r: dict[str, Any]) -> int:
        return order[r["round_id"]]

    train = [r for r in rows(home, "candidates") if r["purpose"] == "train"]
    return {
        "prompts": sorted(r["prompt_id"] for r in rows(home, "prompts")),
        "quarantine": sorted((r["source_sha256"], r["line"], r["reason"]) for r in rows(home, "quarantine")),
        "candidates": sorted((rid(r), r["prompt_id"], r["candidate_idx"], r["completion"]) for r in train),
        "eval_candidates": sorted((rid(r), r["purpose"], r["prompt_id"], r["candidate_idx"])
                                  for r in rows(home, "candidates") if r["purpose"] != "train"),
        "scores": sorted((rid(r), r["prompt_id"], r["candidate_idx"], r["reward_name"],
                          None if r["value"] is None else round(r["value"], 6))
                         for r in rows(home, "scores") if r["purpose"] == "train"),
        "preferences": sorted((rid(r), r["prompt_id"], r["chosen"], r["rejected"]) for r in rows(home, "preferences")),
        "evaluations": sorted((rid(r), r["prompt_id"]) for r in rows(home, "evaluations")),
        "rounds": [(r["status"], r["n_train"], r["n_holdout"], r["prompts_version"])
                   for r in sorted(rows(home, "rounds"), key=rid)],
    }


PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"}


def assert_consistent(home: Path) -> None:
    """One MLflow run and one model version per round, matching the round's row; no lock left; no pickle."""
    from mlflow import MlflowClient

    assert_no_duplicate_keys(home)
    assert rows(home, "locks") == [], "an orphaned lock"
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id])
    by_round: dict[str, list[Any]] = {}
    for run in runs:
        by_round.setdefault(run.data.tags.get("tao.round_id", "?"), []).append(run)
    versions = client.search_model_versions("name = 'tao-policy'")
    for r in rows(home, "rounds"):
        assert r["status"] == "done" and r["finished_at"] is not None, r["round_id"]
        [run] = by_round.pop(r["round_id"])
        assert run.info.run_id == r["mlflow_run_id"] and run.info.status == "FINISHED"
        [version] = [v for v in versions if v.tags.get("tao.round_id") == r["round_id"]]
        assert str(version.version) == r["model_version"] and version.run_id == r["mlflow_run_id"]
    assert not by_round, f"MLflow runs without a round: {list(by_round)}"
    assert len(versions) == len(rows(home, "rounds"))
    for f in (home / "mlartifacts").rglob("*") if (home / "mlartifacts").exists() else []:
        if f.is_file():
            assert f.suffix not in PICKLE_SUFFIXES, f
            with f.open("rb") as fh:
                head = fh.read(2)
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f"pickle: {f}"


# --- the round: config, prompts, reference --------------------------------------------------------------------

def e_rate(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that tells a random tiny model's samples apart (the built-in checks all fail on noise)."""
    return [c.count("e") / max(1, len(c)) for c in completions]


def _setup(tmp: Path, model: Path) -> tuple[Path, list[str], Path, Path]:
    data = yaml.safe_load((ROOT / "conf" / "local.yaml").read_text())
    data["score"]["rewards"].append({"name": "e_rate", "fn": "tests.test_faults:e_rate", "weight": 1.0})
    conf = tmp / "conf.yaml"
    conf.write_text(yaml.safe_dump(data))
    overrides = [
        f"model.path={model}", "generate.n=3", "generate.max_new_tokens=24", "generate.max_prompts=10",
        "generate.batch_size=1", "generate.partitions=1", "generate.temperature=1.0", "evaluate.max_prompts=6",
        "evaluate.max_new_tokens=12", "evaluate.bootstrap=200", "select.min_margin=0.0", "train.trl.max_steps=4",
        "train.checkpoint_steps=1", "train.trl.per_device_train_batch_size=2", "train.trl.learning_rate=0.001",
        "mlflow.experiment=test", "mlflow.model_name=tao-policy", "spark.shuffle_partitions=2",
    ]
    from tao_spark.data import SAMPLE_PROMPTS

    lines = SAMPLE_PROMPTS.read_text().splitlines()
    first, second = tmp / "first.jsonl", tmp / "second.jsonl"
    first.write_text("\n".join(lines[:60]) + "\n")
    second.write_text("\n".join(lines[60:80]) + "\n")
    return conf, overrides, first, second


def _loop(conf: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(conf), "loop", "--rounds", "1", *overrides]


@pytest.fixture(scope="module")
def round_setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    """The unkilled reference: ingest, a round, more prompts, a second round. Its stage times size the kills."""
    tmp = tmp_path_factory.mktemp("faults")
    conf, overrides, first, second = _setup(tmp, tiny_model)
    home = tmp / "reference"
    run(["ingest", str(first)], home)
    times = {}
    for line in run(_loop(conf, overrides), home).lines:
        if m := re.match(r"tao: (\w+): done in ([\d.]+) s", line):
            times[m.group(1)] = float(m.group(2))
    run(["ingest", str(second)], home)
    run(_loop(conf, overrides), home)
    assert_consistent(home)
    return {"tmp": tmp, "conf": conf, "overrides": overrides, "first": first, "second": second,
            "state": lakehouse_state(home), "times": times}


def _exercised(what: str) -> None:
    EXERCISED.append(what)
    print(f"kill: {what}", flush=True)


def test_a_round_killed_at_every_stage_ends_as_the_unkilled_one(round_setup: dict[str, Any]) -> None:
    """Seven kills inside a round's stages (train's twice: cut again after it resumed from its checkpoint), an
    eighth after its register (the loop between rounds, holding the lock); then more prompts and the next round,
    which must take the dead scheduler's lock over."""
    s = round_setup
    rng = random.Random(SEED)
    home = s["tmp"] / "killed"
    run(["ingest", str(s["first"])], home)
    stages = ["generate", "score", "select", "train", "evaluate", "register"]
    # A kill at a fraction of the stage's reference time; below 0.7 so that a slower restart still lands inside.
    plan = [(st, rng.uniform(0.05, 0.7)) for st in
            ["generate", "score", "select", "train", "train", "evaluate", "register"]]
    plan.append(("between rounds", rng.uniform(0.0, 1.0)))
    print(f"reference stage times (s): {s['times']}", flush=True)
    child: Child | None = None
    for stage, u in plan:
        child = child or Child(_loop(s["conf"], s["overrides"]), home)
        if stage == "between rounds":
            patterns = [r"^tao: register: done"]
        else:
            # A stage cut once is cut again after it resumed: train from its last checkpoint.
            patterns = [rf"^tao: {st}: started" for st in stages[stages.index(stage):]]
            patterns.insert(1, rf"^tao: {stage}: resuming from")
        hit = child.wait_for(patterns)
        if hit is None:  # the round ended before this point came
            child.finish()
            child = None
            _exercised(f"round: the {stage} point came after the round ended")
            continue
        hit_stage = "between rounds" if stage == "between rounds" else re.search(r"tao: (\w+):", hit).group(1)  # type: ignore[union-attr]
        if "resuming" in hit:
            hit_stage = f"{stage} (resumed)"
        time.sleep(u * s["times"].get(hit_stage.split(" ")[0], 1.0))
        where = child.stage()
        if child.kill():
            _exercised(f"round: {hit_stage} +{u:.2f} of its time, landed in {where}")
            assert_no_duplicate_keys(home)
        else:
            child.finish()
        child = None
    if any(r["status"] != "done" for r in rows(home, "rounds")):
        run(_loop(s["conf"], s["overrides"]), home)
    run(["ingest", str(s["second"])], home)
    run(_loop(s["conf"], s["overrides"]), home)  # the next scheduled round
    assert lakehouse_state(home) == s["state"]
    assert_consistent(home)


def test_ingest_killed_between_chunks_ends_as_one_whole_run(tmp_path: Path) -> None:
    from tests.test_ingest import _mixed_file

    rng = random.Random(SEED + 1)
    path = _mixed_file(tmp_path / "mixed.jsonl", 6000)
    args = ["ingest", str(path), "ingest.chunk_rows=400"]
    reference = tmp_path / "reference"
    run(args, reference)
    want = lakehouse_state(reference)
    for i in range(3):
        home = tmp_path / f"killed-{i}"
        child = Child(args, home)
        k = rng.randint(1, 12)
        for _ in range(k):
            assert child.wait_for([r"^tao: ingest prompts: chunk \d+ committed"]) is not None, "ended before chunk"
        time.sleep(rng.uniform(0.0, 0.2))
        where = child.stage()
        if child.kill():
            _exercised(f"ingest: {k} chunks seen + <=0.2 s, landed in {where}")
        again = run([*args, "--json"], home)
        assert lakehouse_state(home) == want
        assert_no_duplicate_keys(home)
        del again


def test_serve_killed_under_load_logs_every_acknowledged_request_once(tiny_model: Path, tmp_path: Path) -> None:
    from tests.test_serve import _delta_rows, _free_port, _load, _start

    rng = random.Random(SEED + 2)
    for i in range(2):
        home, port = tmp_path / f"serve-{i}", _free_port()
        proc = _start(home, tiny_model, port)
        acked: list[str] = []
        after = rng.uniform(0.5, 3.0)
        try:
            killer = threading.Timer(after, lambda p=proc: os.kill(p.pid, signal.SIGKILL))
            killer.start()
            got, _, _ = _load(port, clients=4, seconds=after + 2, max_requests=400)
            killer.join()
            acked += got
            assert proc.wait(timeout=30) == -signal.SIGKILL
            proc = _start(home, tiny_model, port)  # replays the spool before it answers /health
            acked += _load(port, clients=2, seconds=1.0, max_requests=50)[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        logged = [r["request_id"] for r in _delta_rows(home, "serving_log")]
        assert len(logged) == len(set(logged)) and set(acked) <= set(logged)
        assert len(set(logged) - set(acked)) <= 4  # answered but the client was killed before reading it
        assert not list((home / "spool").glob("*.flushing"))
        _exercised(f"serve: SIGKILL {after:.2f} s into 4 clients' load, {len(acked)} acknowledged")


def test_two_servers_on_one_home_store_every_acknowledged_request_once(tiny_model: Path, tmp_path: Path) -> None:
    """Two `tao serve` processes on one TAO_HOME under load, one of them SIGKILLed midway and restarted: each
    server spools to its own file, flushes under the home's lock and claims a dead server's file."""
    from tests.test_serve import _delta_rows, _free_port, _load, _start

    home, ports = tmp_path / "home", [_free_port(), _free_port()]
    procs = [_start(home, tiny_model, port) for port in ports]
    acked: list[str] = []
    lock = threading.Lock()

    def load(port: int, seconds: float) -> None:
        got = _load(port, clients=2, seconds=seconds, max_requests=300)[0]
        with lock:
            acked.extend(got)

    try:
        threads = [threading.Thread(target=load, args=args) for args in ((ports[0], 6.0), (ports[1], 2.5))]
        for t in threads:
            t.start()
        threads[1].join()
        os.kill(procs[1].pid, signal.SIGKILL)  # its live file stays behind, locked by nobody
        assert procs[1].wait(timeout=30) == -signal.SIGKILL
        threads[0].join()
        procs[1] = _start(home, tiny_model, ports[1])
        load(ports[1], 1.0)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=120)
    logged = [r["request_id"] for r in _delta_rows(home, "serving_log")]
    assert len(logged) == len(set(logged)) and set(acked) <= set(logged), len(set(acked) - set(logged))
    assert len(set(logged) - set(acked)) <= 2  # answered just before the kill, never read by its client
    spool = home / "spool"
    assert not list(spool.glob("*.flushing")) and all(f.stat().st_size == 0 for f in spool.glob("live-*.jsonl"))
    _exercised(f"serve: two servers on one home, {len(acked)} acknowledged, one SIGKILLed")


def test_report_the_points_exercised() -> None:
    """Runs last: prints where each kill landed (pytest -s shows it) and asserts enough of them happened."""
    if not EXERCISED:
        pytest.skip("reports the kills of the other tests in this file: run it with them")
    print("\n" + json.dumps({"seed": SEED, "kills": EXERCISED}, indent=1))
    kills = [e for e in EXERCISED if "landed" in e or e.startswith("serve")]
    assert len(kills) >= 10, EXERCISED
