"""A trained reward model as a ``RewardFn``: loaded once per worker process, scores in batches.

    score:
      rewards:
        - {name: rm, model: "models:/tao-reward@champion", weight: 1.0}
        - {name: rm_local, model: /path/to/reward/model, params: {batch_size: 32, normalize: raw}}

``model`` is anything ``tao_spark.models.resolve_model`` takes (a ``models:/`` URI, a local HF folder with a
one-label sequence-classification head). The prompt and answer are encoded as ``tao train-reward`` encoded them
(``tao_spark.mlflow_reward_model.encode``, which the registered MLflow model uses too). The score stage keeps one
instance per process (``score.get_reward``), and the weights load on the first call, not when the config is
checked, so a driver that never scores never loads them.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

from tao_spark.mlflow_reward_model import score_texts

_lock = threading.Lock()
load_counts: dict[str, int] = {}


class RewardModel:
    """Scalar reward of a sequence classifier; ``normalize="sigmoid"`` maps it into (0, 1) like the verifiers."""

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 256, normalize: str = "sigmoid",
                 home: str = "", threads: int = 0) -> None:
        if normalize not in ("sigmoid", "raw"):
            raise TypeError(f"normalize must be sigmoid or raw, got {normalize!r}")
        if batch_size < 1 or max_length < 16:
            raise TypeError("batch_size must be >= 1 and max_length >= 16")
        self.uri, self.batch_size, self.max_length, self.normalize = model, batch_size, max_length, normalize
        self.home, self.threads = home, threads
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        with _lock:  # Sail runs a worker's partitions as threads: one load, shared
            if self._loaded is None:
                import torch
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                from tao_spark.models import resolve_model

                if self.threads:
                    torch.set_num_threads(self.threads)
                path = resolve_model(self.uri, str(Path(self.home or os.environ.get("TAO_HOME") or ".tao").resolve()))
                tokenizer = AutoTokenizer.from_pretrained(path)
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
                if model.config.num_labels != 1:
                    raise ValueError(f"{self.uri}: a reward model has one output, not {model.config.num_labels}")
                self._loaded = (model, tokenizer)
                load_counts[self.uri] = load_counts.get(self.uri, 0) + 1
            return self._loaded

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        model, tokenizer = self._load()
        texts = [(p if isinstance(p, str) else "", c if isinstance(c, str) else "")
                 for p, c in zip(prompts, completions, strict=True)]
        raw = score_texts(model, tokenizer, texts, self.max_length, self.batch_size)
        if self.normalize == "raw":
            return raw
        return [1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, v)))) for v in raw]
