"""bench/run_all.py's smoke run on the tiny model: every benchmark script still runs and reports its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_run_all_tiny_reports_every_ratio_and_appends_history(tmp_path: Path) -> None:
    out = tmp_path / "results" / "latest.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--tiny", "--out", str(out)], check=True,
                   cwd=ROOT, timeout=900)
    result = json.loads(out.read_text())
    # A benchmark that breaks (one script calling another's changed signature) shows up here, not after an hour.
    assert result["failed"] == []
    for key in ("generation_udf_ratio", "scoring_udf_ratio", "training_distributor_ratio",
                "generation_roofline_fraction"):
        assert isinstance(result[key], float) and 0 < result[key], key
    assert set(result["peak_rss_mb"]) == {"generate", "score", "train"}
    assert all(mb > 100 for mb in result["peak_rss_mb"].values())  # a Python process with torch is larger
    assert result["model_loads_per_worker"]["generate"] == 1
    history = (out.parent / "history.jsonl").read_text().splitlines()
    assert len(history) == 1 and json.loads(history[0])["date"] == result["date"]


def test_answer_pairs_tiny_counts_pairs_of_both_arms(tmp_path: Path) -> None:
    """bench/answer_pairs.py pairs the same prompts with and without generate.greedy_answer: only the first arm has
    greedy answers, and what it counts is consistent (a pair's chosen is the greedy answer at most once a prompt)."""
    out = tmp_path / "pairs.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "answer_pairs.py"), "--tiny", "--out", str(out)], check=True,
                   env={**os.environ, "TAO_HOME": str(tmp_path / "home")}, timeout=600)
    got = json.loads(out.read_text())
    on, off = got["arms"]["greedy_answer"], got["arms"]["samples_only"]
    assert got["prompts"] == 8 and got["sampling"]["greedy_answer"] is True
    assert off["greedy_right_rate"] is None and off["chosen_is_greedy"] == 0
    assert on["greedy_right_rate"] is not None and 0 <= on["chosen_is_greedy"] <= on["pairs"] <= 8
    for arm in (on, off):
        assert arm["chosen_right"] <= arm["pairs"] and arm["rejected_right"] <= arm["pairs"]
