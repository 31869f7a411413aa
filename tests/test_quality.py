"""bench/quality.py end to end on the tiny model: two rounds as the log grows, the table, the plot, MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_quality_benchmark_tables_two_rounds_on_a_fixed_heldout_set(tiny_model: Path, tmp_path: Path) -> None:
    conf = yaml.safe_load((ROOT / "conf" / "local.yaml").read_text())
    # The built-in checks all fail on a random model's noise; this reward tells its samples apart.
    conf["score"]["rewards"].append({"name": "e_rate", "fn": "tests.test_round:e_rate", "weight": 1.0})
    (tmp_path / "conf.yaml").write_text(yaml.safe_dump(conf))
    out = tmp_path / "quality"
    cmd = [sys.executable, str(ROOT / "bench" / "quality.py"), "--rounds", "2", "--arms", "champion", "--best-of", "3",
           "--out", str(out), "--config", str(tmp_path / "conf.yaml"), "--set", f"model.path={tiny_model}",
           "generate.max_prompts=8", "generate.n=3", "generate.max_new_tokens=6", "evaluate.max_new_tokens=6",
           "generate.temperature=1.0", "select.min_margin=0", "train.trl.max_steps=2", "evaluate.bootstrap=200"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)

    result = json.loads((out / "quality.json").read_text())
    table = result["table"]
    assert [(r["arm"], r["round"]) for r in table] == [("champion", 0), ("champion", 1), ("champion", 2)]
    # Every row is measured on the same prompts: round 1's held-out set, re-checked in round 2.
    assert result["fixed_heldout_prompts"] > 0
    assert {r["prompts"] for r in table} == {result["fixed_heldout_prompts"]}
    for r in table:
        assert 0 <= r["compliance"] <= 1 and 0 <= r["capped"] <= 1 and r["tokens"] > 0 and r["entropy"] > 0
        assert set(r["compliance_by_kind"]) and all(0 <= v <= 1 for v in r["compliance_by_kind"].values())
    for r in table[1:]:
        assert r["win_rate_low"] <= r["win_rate"] <= r["win_rate_high"] and r["pairs"] > 0
    assert table[2]["n_prompts"] > table[1]["n_prompts"]  # the log grew between the rounds
    # Against the base: round 1's baseline is the base, so it is its own win rate on the same prompts; round 2 is
    # compared on the held-out prompts whose base answer a round scored (its own set if it ran against the base).
    assert table[1]["win_vs_base"] == pytest.approx(table[1]["win_rate"])
    assert table[1]["win_vs_base_prompts"] == table[1]["heldout_prompts"]
    assert table[1]["win_vs_base_prompts"] <= table[2]["win_vs_base_prompts"] <= table[2]["heldout_prompts"]
    assert set(result["ceiling"]) == {"best_of_3_compliance", "sampled_compliance_n3", "best_of_3_arithmetic",
                                      "majority_at_3_arithmetic"}
    assert result["ceiling"]["best_of_3_compliance"] >= result["ceiling"]["sampled_compliance_n3"]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| champion | 2 |" in (out / "quality.md").read_text()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'champion' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tao-quality")
    (run,) = client.search_runs([exp.experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"quality.png", "quality.md", "quality.json"}
