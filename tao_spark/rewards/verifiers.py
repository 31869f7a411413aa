"""Programmatic, label-free rewards: each reads the prompt, checks the completion, needs no reference answer.

    from tao_spark.rewards.verifiers import instruction_following, parse_constraints
    parse_constraints('Explain tides. Answer in at most 40 words.')   # [Constraint(kind='max_words', text='', n=40)]
    instruction_following(["Explain tides. Do not use any commas."], ["Tides follow the moon."])   # [1.0]

Every reward has the shape ``(prompts, completions, **params) -> list[float]`` and returns NaN for a prompt it
does not apply to, so the score stage can average only the components that mean something for that prompt.
They are pure Python and regex, deterministic, and never raise on a completion, however malformed: a sampled
completion is arbitrary text, and one bad row must not fail a scoring job.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

NAN = float("nan")


class Constraint(NamedTuple):
    """One checkable instruction found in a prompt: its kind plus the word/phrase/key (``text``) or count (``n``)."""

    kind: str
    text: str = ""
    n: int = 0


# The phrasings that tao_spark/data/build_samples.py writes (the round trip is tested): a kind may have several.
# Quoted arguments never contain a double quote, so the quotes (straight or typographic) delimit them exactly.
_T = r'["\u201c](?P<text>[^"\u201c\u201d\n]+)["\u201d]'
# "Do not include the word X" is the opposite instruction; these kinds skip a negated mention.
_NOT = r"(?<!not )(?<!never )"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(kind, re.compile(pattern, re.I)) for kind, pattern in [
    ("include_word", rf"{_NOT}(?:include the word|must contain the word) {_T}"),
    ("max_words", r"(?:at most|no more than) (?P<n>\d+) words"),
    ("max_words", r"(?P<n>\d+) words or fewer"),
    ("no_commas", r"(?:do not|don't|must not) (?:use|contain|include) any commas"),
    ("bullets", r"exactly (?P<n>\d+) markdown bullet points"),
    ("json_key", rf"JSON object (?:with|that has|containing) the key {_T}"),
    ("starts_with", rf"{_NOT}(?:start|begin) your (?:answer|response) with (?:the (?:words?|phrase) )?{_T}"),
    ("ends_with", rf"{_NOT}(?:end|finish) your (?:answer|response) with the exact phrase {_T}"),
    ("lowercase", r"entire (?:answer|response) in lowercase letters|use only lowercase letters"),
    ("uppercase", r"entire (?:answer|response) in capital letters|use only capital letters"),
    ("quotes", r"(?:wrap|put) your (?:entire|whole) (?:answer|response) (?:in|inside) double quotation marks"),
    ("title", r"title (?:wrapped )?in double angular brackets"),
    ("word_count", rf"mention the word {_T} at least (?P<n>\d+) times"),
    ("word_count", rf"the word {_T} should appear at least (?P<n>\d+) times"),
]]


def parse_constraints(prompt: str) -> list[Constraint]:
    """Every constraint stated in ``prompt``, in the order they appear; ``[]`` when there is none."""
    found: list[tuple[int, Constraint]] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(prompt if isinstance(prompt, str) else ""):
            groups = m.groupdict()
            found.append((m.start(), Constraint(kind, groups.get("text") or "", int(groups.get("n") or 0))))
    return [c for _, c in sorted(found, key=lambda pc: pc[0])]


def _words(text: str) -> list[str]:
    return text.split()


def _has_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I))


def _json_object(text: str) -> dict[str, Any] | None:
    """The answer's JSON object: a fenced ```json block, the whole answer, or the first parseable {...} span."""
    candidates = [m.group(1) for m in re.finditer(r"```(?:json)?\s*\n?(.*?)```", text, re.S | re.I)]
    candidates.append(text.strip())
    decoder = json.JSONDecoder()
    for c in candidates:
        try:
            obj = json.loads(c)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    # Bounded scan: a garbage completion full of braces must not make scoring quadratic.
    for start in [m.start() for m in re.finditer(r"\{", text)][:64]:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


_CHECKS: dict[str, Callable[[Constraint, str], bool]] = {
    "include_word": lambda c, t: _has_word(t, c.text) >= 1,
    "max_words": lambda c, t: len(_words(t)) <= c.n,
    "no_commas": lambda c, t: "," not in t,
    # "- ", "* " and "+ " are all markdown bullets; numbered lines are not.
    "bullets": lambda c, t: len(re.findall(r"^\s*[-*+] \S", t, re.M)) == c.n,
    "json_key": lambda c, t: c.text in (_json_object(t) or {}),
    "starts_with": lambda c, t: t.lstrip().lower().startswith(c.text.lower()),
    "ends_with": lambda c, t: t.rstrip().lower().endswith(c.text.lower()),
    "lowercase": lambda c, t: t == t.lower(),
    "uppercase": lambda c, t: t == t.upper(),
    "quotes": lambda c, t: len(t.strip()) >= 2 and t.strip()[0] in '"\u201c' and t.strip()[-1] in '"\u201d',
    "title": lambda c, t: re.search(r"<<[^<>\n]+>>", t) is not None,
    "word_count": lambda c, t: _has_word(t, c.text) >= c.n,
}


def check_constraint(constraint: Constraint, completion: str) -> bool:
    """Whether ``completion`` satisfies ``constraint``; an empty answer satisfies nothing.

    Without that rule an empty answer would "follow" no-commas, max-words and lowercase constraints, and the
    preference pairs would teach the model to say nothing.
    """
    text = completion if isinstance(completion, str) else ""
    return bool(text.strip()) and _CHECKS[constraint.kind](constraint, text)


def _pairs(prompts: list[str], completions: list[str]) -> list[tuple[str, str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [(p if isinstance(p, str) else "", c if isinstance(c, str) else "")
            for p, c in zip(prompts, completions, strict=True)]


def instruction_following(prompts: list[str], completions: list[str], strict: bool = False) -> list[float]:
    """Fraction of the prompt's constraints the completion meets (``strict``: 1.0 only if all); NaN without any."""
    out = []
    for prompt, completion in _pairs(prompts, completions):
        constraints = parse_constraints(prompt)
        if not constraints:
            out.append(NAN)
            continue
        met = [check_constraint(c, completion) for c in constraints]
        out.append(float(all(met)) if strict else sum(met) / len(met))
    return out


def json_key(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the answer holds a JSON object with the asked key, else 0.0; NaN when the prompt asks no JSON."""
    out = []
    for prompt, completion in _pairs(prompts, completions):
        asked = [c for c in parse_constraints(prompt) if c.kind == "json_key"]
        out.append(float(check_constraint(asked[0], completion)) if asked else NAN)
    return out


# A prompt asks for a number when it says so, or is a bare "What is 17 * 23?" question.
_NUMERIC_ASK = re.compile(
    r"final answer as a number|answer with a single number|final numeric answer|"
    r"what is -?\d+(?:\.\d+)? ?[-+*/x\u00d7] ?-?\d", re.I)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_STATED = re.compile(
    r"(?:answer\s*(?:is|=|:)|\\boxed\{)[\s:*$=]*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)", re.I)


def _to_float(number: str) -> float:
    return float(number.replace(",", ""))


def final_number(text: str) -> float | None:
    """The number an answer gives as its result: the last "answer is N" / ``\\boxed{N}``, else the last number."""
    if not isinstance(text, str):
        return None
    stated = _STATED.findall(text)
    if stated:
        return _to_float(stated[-1])
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def numeric_answer(prompts: list[str], completions: list[str]) -> list[float]:
    """Does the answer end on a clear number? 1.0 stated/last line, 0.5 buried, 0.0 none; NaN if no number asked.

    This rewards the answer format, not correctness: the prompt log carries no labels.
    """
    out = []
    for prompt, completion in _pairs(prompts, completions):
        if not _NUMERIC_ASK.search(prompt):
            out.append(NAN)
        elif not _NUMBER.search(completion):
            out.append(0.0)
        else:
            lines = [line for line in completion.splitlines() if line.strip()]
            clear = _STATED.search(completion) is not None or _NUMBER.search(lines[-1]) is not None
            out.append(1.0 if clear else 0.5)
    return out


def length_penalty(prompts: list[str], completions: list[str], target_words: int = 80) -> list[float]:
    """1.0 up to ``target_words`` words, falling linearly to 0.0 at twice that; applies to every prompt."""
    if target_words < 1:
        raise ValueError(f"target_words must be >= 1, got {target_words}")
    return [max(0.0, min(1.0, 2.0 - len(_words(c)) / target_words)) for _, c in _pairs(prompts, completions)]


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _ramp(x: float, zero: float, one: float) -> float:
    """0 at ``zero``, 1 at ``one``, linear between and clamped."""
    return max(0.0, min(1.0, (x - zero) / (one - zero)))


def _coherence(prompt: str, completion: str) -> float:
    text = completion.strip()
    if not text:
        return 0.0
    tokens = re.findall(r"\w+", text.lower())
    # Looping: normal prose repeats few word trigrams; a degenerate loop repeats most of them.
    trigrams = _ngrams(tokens, 3)
    distinct = len(set(trigrams)) / len(trigrams) if len(trigrams) >= 8 else 1.0
    # Repeated lines; bare JSON or markdown punctuation lines ("},", "---") repeat legitimately, so need two words.
    lines = [line.strip().lower() for line in text.splitlines() if len(re.findall(r"\w+", line)) >= 2]
    unique_lines = len(set(lines)) / len(lines) if lines else 1.0
    # Character-level loops ("!!!!!", "lalala") have no word structure; zlib sees them (short texts compress badly).
    packed = len(zlib.compress(text.encode("utf-8", "replace"))) / len(text) if len(text) >= 120 else 1.0
    repetition = min(_ramp(distinct, 0.3, 0.8), _ramp(unique_lines, 0.3, 0.8), _ramp(packed, 0.1, 0.3))
    # Echo: share of the answer's word 4-grams copied from the prompt; quoting a policy line is fine, parroting is not.
    grams = _ngrams(tokens, 4)
    prompt_grams = set(_ngrams(re.findall(r"\w+", prompt.lower()), 4))
    if grams:
        copied = sum(g in prompt_grams for g in grams) / len(grams)
    else:
        copied = float(text.lower() == prompt.strip().lower())
    echo = 1.0 - _ramp(copied, 0.5, 1.0)
    return repetition * echo


def coherence(prompts: list[str], completions: list[str]) -> list[float]:
    """Label-free quality floor in [0, 1]: 0 for empty, looping or prompt-parroting answers, 1 for plain prose."""
    return [_coherence(p, c) for p, c in _pairs(prompts, completions)]
