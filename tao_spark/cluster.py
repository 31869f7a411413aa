"""A Spark standalone cluster on loopback: one master, two worker JVMs and (optionally) a SQL server.

    tao cluster start [--connect]   # prints the spark://, sc:// and jdbc:hive2:// URLs
    tao round spark.master=spark://127.0.0.1:7077 train.num_processes=2
    tao cluster stop                # stops every process it started, by PID

The same processes a real cluster runs (``org.apache.spark.deploy.master.Master``, ``...worker.Worker``, each
worker with its own work directory, executors in their own JVMs with their own Python workers), started from
the Spark that the ``pyspark`` package ships. Everything lives under ``<home>/cluster``: ``state.json`` (PIDs,
URLs), ``logs/``, ``worker-N/`` (each worker's work directory, where executors keep their stdout/stderr). The
SQL server (``--connect``) is one application of the cluster with delta-spark, its warehouse and Hive metastore under
``home``, serving two protocols from that one JVM (the metastore is embedded Derby, which one JVM opens at a time):
Spark Connect (what Databricks Connect and serverless jobs look like to a client) through Spark's Connect plugin, and
HiveServer2's Thrift JDBC/ODBC protocol (what BI tools, ``beeline`` and notebooks' SQL cells speak).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tao.cluster")

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
THRIFT_CLASS = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"
CONNECT_PLUGIN = "org.apache.spark.sql.connect.SparkConnectPlugin"


@dataclass
class ClusterState:
    """What ``start`` launched: enough for ``stop`` (and tests) to find every process again."""

    master_url: str
    master_ui: str
    connect_url: str | None = None
    jdbc_url: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    work_dirs: list[str] = field(default_factory=list)


def _dir(home: str) -> Path:
    return Path(home) / "cluster"


def _free_port(preferred: int = 0) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _spark_home() -> Path:
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home())


def _env(home: str) -> dict[str, str]:
    return {
        **os.environ,
        "SPARK_HOME": str(_spark_home()),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_LOG_DIR": str(_dir(home) / "logs"),
        # Executors start Python workers with the driver's interpreter; this venv is the one that has tao_spark.
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_DAEMON_MEMORY": "512m",
    }


def _launch(name: str, args: list[str], home: str, env: dict[str, str]) -> int:
    log = _dir(home) / "logs" / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return proc.pid


def _alive(pid: int, marker: str) -> bool:
    """``pid`` still runs and is the process we started (not a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _markers(name: str) -> str:
    return THRIFT_CLASS if name == "connect" else MASTER_CLASS if name == "master" else WORKER_CLASS


def load_state(home: str) -> ClusterState | None:
    path = _dir(home) / "state.json"
    if not path.exists():
        return None
    return ClusterState(**json.loads(path.read_text()))


def _wait(what: str, ok: Any, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.5)
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()] if log.exists() else []
    last = f" (its log's last line: {lines[-1][:300]})" if lines else ""
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f} s{last}; the whole log: {log}")


def _alive_workers(ui_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as r:
            status = json.loads(r.read())
    except (OSError, ValueError):
        return 0
    return sum(w.get("state") == "ALIVE" for w in status.get("workers", []))


def start(home: str, *, workers: int = 2, cores: int = 2, memory: str = "3g", connect: bool = False,
          connect_cores: int = 2, timeout_s: float = 180.0) -> ClusterState:
    """Start a master and ``workers`` worker JVMs on loopback (plus a Spark Connect server); return their URLs.

    Each worker offers ``cores`` task slots. Applications that set no ``spark.cores.max`` get two
    (``spark.deploy.defaultCores``), so the Connect server and a driver can share the cluster. Every process
    inherits this one's environment (executors too: ``PYTHONPATH`` reaches their Python workers).
    """
    existing = load_state(home)
    if existing and any(_alive(pid, _markers(n)) for n, pid in existing.pids.items()):
        raise RuntimeError(f"a cluster from {_dir(home)} is already running ({existing.master_url}); "
                           "`tao cluster stop` first")
    root = _dir(home)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    env = _env(home)
    spark_class = str(_spark_home() / "bin" / "spark-class")
    port, ui = _free_port(7077), _free_port(8080)
    state = ClusterState(master_url=f"spark://127.0.0.1:{port}", master_ui=f"http://127.0.0.1:{ui}")
    master_env = {**env, "SPARK_MASTER_OPTS": "-Dspark.deploy.defaultCores=2"}
    t0 = time.perf_counter()
    state.pids["master"] = _launch("master", [spark_class, MASTER_CLASS, "--host", "127.0.0.1", "--port", str(port),
                                              "--webui-port", str(ui)], home, master_env)
    _save(home, state)  # from here on, `stop` can clean up even if start fails
    try:
        _wait("the Spark master", lambda: _port_open(port) and _port_open(ui), timeout_s, root / "logs" / "master.log")
        for i in range(1, workers + 1):
            work = root / f"worker-{i}"
            work.mkdir(exist_ok=True)
            state.work_dirs.append(str(work))
            state.pids[f"worker-{i}"] = _launch(
                f"worker-{i}", [spark_class, WORKER_CLASS, state.master_url, "--host", "127.0.0.1",
                                "--cores", str(cores), "--memory", memory, "--work-dir", str(work),
                                "--webui-port", str(_free_port())], home, env)
            _save(home, state)
        _wait(f"{workers} Spark workers", lambda: _alive_workers(ui) >= workers, timeout_s,
              root / "logs" / "worker-1.log")
        if connect:
            state.connect_url, state.jdbc_url, state.pids["connect"] = _start_connect(home, state.master_url,
                                                                                      connect_cores, env, timeout_s)
            _save(home, state)
            _warm(state.connect_url, root / "warm-up")
    except BaseException:
        # Half a cluster is worse than none: the next `start` would refuse, and its JVMs hold ports and memory.
        stop(home)
        raise
    log.info(f"tao: cluster up in {time.perf_counter() - t0:.1f} s: {state.master_url} (UI {state.master_ui})"
             + (f", Spark Connect {state.connect_url}, JDBC {state.jdbc_url}" if state.connect_url else ""))
    return state


def _start_connect(home: str, master_url: str, cores: int, env: dict[str, str], timeout_s: float
                   ) -> tuple[str, str, int]:
    """The SQL server: HiveServer2 (Thrift JDBC) with Spark Connect as a plugin of the same application; returns
    the sc:// URL, the jdbc:hive2:// URL and the PID."""
    from tao_spark.config import local_catalog_conf
    from tao_spark.session import delta_conf

    port, jdbc_port = _free_port(15002), _free_port(10000)
    conf = {
        **delta_conf({}, 2),
        **local_catalog_conf(home, catalog=True),
        "spark.plugins": CONNECT_PLUGIN,
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
        "spark.cores.max": str(cores),
        "spark.executor.cores": "1",
        "spark.executor.memory": "1g",
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": "2",
    }
    # Delta's jars on the driver's own class path, not only through --packages: HiveServer2 opens each JDBC
    # session on a thread whose class loader does not see jars added at run time (ClassNotFoundException DeltaCatalog).
    jars = delta_jars(conf.pop("spark.jars.packages"), env)
    conf["spark.driver.extraClassPath"] = ":".join(jars)
    args = [str(_spark_home() / "bin" / "spark-submit"), "--master", master_url, "--class", THRIFT_CLASS,
            "--name", "tao-sql-server", "--jars", ",".join(jars)]
    for k, v in conf.items():
        args += ["--conf", f"{k}={v}"]
    args += ["spark-internal", "--hiveconf", f"hive.server2.thrift.port={jdbc_port}",
             "--hiveconf", "hive.server2.thrift.bind.host=127.0.0.1"]
    pid = _launch("connect", args, home, env)
    _wait("the SQL server (Spark Connect and JDBC)", lambda: _port_open(port) and _port_open(jdbc_port), timeout_s,
          _dir(home) / "logs" / "connect.log")
    return f"sc://127.0.0.1:{port}", f"jdbc:hive2://127.0.0.1:{jdbc_port}/", pid


def _warm(url: str, scratch: Path) -> None:
    """Pay the SQL server's first-use costs here, not in the user's first command: a Delta table created, MERGEd,
    read and deleted under ``scratch`` (a path, so the catalog never sees it) and a Python UDF on the executors.
    A fresh server spends 12-14 s on its first MERGE (class loading and JIT in the driver and the executors) and
    2.4 s on the next; a 360-prompt `tao ingest` as its first work took 33 s, and 4-5 s after this."""
    from pyspark.sql import SparkSession

    t0 = time.perf_counter()
    try:
        _warm_up(SparkSession.builder.remote(url).getOrCreate(), scratch)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RuntimeError(f"the SQL server's warm-up failed ({first}); its log: "
                           f"{scratch.parent / 'logs' / 'connect.log'}") from e
    log.info(f"tao: SQL server warmed up in {time.perf_counter() - t0:.1f} s (Delta commits, executors' Python)")


def _warm_up(spark: Any, scratch: Path) -> None:
    import shutil

    try:
        table = f"delta.`{scratch}`"
        spark.range(4).selectExpr("id", "'a' AS v").write.format("delta").mode("overwrite").save(str(scratch))
        spark.range(2, 6).selectExpr("id", "'b' AS v").createOrReplaceTempView("tao_warm_src")
        spark.sql(f"MERGE INTO {table} t USING tao_warm_src s ON t.id <=> s.id "
                  "WHEN MATCHED THEN UPDATE SET * WHEN NOT MATCHED THEN INSERT *").collect()
        spark.sql(f"DESCRIBE HISTORY {table}").collect()
        spark.read.format("delta").load(str(scratch)).mapInArrow(lambda batches: batches, "id long, v string").count()
    finally:
        spark.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def delta_jars(packages: str, env: dict[str, str]) -> list[str]:
    """Local paths of ``packages``' jars (delta-spark and its dependencies), resolved from Maven by spark-submit's own
    resolver into a cache shared by every home (``~/.cache/tao_spark/ivy``), once."""
    ivy = Path.home() / ".cache" / "tao_spark" / "ivy" / packages.replace(":", "_").replace(",", "+")  # one set
    wanted = [p.split(":") for p in packages.split(",")]
    found = sorted(str(j) for j in (ivy / "jars").glob("*.jar")) if (ivy / "jars").is_dir() else []
    if not all(any(f"{g}_{a}-{v}.jar" in j for j in found) for g, a, v in wanted):
        ivy.mkdir(parents=True, exist_ok=True)
        noop = ivy / "resolve.py"
        noop.write_text("# spark-submit resolves --packages before it runs this file, which does nothing\n")
        r = subprocess.run([str(_spark_home() / "bin" / "spark-submit"), "--master", "local[1]", "--packages",
                            packages, "--conf", f"spark.jars.ivy={ivy}", str(noop)], env=env, capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"could not resolve {packages} from Maven: {r.stderr.strip().splitlines()[-1:]}")
        found = sorted(str(j) for j in (ivy / "jars").glob("*.jar"))
    return found


def _save(home: str, state: ClusterState) -> None:
    (_dir(home) / "state.json").write_text(json.dumps(asdict(state), indent=1))


def stop(home: str, timeout_s: float = 30.0) -> list[str]:
    """Stop every process ``start`` launched (Connect server, workers, master), by PID; return their names."""
    state = load_state(home)
    if state is None:
        return []
    stopped = []
    for name, pid in reversed(list(state.pids.items())):
        if not _alive(pid, _markers(name)):
            continue
        # Each was started in its own session: the group holds its executors and Python workers too.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(pid, _markers(name)):
                time.sleep(0.2)
            if not _alive(pid, _markers(name)):
                break
        stopped.append(name)
    (_dir(home) / "state.json").unlink(missing_ok=True)
    return stopped


def status(home: str) -> dict[str, Any]:
    """The cluster's URLs and, per process, whether it still runs."""
    state = load_state(home)
    if state is None:
        return {"running": False}
    procs = {name: {"pid": pid, "alive": _alive(pid, _markers(name))} for name, pid in state.pids.items()}
    return {"running": any(p["alive"] for p in procs.values()), **asdict(state), "processes": procs}
