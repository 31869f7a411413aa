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

    def __init__(self, answer, busy: int = 0) -> None:
        self.answer, self.requests, self.busy = answer, [], busy
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if outer.busy > 0:  # rate limited, as a serving endpoint over its quota answers
                    outer.busy -= 1
                    data = b'{"error": {"message": "rate limit", "type": "rate_limit"}}'
                    self.send_response(429)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                reply = outer.answer(body["messages"][-1]["content"])
                if reply is None:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"id": f"chatcmpl-{len(outer.requests)}", "object": "chat.completion",
                                   "created": 0, "model": body.get("model") or "judge",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": reply}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
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
                                                               "api_key_env": "JUDGE_KEY", "retries": 1,
                                                               "cache": ""}))
    before = dict(judge_mod.stats)
    out = fn(["q"] * 5, ["a good answer", "a poor answer", "garbage", "eleven", "crash"])
    assert out[0] == pytest.approx(8 / 9) and out[1] == pytest.approx(2 / 9)
    assert all(math.isnan(v) for v in out[2:])
    assert fn.last_failures == [False, False, True, True, True]
    assert judge_mod.stats["failures"] - before["failures"] == 3
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert len(server.requests) == 6  # the 500 was retried once, then recorded as a failure
    assert server.requests[0]["auth"] == "Bearer sk-test" and server.requests[0]["model"] == "judge-1"
    assert server.requests[0]["temperature"] == 0.0


def test_pairwise_mode_scores_win_share_within_a_prompt(server):
    fn = Judge(base_url=server.url + "/v1", mode="pairwise", cache="")
    out = fn(["p1", "p1", "p1", "p2", "p2", "p3"], ["good one", "bad one", "also good", "bad", "bad too", "alone"])
    assert out[:3] == pytest.approx([0.75, 0.0, 0.75])  # a good answer beats the bad one and ties the other
    assert out[3:5] == pytest.approx([0.5, 0.5])
    assert math.isnan(out[5]) and fn.last_failures == [False] * 6  # alone: not applicable, not a failure


def test_score_stage_stores_the_judge_failure_component(server, spark):
    specs = [RewardSpec(name="judge", fn="judge", params={"base_url": server.url, "cache": ""}),
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


def test_a_rate_limited_endpoint_is_retried_not_scored_as_missing(tmp_path):
    """Two 429s first (Retry-After: 0): the openai client's retries get every verdict."""
    s = Canned(lambda q: "Rating: 10", busy=2)
    try:
        fn = Judge(base_url=s.url, retries=3, concurrency=1, cache="")
        assert fn(["q", "q"], ["a", "b"]) == [1.0, 1.0] and fn.last_failures == [False, False]
        assert len(s.requests) == 4
        out = Judge(base_url=s.url, retries=0, cache="")
        s.busy = 1
        got = out(["q"], ["c"])
        assert math.isnan(got[0]) and out.last_failures == [True]  # no retries left: a recorded failure
    finally:
        s.server.shutdown()


def test_replies_are_cached_so_a_rerun_costs_no_request(tmp_path):
    s = Canned(lambda q: "Rating: 7")
    try:
        cache = str(tmp_path / "judge.sqlite")
        first = Judge(base_url=s.url, cache=cache)(["q1", "q2"], ["a", "b"])
        again = Judge(base_url=s.url, cache=cache)(["q1", "q2", "q3"], ["a", "b", "c"])
        assert again[:2] == first and len(s.requests) == 3  # only the new question went out
        Judge(base_url=s.url, model="other", cache=cache)(["q1"], ["a"])
        assert len(s.requests) == 4  # another judge model is another question
    finally:
        s.server.shutdown()


def test_guidelines_per_task_reach_the_judge_and_urls_are_normalised():
    from tao_spark.rewards.judge import api_base

    s = Canned(lambda q: "Rating: 5")
    try:
        fn = Judge(base_url=s.url, cache="", guidelines={"support": "Cite the help-center text."})
        fn(["q", "q"], ["a", "b"], tasks=["support", "chat"])
        asked = sorted(r["messages"][-1]["content"] for r in s.requests)
        assert sum("Cite the help-center text." in q for q in asked) == 1
    finally:
        s.server.shutdown()
    assert api_base("https://adb-1.azuredatabricks.net/serving-endpoints") == \
        "https://adb-1.azuredatabricks.net/serving-endpoints"
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/chat/completions") == "http://h:8000/v1"
