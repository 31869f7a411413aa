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

import functools
import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from tao_spark.rewards.instructions import NUM, Instruction, follows, follows_loosely, number, read_spans

NAN = float("nan")


class Constraint(NamedTuple):
    """One checkable instruction found in a prompt: its kind plus the word/phrase/key (``text``) or count (``n``).

    The bundled log's kinds (``max_words``, ``include_word``, ...) are checked here; every other kind is an
    instruction id of the public taxonomy (``count:numbers``, ``length_constraints:number_sentences``), read by
    ``instructions.read_instructions`` with its checker's keyword arguments in ``args`` and checked by the library.
    """

    kind: str
    text: str = ""
    n: int = 0
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def instruction_id(self) -> str:
        """The kind in the public taxonomy's names (what ``tao coverage`` counts by)."""
        return TAXONOMY.get(self.kind, self.kind)


# The bundled log's kinds under the public taxonomy's ids; json_key and starts_with have none there.
TAXONOMY = {"max_words": "length_constraints:number_words", "include_word": "keywords:existence",
            "no_commas": "punctuation:no_comma", "bullets": "detectable_format:number_bullet_lists",
            "json_key": "detectable_format:json_key", "starts_with": "startend:start_checker",
            "ends_with": "startend:end_checker", "lowercase": "change_case:english_lowercase",
            "uppercase": "change_case:english_capital", "quotes": "startend:quotation",
            "title": "detectable_format:title", "word_count": "keywords:frequency"}


# Each kind is stated in many ways; the phrasings tao_spark/data/build_samples.py writes are among them (the round
# trip is tested). Quoted arguments never contain a double quote, so the quotes (straight or typographic) delimit
# them exactly; a single-quoted argument holds no apostrophe; an unquoted one is a single word.
_T = r'(?:["\u201c](?P<text>[^"\u201c\u201d\n]+)["\u201d]|\'(?P<text2>[^\'\n]{1,60})\')'
_W = r"(?:" + _T + r"|(?P<word>[A-Za-z][\w-]*))"
# "Do not include the word X" is the opposite instruction; these kinds skip a negated mention.
_NOT = r"(?<!not )(?<!never )(?<!n't )(?<!avoid )(?<!without )"
_ANS = r"(?:your|the) (?:entire |whole |full )?(?:answer|response|reply|output)"
_N = r"(?P<n>" + NUM + r")"
# The strict forms ("under 50 words") capture their number as ``lt``: at most lt - 1.
_LT = r"(?P<lt>" + NUM + r")"
_END = rf"(?:{_T}|(?P<phrase>[^\"\u201c\n]+?[.?!]?))\.?(?=\s*(?:no other words|$|\n))"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(kind, re.compile(pattern, re.I)) for kind, pattern in [
    ("include_word", rf"{_NOT}(?:include|use|mention|contain|feature)s? (?:the (?:key)?word|the (?:key)?phrase) {_T}"
                     r"(?!\s+(?:\w+\s+){0,2}(?:times|at least|once|twice))"),
    ("include_word", rf"{_NOT}must contain the word {_T}"),
    ("include_word", r"(?:the (?:key)?word) " + _W + r" (?:must|should) (?:appear|be (?:included|used|mentioned))"
                     r"(?! at least| (?:less|fewer) than| \w+ times| once| twice)"),
    ("max_words", rf"(?:at most|no more than|not more than|a maximum of|maximum of|up to|no longer than|"
                  rf"not (?:to )?exceed|within|limit(?:ed)? (?:it |your \w+ |yourself )?to) {_N}[- ]words"),
    ("max_words", rf"{_N} words (?:or (?:fewer|less)|max(?:imum)?|at most|tops)"),
    ("max_words", rf"{_N}[- ]word (?:limit|maximum|max)"),
    ("max_words", rf"(?:under|fewer than|less than|below|shorter than) {_LT} words"),
    ("max_words", rf"keep (?:it|{_ANS}|this) (?:to|under|below|within) {_N} words"),
    ("no_commas", r"(?:do not|don't|must not|should not|never|cannot|can't) (?:use|contain|include|put|have) (?:any )?"
                  r"commas?"),
    ("no_commas", r"refrain from (?:the use of |using )?(?:any )?commas|without (?:using )?(?:any )?commas|"
                  r"\bno commas\b|avoid (?:using )?(?:any )?commas|comma-free|zero commas"),
    ("bullets", rf"(?:exactly|precisely|just) {_N} (?:markdown )?bullet(?:ed)?(?: points?| list items?|s)\b"),
    ("bullets", rf"(?:use|contain|include|give|list|in|with|as|provide|have) {_N} (?:markdown )?bullet(?:ed)?"
                r"(?: points?| list items?|s)\b"),
    ("json_key", rf"JSON object (?:with|that has|containing|having|that contains|including) (?:a |the )?"
                 rf"(?:key|field|property) {_T}"),
    ("json_key", rf"JSON[^.\n]{{0,60}}?\b(?:with|has|have|containing|contain|include|includes) (?:a |an |the )?"
                 rf"{_T} (?:key|field|property)"),
    ("starts_with", rf"{_NOT}(?:start|begin|open) {_ANS} with (?:the (?:words?|phrase|sentence) )?{_T}"),
    ("starts_with", rf"{_ANS} (?:must|should) (?:start|begin|open) with (?:the (?:words?|phrase|sentence) )?{_T}"),
    ("starts_with", rf"first words? of {_ANS} (?:must|should) be {_T}"),
    ("ends_with", rf"{_NOT}(?:end|finish|conclude|close) {_ANS} with (?:this|the) (?:exact )?(?:phrase|sentence|words?)"
                  rf":? {_END}"),
    ("ends_with", rf"{_NOT}(?:end|finish|conclude|close) {_ANS} with (?:the (?:exact )?(?:words?|phrase|sentence) )?"
                  rf"{_T}"),
    ("ends_with", rf"{_ANS} (?:must|should) (?:end|finish|conclude|close) with (?:the (?:exact )?(?:words?|phrase|"
                  rf"sentence) )?{_T}"),
    ("ends_with", rf"last (?:words?|sentence|line) of {_ANS} (?:must|should) be {_T}"),
    ("lowercase", r"entire (?:answer|response|reply|output)[^.\n]{0,40}?in (?:all )?lower ?case(?: letters)?|"
                  r"use only lower ?case letters|(?:in|using) all lower ?case(?: letters)?|"
                  r"no capital letters (?:are|is) allowed|lower ?case (?:letters )?only|only lower-?case|"
                  r"(?:write|respond|answer|reply) (?:only |entirely )?in lower ?case"),
    ("uppercase", r"entire (?:answer|response|reply|output)[^.\n]{0,40}?in (?:all )?(?:capital letters|caps|"
                  r"upper ?case)(?! should appear)|use only capital letters|"
                  r"(?<!words with )(?:in|using) all (?:capital letters|caps|upper ?case(?: letters)?)"
                  r"(?!\s+(?:should|must) appear)|capital letters only|"
                  r"(?:write|respond|answer|reply) (?:only |entirely )?in (?:all )?(?:caps|upper ?case|capitals)"),
    ("quotes", rf"(?:wrap|put|enclose|surround) {_ANS} (?:in|inside|with|within) (?:double )?(?:quotation marks|"
               r"quotes)"),
    ("quotes", rf"{_ANS} (?:must|should) be (?:wrapped|enclosed) (?:in|with|within) double (?:quotation marks|quotes)"),
    ("title", r"title,? (?:wrapped |enclosed )?in double angul?ar brackets|title[^.\n]{0,40}?<<[^<>\n]*>>|"
              r"title (?:wrapped |enclosed )?in double angle brackets"),
    ("word_count", r"(?:mention|use|include|say) (?:the (?:key)?word )?" + _W + rf" at least {_N} times"),
    ("word_count", r"the (?:key)?word " + _W + rf" (?:should|must) (?:appear|occur|be used|be mentioned) at least "
                   rf"{_N} times"),
]]


def parse_constraints(prompt: str) -> list[Constraint]:
    """Every constraint stated in ``prompt``, in the order they appear; ``[]`` when there is none.

    The bundled log's kinds by the patterns above, every other kind by ``instructions.read_instructions``.
    """
    return list(_constraints(prompt if isinstance(prompt, str) else ""))


@functools.lru_cache(maxsize=8192)
def _constraints(prompt: str) -> tuple[Constraint, ...]:
    # A prompt's N candidates, and several rewards, ask for the same parse: profiling showed a third of
    # scoring time spent parsing each prompt again.
    text = prompt if isinstance(prompt, str) else ""
    found: list[tuple[int, int, Constraint]] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(text):
            if any(c.kind == kind and s < m.end() and m.start() < e for s, e, c in found):
                continue  # two phrasings of one kind matching the same words are one instruction
            g = m.groupdict()
            arg = (g.get("text") or g.get("text2") or g.get("phrase") or g.get("word") or "").strip()
            n = number(g["n"]) if g.get("n") else number(g["lt"]) - 1 if g.get("lt") else 0
            if kind in ("max_words", "bullets", "word_count") and n < 1:
                continue
            found.append((m.start(), m.end(), Constraint(kind, arg, n)))
    # A JSON object with a given key is a JSON answer already: the key check covers the format.
    keyed = any(c.kind == "json_key" for _, _, c in found)
    found += [(start, start, Constraint(i.kind, args=i.args)) for start, i in read_spans(text)
              if not (keyed and i.kind == "detectable_format:json_format")]
    # One instruction stated twice ("at most 40 words ... keep it to 40 words") counts once.
    out: list[Constraint] = []
    for _, _, c in sorted(found, key=lambda f: f[0]):
        if c not in out:
            out.append(c)
    return tuple(out)


def _words(text: str) -> list[str]:
    return text.split()


def _has_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.I))


def _json_object(text: str) -> dict[str, Any] | None:
    """The answer's JSON object: the first of its candidate JSON values (``_json_values``) that is an object."""
    return next((v for v in _json_values(text) if isinstance(v, dict)), None)


_BULLET = re.compile(r"^\s*[-*+] \S", re.M)


def _bullets(text: str) -> int:
    return len(_BULLET.findall(text))


_CHECKS: dict[str, Callable[[Constraint, str], bool]] = {
    "include_word": lambda c, t: _has_word(t, c.text) >= 1,
    "max_words": lambda c, t: len(_words(t)) <= c.n,
    "no_commas": lambda c, t: "," not in t,
    # "- ", "* " and "+ " are all markdown bullets; numbered lines are not.
    "bullets": lambda c, t: _bullets(t) == c.n,
    "json_key": lambda c, t: c.text in (_json_object(t) or {}),
    "starts_with": lambda c, t: t.lstrip().lower().startswith(c.text.lower()),
    "ends_with": lambda c, t: t.rstrip().lower().endswith(c.text.lower()),
    "lowercase": lambda c, t: t == t.lower(),
    "uppercase": lambda c, t: t == t.upper(),
    "quotes": lambda c, t: len(t.strip()) >= 2 and t.strip()[0] in '"\u201c' and t.strip()[-1] in '"\u201d',
    "title": lambda c, t: re.search(r"<<[^<>\n]+>>", t) is not None,
    "word_count": lambda c, t: _has_word(t, c.text) >= c.n,
}


def check_constraint(constraint: Constraint, completion: str) -> bool | None:
    """Whether ``completion`` satisfies ``constraint``; an empty answer satisfies nothing.

    Without that rule an empty answer would "follow" no-commas, max-words and lowercase constraints, and the
    preference pairs would teach the model to say nothing. ``None`` for a library kind whose checker cannot run
    on this machine (``instructions.follows``).
    """
    text = completion if isinstance(completion, str) else ""
    own = _CHECKS.get(constraint.kind)
    if own is None:
        return follows(Instruction(constraint.kind, constraint.args), text)
    return bool(text.strip()) and own(constraint, text)


def _letters_share(text: str, upper: bool) -> float:
    cased = [ch for ch in text if ch.isalpha() and ch.lower() != ch.upper()]
    return sum(ch.isupper() == upper for ch in cased) / len(cased) if cased else 0.0


def _ratio(got: int, want: int) -> float:
    return min(got, want) / max(got, want) if max(got, want) else 0.0


# How near a failing answer came, in [0, 1): sampled answers to one prompt often all miss the same constraint, and a
# pass/fail check then gives the pair nothing to prefer; the nearer miss is the direction to learn.
_CLOSENESS: dict[str, Callable[[Constraint, str], float]] = {
    "max_words": lambda c, t: c.n / len(_words(t)),
    "no_commas": lambda c, t: 1.0 / (1 + t.count(",")),
    "bullets": lambda c, t: _ratio(_bullets(t), c.n),
    "json_key": lambda c, t: 0.5 if _json_object(t) is not None else 0.0,
    "starts_with": lambda c, t: 0.5 if c.text.lower() in t.lower() else 0.0,
    "ends_with": lambda c, t: 0.5 if c.text.lower() in t.lower() else 0.0,
    "lowercase": lambda c, t: _letters_share(t, upper=False),
    "uppercase": lambda c, t: _letters_share(t, upper=True),
    "quotes": lambda c, t: 0.5 if t.strip()[:1] in '"\u201c' or t.strip()[-1:] in '"\u201d' else 0.0,
    "word_count": lambda c, t: _has_word(t, c.text) / c.n if c.n else 0.0,
}


def constraint_credit(constraint: Constraint, completion: str) -> float | None:
    """1.0 when ``completion`` meets ``constraint``, else half its closeness (< 0.5): any met constraint outweighs
    any near miss, so the preference order among answers that meet it is unchanged. ``None`` where it cannot be
    checked here."""
    text = completion if isinstance(completion, str) else ""
    met = check_constraint(constraint, text)
    if met is None or met:
        return None if met is None else 1.0
    if constraint.kind not in _CHECKS:  # a library kind: its loose verdict is the near miss
        return 0.5 if follows_loosely(Instruction(constraint.kind, constraint.args), text) else 0.0
    near = _CLOSENESS.get(constraint.kind)
    return 0.5 * min(0.999, max(0.0, near(constraint, text))) if near and text.strip() else 0.0


def _pairs(prompts: list[str], completions: list[str]) -> list[tuple[str, str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [(p if isinstance(p, str) else "", c if isinstance(c, str) else "")
            for p, c in zip(prompts, completions, strict=True)]


def instruction_following(prompts: list[str], completions: list[str], strict: bool = False,
                          graded: bool = False) -> list[float]:
    """Fraction of the prompt's constraints the completion meets (``strict``: 1.0 only if all); NaN without any.

    ``graded``: a missed constraint earns part credit for a near miss (``constraint_credit``: fewer commas, a word
    count nearer the limit, more of the asked-for bullets; for a taxonomy kind, meeting it in the benchmarks' loose
    mode); 1.0 still means every constraint met. ``strict`` wins
    over ``graded``: a strict score is pass/fail by definition. A constraint that cannot be checked here
    (``check_constraint`` gives ``None``) counts neither way.
    """
    out = []
    for prompt, completion in _pairs(prompts, completions):
        constraints = _constraints(prompt if isinstance(prompt, str) else "")
        if graded and not strict:
            credits = [constraint_credit(c, completion) for c in constraints]
            known = [c for c in credits if c is not None]
            out.append(sum(known) / len(known) if known else NAN)
            continue
        met = [m for m in (check_constraint(c, completion) for c in constraints) if m is not None]
        out.append(NAN if not met else float(all(met)) if strict else sum(met) / len(met))
    return out


def json_key(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 when the answer holds a JSON object with the asked key, else 0.0; NaN when the prompt asks no JSON."""
    out = []
    for prompt, completion in _pairs(prompts, completions):
        asked = [c for c in _constraints(prompt if isinstance(prompt, str) else "") if c.kind == "json_key"]
        out.append(float(bool(check_constraint(asked[0], completion))) if asked else NAN)
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


def _applies(prompt: str, prompt_pattern: str | None) -> bool:
    return prompt_pattern is None or re.search(prompt_pattern, prompt, re.I) is not None


# --- SQL ---------------------------------------------------------------------------------------------------------

_CREATE = re.compile(r"\bCREATE\s+TABLE\b", re.I)
_SQL_BLOCK = re.compile(r"```(?:sql|sqlite)\s*\n?(.*?)```", re.S | re.I)
_ANY_BLOCK = re.compile(r"```[a-z]*\s*\n?(.*?)```", re.S | re.I)
# sqlite3's progress handler runs every N virtual-machine steps; this many calls (~10^7 steps) is a runaway query.
_SQL_STEP_CALLS = 1000


def schema_statements(text: str) -> str:
    """The ``CREATE TABLE ...(...)`` statements in ``text``, each up to its balanced closing parenthesis."""
    out = []
    for m in _CREATE.finditer(text):
        open_at = text.find("(", m.end())
        if open_at < 0:
            continue
        depth = 0
        for i in range(open_at, len(text)):
            depth += (text[i] == "(") - (text[i] == ")")
            if depth == 0:
                out.append(text[m.start():i + 1] + ";")
                break
    return "\n".join(out)


def _answer_sql(completion: str) -> str:
    blocks = _SQL_BLOCK.findall(completion) or _ANY_BLOCK.findall(completion)
    return (blocks[-1] if blocks else completion).strip()


def _deny_attach(action: int, *args: Any) -> int:
    import sqlite3

    # ATTACH would let an answer create files on the scoring machine.
    return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_ATTACH else sqlite3.SQLITE_OK


def _sql_runs(schema: str, sql: str) -> bool:
    import sqlite3

    if not sql:
        return False
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(schema)
        calls = [0]

        def progress() -> int:
            calls[0] += 1
            return int(calls[0] > _SQL_STEP_CALLS)

        con.set_progress_handler(progress, 10_000)
        con.set_authorizer(_deny_attach)
        con.executescript(sql)
        return True
    except (sqlite3.Error, ValueError, OverflowError):
        return False
    finally:
        con.close()


def sql_executes(prompts: list[str], completions: list[str], schema: str | None = None) -> list[float]:
    """1.0 when the answer's SQL (last ```sql block, else the whole answer) runs on the prompt's schema, else 0.0.

    The schema is ``schema`` or the ``CREATE TABLE`` statements in the prompt, loaded into an empty in-memory
    sqlite3 database per answer; NaN when there is neither. Checks that the query is valid, not that it is right.
    """
    out = []
    for prompt, completion in _pairs(prompts, completions):
        ddl = schema if schema is not None else schema_statements(prompt)
        if not ddl.strip():
            out.append(NAN)
            continue
        import sqlite3

        try:  # a broken schema in the prompt is not the answer's fault: the reward does not apply
            sqlite3.connect(":memory:").executescript(ddl)
        except sqlite3.Error:
            out.append(NAN)
            continue
        out.append(float(_sql_runs(ddl, _answer_sql(completion))))
    return out


# --- JSON schema, regex --------------------------------------------------------------------------------------------

def _json_values(text: str) -> Iterator[Any]:
    """Candidate JSON values of an answer: fenced blocks, the whole answer, then each {...} / [...] span. The scan
    is bounded (64 starts): a garbage completion full of braces must not make scoring quadratic."""
    for c in [*(m.group(1) for m in re.finditer(r"```(?:json)?\s*\n?(.*?)```", text, re.S | re.I)), text.strip()]:
        try:
            yield json.loads(c)
        except (ValueError, RecursionError):
            pass
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"[{\[]", text)][:64]:
        try:
            yield decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):
            continue


def json_schema(prompts: list[str], completions: list[str], schema: dict[str, Any] | str | None = None,
                prompt_pattern: str | None = None) -> list[float]:
    """1.0 when the answer holds JSON valid against ``schema`` (a JSON Schema, dict or JSON text), else 0.0.

    ``prompt_pattern`` (a regex) limits the reward to the prompts that match it; the others get NaN.
    """
    import jsonschema

    if schema is None:
        raise ValueError("json_schema needs params.schema (a JSON Schema)")
    parsed = json.loads(schema) if isinstance(schema, str) else schema
    validator_cls = jsonschema.validators.validator_for(parsed)
    validator_cls.check_schema(parsed)  # a bad schema is a config error, raised before any answer is judged
    validator = validator_cls(parsed)
    out = []
    for prompt, completion in _pairs(prompts, completions):
        if not _applies(prompt, prompt_pattern):
            out.append(NAN)
            continue
        out.append(float(any(validator.is_valid(v) for v in _json_values(completion))))
    return out


def regex_match(prompts: list[str], completions: list[str], pattern: str = "", full: bool = False,
                ignore_case: bool = False, prompt_pattern: str | None = None) -> list[float]:
    """1.0 when ``pattern`` occurs in the answer (``full``: matches the whole stripped answer), else 0.0."""
    if not pattern:
        raise ValueError("regex_match needs params.pattern")
    compiled = re.compile(pattern, re.I if ignore_case else 0)
    out = []
    for prompt, completion in _pairs(prompts, completions):
        if not _applies(prompt, prompt_pattern):
            out.append(NAN)
        elif full:
            out.append(float(compiled.fullmatch(completion.strip()) is not None))
        else:
            out.append(float(compiled.search(completion) is not None))
    return out


# --- majority vote -----------------------------------------------------------------------------------------------

def final_answer(text: str) -> str | None:
    """A short answer's comparable form: its final number (``42.0`` -> ``42``), else its last line normalised."""
    number = final_number(text)
    if number is not None:
        return f"{number:g}" if number == number and abs(number) < 1e15 else str(number)
    lines = [line for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    last = re.sub(r"^(?:final answer|answer)\s*[:=]\s*", "", lines[-1].strip().lower())
    last = re.sub(r"[^\w\s]", "", last)
    last = " ".join(last.split())
    return last or None


def majority_vote(prompts: list[str], completions: list[str], min_candidates: int = 2) -> list[float]:
    """Label-free self-consistency: the share of a prompt's candidates whose answer equals this one's.

    Candidates of one prompt are the rows with the same prompt text (the score stage sends all of a prompt's
    candidates in one call). 1.0 when all agree; an answer with no extractable final answer gets 0.0. NaN for a
    prompt with fewer than ``min_candidates`` candidates in the call: agreement needs something to agree with.
    """
    pairs = _pairs(prompts, completions)
    return _agreement([p for p, _ in pairs], [final_answer(c) for _, c in pairs], min_candidates)


def _agreement(prompts: list[str], answers: list[str | None], min_candidates: int,
               voters: list[bool] | None = None) -> list[float]:
    """Per row, the share of its prompt's voting rows whose answer equals its own. Where some rows of a prompt are
    ``voters``, only they vote (every row is still scored against their votes); where none is, every row votes."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = [NAN] * len(prompts)
    for rows in groups.values():
        if len(rows) < max(min_candidates, 2):
            continue
        voting = [i for i in rows if voters[i]] if voters else []
        voting = voting or rows
        votes: dict[str, int] = {}
        for i in voting:
            a = answers[i]
            if a is not None:
                votes[a] = votes.get(a, 0) + 1
        for i in rows:
            a = answers[i]
            out[i] = 0.0 if a is None else votes.get(a, 0) / len(voting)
    return out

# A prompt whose answers end in a short final answer: a number, a choice among given options, a yes/no, a name or
# a single word. Self-consistency means something only there: two essays never "agree" on their last line. A
# quantity question ("how many ...", "calculate ...") counts only with numbers in it: "how much storage do I use?"
# asks for a procedure, not a figure.
_CHOICE_ASK = re.compile(
    r"\bwhich of the following\b|\bmultiple[- ]choice\b|(?:^|\s)\(?[A-D][).]\s|\btrue or false\b|\byes or no\b|"
    r"\banswer with (?:one|a single) (?:word|letter|name|option)\b|\bin (?:one|a single) word\b|"
    r"\bjust the (?:name|number|letter|answer)\b|\bonly (?:the|a) (?:final )?(?:number|name|letter|answer)\b|"
    r"\bone of the following options\b", re.I)
_QUANTITY_ASK = re.compile(r"\bhow (?:many|much)\b|\b(?:calculate|compute|solve|evaluate)\b|"
                           r"\bwhat is the (?:total|sum|product|difference|result|value|average|remainder)\b", re.I)


def _question(prompt: str) -> str:
    """The part of a prompt that asks: its last paragraph (a grounding text above it asks nothing)."""
    parts = [p for p in re.split(r"\n\s*\n", prompt) if p.strip()]
    return parts[-1] if parts else ""


def asks_number(prompt: str) -> bool:
    """Whether ``prompt`` asks for a number: it says so, or its question asks for a quantity of given numbers."""
    q = _question(prompt) if isinstance(prompt, str) else ""
    return bool(_NUMERIC_ASK.search(q) or (_QUANTITY_ASK.search(q) and re.search(r"\d", q)))


def asks_short_answer(prompt: str) -> bool:
    """Whether ``prompt``'s answers end in a short final answer that several samples can agree on."""
    return asks_number(prompt) or (isinstance(prompt, str) and _CHOICE_ASK.search(_question(prompt)) is not None)


# A calculation step: two numbers joined by an operator ("12 * 3", "40 minus 4", "3 x 4").
_STEP = re.compile(r"\d\s*(?:[-+*/\u00d7\u00f7x]|\b(?:plus|minus|times|multiplied by|divided by)\b)\s*\$?\d", re.I)


def shows_work(completion: str) -> bool:
    """Whether an answer shows at least one calculation step rather than a bare result."""
    return isinstance(completion, str) and _STEP.search(completion) is not None


def answer_key(prompt: str, completion: str) -> str | None:
    """What two answers to ``prompt`` must share to agree: the final number where it asks for a number (an answer
    without one agrees with nothing), else the final short answer."""
    if asks_number(prompt):
        n = final_number(completion)
        return None if n is None else f"{n:g}" if n == n and abs(n) < 1e15 else str(n)
    return final_answer(completion)


def self_consistency(prompts: list[str], completions: list[str], min_candidates: int = 2,
                     greedy: list[bool] | None = None) -> list[float]:
    """Majority vote on the prompts that ask for a short final answer; NaN on the others.

    The label-free signal for answer-type prompts: the share of the prompt's candidates whose final answer equals
    this one's. Where the prompt asks for a number (``asks_number``), the answer compared is the final number, and
    an answer without one agrees with nothing; if any candidate shows its work (``shows_work``), only those vote.
    The score stage hands a reward all of a prompt's candidates in one call, whatever the batching, so the share is
    over every candidate.

    Where one of a prompt's candidates is the policy's greedy answer (``greedy``, from ``generate.greedy_answer``),
    it is the anchor: an answer that agrees with it scores 1, one that does not scores half its share of the
    vote, so a sampled majority can never outrank the policy's mode. At 135M parameters the mode is right 12% of
    the time on the project's arithmetic prompts and a sample at temperature 0.9 3%, and a sampled majority, when
    there is one, is mostly wrong.
    """
    pairs = _pairs(prompts, completions)
    rows = [i for i, (p, _) in enumerate(pairs) if asks_short_answer(p)]
    answers = [answer_key(*pairs[i]) for i in rows]
    # Where some of a number question's candidates show their work, only those vote: a majority of bare numbers (at
    # temperature, samples drop the working a greedy answer keeps) is often confidently wrong, and must not outrank
    # a minority that computes. Bare answers still score by agreeing with the working ones.
    voters = [asks_number(pairs[i][0]) and shows_work(pairs[i][1]) for i in rows]
    votes = _agreement([pairs[i][0] for i in rows], answers, min_candidates, voters)
    if greedy is not None:
        anchors = {pairs[i][0]: a for i, a in zip(rows, answers, strict=True) if greedy[i] and a is not None}
        for j, (i, a) in enumerate(zip(rows, answers, strict=True)):
            anchor = anchors.get(pairs[i][0])
            if anchor is not None and votes[j] == votes[j]:
                votes[j] = 1.0 if a == anchor else 0.5 * votes[j]
    out = [NAN] * len(pairs)
    for i, v in zip(rows, votes, strict=True):
        out[i] = v
    return out
