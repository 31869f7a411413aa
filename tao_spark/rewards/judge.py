"""LLM judge: a rubric, a model that reads it, and a parser that never turns "no verdict" into a score.

    score:
      rewards:
        - {name: judge, fn: judge, weight: 1.0,
           params: {mode: pointwise, model: smollm2-135m-instruct, rubric: "Is the answer helpful and correct?"}}
        - {name: judge_api, fn: judge, params: {base_url: "http://localhost:8000", model: "my-judge",
                                                 api_key_env: JUDGE_API_KEY, mode: pairwise}}

Two modes. ``pointwise``: the judge rates each answer 1-10, normalised to [0, 1] as ``(s - 1) / 9``.
``pairwise``: the judge picks the better of two answers to the same prompt (the candidates of one prompt are the
rows of a call with equal prompt text, as the score stage sends them); an answer's reward is its share of wins
over the prompt's other candidates (a tie counts one half). The model is a local one (a HF folder, ``models:/``
URI or ``smollm2-135m-instruct``, greedy through ``tao_spark.engines``) or any OpenAI-compatible server
(``base_url``: a POST to ``/v1/chat/completions``).

A verdict that cannot be parsed (no number, a number outside 1-10, neither A nor B) or a failed request is a
recorded failure: the row's reward is NaN, ``last_failures`` (per thread) flags it, the score stage stores it
as the component ``<name>_failed`` = 1.0, and the module counters ``stats`` add it up.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any

NAN = float("nan")
DEFAULT_RUBRIC = ("Rate how well the answer serves the user: it does what the prompt asks, follows every stated "
                  "instruction, is correct, and is clear and concise.")
_POINTWISE = ("You are a strict judge. {rubric}\n\n[Prompt]\n{prompt}\n\n[Answer]\n{answer}\n\n"
              "Reply with one line: \"Rating: N\" where N is an integer from 1 (worst) to 10 (best).")
_PAIRWISE = ("You are a strict judge. {rubric}\n\n[Prompt]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
             "Which answer is better? Reply with one line: \"Verdict: A\", \"Verdict: B\" or \"Verdict: tie\".")

# A rating the judge states (Rating: 7, Score 7/10, [[7]]), or a bare number opening the reply.
_RATING = re.compile(r"(?:rating|score)\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)|\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]|"
                     r"(-?\d+(?:\.\d+)?)\s*/\s*10\b|^\s*(-?\d+(?:\.\d+)?)\s*(?:$|[.\s])", re.I)
_VERDICT = re.compile(r"verdict\s*[:=]?\s*\**\s*\[*\s*(A|B|tie)\b|^\s*\[*(A|B|tie)\]*\s*[.!]?\s*$", re.I)

_stats_lock = threading.Lock()
stats: dict[str, int] = {"calls": 0, "failures": 0}


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's reply normalised to [0, 1]; None when there is none or it is out of range."""
    m = _RATING.search(text or "")
    if m is None:
        return None
    value = float(next(g for g in m.groups() if g is not None))
    if not 1 <= value <= 10:
        return None
    return (value - 1) / 9


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise judge's reply; None when it names none."""
    m = _VERDICT.search(text or "")
    if m is None:
        return None
    v = next(g for g in m.groups() if g is not None)
    return "tie" if v.lower() == "tie" else v.upper()


class Judge:
    """A ``RewardFn`` that asks an LLM for a verdict; see the module docstring for the modes and backends."""

    def __init__(self, rubric: str = DEFAULT_RUBRIC, mode: str = "pointwise", model: str | None = None,
                 base_url: str | None = None, endpoint: str | None = None, api_key_env: str | None = None,
                 max_new_tokens: int = 16, timeout_s: float = 60.0, concurrency: int = 4, home: str = "",
                 dtype: str = "float32") -> None:
        if mode not in ("pointwise", "pairwise"):
            raise TypeError(f"mode must be pointwise or pairwise, got {mode!r}")
        url = base_url or endpoint
        if not model and not url:
            raise TypeError("set model (a local model) or base_url (an OpenAI-compatible server)")
        self.rubric, self.mode, self.model, self.max_new_tokens = rubric, mode, model, max_new_tokens
        self.url = None if url is None else _chat_url(url)
        self.api_key_env, self.timeout_s, self.concurrency = api_key_env, timeout_s, concurrency
        self.home, self.dtype = home, dtype
        self._local = threading.local()

    @property
    def last_failures(self) -> list[bool]:
        """Per row of this thread's last call: True where the judge gave no usable verdict."""
        return list(getattr(self._local, "failures", []))

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.mode == "pointwise":
            replies = self._ask([_POINTWISE.format(rubric=self.rubric, prompt=p, answer=c)
                                 for p, c in zip(prompts, completions, strict=True)])
            values = [parse_rating(r) if r is not None else None for r in replies]
            failures = [v is None for v in values]
            out = [NAN if v is None else v for v in values]
        else:
            out, failures = self._pairwise(prompts, completions)
        self._local.failures = failures
        with _stats_lock:
            stats["calls"] += len(prompts)
            stats["failures"] += sum(failures)
        return out

    def _pairwise(self, prompts: list[str], completions: list[str]) -> tuple[list[float], list[bool]]:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        matches = [(i, j) for rows in groups.values() for i, j in combinations(rows, 2)]
        # Alternate which answer is shown first, so the judge's position bias does not favour one index.
        shown = [(i, j) if k % 2 == 0 else (j, i) for k, (i, j) in enumerate(matches)]
        replies = self._ask([_PAIRWISE.format(rubric=self.rubric, prompt=prompts[a], a=completions[a],
                                              b=completions[b]) for a, b in shown])
        wins = [0.0] * len(prompts)
        played = [0] * len(prompts)
        for (a, b), reply in zip(shown, replies, strict=True):
            verdict = parse_verdict(reply) if reply is not None else None
            if verdict is None:
                continue
            played[a] += 1
            played[b] += 1
            wins[a] += {"A": 1.0, "B": 0.0, "tie": 0.5}[verdict]
            wins[b] += {"A": 0.0, "B": 1.0, "tie": 0.5}[verdict]
        out, failures = [], []
        for rows in groups.values():
            for i in rows:
                if len(rows) < 2:  # nothing to compare with: the reward does not apply, and nothing failed
                    out.append((i, NAN))
                    failures.append((i, False))
                else:
                    out.append((i, wins[i] / played[i] if played[i] else NAN))
                    failures.append((i, played[i] == 0))
        return [v for _, v in sorted(out)], [f for _, f in sorted(failures)]

    def _ask(self, questions: list[str]) -> list[str | None]:
        """The judge's reply to each question, in order; None for a request that failed."""
        if not questions:
            return []
        if self.url is not None:
            with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
                return list(pool.map(self._post, questions))
        from tao_spark.engines import get_generator
        from tao_spark.models import resolve_model

        home = str(Path(self.home or os.environ.get("TAO_HOME") or ".tao").resolve())
        generator = get_generator("transformers", resolve_model(str(self.model), home), self.dtype)
        chats = [[{"role": "user", "content": q}] for q in questions]
        answers = generator.generate(chats, n=1, temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens,
                                     seeds=[0] * len(chats))
        return [a[0].text for a in answers]

    def _post(self, question: str) -> str | None:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": question}], "temperature": 0.0,
                                "max_tokens": self.max_new_tokens}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        request = urllib.request.Request(str(self.url), json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = json.loads(response.read())
            content = data["choices"][0]["message"]["content"]
            return content if isinstance(content, str) else None
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
            return None  # recorded as a failure by the caller: the row gets NaN, never a silent score


def _chat_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


def failure_rate() -> float:
    """Share of judged rows in this process with no usable verdict (NaN before any call)."""
    with _stats_lock:
        return stats["failures"] / stats["calls"] if stats["calls"] else math.nan

