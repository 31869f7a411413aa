"""The job entry points and the Databricks Asset Bundle agree with the CLI they call."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tao_spark.cli import COMMANDS, OVERRIDE, build_parser
from tao_spark.config import load_config

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def _bundle() -> tuple[dict, list[tuple[Path, dict]]]:
    root = yaml.safe_load((JOBS / "databricks.yml").read_text())
    resources = [(p, yaml.safe_load(p.read_text())) for pattern in root["include"] for p in JOBS.glob(pattern)]
    return root, resources


def test_entry_files_do_not_shadow_modules():
    # A job runs with jobs/ first on sys.path: jobs/select.py once hid the stdlib's select module.
    import importlib.util
    import sys

    for path in JOBS.glob("*.py"):
        assert path.stem not in sys.stdlib_module_names and importlib.util.find_spec(path.stem) is None, path


def test_every_stage_has_a_thin_entry_file():
    for stage in ("ingest", "generate", "score", "select", "train", "evaluate", "register", "round", "loop"):
        text = (JOBS / f"tao_{stage}.py").read_text()
        assert f'main(["{stage}", *sys.argv[1:]])' in text and stage in COMMANDS


def test_bundle_tasks_point_at_files_and_pass_accepted_parameters():
    root, resources = _bundle()
    assert {"dev", "prod"} <= set(root["targets"])
    jobs = {name: job for _, r in resources for name, job in r["resources"]["jobs"].items()}
    assert "tao_round" in jobs
    for path, res in resources:
        for job in res["resources"]["jobs"].values():
            clusters = {c["job_cluster_key"]: c for c in job["job_clusters"]}
            keys = [t["task_key"] for t in job["tasks"]]
            assert job["schedule"]["quartz_cron_expression"]
            config_default = job["parameters"][0]["default"]
            for task in job["tasks"]:
                for dep in task.get("depends_on", []):
                    assert keys.index(dep["task_key"]) < keys.index(task["task_key"])
                assert task["job_cluster_key"] in clusters
                entry = (path.parent / task["spark_python_task"]["python_file"]).resolve()
                assert entry.is_file(), entry
                params = [p.replace("{{job.parameters.config}}", str(ROOT / "conf" / "databricks.yaml"))
                          for p in task["spark_python_task"]["parameters"]]
                assert not any(re.search(r"\{\{|\$\{", p) for p in params)
                stage = entry.stem.removeprefix("tao_")
                args = build_parser().parse_args([stage, *[p for p in params if not OVERRIDE.match(p)]])
                load_config(args.config, [p for p in params if OVERRIDE.match(p)])
            gpu_stages = {t["task_key"] for t in job["tasks"] if t["job_cluster_key"] == "gpu"}
            assert {"generate", "score", "train"} <= gpu_stages
            for key in {t["job_cluster_key"] for t in job["tasks"] if t["task_key"] in gpu_stages}:
                assert clusters[key]["new_cluster"]["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
            assert config_default.endswith("conf/databricks.yaml")
