"""The cluster path: whole TAO rounds on a Spark standalone cluster (master + two worker JVMs) with delta-spark.

    make test-cluster                                  # pytest -m cluster, in its own process
    .venv/bin/pytest tests/test_cluster.py -m cluster -k kill

The cluster is the one ``tao cluster start --connect`` brings up, on loopback: executors are JVMs of their own
with their own Python workers, so generation, scoring and training run in processes other than the driver, and
every file a stage hands to another goes through the shared ``home``. The driver here is a classic JVM session
(``spark.master=spark://…``); the catalog test drives the Spark Connect server through the ``tao`` CLI in
subprocesses, since one Python process cannot hold a classic and a Connect session at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tao_spark import cluster, loop
from tao_spark.config import Config, load_config
from tao_spark.data import SAMPLE_PROMPTS
from tao_spark.ingest import ingest
from tao_spark.tables import KEYS, Tables
from tests.test_ingest import two_ingesters_at_once
from tests.test_round import _config_file

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
LOAD = re.compile(r"tao: engine load (\S+) in pid (\d+) \(load (\d+) in this process\)")
RANK = re.compile(r"tao: train worker rank (\d+)/(\d+) in pid (\d+)")


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[cluster.ClusterState, Path]]:
    """Master, two workers and a Spark Connect server for the module; everything stopped by PID at the end."""
    home = tmp_path_factory.mktemp("cluster")
    # Executors inherit the environment: PYTHONPATH lets them import the tests' reward (tests.test_round:e_rate).
    env = {**os.environ, "TAO_HOME": str(home), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tao_spark.cli", "cluster", "start", "--connect", "--json"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"cluster start: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    state = cluster.ClusterState(**json.loads(r.stdout))
    assert set(state.pids) == {"master", "worker-1", "worker-2", "connect"}
    # The SQL server's first Delta commit and Python worker were paid by `start` and left nothing behind.
    assert "SQL server warmed up" in r.stderr and not (home / "cluster" / "warm-up").exists()
    try:
        yield state, home
    finally:
        r = subprocess.run([sys.executable, "-m", "tao_spark.cli", "cluster", "stop", "--json"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert set(json.loads(r.stdout)["stopped"]) == set(state.pids)
        assert not any(cluster._alive(pid, cluster._markers(n)) for n, pid in state.pids.items())


@pytest.fixture(scope="module")
def driver(local_cluster: tuple[cluster.ClusterState, Path]) -> Iterator[Any]:
    """A classic JVM driver on the cluster (its executors: two 1-core JVMs, one per worker)."""
    if os.environ.get("SPARK_CONNECT_MODE_ENABLED"):
        pytest.skip("a Spark Connect session already lives in this process; run the tier alone: pytest -m cluster")
    from tao_spark.session import get_spark

    state, home = local_cluster
    cfg = load_config(None, [f"home={home / 'driver'}", f"spark.master={state.master_url}"])
    cfg.spark.conf.update({"spark.executor.cores": "1", "spark.cores.max": "2", "spark.executor.memory": "1g",
                           "spark.sql.shuffle.partitions": "2"})
    spark = get_spark(cfg.spark)
    assert type(spark).__module__ == "pyspark.sql.session"
    yield spark
    spark.stop()


def _cfg(tmp: Path, master: str, home: Path, extra: list[str] = ()) -> Config:
    return load_config(_config_file(tmp), [
        f"home={home}", f"model.path={tiny_path(tmp)}", f"spark.master={master}", "generate.n=3",
        "generate.max_new_tokens=12", "generate.max_prompts=0", "generate.batch_size=12", "generate.temperature=1.0",
        "evaluate.max_prompts=6", "evaluate.max_new_tokens=12", "evaluate.bootstrap=200", "select.min_margin=0.0",
        "train.trl.max_steps=3", "train.trl.per_device_train_batch_size=2", "train.trl.learning_rate=0.001",
        "mlflow.experiment=cluster", "train.local_mode=false", "train.num_processes=2", "gate.min_win_rate_low=0.0",
        "gate.max_task_drop=1.0", "gate.max_forgetting=1.0", "loop.forgetting_prompts=4",
        "evaluate.consistency_samples=0", *extra,  # the consistency check's sampling is generate's: tested on Sail
    ])


_tiny: dict[str, Path] = {}


def tiny_path(tmp: Path) -> Path:
    """The tiny model, written once per module under a path every worker can read (the shared disk)."""
    if "path" not in _tiny:
        from tests.tiny import make_tiny_model

        _tiny["path"] = make_tiny_model(tmp.parent / "tiny-model-cluster")
    return _tiny["path"]


def _slice(tmp: Path, name: str, lo: int, hi: int) -> Path:
    out = tmp / name
    out.write_text("\n".join(SAMPLE_PROMPTS.read_text().splitlines()[lo:hi]) + "\n")
    return out


def test_spark_submit_in_catalog_mode_uses_the_homes_catalog_or_refuses(
        local_cluster: tuple[cluster.ClusterState, Path], tmp_path: Path) -> None:
    """``spark-submit --master spark://… --packages <delta> jobs/tao_ingest.py`` uses spark-submit's session, which
    sets no spark.master of ours: a catalog lakehouse must still land in the home's metastore, not
    in an in-memory catalog and ./spark-warehouse; while the Connect server holds that metastore, a one-line refusal
    names the spark.remote to use."""
    from tao_spark.session import delta_package

    state, cluster_home = local_cluster
    spark_submit = Path(sys.executable).parent / "spark-submit"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data = _slice(tmp_path, "a.jsonl", 0, 20)

    def submit(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TAO_HOME": str(home), "PYSPARK_PYTHON": sys.executable,
               "PYSPARK_DRIVER_PYTHON": sys.executable}
        return subprocess.run([str(spark_submit), "--master", state.master_url, "--packages", delta_package(),
                               "--conf", "spark.cores.max=2", "--conf", "spark.executor.cores=1",
                               str(ROOT / "jobs" / "tao_ingest.py"), *args], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=600)

    r = submit(cluster_home, str(data), "lakehouse=tao_submit")  # the Connect server holds this home's metastore
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    # One line; spark-submit's Python runner merges the job's stderr into its stdout.
    assert re.search(rf"tao ingest: lakehouse=tao_submit is a catalog namespace .* held by the Spark Connect "
                     rf"server: pass spark.remote={re.escape(state.connect_url)} ", r.stdout), r.stdout[-3000:]

    home = tmp_path / "home"  # no Connect server here: the job opens the home's metastore itself
    r = submit(home, str(data), "lakehouse=tao_submit", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["accepted"] == 20  # the job's stderr is in stdout too
    assert not (cwd / "spark-warehouse").exists() and (home / "metastore_db").is_dir()
    # Another driver on the same home finds the table by name.
    env = {**os.environ, "TAO_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "tao_spark.cli", "sql", "SELECT count(*) AS n FROM tao_submit.prompts",
                        "--json", "spark.master=local[1]", "lakehouse=tao_submit"], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout) == [{"n": 20}]


def _executor_logs(state: cluster.ClusterState, app_id: str) -> str:
    """stdout and stderr of this application's executors, from every worker's work directory."""
    text = []
    for work in state.work_dirs:
        for f in sorted(Path(work, app_id).glob("*/std*")):
            text.append(f.read_text(errors="replace"))
    return "\n".join(text)


def _no_duplicate_keys(tables: Tables) -> None:
    from pyspark.sql import functions as F

    for name, key in KEYS.items():
        if tables.exists(name):
            df = tables.read(name)
            assert df.groupBy(*key).count().where(F.col("count") > 1).count() == 0, name


def test_two_rounds_on_the_cluster(driver: Any, local_cluster: tuple[cluster.ClusterState, Path],
                                   tmp_path: Path) -> None:
    import mlflow
    from mlflow import MlflowClient
    from pyspark.sql import functions as F

    state, _ = local_cluster
    cfg = _cfg(tmp_path, state.master_url, tmp_path / "home")
    tables = Tables(driver, cfg.lakehouse)
    assert tables.jvm and tables.namespace is None
    ingest(driver, tables, [_slice(tmp_path, "a.jsonl", 0, 20)], cfg.ingest)
    from deltalake import DeltaTable  # written by delta-spark through the cluster, read by delta-rs

    prompts = DeltaTable(str(tmp_path / "home" / "lakehouse" / "prompts"))
    assert len(prompts.to_pyarrow_table()) == 20 and "Apache-Spark" in str(prompts.history(1)[0].get("engineInfo"))
    t0 = time.perf_counter()
    rnd = loop.run_round(tables, cfg)
    print(f"cluster round: {time.perf_counter() - t0:.1f} s; stages "
          f"{ {s: round(rnd.metrics[f'time_{s}_s'], 1) for s in loop.STAGES} }", file=sys.stderr)

    # The same contract as the round on Sail.
    n = rnd.n_train * 3
    assert rnd.status == "done" and rnd.n_train + rnd.n_holdout == 20 and rnd.n_train >= 10
    cands = tables.read("candidates").where(F.col("purpose") == "train")
    sampled = cands.where(F.col("finish_reason") != "mend")
    assert sampled.count() == n and sampled.select("prompt_id", "candidate_idx").distinct().count() == n
    assert cands.count() - n == rnd.metrics["candidates_mended"]
    names = {r.name for r in cfg.score.rewards} | {"combined"}
    assert tables.read("scores").where(F.col("purpose") == "train").count() == cands.count() * len(names)
    prefs = tables.read("preferences").collect()
    assert len(prefs) == rnd.metrics["pairs"] > 0 and all(p.chosen_score > p.rejected_score for p in prefs)
    assert tables.read("evaluations").count() == rnd.n_holdout
    _no_duplicate_keys(tables)
    history = tables.history("candidates")  # DESCRIBE HISTORY on delta-spark, newest first
    assert [h["version"] for h in history] == list(range(len(history) - 1, -1, -1))
    assert history[0]["operation"] == "MERGE" and history[-1]["operation"] in ("WRITE", "CREATE TABLE")

    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient()
    run = client.get_run(rnd.mlflow_run_id)
    assert run.data.tags["tao.prompts_version"] == str(rnd.prompts_version)
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.source)["delta_table_version"] == rnd.prompts_version
    assert str(client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger").version) == rnd.model_version

    # Generation and scoring ran in the executors' Python workers, one engine load each; training ran as two
    # barrier tasks there too, never in the driver.
    logs = _executor_logs(state, driver.sparkContext.applicationId)
    loads = [(m[1], int(m[2]), int(m[3])) for m in LOAD.finditer(logs)]
    assert loads, "no engine load in the executors' logs"
    assert all(pid != os.getpid() for _, pid, _ in loads)
    per_worker: dict[tuple[str, int], int] = {}
    for key, pid, count in loads:
        per_worker[(key, pid)] = max(count, per_worker.get((key, pid), 0))
    assert set(per_worker.values()) == {1}, per_worker
    ranks = {(int(m[1]), int(m[2])) for m in RANK.finditer(logs)}
    assert ranks == {(0, 2), (1, 2)}, ranks
    assert (Path(rnd.tuned_model) / "config.json").exists()  # written by rank 0 on a worker, read by the driver

    # A second round with 10% new prompts, under the loop's lock: earlier candidates and scores reused through
    # delta-spark's MERGE. Its train, evaluate and register stages are the first round's again (and the loop's
    # whole second round runs on Sail in tests/test_loop.py), so it stops after score.
    if not rnd.promoted:
        pytest.skip(f"round 1 was not promoted ({rnd.gate_reason}); the second round needs a champion")
    ingest(driver, tables, [_slice(tmp_path, "b.jsonl", 20, 22)], cfg.ingest)
    from tao_spark.locks import acquire, release

    holder = acquire(tables, "round", cfg.loop.lock_lease_s)
    r2 = loop.start(tables, cfg)
    assert r2 is not None
    for stage in ("generate", "score"):
        r2 = loop.run_stage(tables, r2, stage, cfg)
    release(tables, "round", holder)
    assert r2.status == "score" and r2.new_prompts == 2 and r2.previous_version == rnd.prompts_version
    assert r2.baseline_model.endswith("@champion") and r2.reused_candidates == n
    assert r2.new_candidates == (r2.n_train - rnd.n_train) * 3
    assert r2.metrics["scores_reused"] == n * len(names)
    assert tables.read("rounds").count() == 2 and tables.read("locks").count() == 0
    _no_duplicate_keys(tables)


def _python_workers(app_id: str) -> list[int]:
    """PIDs of the Python workers forked by this application's executors (children of the worker daemon)."""
    procs: dict[int, tuple[int, str]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(p.name)] = (ppid, cmd)

    def under_app(pid: int) -> bool:
        while pid > 1 and pid in procs:
            ppid, cmd = procs[pid]
            if "CoarseGrainedExecutorBackend" in cmd:
                return app_id in cmd
            pid = ppid
        return False

    def daemon(cmd: str) -> bool:  # tao's daemon (torch imported before the fork), or pyspark's own
        return "tao_spark.worker_daemon" in cmd or "pyspark.daemon" in cmd

    return [pid for pid, (ppid, cmd) in procs.items()
            if daemon(cmd) and daemon(procs.get(ppid, (0, ""))[1]) and under_app(pid)]


def test_killed_python_worker_is_retried_with_exact_counts(driver: Any, local_cluster: tuple[cluster.ClusterState,
                                                                                                Path],
                                                          tmp_path: Path) -> None:
    from pyspark.sql import functions as F

    state, _ = local_cluster
    # A model folder of its own: the warm workers have not loaded it, so each first task logs a fresh load.
    import shutil

    model = shutil.copytree(tiny_path(tmp_path), tmp_path / "kill-model")
    cfg = _cfg(tmp_path, state.master_url, tmp_path / "home", ["generate.max_new_tokens=64", "generate.batch_size=1",
                                                                 "generate.max_prompts=10", f"model.path={model}"])
    tables = Tables(driver, cfg.lakehouse)
    ingest(driver, tables, [_slice(tmp_path, "a.jsonl", 0, 60)], cfg.ingest)
    sc = driver.sparkContext
    app = sc.applicationId
    rnd = loop.start(tables, cfg)
    done: dict[str, Any] = {}

    def generate() -> None:
        sc.setJobGroup("tao-kill-test", "generate while a Python worker is killed")  # per thread
        try:
            done["round"] = loop.run_stage(tables, rnd, "generate", cfg)
        except BaseException as e:  # surfaced below
            done["error"] = e

    worker = threading.Thread(target=generate)
    worker.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and worker.is_alive() and time.monotonic() < deadline:
        # A worker that just loaded its engine for this round is busy generating: kill it mid-task.
        for m in LOAD.finditer(_executor_logs(state, app)):
            pid = int(m[2])
            if m[1].endswith(f"{model}:float32") and pid in _python_workers(app):
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
        time.sleep(0.1)
    worker.join(timeout=600)
    assert killed is not None, "generate finished before a busy Python worker could be killed"
    assert "error" not in done, done.get("error")
    cands = tables.read("candidates").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train")
                                            & (F.col("finish_reason") != "mend"))
    assert cands.count() == 30 and cands.select("prompt_id", "candidate_idx").distinct().count() == 30
    _no_duplicate_keys(tables)
    # Spark saw the task fail and ran it again.
    tracker = sc.statusTracker()
    stages = [s for job in tracker.getJobIdsForGroup("tao-kill-test")
              for s in (tracker.getJobInfo(job).stageIds if tracker.getJobInfo(job) else [])]
    failed = sum(info.numFailedTasks for info in map(tracker.getStageInfo, stages) if info)
    assert failed >= 1, "no task failed: the kill landed outside a task"


def test_two_ingesters_on_delta_spark(tmp_path: Path) -> None:
    # Each its own local[1] JVM driver with delta-spark: the commit-conflict path of the JVM.
    # 800 rows each, 28 chunks: a JVM commit is seconds, not Sail's tenths, and this many still conflict (2500 rows
    # met 50-58 conflicts).
    two_ingesters_at_once(tmp_path, ["spark.master=local[1]"], timeout_s=600, n=800)  # asserts a conflict was retried


def _tao(args: list[str], home: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TAO_HOME": str(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tao_spark.cli", "--config", str(conf), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_catalog_tables_by_name_over_spark_connect(local_cluster: tuple[cluster.ClusterState, Path],
                                                   tmp_path: Path) -> None:
    """ingest → round over the JVM Spark Connect server, lakehouse a catalog namespace; read by name elsewhere."""
    state, _ = local_cluster
    home = tmp_path / "home"
    conf = _config_file(tmp_path)
    over = [f"spark.remote={state.connect_url}", "lakehouse=tao_test", f"model.path={tiny_path(tmp_path)}",
            "generate.n=3", "generate.max_new_tokens=8", "generate.max_prompts=8", "generate.batch_size=4",
            "generate.temperature=1.0", "evaluate.max_prompts=4", "evaluate.max_new_tokens=8",
            "evaluate.bootstrap=100", "select.min_margin=0.0", "train.trl.max_steps=2",
            "train.trl.per_device_train_batch_size=2", "mlflow.experiment=connect",
            "train.num_processes=2", "gate.min_win_rate_low=0.0", "gate.max_task_drop=1.0",
            "evaluate.consistency_samples=0"]
    r = _tao(["ingest", str(_slice(tmp_path, "a.jsonl", 0, 50)), "--json", *over], home, conf)
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["accepted"] == 50
    r = _tao(["round", "--json", *over], home, conf)
    assert r.returncode == 0, r.stderr[-3000:]
    # train.local_mode unset: over Connect to a cluster, training runs on its executors, not on this client.
    assert f"tao: train: 2 process(es) on the executors of {state.master_url}" in r.stderr, r.stderr[-3000:]

    # A later append through the CLI, then a second Spark session (another process: a plain PySpark Connect
    # client, no tao_spark) reads the tables by name, and VERSION AS OF the snapshot the round pinned.
    r = _tao(["ingest", str(_slice(tmp_path, "b.jsonl", 50, 60)), "--json", *over], home, conf)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["accepted"] == 10
    client = (
        "import json, sys\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()\n"
        "q = lambda s: [r.asDict() for r in spark.sql(s).collect()]\n"
        "rnd = q('SELECT round_id, status, prompts_version, mlflow_run_id FROM tao_test.rounds')\n"
        "v = rnd[0]['prompts_version']\n"
        "print(json.dumps({'rounds': rnd, 'tables': sorted(r['tableName'] for r in q('SHOW TABLES IN tao_test')),\n"
        "  'train': q(\"SELECT count(*) AS n FROM tao_test.candidates WHERE purpose = 'train' \"\n"
        "             \"AND finish_reason != 'mend'\")[0]['n'],\n"
        "  'pinned': q(f'SELECT count(*) AS n FROM tao_test.prompts VERSION AS OF {v}')[0]['n'],\n"
        "  'now': q('SELECT count(*) AS n FROM tao_test.prompts')[0]['n']}))\n"
    )
    r = subprocess.run([sys.executable, "-c", client, state.connect_url], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    (rnd,) = seen["rounds"]
    assert rnd["status"] == "done" and seen["train"] == 8 * 3
    assert {"prompts", "candidates", "scores", "preferences", "evaluations", "rounds"} <= set(seen["tables"])
    assert seen["pinned"] == 50 and seen["now"] == 60
    v = rnd["prompts_version"]

    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    (ds,) = MlflowClient().get_run(rnd["mlflow_run_id"]).inputs.dataset_inputs
    source = json.loads(ds.dataset.source)
    # A JDBC client (beeline, as a BI tool would connect) reads the same tables by name, VERSION AS OF included.
    beeline = cluster._spark_home() / "bin" / "beeline"
    r = subprocess.run([str(beeline), "-u", state.jdbc_url, "--silent=true", "--outputformat=csv2", "-e",
                        f"SELECT count(*) AS n FROM tao_test.prompts VERSION AS OF {v}; "
                        "SELECT count(*) AS n FROM tao_test.candidates WHERE purpose = 'train' "
                        "AND finish_reason != 'mend'; "
                        "SELECT count(*) AS n FROM tao_test.preferences"],
                       env={**os.environ, "SPARK_HOME": str(cluster._spark_home())}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    counts = [int(line) for line in r.stdout.split() if line.isdigit()]
    assert counts[:2] == [50, 8 * 3] and len(counts) == 3, r.stdout

    # Fully qualified with the local catalog, so MLflow does not take it for a Unity Catalog table.
    assert source["delta_table_name"] == "spark_catalog.tao_test.prompts" and source["delta_table_version"] == v
    assert "is_databricks_uc_table" not in source


def test_inference_table_by_name_incrementally_over_spark_connect(local_cluster: tuple[cluster.ClusterState, Path],
                                                                  tmp_path: Path) -> None:
    """``tao ingest --table catalog.name`` on JVM Spark: the snapshot first, then only the rows appended since,
    read through the table's Change Data Feed."""
    from tao_spark.data import SAMPLE_INFERENCE_TABLE
    from tests.test_inference_table import REASONS

    state, _ = local_cluster
    home, conf = tmp_path / "home", _config_file(tmp_path)

    def sql(*statements: str) -> list[list[dict[str, Any]]]:
        # Another process: this one already holds a classic session, and PySpark allows one kind per process.
        r = subprocess.run([sys.executable, "-c", _CONNECT_CLIENT, state.connect_url, json.dumps(statements)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out: list[list[dict[str, Any]]] = json.loads(r.stdout.strip().splitlines()[-1])
        return out

    sql("CREATE SCHEMA IF NOT EXISTS serving_it",
        "CREATE OR REPLACE TABLE serving_it.acme_assistant_payload USING DELTA "
        f"TBLPROPERTIES (delta.enableChangeDataFeed = true) AS SELECT * FROM delta.`{SAMPLE_INFERENCE_TABLE}`")
    late_request = ("concat('{\"messages\": [{\"role\": \"user\", \"content\": \"late question ', "
                    "databricks_request_id, '?\"}]}')")
    over = [f"spark.remote={state.connect_url}", "lakehouse=tao_it"]
    runs = []
    for append in (0, 0, 20):
        if append:
            sql("INSERT INTO serving_it.acme_assistant_payload SELECT concat('late-', databricks_request_id), "
                "client_request_id, request_date, request_time, 200, sampling_fraction, execution_duration_ms, "
                f"{late_request}, response, CAST(array() AS array<string>), served_entity_id, requester "
                f"FROM serving_it.acme_assistant_payload ORDER BY databricks_request_id LIMIT {append}")
        r = _tao(["ingest", "--table", "serving_it.acme_assistant_payload", "--json", *over], home, conf)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append((json.loads(r.stdout.strip().splitlines()[-1]), r.stderr))
    (first, _), (second, _), (third, log) = runs
    assert first["offered"] == first["source_rows"] == 305 and first["quarantined"] == sum(REASONS.values())
    assert first["offered"] == first["accepted"] + first["duplicates"] + first["quarantined"]
    assert second["source_rows"] == second["offered"] == 0
    assert third["source_rows"] == third["accepted"] == 20 and "change data feed" in log
    reasons, prompts, mark = sql("SELECT split(reason, ':')[0] AS reason, count(*) AS n FROM tao_it.quarantine "
                                 "GROUP BY 1", "SELECT count(*) AS n FROM tao_it.prompts",
                                 "SELECT version FROM tao_it.ingest_watermarks")
    assert {r["reason"]: r["n"] for r in reasons} == REASONS
    assert prompts[0]["n"] == first["accepted"] + 20 and mark[0]["version"] == third["source_version"]


_CONNECT_CLIENT = (
    "import json, sys\n"
    "from pyspark.sql import SparkSession\n"
    "spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()\n"
    "print(json.dumps([[r.asDict() for r in spark.sql(q).collect()] for q in json.loads(sys.argv[2])], default=str))\n"
)


def test_a_start_that_fails_stops_what_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No half cluster: JVMs launched before the failure are stopped, so the next `start` is not refused; the
    reason is one line naming the log."""
    home = str(tmp_path / "home")
    launched: list[int] = []
    real_launch = cluster._launch

    def launch(*args: Any, **kwargs: Any) -> int:  # the real launch, its PID noted
        launched.append(real_launch(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(cluster, "_launch", launch)
    with pytest.raises(RuntimeError, match=r"^the Spark master did not come up within 0 s.*; the whole log: .*master"
                                           r"\.log$") as e:
        cluster.start(home, workers=1, timeout_s=0.01)  # no JVM binds its port in 10 ms
    assert "\n" not in str(e.value) and launched
    assert cluster.status(home) == {"running": False}
    assert not any(cluster._alive(pid, cluster.MASTER_CLASS) for pid in launched)
