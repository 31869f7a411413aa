"""The verifiers for SQL, JSON Schema, regex and majority vote, and length control in the score stage."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tao_spark.config import ConfigError, RewardSpec, ScoreConfig, load_config
from tao_spark.reward_model import correlation
from tao_spark.rewards import load_reward
from tao_spark.rewards.verifiers import final_answer, json_schema, majority_vote, regex_match, sql_executes
from tao_spark.score import COMBINED, COMBINED_RAW, score_frame

SCHEMA_PROMPT = ("Given the tables\nCREATE TABLE users (id INTEGER PRIMARY KEY, name VARCHAR(20), age INT);\n"
                 "CREATE TABLE orders (id INT, user_id INT REFERENCES users(id), total DECIMAL(10, 2));\n"
                 "write a query that lists users older than 30.")


def nan(x: float) -> bool:
    return isinstance(x, float) and math.isnan(x)


# --- sql_executes ------------------------------------------------------------------------------------------------

def test_sql_executes_runs_the_answer_against_the_prompts_schema():
    answers = ["```sql\nSELECT name FROM users WHERE age > 30;\n```",
               "SELECT u.name, SUM(o.total) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.name",
               "```sql\nSELECT nme FROM users;\n```",  # no such column
               "Sure! You could select the users whose age is above thirty.",  # prose is not SQL
               "```sql\nATTACH DATABASE '/tmp/tao-evil.db' AS evil;\n```",  # files are off limits
               ""]
    assert sql_executes([SCHEMA_PROMPT] * len(answers), answers) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_sql_executes_takes_a_schema_param_and_skips_prompts_without_one():
    assert nan(sql_executes(["List the users."], ["SELECT 1"])[0])
    schema = "CREATE TABLE t (a INT);"
    assert sql_executes(["List a."], ["SELECT a FROM t"], schema=schema) == [1.0]
    assert sql_executes(["List a."], ["SELECT b FROM t"], schema=schema) == [0.0]


def test_sql_executes_stops_a_runaway_query():
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c;"
    assert sql_executes([SCHEMA_PROMPT], [forever]) == [0.0]


# --- json_schema, regex_match ------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["name", "age"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}


def test_json_schema_positive_and_negative():
    answers = ['{"name": "Ada", "age": 36}', 'Here you go:\n```json\n{"name": "Ada", "age": 36}\n```',
               'The record is {"name": "Ada", "age": 36} as asked.', '{"name": "Ada", "age": -1}',
               '{"name": "Ada"}', "no json here", '{"name": "Ada", "age": 36']
    assert json_schema(["p"] * len(answers), answers, schema=SCHEMA) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    as_text = load_reward(RewardSpec(name="js", fn="json_schema", params={"schema": json.dumps(SCHEMA),
                                                                          "prompt_pattern": "json"}))
    out = as_text(["Reply in JSON.", "Say hi."], ['{"name": "A", "age": 1}', "hi"])
    assert out[0] == 1.0 and nan(out[1])
    with pytest.raises(Exception, match="type"):
        json_schema(["p"], ["{}"], schema={"type": "no-such-type"})


def test_regex_match_search_full_and_case():
    assert regex_match(["p"] * 3, ["Order #12345 shipped", "no order", "#1"], pattern=r"#\d{3,}") == [1.0, 0.0, 0.0]
    assert regex_match(["p"] * 2, ["  YES \n", "yes, sure"], pattern="yes", full=True, ignore_case=True) == [1.0, 0.0]
    with pytest.raises(ValueError, match="pattern"):
        regex_match(["p"], ["x"])


# --- majority_vote -----------------------------------------------------------------------------------------------

def test_final_answer_normalises_numbers_and_last_lines():
    assert final_answer("5 + 7 is 12.0") == "12"
    assert final_answer("The answer is 1,200.") == "1200"
    assert final_answer("I think so.\nFinal answer: Paris!") == "paris"
    assert final_answer("   ") is None


def test_majority_vote_is_the_share_of_a_prompts_candidates_that_agree():
    prompts = ["What is 6 * 7?"] * 4 + ["Capital of France?"] * 3 + ["alone"]
    answers = ["6 * 7 = 42", "The answer is 42.", "It is 41", "", "Paris", "paris.", "Lyon", "7"]
    out = majority_vote(prompts, answers)
    assert out[:4] == [0.5, 0.5, 0.25, 0.0]
    assert out[4:7] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert nan(out[7])  # one candidate: nothing to agree with


def test_new_verifiers_are_builtins():
    for fn, params in [("sql_executes", {}), ("json_schema", {"schema": SCHEMA}), ("regex_match", {"pattern": "x"}),
                       ("majority_vote", {})]:
        assert callable(load_reward(RewardSpec(name=fn, fn=fn, params=params)))


# --- length control ----------------------------------------------------------------------------------------------

def _frame(completions: list[str]) -> pd.DataFrame:
    msgs = json.dumps([{"role": "user", "content": "Describe the sea."}])
    return pd.DataFrame({"messages_json": [msgs] * len(completions), "completion": completions})


def long_loving_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that likes length, the bias length control removes (loaded by module:function)."""
    return [min(1.0, len(c.split()) / 60) * 0.8 + (0.2 if "calm" in c else 0.0) for c in completions]


def test_decorrelate_removes_the_length_correlation_and_keeps_every_component():
    completions = [" ".join(["calm" if i % 3 == 0 else "wave"] * n) for i, n in enumerate(range(3, 63, 3))]
    spec = RewardSpec(name="verbose", fn="tests.test_verifiers_more:long_loving_reward")
    words = [len(c.split()) for c in completions]
    raw = score_frame(_frame(completions), [spec])
    assert COMBINED_RAW not in raw.columns
    cfg = ScoreConfig(rewards=[spec], length_control="decorrelate")
    out = score_frame(_frame(completions), [spec], cfg)
    assert list(out.columns) == ["verbose", COMBINED_RAW, COMBINED]
    before, after = correlation(words, list(out[COMBINED_RAW])), correlation(words, list(out[COMBINED]))
    print(f"length correlation of combined: before {before:+.3f}, after {after:+.3f}")
    assert before > 0.9 and abs(after) < 1e-9
    assert out[COMBINED].mean() == pytest.approx(out[COMBINED_RAW].mean())  # only the length part moved
    assert list(out[COMBINED_RAW]) == pytest.approx(list(raw[COMBINED]))


def test_penalty_scales_or_shifts_combined_past_the_target():
    spec = RewardSpec(name="one", fn="tests.test_verifiers_more:long_loving_reward")
    completions = ["calm " * 10, "calm " * 30, "calm " * 45]
    mult = score_frame(_frame(completions), [spec], ScoreConfig(rewards=[spec], length_control="penalty",
                                                                length_target_words=20))
    raw = list(mult[COMBINED_RAW])
    assert list(mult[COMBINED]) == pytest.approx([raw[0], raw[1] * 0.5, 0.0])
    sub = score_frame(_frame(completions), [spec], ScoreConfig(
        rewards=[spec], length_control="penalty", length_target_words=20, length_penalty_mode="subtract",
        length_penalty_weight=0.4))
    assert list(sub[COMBINED]) == pytest.approx([raw[0], raw[1] - 0.2, raw[2] - 0.4])


def test_length_control_config_is_checked_by_key():
    with pytest.raises(ConfigError, match="score.length_control"):
        load_config(None, ["score.length_control=shorter"])
    with pytest.raises(ConfigError, match="score.length_penalty_mode"):
        load_config(None, ["score.length_penalty_mode=divide"])
    with pytest.raises(ConfigError, match=r"score.rewards\[0\].name"):
        ScoreConfig(rewards=[RewardSpec(name="combined_raw", fn="coherence")])
    assert load_config(None, ["score.length_control=decorrelate"]).score.length_control == "decorrelate"
