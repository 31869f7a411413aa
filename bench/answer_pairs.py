"""Do the pairs on answer-type prompts prefer right answers? Measured with the answers that ship for benchmarks.

    .venv/bin/python bench/answer_pairs.py            # the base model on the bundled log's arithmetic prompts
    .venv/bin/python bench/answer_pairs.py --tiny     # smoke run

For every arithmetic prompt of the bundled log, the default config's candidates (``generate.n`` at
``generate.temperature``, the same per-prompt seeds as a round) are made twice: with ``generate.greedy_answer``
(candidate 0 the greedy answer, the anchor of ``self_consistency``) and without. Each set is scored with
``conf/local.yaml``'s rewards (``score.score_frame``, what the score UDF runs) and paired the way ``select``'s
``best_worst`` pairs (best against worst, ties to the longest rejected, ``select.min_margin``). Labels
(``arithmetic_answers.json``, never used in training) then say how often a pair's chosen and rejected answers are
right, with Wilson 95% intervals, and the share of right answers among greedy answers and samples. Writes
``bench/results/answer_pairs.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from quality import ANSWERS  # noqa: E402
from quality import correct as right  # noqa: E402  # the quality benchmark's test of an answer


def rate(k: int, n: int) -> list[float]:
    """[share, low, high]: the share with its Wilson 95% interval."""
    from tao_spark.serve import wilson

    return [k / n if n else float("nan"), *wilson(k, n)]


def best_worst(values: list[float], tokens: list[int], texts: list[str], min_margin: float) -> tuple[int, int] | None:
    """``select``'s best_worst on one prompt: (chosen, rejected) indices, or None where it makes no pair."""
    ok = [i for i, v in enumerate(values) if v == v]
    if not ok:
        return None
    b = min(ok, key=lambda i: (-values[i], i))
    w = min(ok, key=lambda i: (values[i], -tokens[i], i))
    margin = values[b] - values[w]
    return (b, w) if margin > 0 and margin >= min_margin and texts[b] != texts[w] else None


def main() -> None:
    import pandas as pd

    from tao_spark.config import load_config
    from tao_spark.engines import TransformersGenerator, set_torch_threads
    from tao_spark.generate import Sampling, _candidates, prompt_seed
    from tao_spark.score import COMBINED, score_frame

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny random model on 8 prompts (smoke run)")
    ap.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results" / "answer_pairs.json")
    a = ap.parse_args()
    cfg = load_config(common.ROOT / "conf" / "local.yaml")
    g = cfg.generate
    max_new = 16 if a.tiny else g.max_new_tokens
    expected = json.loads(ANSWERS.read_text())
    recs = [json.loads(line) for line in common.PROMPTS.read_text().splitlines() if line.strip()]
    rows = [{"prompt_id": r["id"], "messages": r.get("messages") or [{"role": "user", "content": r["prompt"]}]}
            for r in recs if r["task"] == "arithmetic"][:8 if a.tiny else None]
    model = common.model_path(a.tiny)
    set_torch_threads(os.cpu_count() or 1)
    gen = TransformersGenerator(model, batch_size=32)
    chats = [r["messages"] for r in rows]
    seeds = [prompt_seed(g.seed, r["prompt_id"]) for r in rows]
    specs = list(cfg.score.rewards)

    arms: dict[str, Any] = {}
    for greedy in (True, False):
        s = Sampling(g.engine, cfg.model.dtype, g.n, g.temperature, g.top_p, max_new, g.seed, greedy)
        t0 = time.perf_counter()
        outs = _candidates(gen, chats, seeds, s)
        seconds = time.perf_counter() - t0
        pairs, chosen, rejected, anchored = 0, 0, 0, 0
        samples_right, samples = 0, 0
        greedy_right = []
        for r, chat, cands in zip(rows, chats, outs, strict=True):
            want = expected.get(r["prompt_id"])
            flags = [greedy and i == 0 for i in range(len(cands))]
            frame = pd.DataFrame({"messages_json": [json.dumps(chat)] * len(cands),
                                  "completion": [c.text for c in cands], "task": "arithmetic", "greedy": flags})
            values = score_frame(frame, specs, cfg.score)[COMBINED].tolist()
            for c, f in zip(cands, flags, strict=True):
                if f:
                    greedy_right.append(right(c.text, want))
                else:
                    samples += 1
                    samples_right += right(c.text, want)
            pick = best_worst(values, [c.tokens for c in cands], [c.text for c in cands], cfg.select.min_margin)
            if pick is not None:
                pairs += 1
                chosen += right(cands[pick[0]].text, want)
                rejected += right(cands[pick[1]].text, want)
                anchored += flags[pick[0]]
        arms["greedy_answer" if greedy else "samples_only"] = {
            "pairs": pairs, "chosen_right": chosen, "rejected_right": rejected,
            "chosen_right_rate": rate(chosen, pairs), "rejected_right_rate": rate(rejected, pairs),
            "chosen_is_greedy": anchored, "samples_right_rate": rate(samples_right, samples),
            "greedy_right_rate": rate(sum(greedy_right), len(greedy_right)) if greedy_right else None,
            "seconds": round(seconds, 1)}
    result = {"date": common.now(), "machine": common.machine(), "model": model, "prompts": len(rows),
              "sampling": dataclasses.asdict(g) | {"max_new_tokens": max_new}, "min_margin": cfg.select.min_margin,
              "rewards": [s.name for s in specs], "arms": arms}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for name, m in arms.items():
        print(f"{name}: {m['pairs']} pairs on {len(rows)} prompts, chosen right {m['chosen_right']}, rejected right "
              f"{m['rejected_right']}; samples right {m['samples_right_rate'][0]:.3f}"
              + (f", greedy right {m['greedy_right_rate'][0]:.3f}" if m["greedy_right_rate"] else ""))


if __name__ == "__main__":
    main()
