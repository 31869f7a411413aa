"""Train: tune the policy on preference pairs (DPO) or on the best candidate of each prompt (SFT) with LoRA.

    train.run(tables, rnd, cfg)      # the stage: the round's pairs, output under the round's folder

    from tao_spark.train import train_on_pairs
    result = train_on_pairs(pairs, "/models/smollm2-135m-instruct", "/tmp/round-1/train", cfg.train, spark=spark)
    result.merged_dir, result.metrics["rewards/accuracies"]

The driver stays light: it checks the pairs, writes them to ``<out_dir>/pairs.jsonl`` and launches
``train_worker`` through Spark's ``TorchDistributor`` (torchrun on the driver's machine, or one barrier task per
process on the executors with ``train.local_mode=false``; ``DeepspeedTorchDistributor``
with a ZeRO config from ``conf/deepspeed/`` when ``train.backend=deepspeed``). The worker runs TRL's
``DPOTrainer`` or ``SFTTrainer`` with a PEFT LoRA adapter; rank 0 writes ``adapter/``, ``merged/`` and
``metrics.json`` to ``out_dir``, and the driver reads them back, because the distributor's return value is
not a contract we rely on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tao_spark.config import TrainConfig

log = logging.getLogger("tao.train")

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import ModuleType

    import pandas as pd
    from pyspark.sql import SparkSession

    from tao_spark.config import Config
    from tao_spark.rounds import Round, StageResult
    from tao_spark.tables import Tables

DEEPSPEED_CONF_DIR = Path(__file__).parent / "conf" / "deepspeed"  # packaged with the wheel
PAIR_COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "sft": ("prompt", "chosen")}

# CPU defaults, checked on SmolLM2-135M-Instruct (2 cores); any key can be overridden through `train.trl`.
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,  # 8 pairs = 16 sequences (+ 16 reference passes) per step: ~40 s on 2 cores
    "max_length": 384,  # prompt + answer; generation caps answers at ~96 tokens, so this rarely truncates
    "lr_scheduler_type": "constant",  # a round is a few dozen steps: warmup/decay would idle a third of them
    "logging_steps": 1,  # the loss history is the training curve we report
    "save_strategy": "no",  # the worker saves the adapter itself, once, at the end
    "report_to": [],  # the caller logs to MLflow; a second logger in the worker would open its own run
    "gradient_checkpointing": False,  # 135M fits easily; checkpointing costs ~20% speed for memory we don't need
    "ddp_find_unused_parameters": False,  # every LoRA weight is used; True costs an extra autograd-graph walk
    "dataloader_num_workers": 0,  # tokenized rows are in memory; worker processes only add fork cost
}
_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {
        # TRL's 1e-6 is for full fine-tuning; LoRA needs ~100x. At 1e-4 one epoch of 64 clear pairs takes the
        # loss from 0.69 to 0.003 (reward accuracy 1.0) on SmolLM2-135M: enough to move, no divergence.
        "learning_rate": 1e-4,
        "beta": 0.1,
        # The reference (the base, adapter off) never changes: its log-probabilities once per dataset instead of
        # a forward pass per step and epoch. On the demo's pairs (2 epochs) 1.39x faster, the same losses.
        "precompute_ref_log_probs": True,
    },
    "sft": {
        "learning_rate": 1e-4,
        "completion_only_loss": True,  # learn the answer, not the prompt (the prompt is the user's text)
    },
}


@dataclass
class TrainResult:
    adapter_dir: str = field(metadata={"help": "PEFT adapter (adapter_model.safetensors + adapter_config.json)"})
    merged_dir: str | None = field(metadata={"help": "base + adapter merged: same inference cost as the base"})
    metrics: dict[str, float] = field(metadata={"help": "train_loss_first/last, steps, samples, runtime_s, ..."})
    loss_history: list[float] = field(metadata={"help": "training loss of every optimizer step"})
    curves: dict[str, list[float]] = field(default_factory=dict, metadata={
        "help": "TRL's per-step metrics (rewards/margins, rewards/accuracies, ...), one value per logged step"})


TRL_CONFIGS = {"dpo": "DPOConfig", "sft": "SFTConfig", "sft_labels": "SFTConfig", "reward": "RewardConfig"}


def trl_options(cls_name: str) -> set[str]:
    """The option names of TRL's ``cls_name`` (``DPOConfig``, ``SFTConfig``, ``RewardConfig``), cached per TRL
    version under ``~/.cache/tao_spark``: importing TRL to read them costs seconds, reading the cache nothing."""
    from importlib.metadata import version

    cache = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tao_spark"
             / f"trl-{version('trl')}-options.json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if cls_name not in known:
        import trl

        known = {name: sorted(f.name for f in dataclasses.fields(getattr(trl, name))) for name in TRL_CONFIGS.values()}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        except OSError:
            pass  # a read-only home: read TRL again next time
    return set(known[cls_name])


def check_trl(options: dict[str, Any], kind: str, key: str) -> None:
    """Refuse a ``train.trl`` / ``reward_model.trl`` option TRL's config class of ``kind`` does not have, naming the
    dotted key and the nearest real option: before a round generates, not minutes later in a torchrun worker."""
    import difflib

    from tao_spark.config import UserError

    cls_name = TRL_CONFIGS[kind]
    known = trl_options(cls_name)
    for name in sorted(set(options) - known):
        near = difflib.get_close_matches(name, sorted(known), n=1)
        raise UserError(f"{key}.{name}: not an option of TRL's {cls_name}"
                        + (f" (did you mean {key}.{near[0]}?)" if near else ""))


def training_args(cfg: TrainConfig, out_dir: str, seed: int = 0, deepspeed_config: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``DPOConfig`` / ``SFTConfig``: CPU-sane defaults, then ``cfg.trl`` on top."""
    args: dict[str, Any] = {**_COMMON_DEFAULTS, **_METHOD_DEFAULTS[cfg.method]}
    args.update(
        output_dir=str(Path(out_dir) / "trainer"),
        seed=seed,
        use_cpu=not cfg.use_gpu,
    )
    if cfg.use_gpu:
        args["bf16"] = True  # on CPU the worker decides (``cpu_bf16``): it knows the CPU it trains on
    if deepspeed_config is not None:
        args["deepspeed"] = deepspeed_config
    if cfg.checkpoint_steps:
        # The trainer's own checkpoints (DeepSpeed's format on that backend): adapter, optimizer, scheduler, RNG
        # states and the step, from which it resumes at the same batch. One kept: a resume needs only the last.
        args.update(save_strategy="steps", save_steps=cfg.checkpoint_steps, save_total_limit=1)
    args.update(cfg.trl)
    return args


def distributor_for(cfg: TrainConfig, deepspeed_config: str | None) -> Any:
    """The Spark distributor that runs ``train_worker``: torchrun on the driver's machine (``cfg.local_mode``),
    else one barrier Spark task per process on the executors.

    Needs an active SparkSession (classic or Spark Connect): the distributor reads its conf from it, and an unset
    ``local_mode`` is decided by it (``runs_here``).
    """
    if cfg.local_mode is None:
        from pyspark.sql import SparkSession

        cfg = dataclasses.replace(cfg, local_mode=runs_here(cfg, SparkSession.active()))
    if cfg.backend == "deepspeed":
        from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor

        return DeepspeedTorchDistributor(numGpus=cfg.num_processes, nnodes=1, localMode=cfg.local_mode, useGpu=True,
                                         deepspeedConfig=deepspeed_config)
    from pyspark.ml.torch.distributor import TorchDistributor

    return TorchDistributor(num_processes=cfg.num_processes, local_mode=cfg.local_mode, use_gpu=cfg.use_gpu)


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The train stage: the round's policy tuned on its preference pairs; output under the round's folder."""
    import pandas as pd
    from pyspark.sql import functions as F

    from tao_spark.config import UserError
    from tao_spark.rounds import StageResult, Trained, folder, policy, split

    train_prompts = split(tables, rnd, cfg)[0]
    train_cfg = cfg.train
    if cfg.train.method == "sft_labels":
        assert cfg.train.references is not None  # TrainConfig checks it
        pairs = labelled(train_prompts.select("prompt_id", "client_id", F.to_json("messages").alias("messages_json"))
                         .orderBy("prompt_id").toPandas(), cfg.train.references)
        if pairs.empty:
            raise UserError(f"round {rnd.round_id}: no training prompt has a reference in {cfg.train.references}")
        train_cfg = dataclasses.replace(cfg.train, method="sft")
    else:
        prefs = (tables.read("preferences").where(F.col("round_id") == rnd.round_id)
                 .join(train_prompts.select("prompt_id", F.to_json("messages").alias("messages_json")), "prompt_id")
                 .select("prompt_id", "chosen_idx", "rejected_idx", "messages_json", "chosen", "rejected", "margin")
                 .orderBy("prompt_id", "chosen_idx", "rejected_idx").toPandas())
        if prefs.empty:
            raise UserError(f"round {rnd.round_id}: no preference pairs to train on "
                            f"(lower select.min_margin or raise generate.n)")
        pairs = pd.DataFrame({"prompt": [json.loads(x) for x in prefs.messages_json], "chosen": prefs.chosen,
                              "rejected": prefs.rejected})
    _, base_path, _ = policy(cfg, rnd.base_model)
    result = train_on_pairs(pairs, base_path, str(folder(cfg, rnd) / "train"), train_cfg, seed=cfg.generate.seed,
                            spark=tables.spark)
    return StageResult(fields={"tuned_model": result.merged_dir or result.adapter_dir},
                       record=Trained.of(result.metrics, result.loss_history, result.curves))


def labelled(prompts: pd.DataFrame, references: str) -> pd.DataFrame:
    """(prompt, chosen) rows for the training prompts that ``references`` answers, matched on ``prompt_id`` or on
    the log line's own ``id`` (``client_id``); the supervised baseline's data."""
    import pandas as pd

    by_key: dict[str, str] = {}
    with open(references, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            key, text = row.get("prompt_id") or row.get("id"), row.get("reference")
            if not isinstance(key, str) or not isinstance(text, str) or not text.strip():
                raise ValueError(f"{references}:{n}: needs a string id (or prompt_id) and a non-empty reference")
            by_key[key] = text
    keep = [(json.loads(m), by_key.get(pid) or by_key.get(cid or ""))
            for pid, cid, m in zip(prompts.prompt_id, prompts.client_id, prompts.messages_json, strict=True)]
    keep = [(m, r) for m, r in keep if r]
    log.info(f"tao: train: sft_labels on {len(keep)} of {len(prompts)} training prompts with a reference")
    return pd.DataFrame({"prompt": [m for m, _ in keep], "chosen": [r for _, r in keep]})


def worker_spec(records: list[dict[str, Any]], model_path: str, out_dir: str, cfg: TrainConfig,
                seed: int = 0) -> dict[str, Any]:
    """Write ``records`` (from ``_records``) to ``out_dir/pairs.jsonl`` and return what ``train_worker`` takes."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a stale file from an earlier run must not pass as this one's
    pairs_path = out / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    deepspeed_config = None
    if cfg.backend == "deepspeed":
        deepspeed_config = str(cfg.trl.get("deepspeed", DEEPSPEED_CONF_DIR / "zero2.json"))
    return {
        "method": cfg.method,
        "model_path": str(model_path),
        "pairs_path": str(pairs_path),
        "out_dir": str(out),
        "lora": cfg.lora_args(),
        "merge": cfg.merge,
        "use_gpu": cfg.use_gpu,
        "args": training_args(cfg, str(out), seed, deepspeed_config),
    }


def runs_here(cfg: TrainConfig, spark: SparkSession) -> bool:
    """Whether training runs on this machine (TorchDistributor's local mode): ``train.local_mode`` when set, else
    only when the session has no executors of its own to use: Sail, or JVM Spark with a ``local[*]`` master. Over
    Spark Connect the server's master decides, so a round submitted to a cluster trains on its workers."""
    if cfg.local_mode is not None:
        return cfg.local_mode
    from tao_spark.tables import is_jvm_spark

    if not is_jvm_spark(spark):
        return True
    return str(spark.conf.get("spark.master", "local")).startswith("local")


def launch(fn: Callable[[dict[str, Any]], None], spec: dict[str, Any], cfg: TrainConfig, *,
           deepspeed_config: str | None = None, by_value: Sequence[ModuleType] = (), what: str = "train",
           spark: SparkSession | None = None) -> float:
    """Run ``fn(spec)`` in ``cfg.num_processes`` torchrun processes through Spark's distributor; the one launcher of
    every training job (the policy, the reward model). Returns its wall seconds.

    Where it runs follows the session (``runs_here``) unless ``cfg.local_mode`` says, and the round's output says
    where. ``fn``'s module and ``by_value`` travel to the workers by value, so they need not have tao_spark
    installed (a source checkout, or an executor image without our wheel).
    """
    from pyspark import cloudpickle
    from pyspark.sql import SparkSession

    try:
        active = SparkSession.active()
    except Exception as e:
        raise RuntimeError("TorchDistributor needs an active SparkSession: start one first "
                           "(tao_spark.session.get_spark) or pass spark=") from e
    if spark is not None and spark is not active:
        raise ValueError("spark= is not the active SparkSession, and TorchDistributor only uses the active one")
    cfg = dataclasses.replace(cfg, local_mode=runs_here(cfg, active))
    where = "this machine" if cfg.local_mode else f"the executors of {active.conf.get('spark.master', '?')}"
    log.info(f"tao: {what}: {cfg.num_processes} process(es) on {where}")
    modules = list(dict.fromkeys([sys.modules[fn.__module__], *by_value]))
    for module in modules:
        cloudpickle.register_pickle_by_value(module)
    t0 = time.perf_counter()
    try:
        distributor_for(cfg, deepspeed_config).run(fn, spec)
    finally:
        for module in modules:
            cloudpickle.unregister_pickle_by_value(module)
    return time.perf_counter() - t0


def train_on_pairs(pairs: pd.DataFrame, model_path: str, out_dir: str, cfg: TrainConfig, *, seed: int = 0,
                   spark: SparkSession | None = None) -> TrainResult:
    """Fine-tune ``model_path`` on ``pairs`` with a LoRA adapter, through Spark's TorchDistributor.

    Parameters
    ----------
    pairs : pandas.DataFrame
        ``prompt`` (a chat: list of ``{"role", "content"}``) and ``chosen`` (str), plus ``rejected`` (str) for DPO.
        Other columns are ignored.
    model_path : str
        Local Hugging Face model folder (safetensors) with a chat template.
    out_dir : str
        Receives ``pairs.jsonl``, ``adapter/``, ``merged/`` (if ``cfg.merge``) and ``metrics.json``.
    cfg : TrainConfig
        ``train`` slice of the config; ``cfg.trl`` overrides any trainer argument.
    seed : int
        Seed of the LoRA init and data order.
    spark : SparkSession, optional
        The session the distributor reads its conf from. TorchDistributor always takes
        ``SparkSession.active()``, so this must be that session; None means "whichever is active".

    Examples
    --------
    >>> result = train_on_pairs(pairs, model_dir, "/tmp/tao/train", TrainConfig(method="dpo"))  # doctest: +SKIP
    >>> result.metrics["train_loss_last"] < result.metrics["train_loss_first"]  # doctest: +SKIP
    True
    """
    records = _records(pairs, cfg.method)
    spec = worker_spec(records, model_path, out_dir, cfg, seed)
    out, deepspeed_config = Path(spec["out_dir"]), spec["args"].get("deepspeed")
    _drop_stale_checkpoints(out, spec)
    wall_s = launch(train_worker, spec, cfg, deepspeed_config=deepspeed_config, spark=spark)

    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"training finished without writing {metrics_path}; see the worker log above")
    report = json.loads(metrics_path.read_text())
    metrics = {**report["metrics"], "wall_s": wall_s}
    return TrainResult(adapter_dir=str(out / "adapter"), merged_dir=str(out / "merged") if cfg.merge else None,
                       metrics=metrics, loss_history=report["loss_history"], curves=report.get("curves", {}))


def _drop_stale_checkpoints(out: Path, spec: dict[str, Any]) -> None:
    """Checkpoints resume only the training they came from: the same pairs, model and arguments."""
    import hashlib
    import shutil

    digest = hashlib.sha256(Path(spec["pairs_path"]).read_bytes())
    digest.update(json.dumps({k: v for k, v in spec.items() if k != "pairs_path"}, sort_keys=True,
                             default=str).encode())
    trainer_dir, stamp = Path(spec["args"]["output_dir"]), out / "checkpoint.sha256"
    if stamp.exists() and stamp.read_text() != digest.hexdigest() and trainer_dir.exists():
        log.warning(f"tao: train: pairs or arguments changed; dropping the checkpoints in {trainer_dir}")
        shutil.rmtree(trainer_dir)
    stamp.write_text(digest.hexdigest())


def _records(pairs: pd.DataFrame, method: str) -> list[dict[str, Any]]:
    """Check the pairs and turn them into TRL's conversational rows (the chat template formats them)."""
    if len(pairs) == 0:
        raise ValueError("no pairs to train on: select kept no prompt (lower select.min_margin or add prompts)")
    needed = PAIR_COLUMNS[method]
    missing = [c for c in needed if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs for {method} need columns {list(needed)}; missing {missing}")
    records = []
    for i, row in enumerate(pairs[list(needed)].itertuples(index=False)):
        prompt = _chat(row.prompt, i)
        answers = {c: getattr(row, c) for c in needed[1:]}
        for c, text in answers.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"pairs row {i}: {c} must be a non-empty string, got {text!r}")
        if method == "dpo":
            records.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answers["chosen"]}],
                            "rejected": [{"role": "assistant", "content": answers["rejected"]}]})
        else:
            records.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answers["chosen"]}]})
    return records


def _chat(prompt: Any, row: int) -> list[dict[str, str]]:
    # Spark's toPandas gives array<struct> as a numpy array of dicts or Rows; both index by key.
    try:
        chat = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"pairs row {row}: prompt must be a chat, a list of {{role, content}}; got {prompt!r}") from e
    if not chat:
        raise ValueError(f"pairs row {row}: prompt is an empty chat")
    return chat


def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX).

    There, bf16 autocast trains the demo's DPO round 1.5x faster (315 s -> 206 s) with the same learning effect;
    without it bf16 is emulated and slower than float32.
    """
    import torch

    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def train_worker(spec: dict[str, Any]) -> None:
    """One torchrun process: train the LoRA adapter; rank 0 saves adapter, merged model and metrics to out_dir."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    if not spec["use_gpu"]:
        # torchrun sets OMP_NUM_THREADS=1 with several processes; give each process its share of the cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    out = Path(spec["out_dir"])
    print(f"tao: train worker rank {os.environ.get('RANK', '0')}/{os.environ.get('WORLD_SIZE', '1')} in pid "
          f"{os.getpid()} on {os.uname().nodename}", file=sys.stderr, flush=True)
    with open(spec["pairs_path"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:  # transformers 4.x tokenizers may have none; TRL pads batches
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    peft_config = LoraConfig(task_type="CAUSAL_LM", **spec["lora"])
    # Seeded right before the trainer wraps the model: the same seed gives the same LoRA init whatever else a TRL
    # version draws from the RNG first.
    set_seed(int(spec["args"].get("seed", 0)))
    args = dict(spec["args"])
    if not spec["use_gpu"] and "bf16" not in args:  # train.trl.bf16 decides where it is set
        args["bf16"] = cpu_bf16()
        if args["bf16"]:
            print("tao: train: bf16 autocast (this CPU has bf16 matmuls; train.trl.bf16=false to train in float32)",
                  file=sys.stderr, flush=True)
    if spec["method"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        if args.get("precompute_ref_log_probs") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # TRL caches the precomputed log-probs beside the dataset's cache files and every rank opens rank 0's
            # file; an in-memory dataset's cache is a temp folder of its own process, which other ranks cannot open.
            print("tao: train: several processes: the reference log-probs are computed per step, not precomputed",
                  file=sys.stderr, flush=True)
            args["precompute_ref_log_probs"] = False
        # With a PEFT model and no ref_model, TRL's reference is the same model with the adapter disabled.
        trainer: Any = DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=peft_config)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config)
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = spec["args"]["output_dir"]
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last:
        print(f"tao: train: resuming from {last}", file=sys.stderr, flush=True)
    result = trainer.train(resume_from_checkpoint=last)
    # save_model runs on every rank (ZeRO-3 gathers the sharded adapter there) and writes on rank 0 only.
    trainer.save_model(str(out / "adapter"))
    if not trainer.is_world_process_zero():
        return

    if spec["merge"]:
        # Merge the adapter as saved, into a fresh base: the same bytes any later consumer will load, and no
        # dependence on how the backend (DDP, ZeRO) holds the trained weights in memory.
        base = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
        merged.save_pretrained(str(out / "merged"))
        tokenizer.save_pretrained(str(out / "merged"))

    steps = [log for log in trainer.state.log_history if "loss" in log]
    losses = [float(log["loss"]) for log in steps]
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "train_loss_first": losses[0] if losses else float("nan"),
        "train_loss_last": losses[-1] if losses else float("nan"),
        "steps": float(trainer.state.global_step),
        "samples": float(len(trainer.train_dataset)),
        "samples_per_second": float(result.metrics["train_samples_per_second"]),
        "runtime_s": float(result.metrics["train_runtime"]),
    }
    if steps:  # TRL's per-step metrics (rewards/accuracies, rewards/margins, entropy, ...) as of the last step
        metrics.update({k: float(v) for k, v in steps[-1].items()
                        if isinstance(v, (int, float)) and k not in ("loss", "epoch", "step") and k not in metrics})
    # The training curve MLflow draws: every numeric per-step metric TRL logged, step by step.
    curves: dict[str, list[float]] = {}
    for log in steps:
        for k, v in log.items():
            if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                curves.setdefault(k, []).append(float(v))
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "loss_history": losses, "curves": curves},
                                                 indent=1))
