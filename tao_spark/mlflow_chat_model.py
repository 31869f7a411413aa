"""The tuned policy as an MLflow model for chat: ``{"messages": [...]}`` in, an OpenAI-style chat completion out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/tao-policy@champion")
    model.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_tokens": 64})

``tao register`` logs this file as a model from code (``mlflow.pyfunc.log_model(python_model=<this file>)``) with
the merged Hugging Face folder as the artifact ``hf``, the LoRA adapter as ``adapter`` and ``tao_spark/engines.py``
as code: no pickle, and nothing but torch and transformers needed where it is loaded (``mlflow models serve``,
Databricks Model Serving). The same
folder is what ``tao serve`` and later rounds load (``tao_spark.models`` finds the HF folder inside it).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULT_MAX_TOKENS = 256


def _chats(model_input: Any) -> list[list[dict[str, str]]]:
    """One chat per request: a dict (``{"messages": ...}``), a list of them, or a DataFrame with ``messages``."""
    if hasattr(model_input, "to_dict"):  # pandas: one row per request
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    else:
        rows = list(model_input)
    chats = []
    for row in rows:
        messages = row["messages"] if isinstance(row, dict) else row
        chats.append([{"role": str(m["role"]), "content": str(m["content"])} for m in messages])
    return chats


class ChatPolicy(PythonModel):
    """Greedy (or sampled, with ``temperature`` > 0) chat generation with the model's own chat template, through the
    engine ``tao serve`` and the rounds decode with (``TransformersGenerator``): one decode path, the same answers."""

    def load_context(self, context: Any) -> None:
        try:
            from tao_spark.engines import TransformersGenerator, chat_prompt_ids
        except ImportError:  # served where tao_spark is not installed: the engine's copy logged with the model
            from engines import TransformersGenerator, chat_prompt_ids  # type: ignore[no-redef]

        self.engine = TransformersGenerator(context.artifacts["hf"], dtype="float32", batch_size=1)
        self.prompt_ids = chat_prompt_ids
        self.name = str(context.model_config.get("name", "tao-policy")) if context.model_config else "tao-policy"

    # No type hints here: MLflow reads predict's hints as a schema and warns on anything but list[...]; the
    # logged signature is the schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        params = params or {}
        max_tokens = int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)
        temperature = float(params.get("temperature") or 0.0)
        out = []
        for chat in _chats(model_input):
            done = self.engine.complete(chat, temperature=temperature, top_p=1.0, max_new_tokens=max_tokens,
                                        seed=0)
            with self.engine._tok_lock:
                prompt_tokens = len(self.prompt_ids(self.engine.tokenizer, chat))
            out.append({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text.strip()},
                             "finish_reason": done.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done.tokens,
                          "total_tokens": prompt_tokens + done.tokens},
            })
        return out


mlflow.models.set_model(ChatPolicy())
