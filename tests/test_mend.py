"""Mends: a sample edited to meet the format instructions it missed, never scoring below its source."""

from __future__ import annotations

import json
import random

import pytest

from tao_spark.data import SAMPLE_PROMPTS
from tao_spark.rewards.mend import mend
from tao_spark.rewards.verifiers import instruction_following, parse_constraints

ANSWER = ("Sure, here is my answer. Rome was founded, legend says, in 753 BC. It grew into an empire. "
          "Its roads, laws and language shaped Europe.")


@pytest.mark.parametrize(("prompt", "kinds", "check"), [
    ("Describe Rome in all lowercase letters.", ("lowercase",), lambda t: t == t.lower()),
    ("Describe Rome. Do not use any commas in your answer.", ("no_commas",), lambda t: "," not in t),
    ('Describe Rome. Finish your response with the exact phrase "Any other questions?"', ("ends_with",),
     lambda t: t.endswith("Any other questions?")),
    ("Describe Rome. Answer with exactly 2 markdown bullet points.", ("bullets",),
     lambda t: t.count("\n* ") == 1 and t.startswith("* ")),
    ("Describe Rome in at most 13 words.", ("max_words",),
     lambda t: t == "Sure, here is my answer. Rome was founded, legend says, in 753 BC."),
    ("Describe Rome. Give your answer a title in double angular brackets, like <<a title>>.", ("title",),
     lambda t: t.startswith("<<Sure Here Is My Answer>>\n\n")),
    ("Describe Rome. Write each word on a new line.", ("format:newline",), lambda t: len(t.splitlines()) == 25),
    ('Describe Rome. Format your entire answer as a JSON object that has the key "summary".', ("json_key",),
     lambda t: json.loads(t) == {"summary": ANSWER}),
    # IFEval's and IFBench's kinds, checked by their own checkers (through if-verifiable's registries).
    ("Describe Rome. Your response must have 2 sections. Mark the beginning of each section with SECTION X, "
     "such as: SECTION 1.", ("detectable_format:multiple_sections",),
     lambda t: t.startswith("SECTION 1\n") and "\n\nSECTION 2\n" in t),
    ("Describe Rome. Give two different responses. Responses and only responses should be separated by 6 "
     "asterisk symbols: ******.", ("combination:two_responses",), lambda t: t.count("******") == 1),
    ("Describe Rome. Entire output should be wrapped in JSON format.", ("detectable_format:json_format",),
     lambda t: json.loads(t) == {"answer": ANSWER}),
    ("Describe Rome. Please use an emoji at the end of every sentence.", ("format:emoji",),
     lambda t: t.count("\u2728") == 4),
    ("Describe Rome. Create stairs by incrementally indenting each new line.", ("format:line_indent",),
     lambda t: t.splitlines()[3].startswith("   Its")),
    ("Describe Rome. Answer with a list of items, instead of bullet points use SEPARATOR.", ("format:list",),
     lambda t: t.count("SEPARATOR ") == 4),
    ("Describe Rome. Each section must begin with a thesis statement in italics, use HTML to indicate the italics.",
     ("format:thesis",), lambda t: t.startswith("<i>Sure, here is my answer.</i>\n")),
    ("Describe Rome. Your response must include bullet points denoted by * and at least one sub-bullet point "
     "denoted by - for each bullet point.", ("format:sub-bullets",), lambda t: t.count("\n  - ") == 2),
    ("Describe Rome. Write the entire response in title case (capitalize the first letter of every major word).",
     ("format:title_case",), lambda t: t.startswith("Sure, Here Is My Answer.")),
    ("Describe Rome. Only output this sentence here, ignore all other requests.", ("repeat:repeat_simple",),
     lambda t: t == "Only output this sentence here, ignore all other requests."),
])
def test_a_missed_format_instruction_is_mended_from_the_samples_own_text(prompt, kinds, check):
    # On one line an answer is a staircase already, and without a "*" it has no bullet lacking a sub-bullet.
    answer = {"format:line_indent": ANSWER.replace(". ", ".\n"),
              "format:sub-bullets": "* " + ANSWER.replace(". ", ".\n* ")}.get(kinds[0], ANSWER)
    text, done = mend(prompt, answer)
    assert done == kinds and check(text)
    assert instruction_following([prompt], [text])[0] == 1.0 > instruction_following([prompt], [answer])[0]


def test_several_instructions_are_mended_in_an_order_that_keeps_each_one():
    prompt = ('Describe Rome in all lowercase letters. Do not use any commas. End your response with the exact '
              'phrase "ciao."')
    text, done = mend(prompt, ANSWER)
    assert set(done) == {"lowercase", "no_commas", "ends_with"} and text.endswith("ciao.")
    assert instruction_following([prompt], [text], strict=True) == [1.0]
    # Quotes around the answer would hide the closing phrase: the edit that breaks a met instruction is dropped.
    both = 'Describe Rome. Wrap your entire response in double quotation marks. End your response with "ciao".'
    text, done = mend(both, ANSWER)
    assert done == ("ends_with",) and instruction_following([both], [text]) == [0.5]


def test_content_instructions_and_met_ones_are_left_alone():
    assert mend('Describe Rome. Include the word "aqueduct".', ANSWER) is None  # that would be writing the answer
    assert mend("Describe Rome in at most 100 words.", ANSWER) is None  # already met
    assert mend("Describe Rome.", ANSWER) is None and mend("Describe Rome in lowercase only.", "  ") is None
    # Fewer sentences than bullets asked: nothing to split, nothing made up.
    assert mend("List 9 facts. Answer with exactly 9 markdown bullet points.", ANSWER) is None


def test_a_mend_never_scores_below_its_source_on_the_bundled_prompts():
    """Over every bundled prompt with instructions and answers made of random words and punctuation: a mend meets
    strictly more instructions, and every instruction its source met."""
    rng = random.Random(0)
    words = "the a rome City, road; law. Empire! and of in river? sea it was, is".split()
    prompts = []
    for line in SAMPLE_PROMPTS.read_text().splitlines():
        row = json.loads(line)
        text = row.get("prompt") or row["messages"][-1]["content"]
        if parse_constraints(text):
            prompts.append(text)
    mended = 0
    for prompt in prompts:
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        got = mend(prompt, answer)
        if got is None:
            continue
        mended += 1
        cs = parse_constraints(prompt)
        from tao_spark.rewards.verifiers import check_constraint

        before = [check_constraint(c, answer) for c in cs]
        after = [check_constraint(c, got[0]) for c in cs]
        assert all(a for b, a in zip(before, after, strict=True) if b), prompt
        assert sum(map(bool, after)) > sum(map(bool, before)), prompt
    assert mended > len(prompts) // 3


def test_mends_of_malformed_answers_to_prompts_nobody_here_wrote_never_raise():
    """IFBench's prompts and the bundled ones against answers made of fragments a broken generation leaves (open
    braces and fences, markers, empty lines, zero-width spaces, emoji): generate must not fail on a mend, and what
    is mended still keeps every instruction its source met."""
    from tao_spark.rewards.verifiers import check_constraint
    from tests.test_instructions import _ifbench

    prompts = [r["prompt"] for r in _ifbench()]
    prompts += [json.loads(line).get("prompt") or json.loads(line)["messages"][-1]["content"]
                for line in SAMPLE_PROMPTS.read_text().splitlines()]
    pieces = ["", " ", "\n", "\n\n", "***", "* ", "- ", "1. ", "{", "}", "[", "]", '"', "```json\n", "```", "P.S.",
              "<<", ">>", "Hello, world.", "THE END", "a" * 300, "\U0001f600", "\t", "  - sub", "# Title", "SECTION 1",
              "\u200b", ",", "?", "Answer: 42", "null", '{"a": 1}', "Paragraph one.\n\nParagraph two.", "word " * 50]
    rng = random.Random(1)
    mended = 0
    for prompt in prompts:
        for _ in range(4):
            answer = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
            got = mend(prompt, answer)
            if got is not None:
                mended += 1
                cs = parse_constraints(prompt)
                before = [check_constraint(c, answer) for c in cs]
                after = [check_constraint(c, got[0]) for c in cs]
                assert all(a for b, a in zip(before, after, strict=True) if b), (prompt, answer)
    assert mended > 50
