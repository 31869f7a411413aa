"""The tuned policy as an MLflow model for chat: ``{"messages": [...]}`` in, an OpenAI-style chat completion out.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/tao-policy@champion")
    model.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_tokens": 64})

``tao register`` logs this file as a model from code (``mlflow.pyfunc.log_model(python_model=<this file>)``) with
the merged Hugging Face folder as the artifact ``hf`` and the LoRA adapter as ``adapter``: no pickle, and nothing
but torch and transformers needed where it is loaded (``mlflow models serve``, Databricks Model Serving). The same
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
    """Greedy (or sampled, with ``temperature`` > 0) chat generation with the model's own chat template."""

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts["hf"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.name = str(context.model_config.get("name", "tao-policy")) if context.model_config else "tao-policy"

    # No type hints here: MLflow reads predict's hints as a schema and warns on anything but list[...]; the
    # logged signature is the schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import torch

        params = params or {}
        max_tokens = int(params.get("max_tokens") or DEFAULT_MAX_TOKENS)
        temperature = float(params.get("temperature") or 0.0)
        out = []
        for chat in _chats(model_input):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            with torch.no_grad():
                gen = self.model.generate(
                    **ids, max_new_tokens=max_tokens, do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            new = gen[0, ids["input_ids"].shape[1]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            stopped = len(new) > 0 and int(new[-1]) == self.tokenizer.eos_token_id
            out.append({
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if stopped or len(new) < max_tokens else "length"}],
                "usage": {"prompt_tokens": int(ids["input_ids"].shape[1]), "completion_tokens": int(len(new)),
                          "total_tokens": int(ids["input_ids"].shape[1] + len(new))},
            })
        return out


mlflow.models.set_model(ChatPolicy())
