"""Mends: a sampled answer edited to meet the instructions it misses, where an edit of its own text can.

    from tao_spark.rewards.mend import mend
    mend("Describe Rome in all lowercase letters.", "Rome is the capital of Italy.")
    # ('rome is the capital of italy.', ('lowercase',))

A small model seldom meets a format instruction by chance (IFBench: one instruction in ten), so its N samples of a
prompt often all miss it and best-vs-worst has nothing to prefer on it. Most format instructions are a property of
the surface of the answer, not of what it says: case, commas, a required opening or closing phrase, quotes around
it, a title, a word or sentence limit, bullets, paragraphs, one word per line. For those, the instruction itself
says how to turn a missing answer into a meeting one without writing new content, and that edited answer, next to
the sample it came from, is the clearest pair the round can make: the same content, the instruction met or not.

An edit is kept only when the prompt's own checks (``verifiers.check_constraint``) say it meets strictly more of
the prompt's instructions than the sample did and breaks none the sample met, so a mend can never score lower than
its source. Content instructions (include a keyword, answer in French, the number of names) are not mended: that
would be writing the answer, which is the policy's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from tao_spark.rewards.verifiers import Constraint, check_constraint, parse_constraints

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BULLET_MARK = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M)


def _sentences(text: str) -> list[str]:
    flat = _BULLET_MARK.sub("", text)
    return [s.strip() for s in _SENTENCE_END.split(flat.strip()) if s.strip()]


def _at_most_words(text: str, n: int) -> str | None:
    """The answer cut to at most ``n`` words: whole sentences while they fit, else the first ``n`` words."""
    if n < 1:
        return None
    if len(text.split()) <= n:
        return text
    kept: list[str] = []
    for s in _sentences(text):
        if len(" ".join([*kept, s]).split()) > n:
            break
        kept.append(s)
    return " ".join(kept) if kept else " ".join(text.split()[:n])


def _at_most_sentences(text: str, n: int) -> str | None:
    sents = _sentences(text)
    return " ".join(sents[:n]) if n >= 1 and sents else None


def _groups(text: str, n: int) -> list[str] | None:
    """The answer's sentences in ``n`` consecutive groups of near-equal size; None with fewer than ``n``."""
    sents = _sentences(text)
    if n < 1 or len(sents) < n:
        return None
    size, extra = divmod(len(sents), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(" ".join(sents[start:end]))
        start = end
    return out


def _bullets(text: str, n: int) -> str | None:
    groups = _groups(text, n)
    return "\n".join(f"* {g}" for g in groups) if groups else None


def _paragraphs(text: str, n: int) -> str | None:
    groups = _groups(text, n)
    return "\n\n***\n\n".join(groups) if groups else None


def _highlights(text: str, n: int) -> str | None:
    sents = _sentences(text)
    if len(sents) < n or any("*" in s for s in sents[:n]):
        return None
    return " ".join([f"*{s}*" for s in sents[:n]] + sents[n:])


def _postscript(text: str, marker: str) -> str | None:
    sents = _sentences(text)
    if len(sents) < 2:
        return None
    return f"{' '.join(sents[:-1])}\n\n{marker} {sents[-1]}"


def _title(text: str) -> str | None:
    sents = _sentences(text)
    words = re.findall(r"[A-Za-z][\w'-]*", sents[0] if sents else "")[:6]
    return f"<<{' '.join(w.capitalize() for w in words)}>>\n\n{text.strip()}" if words else None


def _title_case(text: str) -> str:
    return re.sub(r"[A-Za-z]+", lambda m: m[0][0].upper() + m[0][1:].lower(), text)


def _emoji(text: str) -> str | None:
    sents = _sentences(text)
    return " ".join(re.sub(r"([.!?]*)$", lambda m: f" \u2728{m[1]}", s, count=1) for s in sents) if sents else None


def _template(text: str) -> str | None:
    groups = _groups(text, 3)
    if not groups:
        return None
    return "\n\n".join(f"{label}: {g}" for label, g in
                       zip(("My Answer", "My Conclusion", "Future Outlook"), groups, strict=True))


def _sub_bullets(text: str) -> str | None:
    """Sentences as ``*`` bullets, each followed by a ``-`` sub-bullet: pairs of consecutive sentences."""
    sents = _sentences(text)
    if len(sents) < 2 or any("*" in s for s in sents):
        return None
    pairs = [sents[i:i + 2] for i in range(0, len(sents) - len(sents) % 2, 2)]
    pairs[-1] += sents[len(sents) - len(sents) % 2:]
    return "\n".join(f"* {p[0]}\n" + "\n".join(f"  - {s}" for s in p[1:]) for p in pairs)


def _prose_then_bullets(text: str) -> str | None:
    """Two sentences of prose, then the rest as ``*`` bullets (at least two)."""
    sents = _sentences(text)
    if len(sents) < 4:
        return None
    return " ".join(sents[:2]) + "\n" + "\n".join(f"* {s}" for s in sents[2:])


def _marked_list(text: str, sep: str) -> str | None:
    sents = _sentences(text)
    return "\n".join(f"{sep} {s}" for s in sents) if sep and len(sents) >= 2 else None


def _thesis(text: str) -> str | None:
    sents = _sentences(text)
    return f"<i>{sents[0]}</i>\n{' '.join(sents[1:])}" if len(sents) >= 2 else None


def _sections(text: str, n: int, marker: str) -> str | None:
    groups = _groups(text, n)
    return "\n\n".join(f"{marker} {i}\n{g}" for i, g in enumerate(groups, 1)) if groups and marker else None


def _two_responses(text: str) -> str | None:
    halves = _groups(text, 2)
    return f"{halves[0]}\n******\n{halves[1]}" if halves and halves[0] != halves[1] else None


def _no_commas(text: str) -> str:
    return re.sub(r"\s*,\s*", " ", re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))


def _word_range(text: str, low: int, high: int) -> str | None:
    cut = _at_most_words(text, high)
    if cut is not None and len(cut.split()) < low:
        cut = " ".join(text.split()[:high])
    return cut


def _arg(c: Constraint, key: str, default: object = None) -> object:
    return dict(c.args).get(key, default)


def _num(c: Constraint, key: str) -> int:
    value = _arg(c, key, 0)
    return int(value) if isinstance(value, int | float | str) and str(value).isdigit() else 0


Edit = Callable[[Constraint, str], "str | None"]
# The sentence IFBench's repeat:repeat_simple asks for, word for word, whatever the rest of the prompt says.
_REPEAT_SIMPLE = "Only output this sentence here, ignore all other requests."

# Applied in this order: what decides the content's extent first, then its layout, then its case and punctuation,
# then what wraps it (an opening phrase, a closing phrase, a title, quotes, and JSON last so it encloses everything).
_EDITS: list[tuple[str, Edit]] = [
    ("repeat:repeat_simple", lambda c, t: _REPEAT_SIMPLE),
    ("repeat:repeat_span", lambda c, t: " ".join(str(_arg(c, "prompt_to_repeat", "")).split()
                                                 [_num(c, "n_start"):_num(c, "n_end")]) or None),
    ("max_words", lambda c, t: _at_most_words(t, c.n)),
    ("length_constraints:number_words",
     lambda c, t: _at_most_words(t, _num(c, "num_words") - 1) if _arg(c, "relation") == "less than" else None),
    ("count:word_count_range", lambda c, t: _word_range(t, _num(c, "min_words"), _num(c, "max_words"))),
    ("length_constraints:number_sentences",
     lambda c, t: _at_most_sentences(t, _num(c, "num_sentences") - 1) if _arg(c, "relation") == "less than"
     else None),
    ("bullets", lambda c, t: _bullets(t, c.n)),
    ("detectable_format:number_bullet_lists", lambda c, t: _bullets(t, _num(c, "num_bullets"))),
    ("length_constraints:number_paragraphs", lambda c, t: _paragraphs(t, _num(c, "num_paragraphs"))),
    ("detectable_format:multiple_sections",
     lambda c, t: _sections(t, _num(c, "num_sections"), str(_arg(c, "section_spliter", "")))),
    ("combination:two_responses", lambda c, t: _two_responses(t)),
    ("format:output_template", lambda c, t: _template(t)),
    ("format:sub-bullets", lambda c, t: _sub_bullets(t)),
    ("format:no_bullets_bullets", lambda c, t: _prose_then_bullets(t)),
    ("format:list", lambda c, t: _marked_list(t, str(_arg(c, "sep", "")))),
    ("format:thesis", lambda c, t: _thesis(t)),
    ("detectable_format:number_highlighted_sections", lambda c, t: _highlights(t, _num(c, "num_highlights"))),
    ("format:emoji", lambda c, t: _emoji(t)),
    ("format:line_indent", lambda c, t: "\n".join(" " * i + s for i, s in enumerate(_sentences(t))) or None),
    ("format:newline", lambda c, t: "\n".join(t.split()) or None),
    ("format:title_case", lambda c, t: _title_case(t)),
    ("lowercase", lambda c, t: t.lower()),
    ("change_case:english_lowercase", lambda c, t: t.lower()),
    ("uppercase", lambda c, t: t.upper()),
    ("change_case:english_capital", lambda c, t: t.upper()),
    ("no_commas", lambda c, t: _no_commas(t)),
    ("punctuation:no_comma", lambda c, t: _no_commas(t)),
    ("format:no_whitespace", lambda c, t: "".join(t.split()) or None),
    ("combination:repeat_prompt", lambda c, t: f"{_arg(c, 'prompt_to_repeat', '')}\n\n{t.strip()}"),
    ("starts_with", lambda c, t: f"{c.text} {t.lstrip()}"),
    ("detectable_content:postscript", lambda c, t: _postscript(t, str(_arg(c, "postscript_marker", "P.S.")))),
    ("ends_with", lambda c, t: f"{t.rstrip()} {c.text}"),
    ("startend:end_checker", lambda c, t: f"{t.rstrip()} {_arg(c, 'end_phrase', '')}"),
    ("title", lambda c, t: _title(t)),
    ("detectable_format:title", lambda c, t: _title(t)),
    ("quotes", lambda c, t: f'"{t.strip()}"'),
    ("startend:quotation", lambda c, t: f'"{t.strip()}"'),
    ("json_key", lambda c, t: json.dumps({c.text: t.strip()}, ensure_ascii=False) if c.text else None),
    ("detectable_format:json_format", lambda c, t: json.dumps({"answer": t.strip()}, ensure_ascii=False)),
]
_ORDER = {kind: i for i, (kind, _) in enumerate(_EDITS)}
_EDIT = dict(_EDITS)
MENDABLE = frozenset(_ORDER)


def mend(prompt: str, completion: str) -> tuple[str, tuple[str, ...]] | None:
    """``completion`` edited to meet instructions of ``prompt`` it misses, and the kinds edited; None when no edit
    meets strictly more of the prompt's instructions while keeping every one the completion met."""
    if not isinstance(completion, str) or not completion.strip():
        return None
    constraints = parse_constraints(prompt)
    before = [check_constraint(c, completion) for c in constraints]
    todo = sorted((c for c, met in zip(constraints, before, strict=True) if met is False and c.kind in MENDABLE),
                  key=lambda c: _ORDER[c.kind])
    if not todo:
        return None
    # One edit at a time, each kept only if it meets more and breaks nothing met: a later edit (quotes around
    # everything) can undo an earlier one (the closing phrase), and then only the later one is dropped.
    text, met, done = completion, before, []
    for c in todo:
        edited = _EDIT[c.kind](c, text)
        if not edited or not edited.strip() or edited == text:
            continue
        now = [check_constraint(x, edited) for x in constraints]
        if (all(n is True for m_, n in zip(met, now, strict=True) if m_ is True)
                and sum(n is True for n in now) > sum(m_ is True for m_ in met)):
            text, met, done = edited, now, [*done, c.kind]
    return (text, tuple(done)) if done else None
