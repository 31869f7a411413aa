"""Quality benchmark: K rounds of the loop on the bundled prompt log as it grows, per ``loop.start_from`` and for
the supervised baseline on reference answers, with the base model's best-of-N and majority@N on the same held-out
prompts as the label-free ceiling.

    make quality                        # 3 rounds from the base (the default config), every training prompt, n=4
    .venv/bin/python bench/quality.py --arms champion,base,sft_labels   # more arms: about 55 minutes each
    .venv/bin/python bench/quality.py --rounds 2 --arms champion --set generate.max_prompts=80 generate.n=4

The log arrives in K slices (a stable hash of each prompt's id), one before each round, so round k trains on every
prompt of slices 1..k (``loop.mix=all``) and evaluates on every held-out prompt so far. Every round re-checks the
whole of round 1's held-out set (``loop.forgetting_prompts`` is raised to cover it), and the table's figures are
on that fixed set, so rounds compare like with like. Each round runs as ``tao ingest`` + ``tao round`` in its own
process, exactly as a user runs them. Writes ``quality.json``, ``quality.md`` and ``quality.png`` to ``--out``
and logs them to the first arm's MLflow store (experiment ``tao-quality``).

Figures per model on round 1's held-out prompts: strict compliance (every stated constraint met) and
instruction-level compliance per constraint kind, arithmetic accuracy against the answers that ship for
benchmarks only (training never sees them), the support prompts' mean reward, answer length, the share cut at the
token cap, distinct-1/2 and the mean per-token entropy of the model on its own answers; per round the win rate
against that round's baseline with its 95% interval.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

from tao_spark.rewards import reward_text  # noqa: E402
from tao_spark.rounds import read_evaluation  # noqa: E402

ANSWERS = common.ROOT / "tao_spark" / "data" / "arithmetic_answers.json"


def bucket(client_id: str, k: int) -> int:
    """The slice (0..k-1) a bundled prompt arrives in: stable, and independent of the held-out split's hash."""
    return int(hashlib.sha256(f"quality-slice:{client_id}".encode()).hexdigest()[:8], 16) % k


def tao(home: Path, *args: str, overrides: list[str], config: str | None) -> None:
    cmd = [sys.executable, "-m", "tao_spark.cli", *(["--config", config] if config else []), *args, f"home={home}",
           *overrides]
    print(f"quality: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def delta(home: Path, table: str) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    return DeltaTable(str(home / "lakehouse" / table)).to_pyarrow_table().to_pylist()


def same_number(got: float | None, expected: float | None) -> bool:
    return expected is not None and got is not None and math.isclose(got, expected, rel_tol=0, abs_tol=1e-6)


def correct(answer: str, expected: float | None) -> bool:
    from tao_spark.rewards.verifiers import final_number

    return same_number(final_number(answer), expected)


def answer_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one model's answers; ``rows`` carry task, prompt, answer, tokens, finish, reward, expected."""
    from tao_spark.evaluate import distinct_n
    from tao_spark.rewards.verifiers import check_constraint, parse_constraints
    from tao_spark.serve import wilson

    out: dict[str, Any] = {"prompts": len(rows)}
    kinds: dict[str, list[bool]] = collections.defaultdict(list)
    strict = []
    for r in rows:
        constraints = parse_constraints(r["prompt"])
        if not constraints:
            continue
        met = [check_constraint(c, r["answer"]) for c in constraints]
        strict.append(all(met))
        for c, ok in zip(constraints, met, strict=True):
            kinds[c.kind].append(ok)
    out["compliance"] = sum(strict) / len(strict) if strict else float("nan")
    out["compliance_n"] = len(strict)
    out["compliance_low"], out["compliance_high"] = wilson(sum(strict), len(strict))
    out["compliance_by_kind"] = {k: sum(v) / len(v) for k, v in sorted(kinds.items())}
    arith = [r for r in rows if r["task"] == "arithmetic"]
    out["arithmetic_accuracy"] = (sum(correct(r["answer"], r["expected"]) for r in arith) / len(arith)
                                  if arith else float("nan"))
    support = [r["reward"] for r in rows if r["task"] == "support" and r["reward"] is not None]
    out["support_reward"] = sum(support) / len(support) if support else float("nan")
    out["reward"] = sum(r["reward"] for r in rows if r["reward"] is not None) / max(1, len(rows))
    out["tokens"] = sum(r["tokens"] for r in rows) / max(1, len(rows))
    out["capped"] = sum(r["finish"] == "length" for r in rows) / max(1, len(rows))
    out["distinct1"] = distinct_n([r["answer"] for r in rows], 1)
    out["distinct2"] = distinct_n([r["answer"] for r in rows], 2)
    return out


def entropy(model_path: str, rows: list[dict[str, Any]], max_tokens: int) -> float:
    """Mean per-token entropy (nats) of the model's next-token distribution along its own answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tao_spark.engines import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for r in rows:
            prompt = chat_prompt_ids(tok, r["messages"])
            answer = tok(r["answer"], add_special_tokens=False)["input_ids"][:max_tokens]
            if not answer:
                continue
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            total += float(-(logp.exp() * logp).sum(-1).sum())
            count += len(answer)
    return total / count if count else float("nan")


def ceiling(model_path: str, rows: list[dict[str, Any]], n: int, temperature: float, top_p: float,
            max_new_tokens: int, batch_size: int) -> dict[str, float]:
    """The base model's best-of-N (oracle by the verifiers) and majority@N on ``rows``."""
    from tao_spark.engines import TransformersGenerator, set_torch_threads
    from tao_spark.generate import prompt_seed
    from tao_spark.rewards.verifiers import final_number, instruction_following

    set_torch_threads(os.cpu_count() or 1)
    gen = TransformersGenerator(model_path, batch_size=batch_size)
    t0 = time.perf_counter()
    outs = gen.generate([r["messages"] for r in rows], n=n, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, seeds=[prompt_seed(7, r["prompt_id"]) for r in rows])
    print(f"quality: base best-of-{n} sampled in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    best_c, any_c, best_a, major_a = [], [], [], []
    for r, samples in zip(rows, outs, strict=True):
        texts = [c.text for c in samples]
        strict = instruction_following([r["prompt"]] * n, texts, strict=True)
        if not math.isnan(strict[0]):
            best_c.append(max(strict) >= 1.0)
            any_c.append(sum(s >= 1.0 for s in strict) / n)
        if r["task"] == "arithmetic":
            best_a.append(any(correct(t, r["expected"]) for t in texts))
            votes = collections.Counter(v for v in (final_number(t) for t in texts) if v is not None)
            top = votes.most_common(1)[0][0] if votes else None
            major_a.append(same_number(top, r["expected"]))

    def mean(xs: list[Any]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {f"best_of_{n}_compliance": mean(best_c), f"sampled_compliance_n{n}": mean(any_c),
            f"best_of_{n}_arithmetic": mean(best_a), f"majority_at_{n}_arithmetic": mean(major_a)}


def arm_overrides(arm: str) -> list[str]:
    """champion / base: ``loop.start_from``; sft_labels: the supervised baseline, the base tuned on the bundled
    reference answers of the same training prompts (its sampled candidates are unused: two per prompt suffice)."""
    if arm == "sft_labels":
        from tao_spark.data import SAMPLE_REFERENCES

        return ["loop.start_from=base", "train.method=sft_labels", f"train.references={SAMPLE_REFERENCES}",
                "generate.n=2"]
    return [f"loop.start_from={arm}"]


def run_arm(arm: str, out: Path, k: int, overrides: list[str], prompts: list[dict[str, Any]],
            config: str | None) -> Path:
    home = out / arm
    home.mkdir(parents=True, exist_ok=True)
    done = {r["round_id"] for r in delta(home, "rounds") if r["status"] == "done"} \
        if (home / "lakehouse" / "rounds").exists() else set()
    for i in range(len(done), k):
        part = home / f"slice-{i + 1}.jsonl"
        part.write_text("".join(json.dumps(p) + "\n" for p in prompts if bucket(p["id"], k) == i))
        tao(home, "ingest", str(part), "--source", "quality", overrides=overrides, config=config)
        tao(home, "round", overrides=[*overrides, *arm_overrides(arm)], config=config)
    return home


def collect(arm: str, home: Path, cfg_overrides: list[str], fixed: set[str] | None,
            config: str | None) -> tuple[list[dict[str, Any]], set[str]]:
    """Per round (round 0 = the base model) the figures on round 1's held-out prompts."""
    from tao_spark.config import load_config
    from tao_spark.rounds import policy

    cfg = load_config(config, [f"home={home}", *cfg_overrides])
    answers = json.loads(ANSWERS.read_text())
    prompts = {p["prompt_id"]: p for p in delta(home, "prompts")}
    rounds = sorted(delta(home, "rounds"), key=lambda r: r["started_at"])
    evals = delta(home, "evaluations")
    first = rounds[0]["round_id"]
    fixed = fixed or {e["prompt_id"] for e in evals if e["round_id"] == first}

    def rows_of(round_id: str, arm_col: str) -> list[dict[str, Any]]:
        rows = []
        for e in evals:
            if e["round_id"] != round_id or e["prompt_id"] not in fixed:
                continue
            p = prompts[e["prompt_id"]]
            rows.append({"prompt_id": e["prompt_id"], "task": e["task"], "prompt": reward_text(p["messages"]),
                         "messages": [dict(m) for m in p["messages"]], "answer": e[arm_col],
                         "tokens": e[f"{arm_col}_tokens"], "reward": e[f"{arm_col}_reward"],
                         "finish": "length" if e[f"{arm_col}_tokens"] >= cfg.evaluate.max_new_tokens else "stop",
                         "expected": answers.get(p["client_id"] or "")})
        return rows

    # The base's reward on every held-out prompt a round compared it on (its greedy answer does not change), so
    # each round can be compared with the base, not only with its own baseline, on the prompts where it was.
    base_ids = {r["round_id"] for r in rounds if r["baseline_model"] == rounds[0]["baseline_model"]}
    base_reward = {e["prompt_id"]: e["champion_reward"] for e in evals if e["round_id"] in base_ids}

    table = []
    base_rows = rows_of(first, "champion")
    base = {"arm": arm, "round": 0, "model": cfg.model.path, **answer_figures(base_rows),
            "entropy": entropy(policy(cfg, rounds[0]["baseline_model"])[1], base_rows, cfg.evaluate.max_new_tokens)}
    table.append(base)
    for i, r in enumerate(rounds, 1):
        m = json.loads(r["metrics"] or "{}")
        ev = read_evaluation(m, r["round_id"])
        rows = rows_of(r["round_id"], "challenger")
        fig = answer_figures(rows)
        fig["entropy"] = entropy(policy(cfg, r["tuned_model"])[1], rows, cfg.evaluate.max_new_tokens)
        table.append({"arm": arm, "round": i, "round_id": r["round_id"], "model": r["tuned_model"], **fig,
                      **({"win_rate": ev.overall.win_rate, "win_rate_low": ev.overall.win_rate_low,
                          "win_rate_high": ev.overall.win_rate_high, "heldout_prompts": ev.overall.prompts}
                         if ev else {}),
                      **vs_base([e for e in evals if e["round_id"] == r["round_id"]], base_reward),
                      "pairs": r["pairs"], "n_prompts": r["n_prompts"], "n_train": r["n_train"],
                      "promoted": r["promoted"],
                      "gate_reason": r["gate_reason"], "baseline": r["baseline_model"],
                      "seconds": sum(v for k_, v in m.items() if k_.startswith("time_") and k_.endswith("_s"))})
    return table, fixed


def vs_base(evals: list[dict[str, Any]], base_reward: dict[str, float]) -> dict[str, Any]:
    """A round's win rate against the base model (ties half, bootstrap 95% interval, seed 0) on its held-out prompts
    whose base answer some round scored."""
    import numpy as np

    from tao_spark.evaluate import win_rate

    pairs = [(e["challenger_reward"], base_reward[e["prompt_id"]]) for e in evals
             if e["prompt_id"] in base_reward and e["challenger_reward"] is not None
             and base_reward[e["prompt_id"]] is not None]
    if not pairs:
        return {}
    rate, low, high = win_rate(np.array([1.0 if c > b else 0.5 if c == b else 0.0 for c, b in pairs]))
    return {"win_vs_base": rate, "win_vs_base_low": low, "win_vs_base_high": high, "win_vs_base_prompts": len(pairs)}


def markdown(result: dict[str, Any]) -> str:
    cols = [("arm", "{}"), ("round", "{}"), ("compliance", "{:.3f}"), ("compliance_low", "{:.3f}"),
            ("compliance_high", "{:.3f}"), ("arithmetic_accuracy", "{:.3f}"),
            ("support_reward", "{:.3f}"), ("reward", "{:.3f}"), ("tokens", "{:.1f}"), ("capped", "{:.2f}"),
            ("distinct2", "{:.3f}"), ("entropy", "{:.2f}")]
    head = [c for c, _ in cols] + ["win rate [95% CI]", "vs base [95% CI] (prompts)", "pairs", "promoted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        cells = [f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols]
        wr = (f"{r['win_rate']:.3f} [{r['win_rate_low']:.3f}, {r['win_rate_high']:.3f}]"
              if r.get("win_rate") is not None else "-")
        vb = (f"{r['win_vs_base']:.3f} [{r['win_vs_base_low']:.3f}, {r['win_vs_base_high']:.3f}] "
              f"({r['win_vs_base_prompts']})" if r.get("win_vs_base") is not None else "-")
        cells += [wr, vb, str(r.get("pairs", "-")), {True: "yes", False: "no"}.get(r.get("promoted"), "-")]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({k for r in result["table"] for k in r["compliance_by_kind"]})
    lines += ["", "Instruction-level compliance per constraint kind:", "",
              "| arm | round | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
    for r in result["table"]:
        lines.append(f"| {r['arm']} | {r['round']} | " + " | ".join(
            f"{r['compliance_by_kind'][k]:.2f}" if k in r["compliance_by_kind"] else "-" for k in kinds) + " |")
    lines += ["", "Base model, sampled, on the same prompts (the label-free ceiling a greedy answer can absorb):", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in result["ceiling"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    panels = [("compliance", "strict compliance (instruct)", "best_of_"), ("arithmetic_accuracy",
              "arithmetic accuracy", "_arithmetic"), ("support_reward", "support reward", None),
              ("win_rate", "win rate vs the round's baseline", None)]
    for ax, (key, title, ref) in zip(axes, panels, strict=True):
        for arm in sorted({r["arm"] for r in result["table"]}):
            rows = [r for r in result["table"] if r["arm"] == arm and r.get(key) is not None]
            xs, ys = [r["round"] for r in rows], [r[key] for r in rows]
            if key == "win_rate":
                err = [[r[key] - r["win_rate_low"] for r in rows], [r["win_rate_high"] - r[key] for r in rows]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=arm)
                ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
            else:
                ax.plot(xs, ys, marker="o", label=arm)
        refs = [(name, value) for name, value in result["ceiling"].items()
                if ref and ((ref.startswith("best") and name.startswith(ref) and name.endswith("compliance"))
                            or (ref.startswith("_") and name.endswith(ref)))]
        for i, (name, value) in enumerate(refs):
            ax.axhline(value, linestyle=":", linewidth=1, color="black")
            ax.annotate(f"base {name.removesuffix(ref if ref.startswith('_') else '_compliance')}", (0, value),
                        xytext=(0, 3 + 9 * i), textcoords="offset points", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("round (0 = base model)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="K: the log arrives in K slices, one round after each")
    ap.add_argument("--arms", default="base",
                    help="comma-separated: champion, base (loop.start_from) and sft_labels (the supervised baseline)")
    ap.add_argument("--best-of", type=int, default=4, help="N of the base model's best-of-N and majority@N")
    ap.add_argument("--out", default=str(common.ROOT / ".quality"), help="homes of the arms and the results")
    ap.add_argument("--config", help="a tao YAML config (default: conf/local.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every round (key=value)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every training prompt so far, 4 samples each (three rounds in under an hour on 2 cores; QUALITY.md) unless
    # --set says otherwise; every round re-checks
    # all of round 1's held-out prompts.
    overrides = ["generate.max_prompts=0", "generate.n=4", "evaluate.max_prompts=0", "loop.forgetting_prompts=100000",
                 *a.set]
    out = Path(a.out)
    prompts = [json.loads(line) for line in common.PROMPTS.read_text().splitlines() if line.strip()]
    t0, machine, date = time.perf_counter(), common.machine(), common.now()
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    table: list[dict[str, Any]] = []
    fixed: set[str] | None = None
    for arm in arms:
        home = run_arm(arm, out, a.rounds, overrides, prompts, a.config)
        rows, fixed = collect(arm, home, overrides, fixed, a.config)
        table += rows
    from tao_spark.config import load_config
    from tao_spark.rounds import policy

    home = out / arms[0]
    cfg = load_config(a.config, [f"home={home}", *overrides])
    evals = {e["prompt_id"]: e for e in delta(home, "evaluations")}
    answers = json.loads(ANSWERS.read_text())
    rows = [{"prompt_id": p["prompt_id"], "task": p["task"], "prompt": reward_text(p["messages"]),
             "messages": [dict(m) for m in p["messages"]], "expected": answers.get(p["client_id"] or "")}
            for p in delta(home, "prompts") if p["prompt_id"] in (fixed or set()) and p["prompt_id"] in evals]
    ceil = ceiling(policy(cfg, cfg.model.path)[1], sorted(rows, key=lambda r: r["prompt_id"]), a.best_of,
                   cfg.generate.temperature, cfg.generate.top_p, cfg.evaluate.max_new_tokens, cfg.generate.batch_size)
    result = {"date": date, "machine": machine, "command": " ".join(sys.argv), "overrides": overrides,
              "rounds": a.rounds, "arms": arms, "fixed_heldout_prompts": len(rows), "seeds": {
                  "generate.seed": cfg.generate.seed, "evaluate.seed": cfg.evaluate.seed, "ceiling": 7},
              "table": table, "ceiling": ceil, "seconds": time.perf_counter() - t0}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "quality.md").write_text(markdown(result))
    fig = plot(result, out / "quality.png")
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_experiment("tao-quality")
    with mlflow.start_run(run_name=f"quality {date}"):
        mlflow.log_params({"rounds": a.rounds, "arms": ",".join(arms), "best_of": a.best_of,
                           "overrides": " ".join(overrides)[:6000]})
        mlflow.log_figure(fig, "quality.png")
        mlflow.log_text(markdown(result), "quality.md")
        mlflow.log_dict(result, "quality.json")
    print(markdown(result))
    print(f"wrote {out}/quality.{{json,md,png}} in {result['seconds']:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
