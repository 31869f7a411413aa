"""The job entry points and the Databricks Asset Bundle agree with the CLI they call."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tao_spark.cli import COMMANDS, OVERRIDE, build_parser
from tao_spark.config import load_config

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def _bundle(jobs: Path = JOBS) -> tuple[dict, list[tuple[Path, dict]]]:
    root = yaml.safe_load((jobs / "databricks.yml").read_text())
    resources = [(p, yaml.safe_load(p.read_text())) for pattern in root["include"] for p in sorted(jobs.glob(pattern))]
    return root, resources


def _tasks(job: dict) -> list[dict]:
    """A job's tasks, with each for_each_task's inner task after its outer one."""
    out = []
    for t in job.get("tasks", []):
        out.append(t)
        if "for_each_task" in t:
            out.append(t["for_each_task"]["task"])
    return out


def bundle_problems(jobs: Path = JOBS) -> list[str]:
    """What ``databricks bundle validate`` would refuse, checked offline: every job against Databricks' own typed
    models (unknown or misspelt fields), then what the models cannot see: files, task and key references."""
    from databricks.bundles.jobs import Job

    problems = []
    root, resources = _bundle(jobs)
    names = {name for _, r in resources for name in r["resources"]["jobs"]}
    variables = set(root.get("variables", {}))
    for path, res in resources:
        for name, job in res["resources"]["jobs"].items():
            where = f"{path.name}: {name}"
            try:
                Job.from_dict(job)
            except (ValueError, TypeError) as e:
                problems.append(f"{where}: {e}")
                continue
            clusters = {c["job_cluster_key"] for c in job.get("job_clusters", [])}
            envs = {e["environment_key"] for e in job.get("environments", [])}
            keys = [t["task_key"] for t in job["tasks"]]
            if len(set(keys)) != len(keys):
                problems.append(f"{where}: duplicate task_key")
            for task in _tasks(job):
                at = f"{where}.{task['task_key']}"
                for dep in task.get("depends_on", []):
                    if dep["task_key"] not in keys:
                        problems.append(f"{at}: depends_on a missing task {dep['task_key']!r}")
                if "job_cluster_key" in task and task["job_cluster_key"] not in clusters:
                    problems.append(f"{at}: job_cluster_key {task['job_cluster_key']!r} is not defined")
                if "environment_key" in task and task["environment_key"] not in envs:
                    problems.append(f"{at}: environment_key {task['environment_key']!r} is not defined")
                if "spark_python_task" in task:
                    if not ("job_cluster_key" in task) ^ ("environment_key" in task):
                        problems.append(f"{at}: needs exactly one of job_cluster_key and environment_key")
                    entry = (path.parent / task["spark_python_task"]["python_file"]).resolve()
                    if not entry.is_file():
                        problems.append(f"{at}: python_file {entry} does not exist")
                ref = task.get("run_job_task", {}).get("job_id", "")
                m = re.fullmatch(r"\$\{resources\.jobs\.(\w+)\.id\}", str(ref))
                if "run_job_task" in task and (not m or m[1] not in names):
                    problems.append(f"{at}: run_job_task names no job of the bundle ({ref})")
            text = yaml.safe_dump(job)
            for var in re.findall(r"\$\{var\.(\w+)\}", text):
                if var not in variables:
                    problems.append(f"{where}: variable {var!r} is not declared")
    return problems


def _resolve(text: str, root: dict, job: dict) -> str:
    """A parameter as a run sees it: bundle variables and job parameters at their defaults."""
    params = {p["name"]: p["default"] for p in job.get("parameters", [])}
    for _ in range(3):
        text = re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: str(params[m[1]]), text)
        text = re.sub(r"\$\{var\.(\w+)\}", lambda m: str(root["variables"][m[1]]["default"]), text)
    return text.replace("${workspace.file_path}", str(ROOT)).replace("/Workspace" + str(ROOT), str(ROOT))


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
    assert bundle_problems() == []
    root, resources = _bundle()
    assert {"dev", "prod"} <= set(root["targets"])
    jobs = {name: job for _, r in resources for name, job in r["resources"]["jobs"].items()}
    assert {"tao_round", "tao_round_serverless", "tao_endpoints"} <= set(jobs)
    for path, res in resources:
        for job in res["resources"]["jobs"].values():
            clusters = {c["job_cluster_key"]: c for c in job.get("job_clusters", [])}
            keys = [t["task_key"] for t in job["tasks"]]
            for task in job["tasks"]:
                for dep in task.get("depends_on", []):
                    assert keys.index(dep["task_key"]) < keys.index(task["task_key"])
                if "spark_python_task" not in task:
                    continue
                entry = (path.parent / task["spark_python_task"]["python_file"]).resolve()
                params = [_resolve(p, root, job) for p in task["spark_python_task"]["parameters"]]
                assert not any(re.search(r"\{\{|\$\{", p) for p in params), params
                stage = entry.stem.removeprefix("tao_")
                args = build_parser().parse_args([stage, *[p for p in params if not OVERRIDE.match(p)]])
                cfg = load_config(args.config, [p for p in params if OVERRIDE.match(p)])
                assert args.config.endswith("conf/databricks.yaml")
                if stage != "ingest":  # each endpoint its own lakehouse and registered model
                    assert cfg.lakehouse == "/Volumes/main/tao/tao_assistant"
                    assert cfg.mlflow.model_name == "main.tao.tao_assistant"
                else:
                    assert args.table == "main.serving.tao_assistant_payload"
            gpu_stages = {t["task_key"] for t in job["tasks"] if clusters.get(t.get("job_cluster_key"), {})
                          .get("new_cluster", {}).get("spark_conf", {}).get("spark.task.resource.gpu.amount")}
            if "generate" in keys:
                assert {"generate", "score", "train", "evaluate"} <= gpu_stages
                assert all(c["new_cluster"]["spark_version"].startswith("17.3.") for c in clusters.values())
    assert {t["task_key"] for t in jobs["tao_round_serverless"]["tasks"] if "environment_key" in t} == {
        "ingest", "select", "register", "status"}
    fan_out = jobs["tao_endpoints"]["tasks"][0]["for_each_task"]
    assert json.loads(jobs["tao_endpoints"]["parameters"][0]["default"]) and fan_out["concurrency"] == 1


def _broken(tmp: Path, edit: Callable[[dict], None]) -> Path:
    jobs = Path(shutil.copytree(JOBS, tmp / "jobs"))
    (tmp / "conf").symlink_to(ROOT / "conf")
    path = jobs / "resources" / "tao_round.yml"
    doc = yaml.safe_load(path.read_text())
    edit(doc["resources"]["jobs"]["tao_round"])
    path.write_text(yaml.safe_dump(doc))
    return jobs


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda j: j.update(max_concurent_runs=1), "Unexpected field 'max_concurent_runs'"),
    (lambda j: j["tasks"][1]["spark_python_task"].update(python_fiel="x"), "Unexpected field 'python_fiel'"),
    (lambda j: j["tasks"][1]["spark_python_task"].update(python_file="../tao_gen.py"), "does not exist"),
    (lambda j: j["tasks"][2]["depends_on"][0].update(task_key="generat"), "depends_on a missing task 'generat'"),
    (lambda j: j["tasks"][3].update(job_cluster_key="gpu2"), "job_cluster_key 'gpu2' is not defined"),
    (lambda j: j["tasks"][3].update(environment_key="tao"), "needs exactly one of"),
    (lambda j: j["job_clusters"][0]["new_cluster"].update(node_type_id="${var.gpu_nodes}"),
     "variable 'gpu_nodes' is not declared"),
], ids=["misspelt-field", "misspelt-nested-field", "missing-file", "missing-dependency", "undefined-cluster",
        "two-computes", "undeclared-variable"])
def test_a_broken_bundle_is_refused(tmp_path, edit, expected):
    assert bundle_problems(JOBS) == []
    problems = bundle_problems(_broken(tmp_path, edit))
    assert problems and any(expected in p for p in problems), problems
