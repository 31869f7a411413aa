"""Does the gate's label-free consistency check track accuracy? Measured with the answers that ship for benchmarks.

    .venv/bin/python bench/consistency.py --model $TAO_HOME/rounds/<round>/train/merged   # base against a tuned one
    .venv/bin/python bench/consistency.py --tiny                                          # smoke run

For every arithmetic prompt of the bundled log, each model answers greedily (as evaluate does) and draws ``--k``
samples at the default config's temperature and top-p with the same per-prompt seeds; a prompt's consistency is the
share of samples whose final number equals the greedy answer's (``evaluate._consistency``). Labels
(``arithmetic_answers.json``, never used in training) then say how well that proxy separates right greedy answers
from wrong ones (mean consistency of each, and the AUC), and, between the first model and each other one, whether
the consistency difference points the same way as the accuracy difference (both with bootstrap 95% intervals) and
what the gate would decide. Writes ``bench/results/consistency.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

ANSWERS = common.ROOT / "tao_spark" / "data" / "arithmetic_answers.json"


def answers(model: str, rows: list[dict[str, Any]], k: int, temperature: float, top_p: float, max_new_tokens: int,
            seed: int) -> tuple[list[str], list[list[str]]]:
    """Greedy answers and ``k`` samples per prompt."""
    from tao_spark.engines import TransformersGenerator, set_torch_threads
    from tao_spark.generate import prompt_seed

    set_torch_threads(os.cpu_count() or 1)
    gen = TransformersGenerator(model, batch_size=32)
    msgs = [r["messages"] for r in rows]
    seeds = [prompt_seed(seed, r["prompt_id"]) for r in rows]
    t0 = time.perf_counter()
    greedy = [c[0].text for c in gen.generate(msgs, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                               seeds=seeds)]
    samples = [[c.text for c in cs] for cs in gen.generate(msgs, n=k, temperature=temperature, top_p=top_p,
                                                            max_new_tokens=max_new_tokens, seeds=seeds)]
    print(f"consistency: {model}: {len(rows)} prompts x (1 + {k}) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return greedy, samples


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a right answer's consistency > a wrong one's), ties half: how well the proxy ranks right above wrong."""
    if not pos or not neg:
        return float("nan")
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]))


def interval(values: np.ndarray, seed: int = 0) -> list[float]:
    from tao_spark.evaluate import win_rate

    return list(win_rate(values, resamples=2000, seed=seed))


def main() -> None:
    from tao_spark.config import load_config
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.verifiers import answer_key, final_number

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="a model folder to compare with the base (repeat)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model for both arms (smoke run)")
    ap.add_argument("--k", type=int, default=None, help="samples per prompt (default: evaluate.consistency_samples)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="default: generate.temperature")
    ap.add_argument("--base", action="store_true", help="only the base model (the proxy's AUC, no comparison)")
    ap.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results" / "consistency.json")
    a = ap.parse_args()
    cfg = load_config(common.ROOT / "conf" / "local.yaml")
    k = a.k or cfg.evaluate.consistency_samples
    max_new = a.max_new_tokens or (16 if a.tiny else cfg.evaluate.max_new_tokens)
    expected = json.loads(ANSWERS.read_text())
    recs = [json.loads(line) for line in common.PROMPTS.read_text().splitlines() if line.strip()]
    rows = [{"prompt_id": r["id"], "messages": r.get("messages") or [{"role": "user", "content": r["prompt"]}]}
            for r in recs if r["task"] == "arithmetic"][:8 if a.tiny else None]
    models = [common.model_path(a.tiny), *a.model] if not a.tiny else [common.model_path(True)] * 2
    models = models[:1] if a.base else models
    temperature = cfg.generate.temperature if a.temperature is None else a.temperature

    per_model: list[dict[str, Any]] = []
    for model in models:
        greedy, samples = answers(model, rows, k, temperature, cfg.generate.top_p, max_new,
                                  cfg.generate.seed)
        right, agree = [], []
        for r, g, ss in zip(rows, greedy, samples, strict=True):
            text = reward_text(r["messages"])
            want = expected.get(r["prompt_id"])
            got = final_number(g)
            right.append(want is not None and got is not None and math.isclose(got, want, abs_tol=1e-6))
            key = answer_key(text, g)
            agree.append(0.0 if key is None else float(np.mean([answer_key(text, s) == key for s in ss])))
        pos = [c for c, ok in zip(agree, right, strict=True) if ok]
        neg = [c for c, ok in zip(agree, right, strict=True) if not ok]
        per_model.append({"model": model, "accuracy": float(np.mean(right)), "consistency": float(np.mean(agree)),
                          "consistency_if_right": float(np.mean(pos)) if pos else None,
                          "consistency_if_wrong": float(np.mean(neg)) if neg else None, "auc": auc(pos, neg),
                          "_right": right, "_agree": agree})

    base = per_model[0]
    comparisons = []
    for other in per_model[1:]:
        d_acc = np.array(base["_right"], float) - np.array(other["_right"], float)
        d_con = np.array(base["_agree"]) - np.array(other["_agree"])
        drop = interval(d_con)
        comparisons.append({"model": other["model"], "accuracy_drop": interval(d_acc), "consistency_drop": drop,
                            "gate_refuses": drop[1] > cfg.gate.max_consistency_drop})
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": common.machine(),
              "prompts": len(rows), "k": k, "temperature": temperature, "top_p": cfg.generate.top_p,
              "max_new_tokens": max_new, "seed": cfg.generate.seed,
              "models": [{key: v for key, v in m.items() if not key.startswith("_")} for m in per_model],
              "comparisons": comparisons}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for m in result["models"]:
        print(f"{m['model']}: accuracy {m['accuracy']:.3f}, consistency {m['consistency']:.3f} (right "
              f"{m['consistency_if_right']}, wrong {m['consistency_if_wrong']}), AUC {m['auc']:.3f}")
    for c in comparisons:
        print(f"base - {c['model']}: accuracy drop {c['accuracy_drop']}, consistency drop {c['consistency_drop']}, "
              f"gate refuses: {c['gate_refuses']}")


if __name__ == "__main__":
    main()
