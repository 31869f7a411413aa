"""LLM judge: a rubric, a model that reads it, and a parser that never turns "no verdict" into a score.

    score:
      rewards:
        - {name: judge, fn: judge, weight: 1.0,
           params: {mode: pointwise, model: smollm2-135m-instruct, rubric: "Is the answer helpful and correct?"}}
        - {name: judge_api, fn: judge, params: {base_url: "http://localhost:8000/v1", model: "my-judge",
                                                 api_key_env: JUDGE_API_KEY, mode: pairwise,
                                                 guidelines: {support: "Answers must cite the help-center text."}}}
        # a Databricks Foundation Model API endpoint, through the workspace's OpenAI-compatible serving URL
        - {name: judge_fm, fn: judge, params: {base_url: "${DATABRICKS_HOST}/serving-endpoints",
                                                api_key_env: DATABRICKS_TOKEN,
                                                model: databricks-meta-llama-3-3-70b-instruct}}

Two modes. ``pointwise``: the judge rates each answer 1-10, normalised to [0, 1] as ``(s - 1) / 9``.
``pairwise``: the judge picks the better of two answers to the same prompt (the score stage hands a reward all of a
prompt's candidates in one call); an answer's reward is its share of wins over the prompt's other candidates (a tie
counts one half). The model is a local one (a HF folder, ``models:/`` URI or ``smollm2-135m-instruct``, greedy
through ``tao_spark.engines``) or any OpenAI-compatible server (``base_url``, ``${VAR}`` expanded from the
environment): vLLM, ``tao serve``, a Databricks serving endpoint. Requests go through the ``openai`` client, which
retries a 429, a 5xx or a timeout with backoff (``retries``, honouring ``Retry-After``), at most ``concurrency`` at
a time. ``guidelines`` adds natural-language guidance to the rubric, one text for every task or a text per task
(the score stage passes each row's task). Replies are cached on disk by (judge, question) in ``cache`` (default
``$TAO_HOME/cache/judge.sqlite``; ``""`` turns it off), so a re-run, or a candidate judged again in a later
round, costs no request.

A verdict that cannot be parsed (no number, a number outside 1-10, neither A nor B) or a request that still fails
after its retries is a recorded failure: the row's reward is NaN, ``last_failures`` (per thread) flags it, the
score stage stores it as the component ``<name>_failed`` = 1.0, and the module counters ``stats`` add it up.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAN = float("nan")
DEFAULT_RUBRIC = ("Rate how well the answer serves the user: it does what the prompt asks, follows every stated "
                  "instruction, is correct, and is clear and concise.")
_GUIDE = "\n\nGuidelines for this task: {guidelines}"
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
                 guidelines: str | dict[str, str] | None = None, max_new_tokens: int = 16, timeout_s: float = 60.0,
                 retries: int = 5, concurrency: int = 4, cache: str | None = None, home: str = "",
                 dtype: str = "float32") -> None:
        if mode not in ("pointwise", "pairwise"):
            raise TypeError(f"mode must be pointwise or pairwise, got {mode!r}")
        url = base_url or endpoint
        if not model and not url:
            raise TypeError("set model (a local model) or base_url (an OpenAI-compatible server)")
        if not isinstance(guidelines, (str, dict, type(None))):
            raise TypeError("guidelines must be a text or a mapping of task to text")
        self.rubric, self.mode, self.model, self.max_new_tokens = rubric, mode, model, max_new_tokens
        self.url = None if url is None else api_base(os.path.expandvars(url))
        self.api_key_env, self.timeout_s, self.retries, self.concurrency = api_key_env, timeout_s, retries, concurrency
        self.guidelines, self.home, self.dtype = guidelines, home, dtype
        home_dir = Path(self.home or os.environ.get("TAO_HOME") or ".tao")
        self.cache_path = None if cache == "" else Path(cache) if cache else home_dir / "cache" / "judge.sqlite"
        self._local = threading.local()
        self._client: Any = None

    @property
    def last_failures(self) -> list[bool]:
        """Per row of this thread's last call: True where the judge gave no usable verdict."""
        return list(getattr(self._local, "failures", []))

    def _rubric(self, task: str | None) -> str:
        g = self.guidelines.get(task or "") if isinstance(self.guidelines, dict) else self.guidelines
        return self.rubric + (_GUIDE.format(guidelines=g) if g else "")

    def __call__(self, prompts: list[str], completions: list[str], tasks: list[str] | None = None) -> list[float]:
        if len(prompts) != len(completions) or (tasks is not None and len(tasks) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        per_row: list[str | None] = list(tasks) if tasks is not None else [None] * len(prompts)
        rubrics = [self._rubric(t) for t in per_row]
        if self.mode == "pointwise":
            replies = self._ask([_POINTWISE.format(rubric=r, prompt=p, answer=c)
                                 for r, p, c in zip(rubrics, prompts, completions, strict=True)])
            values = [parse_rating(r) if r is not None else None for r in replies]
            failures = [v is None for v in values]
            out = [NAN if v is None else v for v in values]
        else:
            out, failures = self._pairwise(prompts, completions, rubrics)
        self._local.failures = failures
        with _stats_lock:
            stats["calls"] += len(prompts)
            stats["failures"] += sum(failures)
        return out

    def _pairwise(self, prompts: list[str], completions: list[str],
                  rubrics: list[str]) -> tuple[list[float], list[bool]]:
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        matches = [(i, j) for rows in groups.values() for i, j in combinations(rows, 2)]
        # Alternate which answer is shown first, so the judge's position bias does not favour one index.
        shown = [(i, j) if k % 2 == 0 else (j, i) for k, (i, j) in enumerate(matches)]
        replies = self._ask([_PAIRWISE.format(rubric=rubrics[a], prompt=prompts[a], a=completions[a],
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
        """The judge's reply to each question, in order; None for a request that failed after its retries."""
        if not questions:
            return []
        if self.url is not None:
            cache = _Cache(self.cache_path) if self.cache_path else None
            keys = [hashlib.sha256(f"{self.url}\0{self.model}\0{self.max_new_tokens}\0{q}".encode()).hexdigest()
                    for q in questions]
            known = cache.get(keys) if cache else {}
            todo = [i for i, k in enumerate(keys) if k not in known]
            with ThreadPoolExecutor(max(1, self.concurrency)) as pool:
                fresh = dict(zip(todo, pool.map(self._post, [questions[i] for i in todo]), strict=True))
            if cache:
                cache.put({keys[i]: r for i, r in fresh.items() if r is not None})
            return [known[k] if k in known else fresh[i] for i, k in enumerate(keys)]
        from tao_spark.engines import get_generator
        from tao_spark.models import resolve_model

        home = str(Path(self.home or os.environ.get("TAO_HOME") or ".tao").resolve())
        generator = get_generator("transformers", resolve_model(str(self.model), home), self.dtype)
        chats = [[{"role": "user", "content": q}] for q in questions]
        answers = generator.generate(chats, n=1, temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens,
                                     seeds=[0] * len(chats))
        return [a[0].text for a in answers]

    def client(self) -> Any:
        """The ``openai`` client for ``base_url``, made once per judge (it keeps the connection pool)."""
        if self._client is None:
            from openai import OpenAI

            key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
            # The client refuses an empty key; a server without auth ignores the header.
            self._client = OpenAI(base_url=self.url, api_key=key or "none", max_retries=self.retries,
                                  timeout=self.timeout_s)
        return self._client

    def _post(self, question: str) -> str | None:
        import openai

        try:
            response = self.client().chat.completions.create(
                model=self.model or "default", messages=[{"role": "user", "content": question}], temperature=0.0,
                max_tokens=self.max_new_tokens)
            content = response.choices[0].message.content
            return content if isinstance(content, str) else None
        except (openai.OpenAIError, IndexError, AttributeError, ValueError) as e:
            log.warning("judge request failed after %d retries: %s", self.retries, str(e).splitlines()[0][:200])
            return None  # recorded as a failure by the caller: the row gets NaN, never a silent score


class _Cache:
    """Replies by key in a small sqlite file; any error there only costs a request, never a score."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")
        return con

    def get(self, keys: list[str]) -> dict[str, str]:
        try:
            con = self._connect()
            try:
                out: dict[str, str] = {}
                for start in range(0, len(keys), 500):
                    chunk = keys[start:start + 500]
                    rows = con.execute(f"SELECT key, reply FROM replies WHERE key IN ({','.join('?' * len(chunk))})",
                                       chunk).fetchall()
                    out.update(dict(rows))
                return out
            finally:
                con.close()
        except (sqlite3.Error, OSError) as e:
            log.warning("judge cache %s unreadable: %s", self.path, e)
            return {}

    def put(self, replies: dict[str, str]) -> None:
        if not replies:
            return
        try:
            con = self._connect()
            try:
                with con:
                    con.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?)", list(replies.items()))
            finally:
                con.close()
        except (sqlite3.Error, OSError) as e:
            log.warning("judge cache %s not written: %s", self.path, e)


def api_base(url: str) -> str:
    """The ``openai`` client's base URL for what a user gives: a server root gets ``/v1``; a ``/v1``, a Databricks
    ``/serving-endpoints`` or a full ``/chat/completions`` URL is used as it is (the last without that suffix)."""
    url = url.rstrip("/").removesuffix("/chat/completions")
    return url if url.endswith("/v1") or url.endswith("/serving-endpoints") else f"{url}/v1"


def failure_rate() -> float:
    """Share of judged rows in this process with no usable verdict (NaN before any call)."""
    with _stats_lock:
        return stats["failures"] / stats["calls"] if stats["calls"] else math.nan

