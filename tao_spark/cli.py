"""The ``tao`` command: one subcommand per stage plus lakehouse inspection.

    tao ingest prompts.jsonl --task support --json
    tao sql "SELECT task, count(*) AS n FROM prompts GROUP BY task" --json
    tao tables
    tao history prompts
    tao round generate.n=8

Every command takes ``--config FILE`` (default ``$TAO_CONFIG``, else the packaged ``conf/local.yaml``) and
dotted overrides (``section.key=value``) anywhere among its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tao_spark.config import STAGES, Config, ConfigError, UserError, default_config_path, load_config

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")
Handler = Callable[[argparse.Namespace, Config], int]
COMMANDS: dict[str, tuple[str, Handler, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None
            ) -> Callable[[Handler], Handler]:
    def wrap(fn: Handler) -> Handler:
        COMMANDS[name] = (help, fn, args)
        return fn
    return wrap


_RESULT: Any = None  # with --json, the real stdout, kept for the JSON alone; else sys.stdout as it is now


def emit(text: str) -> None:
    """Write a command's result (its JSON, or its report) to stdout; progress and logs go to stderr."""
    out = _RESULT or sys.stdout
    out.write(text + "\n")
    out.flush()


@contextlib.contextmanager
def _json_stdout() -> Iterator[None]:
    """For ``--json``: keep the real stdout for the JSON alone. Everything else written to file descriptor 1 (the
    training subprocess TorchDistributor relays, progress bars, libraries that print) goes to stderr while the
    command runs; afterwards file descriptor 1 is the real stdout again (``main`` may be called in-process)."""
    global _RESULT
    sys.stdout.flush()
    saved = os.dup(1)
    _RESULT = os.fdopen(os.dup(saved), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        _RESULT.close()
        _RESULT = None


def _context(cfg: Config) -> tuple[Any, Any]:
    from tao_spark.config import is_namespace
    from tao_spark.session import get_spark
    from tao_spark.tables import Tables

    if os.environ.get("PYSPARK_GATEWAY_PORT") and not cfg.spark.remote and is_namespace(cfg.lakehouse):
        from tao_spark import cluster

        st = cluster.status(cfg.home)
        if st.get("connect_url") and st.get("processes", {}).get("connect", {}).get("alive"):
            # Its metastore is embedded Derby, which one JVM opens at a time: this driver cannot share it.
            raise UserError(f"lakehouse={cfg.lakehouse} is a catalog namespace whose metastore under {cfg.home} is "
                            f"held by the Spark Connect server: pass spark.remote={st['connect_url']} to this job "
                            "(it then runs as that server's client), or stop the server first")

    spark = get_spark(cfg.spark)
    return spark, Tables(spark, cfg.lakehouse)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "asDict"):
        return _jsonable(v.asDict(recursive=True))
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if hasattr(v, "item"):  # numpy scalars and decimals
        return v.item()
    return v


def print_table(rows: list[dict[str, Any]], max_width: int = 60) -> None:
    if not rows:
        print("(no rows)")
        return
    cols = list(rows[0])
    cells = [[str(_jsonable(r.get(c)))[:max_width] for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _ingest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help="JSONL (.jsonl, .jsonl.gz), CSV or Parquet files")
    p.add_argument("--table", help="a Model Serving inference table (catalog name, or a Delta path) instead of files; "
                                   "reads what was committed since the last run")
    p.add_argument("--since-version", type=int, help="with --table: read from this source version on (inclusive)")
    p.add_argument("--task", help="task of rows that name none (with --table: default the endpoint's name)")
    p.add_argument("--source", default="file", help="source recorded on every row")
    p.add_argument("--json", action="store_true", help="print one JSON object with the counts")


def _ingest_handler(name: str, fn_name: str) -> Handler:
    def run(a: argparse.Namespace, cfg: Config) -> int:
        from tao_spark import ingest

        table = getattr(a, "table", None)
        if table and a.paths:
            print(f"tao {name}: give files or --table, not both", file=sys.stderr)
            return 2
        if not table and not a.paths:
            print(f"tao {name}: give files to ingest" + (" or --table NAME" if name == "ingest" else ""),
                  file=sys.stderr)
            return 2
        if table:
            from tao_spark.inference_table import ingest_table

            spark, tables = _context(cfg)
            r = ingest_table(spark, tables, a.table, cfg.ingest, since_version=a.since_version, task=a.task)
            return _print_ingest(r, a.json)
        ingest.check_paths(a.paths)  # before a Spark session starts: a wrong path fails in a second
        spark, tables = _context(cfg)
        r = getattr(ingest, fn_name)(spark, tables, a.paths, cfg.ingest, task=a.task, source=a.source)
        return _print_ingest(r, a.json)
    return run


def _print_ingest(r: Any, as_json: bool) -> int:
    if as_json:
        emit(json.dumps(r.to_json()))
        return 0
    read = f" (source read up to v{r.source_version}: {r.source_rows} rows)" if r.source_version is not None else ""
    print(f"batch {r.batch_id}: {r.offered} offered, {r.accepted} accepted, {r.duplicates} duplicates, "
          f"{r.quarantined} quarantined; {r.table} is now at version {r.version}{read}")
    for reason, n in sorted(r.reasons.items(), key=lambda x: -x[1]):
        print(f"  quarantined {n:>5}  {reason}")
    return 0


command("ingest", "append prompt files to the Delta prompt log", _ingest_args)(_ingest_handler("ingest", "ingest"))


def _prefs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="JSONL (.jsonl, .jsonl.gz) or Parquet files of prompt/messages, chosen, "
                                            "rejected (the bundled set: tao_spark/data/preferences.jsonl)")
    p.add_argument("--task", help="task of rows that name none")
    p.add_argument("--source", default="file", help="source recorded on rows that name none")
    p.add_argument("--json", action="store_true", help="print one JSON object with the counts")


command("ingest-preferences", "append pairwise preferences to the Delta table preference_pairs", _prefs_args)(
    _ingest_handler("ingest-preferences", "ingest_preferences"))


def _train_reward_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="registered model name (default: reward_model.name)")
    p.add_argument("--json", action="store_true", help="print the metrics and the model version as JSON")


@command("train-reward", "train a Bradley-Terry reward model on preference_pairs (TorchDistributor + TRL + LoRA)",
         _train_reward_args)
def _train_reward(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import reward_model

    spark, tables = _context(cfg)
    r = reward_model.run(spark, tables, cfg, name=a.name)
    if a.json:
        emit(json.dumps(_jsonable(r.to_json())))
    else:
        print(reward_model.report(r))
    return 0


def _sql_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="Spark SQL; every tao table is registered by name")
    p.add_argument("--json", action="store_true", help="print a JSON array of row objects")
    p.add_argument("--limit", type=int, default=1000, help="rows printed at most (table output)")
    p.add_argument("--write", action="store_true",
                   help="also run statements that write (INSERT, DELETE, UPDATE, MERGE, DDL) or read files by path")


@command("sql", "run Spark SQL over the tao tables (read-only unless --write)", _sql_args)
def _sql(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark.sql import read_only_reason

    reason = None if a.write else read_only_reason(a.query)
    if reason:
        raise UserError(f"refused: {reason}; tao sql is read-only, pass --write to run it anyway")
    spark, tables = _context(cfg)
    tables.register()
    try:
        df = spark.sql(a.query)
        rows = df.collect() if a.json else df.limit(a.limit).collect()
    except Exception as e:  # the user's SQL: its error is the message, one line (--debug for the traceback)
        if getattr(a, "debug", False):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"{type(e).__name__}: {first[:300]}") from None
    if a.json:
        emit(json.dumps([_jsonable(r.asDict(recursive=True)) for r in rows], ensure_ascii=False))
    else:
        print_table([r.asDict(recursive=True) for r in rows])
    return 0


@command("tables", "list tables with row counts and Delta versions")
def _tables(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark.tables import SCHEMAS

    _, tables = _context(cfg)
    rows = []
    for name in SCHEMAS:
        if tables.exists(name):
            rows.append({"table": name, "rows": tables.read(name).count(), "version": tables.snapshot(name),
                         "path": tables.path(name)})
    if not rows:
        print(f"no tables yet under {cfg.lakehouse}; start with `tao ingest FILE`")
        return 0
    print_table(rows, max_width=100)
    return 0


def _history_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("table", help="table name")
    p.add_argument("--json", action="store_true", help="print the raw history as JSON")


@command("history", "show a table's Delta history", _history_args)
def _history(a: argparse.Namespace, cfg: Config) -> int:
    _, tables = _context(cfg)
    hist = tables.history(a.table)
    if a.json:
        emit(json.dumps(_jsonable(hist)))
        return 0
    rows = []
    for h in hist:
        m = h.get("operationMetrics") or {}
        rows.append({
            "version": h.get("version"),
            "timestamp": dt.datetime.fromtimestamp(h["timestamp"] / 1000, dt.UTC)
            .isoformat(timespec="seconds"),
            "operation": h.get("operation"),
            "rows_written": m.get("numTargetRowsInserted", m.get("numOutputRows")),
            "engine": h.get("engineInfo"),
        })
    print_table(rows, max_width=100)
    return 0


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schema", action="store_true", help="the config's JSON schema (for editors) instead of the config")


@command("config", "the config a command would run with (the YAML file, then the overrides), or its JSON schema",
         _config_args)
def _config(a: argparse.Namespace, cfg: Config) -> int:
    import yaml

    from tao_spark.config import json_schema

    emit(json.dumps(json_schema(), indent=2) if a.schema else yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    return 0


def _coverage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


@command("coverage", "which configured rewards apply to the prompt log's prompts, per task", _coverage_args)
def _coverage(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import coverage
    from tao_spark.tables import TableNotFound

    _, tables = _context(cfg)
    try:
        cov = coverage.measure(tables, cfg)
    except TableNotFound:
        raise UserError("no prompts yet: run `tao ingest FILE` (or `tao ingest --table NAME`) first") from None
    emit(json.dumps(cov) if a.json else coverage.summary(cov))
    return 0


def _genai_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", help="round id (default: the latest evaluated round)")
    p.add_argument("--arm", choices=["challenger", "champion"], default="challenger", help="whose answers")


@command("genai-eval", "mlflow.genai.evaluate of a round's held-out answers, every reward as an MLflow scorer",
         _genai_args)
def _genai_eval(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark.registry import mlflow_evaluate
    from tao_spark.tables import TableNotFound

    _, tables = _context(cfg)
    try:
        result = mlflow_evaluate(tables, cfg, a.round, a.arm)
    except TableNotFound:
        raise UserError("no evaluations yet: run `tao round` first") from None
    emit(json.dumps({"run_id": result.run_id, "metrics": {k: float(v) for k, v in result.metrics.items()}}))
    return 0


def _round_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--new", action="store_true", help="start a fresh round even if one is unfinished")
    p.add_argument("--json", action="store_true", help="print the round's row as JSON")


@command("round", "run one TAO round: generate, score, select, train, evaluate, register", _round_args)
def _round(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import loop

    _, tables = _context(cfg)
    rnd = loop.run_round(tables, cfg, new=a.new)
    if rnd is None:
        emit(json.dumps(None) if a.json else "nothing to do: no new prompts since the last promoted round")
        return 0
    emit(json.dumps(_jsonable(rnd.__dict__), default=str) if a.json else loop.report(rnd, cfg))
    return 0


def _loop_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rounds", type=int, help="stop after this many rounds (default: run until interrupted)")
    g.add_argument("--once", action="store_true", help="one round, for schedulers (same as --rounds 1)")


@command("loop", "run rounds on the growing prompt log: retune, test, promote, repeat", _loop_args)
def _loop(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import loop
    from tao_spark.locks import Busy

    _, tables = _context(cfg)
    try:
        loop.run_loop(tables, cfg, rounds=1 if a.once else a.rounds)
    except Busy as e:
        print(f"tao loop: {e}", file=sys.stderr)
        return 3
    return 0


def _status_row(row: dict[str, Any]) -> dict[str, Any]:
    """Rates and rewards to three decimals; the win rate with its 95% interval in one column."""
    def f3(v: Any) -> str:
        return "" if v is None or v != v else f"{float(v):.3f}"

    out = {k: v for k, v in row.items() if k not in ("win_rate", "win_rate_low", "win_rate_high", "champion_reward",
                                                      "challenger_reward", "forgetting", "train_loss_last")}
    out["win_rate"] = (f"{f3(row.get('win_rate'))} [{f3(row.get('win_rate_low'))}, {f3(row.get('win_rate_high'))}]"
                       if f3(row.get("win_rate")) else "")
    out["reward"] = f"{f3(row.get('champion_reward'))} -> {f3(row.get('challenger_reward'))}"
    out["forgetting"] = f3(row.get("forgetting"))
    out["train_loss"] = f3(row.get("train_loss_last"))
    return out


@command("status", "the history of rounds as a table, and a plot of it in the latest MLflow run")
def _status(a: argparse.Namespace, cfg: Config) -> int:
    import mlflow

    from tao_spark import registry, rounds

    _, tables = _context(cfg)
    frame = rounds.history(tables)
    if frame.empty:
        print("no rounds yet: run `tao round`")
        return 0
    print_table([_status_row(r) for r in frame.to_dict("records")], max_width=28)
    runs = [r for r in frame.round_id if r]
    latest = rounds.load(tables, runs[-1])
    if latest.mlflow_run_id:
        registry.setup(cfg)
        with mlflow.start_run(run_id=latest.mlflow_run_id):
            mlflow.log_figure(rounds.history_figure(frame), "plots/rounds.png")
        print(f"plot: plots/rounds.png in MLflow run {latest.mlflow_run_id}")
    return 0


def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round", dest="round_id", help="round id (default: the latest unfinished round)")


def _stage(name: str) -> Handler:
    def run(a: argparse.Namespace, cfg: Config) -> int:
        from tao_spark import loop, rounds

        _, tables = _context(cfg)
        rnd = rounds.load(tables, a.round_id) if a.round_id else rounds.latest_open(tables)
        if rnd is None and name != next(iter(STAGES)):
            # Only the first stage opens a round: a later one alone would only record a round it cannot run.
            raise UserError(f"no unfinished round: `tao round` runs one whole, `tao {next(iter(STAGES))}` starts one "
                            "to run stage by stage")
        if rnd is None:
            rnd = loop.start(tables, cfg)
        if rnd is None:
            print("nothing to do: no new prompts since the last promoted round")
            return 0
        rnd = loop.run_stage(tables, rnd, name, cfg)
        print(loop.report(rnd, cfg))
        return 0
    return run


for _name, _help in STAGES.items():
    command(_name, _help, _stage_args)(_stage(_name))


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, help="TCP port (default: serve.port)")


@command("serve", "serve the registered model over an OpenAI-compatible API, capturing prompts (A/B, hot swap)",
         _serve_args)
def _serve(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import serve

    if a.port is not None:
        cfg.serve.port = a.port
    try:
        tables = _context(cfg)[1] if cfg.serve.capture else None
        serve.serve(cfg, tables)
    except RuntimeError as e:
        print(f"tao serve: {e}", file=sys.stderr)
        return 2
    return 0


def _ab_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["report", "pairs", "replay"],
                   help="report: compare the arms' ratings and latency; pairs: turn opposite ratings of answers "
                        "to one prompt into preference_pairs (source feedback); replay: send a round's held-out "
                        "prompts through tao serve with a challenger share and compare the arms' rewards")
    p.add_argument("--min-rated", type=int, default=30, help="rated answers per arm before a winner is named")
    p.add_argument("--round", dest="round_id", help="replay: the round (default: the latest with a registered model)")
    p.add_argument("--share", type=float, default=0.5, help="replay: share of users sent to the challenger")
    p.add_argument("--url", help="replay: a running server's /v1 URL (default: one started for the replay, serving "
                                 "the round's baseline and its tuned version)")
    p.add_argument("--api-key", default=os.environ.get("TAO_API_KEY"), help="replay: key for --url ($TAO_API_KEY)")
    p.add_argument("--max-prompts", type=int, default=0, help="replay: cap on prompts (0 = all held out)")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("ab", "A/B of the served arms: ratings on live traffic, or a replay of held-out prompts", _ab_args)
def _ab(a: argparse.Namespace, cfg: Config) -> int:
    from tao_spark import serve

    _, tables = _context(cfg)
    if a.action == "replay":
        rep = serve.replay(tables, cfg, round_id=a.round_id, share=a.share, url=a.url, api_key=a.api_key,
                           max_prompts=a.max_prompts)
        if a.json:
            emit(json.dumps(rep))
            return 0
        print(f"A/B replay of round {rep['round_id']}: {rep['prompts']} held-out prompts, challenger share "
              f"{rep['share']}")
        print_table([{"arm": arm, **{k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}}
                     for arm, m in rep["arms"].items()])
        print(rep["verdict"])
        return 0
    if a.action == "pairs":
        n = serve.feedback_pairs(tables, cfg)
        emit(json.dumps({"pairs": n}) if a.json else f"{n} new preference pairs from feedback")
        return 0
    r = serve.ab_report(tables, min_rated=a.min_rated)
    if a.json:
        emit(json.dumps(r))
        return 0
    print_table([{"arm": arm, **{k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}}
                 for arm, m in r["arms"].items()])
    print(r["verdict"])
    return 0


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--connect", action="store_true",
                   help="start: also the SQL server with Delta: Spark Connect (sc://) and Thrift JDBC (jdbc:hive2://)")
    p.add_argument("--workers", type=int, default=2, help="start: worker JVMs")
    p.add_argument("--cores", type=int, default=2, help="start: task slots per worker")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("cluster", "a Spark standalone cluster on loopback (master, workers, optional Spark Connect server)",
         _cluster_args)
def _cluster(a: argparse.Namespace, cfg: Config) -> int:
    from dataclasses import asdict

    from tao_spark import cluster
    from tao_spark.session import delta_package

    if a.action == "stop":
        stopped = cluster.stop(cfg.home)
        emit(json.dumps({"stopped": stopped}) if a.json else
             f"stopped {', '.join(stopped)}" if stopped else "no cluster running")
        return 0
    if a.action == "status":
        st = cluster.status(cfg.home)
        emit(json.dumps(st) if a.json else
             "\n".join(f"{k}: {v}" for k, v in st.items()) if st["running"] else "no cluster running")
        return 0 if st["running"] else 1
    try:
        state = cluster.start(cfg.home, workers=a.workers, cores=a.cores, connect=a.connect)
    except RuntimeError as e:
        print(f"tao cluster: {e}", file=sys.stderr)
        return 2
    if a.json:
        emit(json.dumps(asdict(state)))
        return 0
    print(f"master   {state.master_url}   (UI {state.master_ui})")
    if state.connect_url:
        print(f"connect  {state.connect_url}")
        print(f"jdbc     {state.jdbc_url}   (beeline, BI tools: tables by name, e.g. tao.prompts)")
    # Full paths: pyspark's spark-submit and spark-sql live in this environment's bin, often not on PATH.
    bin_dir = Path(sys.executable).parent
    print(f"\n  tao round spark.master={state.master_url} train.num_processes=2")
    print(f"  PYSPARK_PYTHON={sys.executable} {bin_dir / 'spark-submit'} --master {state.master_url} "
          f"--packages {delta_package()} jobs/tao_round.py train.num_processes=2")
    if state.connect_url:
        print(f"  tao round spark.remote={state.connect_url} lakehouse=tao")
        spark_home = cluster._spark_home()
        print(f"  SPARK_HOME={spark_home} {spark_home / 'bin' / 'beeline'} -u {state.jdbc_url} "
              "-e 'SELECT count(*) FROM tao.prompts'")
    print("  tao cluster stop")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tao", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: conf/local.yaml or $TAO_CONFIG)")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of one line for usage errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only on stderr, no progress lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug lines too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, _, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", default=argparse.SUPPRESS, help="YAML config")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    # Dotted overrides may stand anywhere; a path that happens to contain "=" stays a path.
    overrides = [x for x in argv if OVERRIDE.match(x) and not Path(x).exists()]
    rest = [x for x in argv if x not in overrides]
    args = build_parser().parse_args(rest)
    # The package's progress lines and warnings ("tao" logger, tao_spark/__init__.py): -q keeps the warnings only.
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.getLogger("tao").setLevel(level)
    try:
        path = args.config or default_config_path()
        cfg = load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"tao: config error: {e}", file=sys.stderr)
        return 2
    try:
        with _json_stdout() if getattr(args, "json", False) else contextlib.nullcontext():
            return COMMANDS[args.command][1](args, cfg)
    except UserError as e:
        if args.debug:
            raise
        print(f"tao {args.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pyspark.errors.exceptions.base import PythonException

        if args.debug or not isinstance(e, PythonException):
            raise
        print(f"tao {args.command}: {executor_error(str(e))} (--debug for the traceback)", file=sys.stderr)
        return 1


_RAISED = re.compile(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit)): (.*)$")


def executor_error(message: str) -> str:
    """One line for a Python function that failed on the executors (a custom reward, say): the exception it raised,
    the last one of the worker's traceback, and where to look when the executors cannot import a module."""
    raised = [m for line in message.splitlines() if (m := _RAISED.match(line.strip()))]
    if not raised:
        return "a Python function on the executors failed"
    kind, text = raised[-1].groups()
    hint = ""
    if "ModuleNotFoundError" in message or "No module named" in text:
        hint = ("; the executors import it from their own Python path: install it where they run, or start the "
                "cluster with PYTHONPATH naming it")
    return f"a Python function on the executors failed: {kind}: {text}{hint}"


if __name__ == "__main__":
    sys.exit(main())
