"""The LLM judge: parsing, recorded failures, pairwise mode, and an OpenAI-compatible endpoint on loopback."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from pyspark.sql import functions as F

from tao_spark.config import RewardSpec
from tao_spark.rewards import judge as judge_mod
from tao_spark.rewards import load_reward
from tao_spark.rewards.judge import Judge, parse_rating, parse_verdict
from tao_spark.score import COMBINED, reward_key, score_frame, scored
from tao_spark.tables import columns


@pytest.mark.parametrize("reply,value", [("Rating: 7", 6 / 9), ("10", 1.0), ("[[1]]", 0.0), ("Score: 4/10", 3 / 9),
                                         ("**Rating:** 5 - decent", 4 / 9), ("8/10, clear and short", 7 / 9)])
def test_parse_rating_success(reply, value):
    assert parse_rating(reply) == pytest.approx(value)


@pytest.mark.parametrize("reply", ["I cannot rate this.", "", "Rating: 11", "Rating: 0", "0", "-3",
                                   "I think 7 of them are fine", "\x00\x01 garbage ]]]["])
def test_parse_rating_failure_is_none_never_zero(reply):
    assert parse_rating(reply) is None


def test_parse_verdict():
    assert [parse_verdict(t) for t in ["Verdict: A", "verdict: b", "Verdict: tie", "B", "**Verdict:** A"]] == \
        ["A", "B", "tie", "B", "A"]
    assert parse_verdict("A is longer than B") is None and parse_verdict("Both are fine") is None


class Canned:
    """An OpenAI-compatible /v1/chat/completions on loopback that answers from a function of the question."""

    def __init__(self, answer) -> None:
        self.answer, self.requests = answer, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                reply = outer.answer(body["messages"][-1]["content"])
                if reply is None:
                    self.send_response(500)
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Canned]:
    def answer(question: str) -> str | None:
        if "[Answer A]" in question:  # pairwise: the answer that says "good" wins
            a = question.split("[Answer A]")[1].split("[Answer B]")[0]
            b = question.split("[Answer B]")[1]
            return "Verdict: tie" if ("good" in a) == ("good" in b) else f"Verdict: {'A' if 'good' in a else 'B'}"
        ans = question.split("[Answer]")[1]
        if "crash" in ans:
            return None  # HTTP 500
        if "garbage" in ans:
            return "As an AI I have feelings about this."
        if "eleven" in ans:
            return "Rating: 11"
        return "Rating: 9" if "good" in ans else "Rating: 3"

    s = Canned(answer)
    yield s
    s.server.shutdown()


def test_endpoint_pointwise_records_failures(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    fn = load_reward(RewardSpec(name="j", fn="judge", params={"base_url": server.url, "model": "judge-1",
                                                               "api_key_env": "JUDGE_KEY"}))
    before = dict(judge_mod.stats)
    out = fn(["q"] * 5, ["a good answer", "a poor answer", "garbage", "eleven", "crash"])
    assert out[0] == pytest.approx(8 / 9) and out[1] == pytest.approx(2 / 9)
    assert all(math.isnan(v) for v in out[2:])
    assert fn.last_failures == [False, False, True, True, True]
    assert judge_mod.stats["failures"] - before["failures"] == 3
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert server.requests[0]["auth"] == "Bearer sk-test" and server.requests[0]["model"] == "judge-1"
    assert server.requests[0]["temperature"] == 0.0


def test_pairwise_mode_scores_win_share_within_a_prompt(server):
    fn = Judge(base_url=server.url + "/v1", mode="pairwise")
    out = fn(["p1", "p1", "p1", "p2", "p2", "p3"], ["good one", "bad one", "also good", "bad", "bad too", "alone"])
    assert out[:3] == pytest.approx([0.75, 0.0, 0.75])  # a good answer beats the bad one and ties the other
    assert out[3:5] == pytest.approx([0.5, 0.5])
    assert math.isnan(out[5]) and fn.last_failures == [False] * 6  # alone: not applicable, not a failure


def test_score_stage_stores_the_judge_failure_component(server, spark):
    specs = [RewardSpec(name="judge", fn="judge", params={"base_url": server.url}),
             RewardSpec(name="coh", fn="coherence", weight=0.0)]
    msgs = json.dumps([{"role": "user", "content": "Tell me about tides."}])
    pdf = pd.DataFrame({"messages_json": [msgs] * 3, "completion": ["good tides text", "garbage", "plain text"]})
    out = score_frame(pdf, specs)
    assert list(out.columns) == ["judge", "coh", "judge_failed", COMBINED]
    assert list(out["judge_failed"]) == [0.0, 1.0, 0.0]
    assert math.isnan(out["judge"][1]) and math.isnan(out[COMBINED][1])  # a failure is not a silent 0

    # Through the stage's Spark job: the failure flag becomes a `judge_failed` row, NaN becomes NULL, and the
    # reward that records no failures gets no `coh_failed` row.
    keys = pd.DataFrame({"round_id": "r1", "purpose": "train", "prompt_id": "p1", "candidate_idx": [0, 1, 2]})
    df = scored(spark.createDataFrame(pd.concat([keys, pdf], axis=1)), specs)
    rows = df.toPandas()
    assert list(rows.columns) == columns("scores")
    assert sorted(set(rows["reward_name"])) == sorted(["judge", "coh", "judge_failed", COMBINED])
    got = rows.set_index(["candidate_idx", "reward_name"])["value"]
    assert [got[(i, "judge_failed")] for i in range(3)] == [0.0, 1.0, 0.0]
    assert got[(1, "judge")] is None or pd.isna(got[(1, "judge")])
    # The failed answer's judge and combined values are NULL in Spark, not NaN.
    assert df.where(F.col("value").isNull()).count() == 2 and df.where(F.isnan("value")).count() == 0
    assert (rows["reward_key"] == reward_key(specs)).all() and rows["reused_from"].isna().all()


def test_judge_params_are_checked():
    with pytest.raises(ValueError, match="mode"):
        load_reward(RewardSpec(name="j", fn="judge", params={"base_url": "http://x", "mode": "ranked"}))
    with pytest.raises(ValueError, match="base_url"):
        load_reward(RewardSpec(name="j", fn="judge", params={}))
    with pytest.raises(ValueError, match="temperture"):
        load_reward(RewardSpec(name="j", fn="judge", params={"base_url": "http://x", "temperture": 0}))


@pytest.mark.integration
def test_local_model_judge_runs_greedy_and_records_what_it_cannot_parse(tiny_model):
    fn = Judge(model=str(tiny_model), max_new_tokens=4)
    out = fn(["Say hi."] * 2, ["hi", "hello"])
    assert len(out) == 2 and len(fn.last_failures) == 2
    for v, failed in zip(out, fn.last_failures, strict=True):  # a random model: whatever it says is accounted for
        assert failed == math.isnan(v) and (failed or 0 <= v <= 1)
