"""Build the bundled preference set: synthetic pairs whose preferred side a program can check, the same bytes every run.

    python -m tao_spark.data.build_preferences    # rewrites preferences.jsonl beside this file
    tao ingest-preferences tao_spark/data/preferences.jsonl && tao train-reward

One JSON object per line: ``{"id", "task", "prompt" | "messages", "chosen", "rejected", "source"}``. The prompts
come from ``build_samples``' builders under another seed, and any prompt text that is also in ``prompts.jsonl``
is skipped, so the reward model never sees the demo log's (or its held-out split's) prompts.

- ``instruct``: ``chosen`` meets every constraint of the prompt, ``rejected`` meets some but not all
  (``instruction_following`` checks both, strictly).
- ``arithmetic``: ``chosen`` ends on the answer as a clear number, ``rejected`` rambles and gives none
  (``numeric_answer`` 1.0 against 0.0).
- ``support``: ``chosen`` answers from the quoted policy or the question's own words, ``rejected`` loops on one
  sentence or answers another question (``coherence`` or the overlap with the question is lower).
Answer lengths vary on both sides, so length alone does not tell which is preferred.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from tao_spark.data.build_samples import _ENDS, _STARTS, _arithmetic, _instruct, _support, build_samples
from tao_spark.rewards.verifiers import Constraint, check_constraint, coherence, numeric_answer

SEED = 20250101
HERE = Path(__file__).resolve().parent
COUNTS = {"instruct": 220, "arithmetic": 110, "support": 90}

# Body sentences: no commas, quotes, digits or any of build_samples' constraint words, so a constraint holds or
# fails only by what the builder adds.
_BODY = [
    "{topic} deserves a clear and honest answer.", "Start with the basics and build from there.",
    "A little planning goes a long way here.", "Small steps add up over time.",
    "Most people find this easier than they expect.", "Keep the main goal in mind at every step.",
    "It helps to look at the problem from the reader's side.", "Good habits make the whole thing smoother.",
    "Take a moment to check what matters most.", "The details are worth getting right.",
    "Clear words beat long explanations.", "Everyone can learn this with some practice.",
]
_FILLER = ["Well, to be honest, there is a lot to say about this, and some of it matters.",
           "In any case, as always, it depends on many things, which is worth remembering.",
           "Also, by the way, there are other topics too, but let us not go there now."]


def _body(topic: str, rng: random.Random, k: int) -> list[str]:
    return [s.format(topic=topic[:1].upper() + topic[1:]) for s in rng.sample(_BODY, k)]


def _render(constraints: tuple[Constraint, ...], topic: str, rng: random.Random, keep: set[int],
            sentences: int) -> str:
    """An answer that meets the constraints whose index is in ``keep`` and breaks the others."""
    lines = _body(topic, rng, sentences)
    kinds = {c.kind: (i, c) for i, c in enumerate(constraints)}

    def on(kind: str) -> Constraint | None:
        hit = kinds.get(kind)
        return hit[1] if hit and hit[0] in keep else None

    def off(kind: str) -> bool:
        hit = kinds.get(kind)
        return bool(hit and hit[0] not in keep)

    if (c := on("include_word")) is not None:
        lines.insert(1, f"Think about {c.text} as you go.")
    if (c := on("word_count")) is not None:
        lines.insert(1, " ".join([f"The word {c.text} matters."] * c.n))
    if off("no_commas") or (off("max_words") and "max_words" in kinds):
        lines.append(rng.choice(_FILLER))
    if off("max_words"):
        n = kinds["max_words"][1].n
        while len(" ".join(lines).split()) <= n:
            lines.append(rng.choice(_BODY).format(topic=topic))
    if (c := on("max_words")) is not None:
        while len(" ".join(lines).split()) > c.n and len(lines) > 1:
            lines.pop()
    if (c := on("bullets")) is not None or off("bullets"):
        n = kinds["bullets"][1].n + (0 if c is not None else rng.choice([-1, 1]))
        while len(lines) < n:
            lines.append(rng.choice(_BODY).format(topic=topic))
        text = "\n".join(f"- {s}" for s in lines[:n])
    else:
        text = " ".join(lines)
    if (c := on("title")) is not None:
        text = f"<<{topic[:40].strip().title()}>>\n{text}"
    if (c := on("starts_with")) is not None:
        text = f"{c.text} {text}" if c.text[-1:].isalpha() else f"{c.text}. {text}"
    elif off("starts_with"):
        text = f"{rng.choice([s for s in _STARTS if s != kinds['starts_with'][1].text])}. {text}"
    if (c := on("ends_with")) is not None:
        text = f"{text} {c.text}"
    elif off("ends_with"):
        text = f"{text} {rng.choice([e for e in _ENDS if e != kinds['ends_with'][1].text])}"
    if (c := on("json_key")) is not None:
        text = json.dumps({c.text: text})
    elif off("json_key"):
        text = json.dumps({"text": text}) if rng.random() < 0.5 else text
    if on("lowercase") is not None:
        text = text.lower()
    if on("uppercase") is not None:
        text = text.upper()
    if on("quotes") is not None:
        text = f'"{text}"'
    return text


def _topic(prompt: str) -> str:
    m = re.match(r"(?:[^.]*?\b(?:for|about|to|of|how|explain|compare|describe)\s+)?([^.]+)\.", prompt, re.I)
    return (m.group(1) if m else "this").strip()


def _instruct_pair(s: Any, rng: random.Random) -> tuple[str, str] | None:
    topic = _topic(s.messages[-1]["content"] if s.messages else s.prompt)
    every = set(range(len(s.constraints)))
    for _ in range(8):  # a few draws until both sides check out; deterministic under the seed
        chosen = _render(s.constraints, topic, rng, every, rng.randint(1, 4))
        keep = set(rng.sample(sorted(every), rng.randint(0, len(every) - 1)))
        rejected = _render(s.constraints, topic, rng, keep, rng.randint(1, 5))
        if all(check_constraint(c, chosen) for c in s.constraints) and \
                not all(check_constraint(c, rejected) for c in s.constraints) and chosen != rejected:
            return chosen, rejected
    return None


_STEPS = ["Let me work through it step by step.", "First I set up the numbers from the question.",
          "I combine the quantities in the order the question gives them.", "Checking the arithmetic once more."]
_RAMBLE = ["This is an interesting question with a lot going on.", "There are several ways to look at it.",
           "It really depends on how you read the problem.", "Numbers can be tricky and it is easy to slip.",
           "I would want to double-check the details before committing to anything.",
           "Maybe the question expects a rough idea rather than an exact figure.",
           "Word problems like this one often hide an extra step."]


def _arithmetic_pair(s: Any, rng: random.Random) -> tuple[str, str]:
    steps = " ".join(rng.sample(_STEPS, rng.randint(0, 3)))
    end = rng.choice(["The answer is {}.", "So the final answer is {}.", "Final answer: {}", "{}"]).format(s.answer)
    chosen = f"{steps}\n{end}".strip()
    rejected = " ".join(rng.sample(_RAMBLE, rng.randint(1, 5)))
    return chosen, rejected


_OPENERS = ["Thanks for reaching out.", "Happy to help.", "Good question.", ""]
_CLOSERS = ["Let me know if anything is unclear.", "I hope that helps.", ""]
_OFF_TOPIC = ["Our office is closed on public holidays and the cafeteria serves soup on Fridays.",
              "The weather this week should be mild with some rain in the afternoon.",
              "We recently redesigned our logo and we are very proud of the new colors.",
              "Many customers enjoy our newsletter which covers industry trends and team news."]


def _support_pair(s: Any, rng: random.Random) -> tuple[str, str]:
    user = s.messages[-1]["content"] if s.messages else s.prompt
    question = user.rsplit("Customer question:", 1)[-1].strip()
    words = set(re.findall(r"\w+", question.lower()))
    doc = user.split("\n\n")[1] if "Customer question:" in user else ""
    facts = sorted(re.split(r"(?<=\.)\s+", doc), key=lambda x: -len(words & set(re.findall(r"\w+", x.lower()))))
    if facts and facts[0]:
        core = " ".join(facts[:rng.randint(1, 2)])
    else:
        topic = question.rstrip("?").lower()
        core = (f"About your question ({topic}): open Settings in Acme Cloud and look at the section that matches "
                f"it; if the option is missing there, our support team can check your account.")
    chosen = " ".join(x for x in [rng.choice(_OPENERS), core, rng.choice(_CLOSERS)] if x)
    if rng.random() < 0.5:
        line = rng.choice(["Thank you for contacting Acme Cloud support.", "We are looking into your request.",
                           "Please try again later."])
        rejected = "\n".join([line] * rng.randint(4, 9))
    else:
        rejected = " ".join(rng.sample(_OFF_TOPIC, rng.randint(1, 3)))
    return chosen, rejected


_SIGN_OFFS = [" Thanks in advance.", " Please keep it short.", " Any help is appreciated.", " I need this today."]


def _reworded(s: Any, rng: random.Random) -> Any:
    tail = rng.choice(_SIGN_OFFS)
    if s.messages is None:
        return s._replace(prompt=s.prompt + tail)
    return s._replace(messages=[*s.messages[:-1], {"role": "user", "content": s.messages[-1]["content"] + tail}])


def _overlap(question: str, answer: str) -> float:
    q = set(re.findall(r"\w+", question.lower()))
    return len(q & set(re.findall(r"\w+", answer.lower()))) / max(1, len(q))


def build_preferences(seed: int = SEED) -> list[dict[str, Any]]:
    """All pairs, tasks interleaved by a seeded shuffle; each one checked by the rewards named in the docstring."""
    rng = random.Random(seed)
    taken = {s.text() for s in build_samples()}
    pairs: list[dict[str, Any]] = []
    pools = {"instruct": _instruct(400, rng), "arithmetic": _arithmetic(300, rng), "support": _support(90, rng)}
    for task, pool in pools.items():
        made = 0
        for s in pool:
            if made == COUNTS[task]:
                break
            if task == "support":  # the help-desk questions are a fixed list: reword them to stay off the demo log
                s = _reworded(s, rng)
            if s.text() in taken:
                continue
            if task == "instruct":
                pair = _instruct_pair(s, rng)
            elif task == "arithmetic":
                pair = _arithmetic_pair(s, rng)
                text = s.text()
                if numeric_answer([text, text], list(pair)) != [1.0, 0.0]:
                    pair = None
            else:
                pair = _support_pair(s, rng)
                c, r = coherence([s.text()] * 2, list(pair))
                if not (c > r or _overlap(s.text(), pair[0]) > _overlap(s.text(), pair[1])):
                    pair = None
            if pair is None:
                continue
            body = {"prompt": s.prompt} if s.messages is None else {"messages": s.messages}
            pairs.append({"id": f"pref-{task}-{made:04d}", "task": task, **body, "chosen": pair[0],
                          "rejected": pair[1], "source": "synthetic"})
            made += 1
    rng.shuffle(pairs)
    return pairs


def write_preferences(out_dir: Path = HERE, seed: int = SEED) -> Path:
    path = out_dir / "preferences.jsonl"
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in build_preferences(seed))
    path.write_text(lines, encoding="utf-8", newline="\n")
    return path


def main() -> None:
    print(f"wrote {write_preferences()}")


if __name__ == "__main__":
    main()
