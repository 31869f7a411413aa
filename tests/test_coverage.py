"""Scores that do not depend on batching, self-consistency on answer-type prompts, and ``tao coverage``."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

from tao_spark.config import RewardSpec, ScoreConfig, load_config
from tao_spark.rewards.verifiers import asks_short_answer, self_consistency, shows_work
from tao_spark.score import COMBINED, _score_partition, score_frame, scored
from tests.test_cli import ROOT, tao

SPECS = [RewardSpec(name="instruct", fn="instruction_following"),
         RewardSpec(name="consistency", fn="self_consistency"),
         RewardSpec(name="vote", fn="majority_vote"), RewardSpec(name="coherence", fn="coherence", weight=0.3)]
CFG = ScoreConfig(rewards=SPECS, length_control="decorrelate")


def _candidates(n_prompts: int = 13, n: int = 4) -> pd.DataFrame:
    rng = random.Random(3)
    rows = []
    for p in range(n_prompts):
        text = (f"What is {p} + {p + 3}? Answer with a single number." if p % 2 else
                f"Describe place {p}. Answer in at most 12 words. Do not use any commas.")
        for k in range(n):
            answer = (f"The answer is {2 * p + 3 + rng.choice([0, 0, 1])}." if p % 2 else
                      " ".join(rng.choice(["calm", "sea,", "town", "old", "quiet", "harbour"])
                               for _ in range(rng.randint(4, 20))))
            rows.append({"round_id": "r", "purpose": "train", "prompt_id": f"p{p:02d}", "candidate_idx": k,
                         "task": "t", "completion": answer,
                         "messages_json": json.dumps([{"role": "user", "content": text}])})
    return pd.DataFrame(rows)


def _by_key(frame: pd.DataFrame) -> dict:
    cols = [c for c in frame.columns if c not in ("round_id", "purpose", "prompt_id", "candidate_idx")]
    return {(r.prompt_id, r.candidate_idx): tuple(None if pd.isna(getattr(r, c)) else round(getattr(r, c), 12)
                                                  for c in cols) for r in frame.itertuples()}


@pytest.mark.parametrize("batch", [1, 3, 7, 10_000])
def test_the_worker_scores_the_same_whatever_the_arrow_batches(batch):
    cands = _candidates()
    whole = pd.concat(list(_score_partition(iter([cands]), specs=SPECS, cfg=CFG)))
    split = [cands.iloc[i:i + batch] for i in range(0, len(cands), batch)]
    parts = pd.concat(list(_score_partition(iter(split), specs=SPECS, cfg=CFG)))
    assert len(parts) == len(cands)
    assert _by_key(parts) == _by_key(whole)
    # The group rewards really are per prompt: four candidates, agreement shares in quarters.
    assert set(whole["consistency"].dropna()) <= {0.25, 0.5, 0.75, 1.0}


def test_two_purposes_in_one_pass_score_as_each_alone():
    """The evaluation scores both models' answers in one pass: the same prompt's answers from the other model are
    another group, so they never vote in self-consistency or majority."""
    cands = _candidates(n_prompts=6, n=3)
    other = _candidates(n_prompts=6, n=2).assign(purpose="eval_other", completion="The answer is 99.")
    both = pd.concat([cands, other]).sort_values(["purpose", "prompt_id"], kind="stable").reset_index(drop=True)
    together = pd.concat(list(_score_partition(iter([both]), specs=SPECS, cfg=CFG)))
    alone = pd.concat([pd.concat(list(_score_partition(iter([f]), specs=SPECS, cfg=CFG))) for f in (cands, other)])

    def keyed(frame: pd.DataFrame) -> dict:
        return {p: _by_key(frame[frame.purpose == p]) for p in sorted(set(frame.purpose))}

    assert len(together) == len(both) and keyed(together) == keyed(alone)
    assert set(together.loc[together.purpose == "eval_other", "consistency"].dropna()) == {1.0}


def test_the_score_job_gives_identical_scores_with_1_or_4_partitions_and_small_batches(spark):
    cands = spark.createDataFrame(_candidates())
    runs = []
    for partitions, batch in [(1, 10_000), (4, 7)]:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch))
        df = cands.repartition(partitions, "prompt_id").sortWithinPartitions("prompt_id")
        runs.append(scored(df, SPECS, CFG).toPandas().set_index(["prompt_id", "candidate_idx", "reward_name"])
                    ["value"].sort_index())
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10000")
    assert runs[0].index.equals(runs[1].index)
    assert all((a is None and b is None) or (pd.isna(a) and pd.isna(b)) or a == pytest.approx(b)
               for a, b in zip(runs[0], runs[1], strict=True))


def test_self_consistency_reads_answer_type_prompts_only():
    q = "A box holds 6 eggs. How many eggs are in 4 boxes? Answer with a single number."
    essay = "Write a short essay about autumn."
    out = self_consistency([q] * 4 + [essay] * 2, ["24", "The answer is 24.", "20", "no idea", "Leaves.", "Leaves."])
    assert out[:4] == [0.5, 0.5, 0.25, 0.0]
    assert all(math.isnan(v) for v in out[4:])
    assert asks_short_answer("Which of the following is a mammal? (A) shark (B) whale") and \
        not asks_short_answer("Tell me about whales.")


def test_a_bare_majority_never_outranks_a_minority_that_shows_its_work():
    """Three samples say a bare, confidently wrong 20; one computes 6 * 4 = 24. Only answers that show their work
    vote, so the computed answer scores highest and the bare majority lowest; a bare answer that agrees with the
    working scores with it. Without any working, every answer votes as before."""
    q = "A box holds 6 eggs. How many eggs are in 4 boxes? Answer with a single number."
    worked = "Each box has 6 eggs, so 6 * 4 = 24. The answer is 24."
    assert shows_work(worked) and shows_work("40 minus 4 leaves 36") and not shows_work("The answer is 20.")
    out = self_consistency([q] * 5, ["20", "The answer is 20.", "20 eggs", worked, "24"])
    assert out == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert self_consistency([q] * 3, ["20", "20", "24"]) == pytest.approx([2 / 3, 2 / 3, 1 / 3])


def test_a_prompt_split_in_two_calls_would_score_otherwise():
    """Why the worker never splits a prompt and a resumed score stage rescores a prompt whole."""
    msgs = json.dumps([{"role": "user", "content": "How many legs do 6 ants have? Answer with a single number."}])
    frame = pd.DataFrame({"messages_json": [msgs] * 4, "completion": ["36", "36", "30", "32"], "task": "t"})
    whole = score_frame(frame, SPECS, CFG)["consistency"].tolist()
    half = score_frame(frame.iloc[2:].reset_index(drop=True), SPECS, CFG)["consistency"].tolist()
    assert whole == [0.5, 0.5, 0.25, 0.25] and half == [0.5, 0.5]


def test_coverage_counts_on_the_bundled_log(tmp_path):
    home = tmp_path / "home"
    tao(home, "ingest", str(ROOT / "tao_spark" / "data" / "prompts.jsonl"))
    got = json.loads(tao(home, "coverage", "--json").stdout)
    prompts = [json.loads(line) for line in (ROOT / "tao_spark" / "data" / "prompts.jsonl").read_text().splitlines()]
    by_task = {t: sum(p["task"] == t for p in prompts) for t in {p["task"] for p in prompts}}
    assert got["prompts"] == len(prompts) and {t: v["prompts"] for t, v in got["tasks"].items()} == by_task
    names = [r.name for r in load_config(ROOT / "conf" / "local.yaml").score.rewards]
    for t in got["tasks"].values():
        assert list(t["rewards"]) == names and t["rewards"]["length"] == t["prompts"]
    assert got["tasks"]["arithmetic"]["rewards"]["numeric"] == by_task["arithmetic"]
    assert got["tasks"]["arithmetic"]["rewards"]["consistency"] == by_task["arithmetic"]
    assert got["tasks"]["instruct"]["rewards"]["instruct"] == by_task["instruct"]  # every one states a constraint
    assert got["tasks"]["instruct"]["floor_only"] == 0
    assert got["tasks"]["support"]["floor_only"] == by_task["support"]  # nothing checkable: said so
    assert got["instructions"]["recognised"] == sum(v for v in got["instructions"]["by_kind"].values())
    assert got["instructions"]["by_kind"]["detectable_format:json_key"] == \
        got["tasks"]["instruct"]["rewards"]["json"]
    human = tao(home, "coverage")
    assert "warning: task 'support'" in human.stdout and "judge" in human.stdout


def test_coverage_without_prompts_is_one_line(tmp_path):
    p = tao(tmp_path / "empty", "coverage", ok=False)
    assert p.returncode == 2 and "tao ingest" in p.stderr and "Traceback" not in p.stderr


def test_probes_decide_what_applies():
    from tao_spark.coverage import applies

    specs = [RewardSpec(name="i", fn="instruction_following"), RewardSpec(name="j", fn="judge",
                                                                           params={"base_url": "http://x"}),
             RewardSpec(name="n", fn="numeric_answer")]
    assert applies(specs, "Tell me a story.") == [False, True, False]  # the judge reads everything, unasked
    assert applies(specs, "What is 3 * 4? Answer with a single number. Do not use any commas.") == [True, True, True]


SEEN_TASKS: list[list[str] | None] = []


def task_reward(prompts: list[str], completions: list[str], tasks: list[str] | None = None) -> list[float]:
    """A reward that takes each row's task, as the judge does for per-task guidelines."""
    SEEN_TASKS.append(tasks)
    return [1.0] * len(prompts)


def test_the_score_frame_hands_tasks_to_rewards_that_take_them():
    SEEN_TASKS.clear()
    out = score_frame(_candidates(n_prompts=1), [RewardSpec(name="t", fn="tests.test_coverage:task_reward")])
    assert SEEN_TASKS == [["t"] * 4] and (out[COMBINED] == 1.0).all()


def test_a_mostly_floor_only_task_gets_a_warning_naming_what_to_add():
    from tao_spark.coverage import warnings

    cov = {"tasks": {"chat": {"prompts": 10, "floor_only": 6, "rewards": {}},
                     "math": {"prompts": 10, "floor_only": 5, "rewards": {}}}}
    [line] = warnings(cov)
    assert line.startswith("task 'chat': 6 of 10") and "judge" in line and "tao train-reward" in line


def test_the_policys_greedy_answer_anchors_the_vote():
    """With the greedy answer among the candidates (generate.greedy_answer), an answer that agrees with it scores 1
    and one that does not half its share of the vote: a sampled majority (here three bare 20s) never outranks the
    policy's mode. The anchor is read through the score frame's ``greedy`` column; without it, the vote is as
    before, and a greedy answer with no number anchors nothing."""
    q = "A box holds 6 eggs. How many eggs are in 4 boxes? Answer with a single number."
    answers = ["6 * 4 = 24, so 24.", "20", "20", "20", "The answer is 24."]
    anchored = self_consistency([q] * 5, answers, greedy=[True, False, False, False, False])
    assert anchored == pytest.approx([1.0, 0.0, 0.0, 0.0, 1.0])  # only the greedy answer shows work: it alone votes
    bare = ["24", "20", "20", "20", "24"]
    assert self_consistency([q] * 5, bare, greedy=[True] + [False] * 4) == pytest.approx([1, .3, .3, .3, 1])
    assert self_consistency([q] * 5, bare) == pytest.approx([.4, .6, .6, .6, .4])
    assert self_consistency([q] * 3, ["no idea", "20", "20"], greedy=[True, False, False]) == \
        pytest.approx([0.0, 2 / 3, 2 / 3])
    msgs = json.dumps([{"role": "user", "content": q}])
    frame = pd.DataFrame({"messages_json": [msgs] * 5, "completion": bare, "task": "t",
                          "greedy": [True] + [False] * 4})
    assert score_frame(frame, SPECS, CFG)["consistency"].tolist() == pytest.approx([1, .3, .3, .3, 1])
