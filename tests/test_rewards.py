"""Label-free rewards and the bundled sample prompt log they are written against."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter

import pytest

from tao_spark.config import RewardSpec
from tao_spark.data.build_samples import COUNTS, HERE, build_samples, write_samples
from tao_spark.rewards import load_reward
from tao_spark.rewards.verifiers import (
    Constraint,
    check_constraint,
    coherence,
    final_number,
    instruction_following,
    json_key,
    length_penalty,
    numeric_answer,
    parse_constraints,
)

SAMPLES = build_samples()
KINDS = ["include_word", "max_words", "no_commas", "bullets", "json_key", "starts_with", "ends_with", "lowercase",
         "uppercase", "quotes", "title", "word_count"]


def constant_reward(prompts: list[str], completions: list[str], value: float = 0.25) -> list[float]:
    """A reward loaded by ``module:function`` in the tests below."""
    return [value] * len(completions)


# --- the sample prompt log ---------------------------------------------------------------------------------------

def test_regenerating_the_samples_gives_identical_bytes(tmp_path):
    for written in write_samples(tmp_path):
        assert written.read_bytes() == (HERE / written.name).read_bytes(), f"{written.name}: rerun build_samples"


def test_task_mix_and_row_shape():
    rows = [json.loads(line) for line in (HERE / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 360
    assert Counter(r["task"] for r in rows) == COUNTS == {"instruct": 180, "arithmetic": 90, "support": 90}
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        # Label-free: nothing but the id, the task and the prompt (or chat turns) is written.
        assert set(r) in ({"id", "task", "prompt"}, {"id", "task", "messages"}), r
    chats = [r for r in rows if "messages" in r]
    assert {r["task"] for r in chats} == set(COUNTS)
    assert all([m["role"] for m in r["messages"]] == ["system", "user"] for r in chats)
    texts = [s.text() for s in SAMPLES]
    assert len(set(texts)) == len(texts)


def test_every_instruct_prompt_parses_back_to_the_constraints_it_was_built_with():
    instruct = [s for s in SAMPLES if s.task == "instruct"]
    for s in instruct:
        assert 1 <= len(s.constraints) <= 2
        assert parse_constraints(s.text()) == list(s.constraints), s.text()
    assert {c.kind for s in instruct for c in s.constraints} == set(KINDS)
    assert any(len(s.constraints) == 2 for s in instruct)


def test_other_tasks_state_no_constraint_and_only_arithmetic_asks_for_a_number():
    for s in SAMPLES:
        if s.task != "instruct":
            assert parse_constraints(s.text()) == [], s.text()
        assert math.isnan(numeric_answer([s.text()], ["42"])[0]) == (s.task != "arithmetic"), s.text()


def test_arithmetic_answers_live_apart_from_the_prompt_log():
    answers = json.loads((HERE / "arithmetic_answers.json").read_text())
    assert set(answers) == {s.id for s in SAMPLES if s.task == "arithmetic"}
    for s in SAMPLES:
        m = re.match(r"What is (\d+) \* (\d+)\?", s.text())
        if m:
            assert answers[s.id] == int(m.group(1)) * int(m.group(2))


def test_reference_answers_meet_their_prompts_constraints_and_give_the_right_number():
    from tao_spark.rewards.verifiers import check_constraint, final_number

    answers = json.loads((HERE / "arithmetic_answers.json").read_text())
    refs = [json.loads(line) for line in (HERE / "references.jsonl").read_text().splitlines()]
    by_id = {s.id: s for s in SAMPLES}
    assert len({r["id"] for r in refs}) == len(refs) == 140
    for r in refs:
        s = by_id[r["id"]]
        if s.task == "arithmetic":
            assert final_number(r["reference"]) == answers[s.id], r
        else:
            assert s.task == "instruct" and s.constraints
            assert all(check_constraint(c, r["reference"]) for c in s.constraints), r
    assert sum(by_id[r["id"]].task == "instruct" for r in refs) == 50


# --- constraints -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, good, bad", [
    (Constraint("include_word", "harmony"), "Colors in Harmony.", "Colors in harmonyx."),
    (Constraint("max_words", n=5), "One two three four five.", "One two three four five six."),
    (Constraint("no_commas"), "Sun and rain.", "Sun, rain."),
    (Constraint("bullets", n=2), "Tips:\n- water daily\n* add light", "- one\n- two\n- three"),
    (Constraint("json_key", "tips"), '```json\n{"tips": ["water"]}\n```', '{"tip": ["water"]}'),
    (Constraint("starts_with", "In short"), "  in short: yes.", "Well, in short: yes."),
    (Constraint("ends_with", "That is all."), "Done. That is all.\n", "That is all. Bye."),
    (Constraint("lowercase"), "all small here.", "Not all small."),
    (Constraint("uppercase"), "ALL BIG HERE.", "ALL BIG hERE."),
    (Constraint("quotes"), '"Quoted answer."', 'Quoted "part".'),
    (Constraint("title"), "<<Rain Song>>\nIt rains.", "<Rain Song>\nIt rains."),
    (Constraint("word_count", "calm", 2), "Calm seas, calm minds.", "Calm seas, quiet minds."),
])
def test_check_constraint(constraint, good, bad):
    assert check_constraint(constraint, good)
    assert not check_constraint(constraint, bad)
    # An empty answer meets nothing, or "say nothing" would win every no-commas / max-words / lowercase pair.
    assert not check_constraint(constraint, "  ")


def test_parse_constraints_in_prompt_order_with_arguments():
    prompt = ('Describe a lake. Mention the word "calm" at least 3 times. Use no more than 45 words. '
              'Format your entire answer as a JSON object that has the key "summary".')
    assert parse_constraints(prompt) == [Constraint("word_count", "calm", 3), Constraint("max_words", n=45),
                                         Constraint("json_key", "summary")]
    assert parse_constraints("Describe a lake in a few words.") == []
    negated = ('Do not include the word "lake". Never start your answer with "Sure". '
               "Must contain the word \u201cwave\u201d.")
    # The negated mention is the opposite instruction, read as such; the negated start is not read at all.
    forbidden = Constraint("keywords:forbidden_words", args=(("forbidden_words", ("lake",)),))
    assert parse_constraints(negated) == [forbidden, Constraint("include_word", "wave")]


def test_instruction_following_fraction_strict_and_not_applicable():
    prompt = 'Describe rain. Do not use any commas in your answer. Include the word "cloud" in your answer.'
    prompts = [prompt, prompt, prompt, "Describe rain."]
    answers = ["A cloud gives rain.", "Rain, from a cloud.", "Rain, wet.", "Rain falls."]
    loose = instruction_following(prompts, answers)
    assert loose[:3] == [1.0, 0.5, 0.0] and math.isnan(loose[3])
    assert instruction_following(prompts[:3], answers[:3], strict=True) == [1.0, 0.0, 0.0]


def test_graded_credit_orders_near_misses_and_keeps_full_marks_for_compliance():
    prompt = ('Describe rain. Do not use any commas. Answer with exactly 3 markdown bullet points. '
              'Mention the word "cloud" at least 2 times.')
    answers = {
        "all": "- a cloud\n- another cloud\n- rain",
        "one_comma": "- a cloud, then\n- another cloud\n- rain",
        "three_commas": "- a cloud, then, and,\n- another cloud\n- rain",
        "two_bullets": "- a cloud\n- another cloud",
        "no_bullets": "a cloud and another cloud",
        "one_cloud": "- a cloud\n- rain\n- wet",
    }
    graded = dict(zip(answers, instruction_following([prompt] * len(answers), list(answers.values()), graded=True),
                      strict=True))
    plain = dict(zip(answers, instruction_following([prompt] * len(answers), list(answers.values())), strict=True))
    assert graded["all"] == plain["all"] == 1.0
    assert all(v < 1.0 for k, v in graded.items() if k != "all")
    # Nearer misses earn more, where the pass/fail reward cannot tell them apart.
    assert plain["one_comma"] == plain["three_commas"] and graded["one_comma"] > graded["three_commas"]
    assert plain["two_bullets"] == plain["no_bullets"] and graded["two_bullets"] > graded["no_bullets"]
    assert graded["one_cloud"] > plain["one_cloud"]
    # Strict compliance is unchanged by grading.
    assert instruction_following([prompt] * 2, [answers["all"], answers["one_comma"]], strict=True, graded=True) == [
        1.0, 0.0]


def test_graded_credit_never_reorders_answers_that_meet_different_numbers_of_constraints():
    samples = [s for s in SAMPLES if len(s.constraints) >= 2][:20]
    assert samples
    texts = ["", "yes", "Sure, here it is: " + "word " * 120, '"a quoted answer"', "- one\n- two\n- three",
             "<<Title>> all lowercase words here", '{"answer": 1, "summary": "x"}', "SHOUTING ONLY HERE"]
    for s in samples:
        prompt = s.text()
        met = [sum(check_constraint(c, t) for c in s.constraints) for t in texts]
        graded = instruction_following([prompt] * len(texts), texts, graded=True)
        for i, j in itertools.permutations(range(len(texts)), 2):
            if met[i] > met[j]:
                assert graded[i] > graded[j], (prompt, texts[i], texts[j])
    assert instruction_following([samples[0].text()], [""], graded=True) == [0.0]


def test_instruction_following_on_built_prompts():
    s = next(s for s in SAMPLES if [c.kind for c in s.constraints] == ["max_words"])
    assert instruction_following([s.text()], ["Short and sweet."]) == [1.0]
    assert instruction_following([s.text()], ["word " * 200]) == [0.0]


# --- json_key ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ('{"summary": "Rain falls."}', 1.0),
    ('Here you go:\n```json\n{"summary": "Rain falls."}\n```\nEnjoy!', 1.0),
    ('Sure! {"summary": "Rain", "extra": {"a": 1}} and more text {', 1.0),
    ('{"summary": "Rain falls."', 0.0),   # cut off by the token limit
    ('{"title": "Rain"}', 0.0),
    ('{"outer": {"summary": "nested keys do not count"}}', 0.0),
    ("Rain falls.", 0.0),
])
def test_json_key(answer, expected):
    prompt = 'Describe rain. Answer in JSON: a single JSON object with the key "summary".'
    assert json_key([prompt], [answer]) == [expected]


def test_json_key_is_nan_without_a_json_request():
    assert math.isnan(json_key(["Describe rain."], ['{"summary": "x"}'])[0])


# --- numeric_answer ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("17 * 23 = 391", 1.0),
    ("First 17 * 20 = 340, then 17 * 3 = 51.\nSo we get 391.", 1.0),
    ("The answer is 391. I multiplied the tens first\nand then the ones.", 1.0),
    ("17 times 23 is 391.\nI hope that helps!", 0.5),
    ("I am not sure how to multiply these.", 0.0),
    ("", 0.0),
])
def test_numeric_answer(answer, expected):
    assert numeric_answer(["What is 17 * 23? Give the final answer as a number."], [answer]) == [expected]


def test_numeric_answer_is_nan_for_prompts_that_ask_no_number():
    assert math.isnan(numeric_answer(["How do I rename a workspace?"], ["Open settings, step 2."])[0])


@pytest.mark.parametrize("text, expected", [
    ("The answer is 391. Check: 391 / 17 = 23", 391.0),
    ("So the final answer is: **$1,234.50**", 1234.5),
    (r"We get \boxed{-12} in the end, i.e. 12 below zero.", -12.0),
    ("He had 20, gave 5, bought 7: 22 marbles", 22.0),
    ("Temperatures fell to -4.", -4.0),
    ("no digits here", None),
])
def test_final_number(text, expected):
    assert final_number(text) == expected


# --- length_penalty and coherence --------------------------------------------------------------------------------

def test_length_penalty():
    answers = [" ".join(["w"] * n) for n in (0, 80, 120, 160, 400)]
    assert length_penalty([""] * 5, answers) == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert length_penalty(["", ""], ["a b c d", "a b c d e f"], target_words=4) == [1.0, 0.5]
    with pytest.raises(ValueError):
        length_penalty([""], ["a"], target_words=0)


PROSE = ("Acme Cloud keeps deleted files in the Trash for thirty days. Any workspace admin can restore the folder "
         "from there, so ask your admin to open the Trash, select the folder and click Restore.")


def test_coherence_scores_plain_prose_high_and_degenerate_answers_low():
    prompt = "I deleted a folder by mistake last week. Can I still get it back?"
    loop = "I'm sorry, I can't help. " * 12
    lines = "\n".join(["- Stay focused."] * 8)
    chars = "!" * 300
    echo = prompt
    scores = dict(zip(["prose", "empty", "loop", "lines", "chars", "echo"],
                      coherence([prompt] * 6, [PROSE, "   ", loop, lines, chars, echo]), strict=True))
    assert scores["prose"] == 1.0
    assert scores["empty"] == 0.0
    for bad in ("loop", "lines", "chars", "echo"):
        assert scores[bad] < 0.3, (bad, scores[bad])


def test_coherence_allows_quoting_part_of_the_prompt():
    policy = "Deleted files stay in the Trash for 30 days and can be restored by any workspace admin."
    answer = "Yes. The policy says: deleted files stay in the Trash for 30 days. Ask an admin to restore it today."
    assert coherence([f"{policy}\n\nCan I get my folder back?"], [answer]) == [1.0]


GARBAGE = ["", " ", "\x00\x01\ufffd", "{" * 5000, "[" * 100000, '{"a": ' * 3000, "```json\n{]\n```", "🙂" * 500,
           "- \n" * 1000, "1,2,3" * 1000, "9" * 5000, "\n" * 50]


@pytest.mark.parametrize("fn", [instruction_following, json_key, numeric_answer, length_penalty, coherence])
def test_rewards_never_raise_on_garbage(fn):
    prompts = [SAMPLES[i].text() for i in range(len(GARBAGE))]
    for prompt_set in (prompts, GARBAGE):
        scores = fn(prompt_set, GARBAGE)
        assert len(scores) == len(GARBAGE)
        assert all(math.isnan(x) or 0.0 <= x <= 1.0 for x in scores)


def test_rewards_reject_mismatched_lengths():
    with pytest.raises(ValueError):
        coherence(["a", "b"], ["a"])


# --- load_reward -------------------------------------------------------------------------------------------------

def test_load_reward_builtin_with_params():
    fn = load_reward(RewardSpec(name="len", fn="length_penalty", params={"target_words": 4}))
    assert fn(["", ""], ["a b c d", "a b c d e f"]) == [1.0, 0.5]
    strict = load_reward(RewardSpec(name="if", fn="instruction_following", params={"strict": True}))
    prompt = 'Describe rain. Do not use any commas. Include the word "cloud" in your answer.'
    assert strict([prompt], ["Rain, from a cloud."]) == [0.0]


def test_load_reward_module_function():
    fn = load_reward(RewardSpec(name="c", fn="tests.test_rewards:constant_reward", params={"value": 0.75}))
    assert fn(["p", "q"], ["a", "b"]) == [0.75, 0.75]
    assert load_reward(RewardSpec(name="coh", fn="tao_spark.rewards.verifiers:coherence"))([""], [""]) == [0.0]


@pytest.mark.parametrize("spec, message", [
    (RewardSpec(name="rm", model="m", params={"batch": 3}), "do not fit"),
    (RewardSpec(name="x", fn="no_such_reward"), "unknown fn 'no_such_reward'"),
    (RewardSpec(name="x", fn="tao_spark.nowhere:fn"), "cannot load"),
    (RewardSpec(name="x", fn="tao_spark.rewards.verifiers:missing"), "cannot load"),
    (RewardSpec(name="x", fn="tao_spark.rewards.verifiers:NAN"), "is not callable"),
    (RewardSpec(name="x", fn="length_penalty", params={"target": 10}), "do not fit"),
])
def test_load_reward_errors_name_the_reward(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_reward(spec)
