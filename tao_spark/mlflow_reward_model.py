"""The trained reward model as an MLflow model: rows of ``prompt`` and ``response`` in, one scalar reward each out.

    import mlflow
    rm = mlflow.pyfunc.load_model("models:/tao-reward@champion")
    rm.predict([{"prompt": "Explain tides.", "response": "The moon pulls the sea."}])   # -> [1.73]

``tao train-reward`` logs this file as a model from code with the merged sequence classifier as the artifact
``hf``. The file needs only torch and transformers where it is loaded, and it is also the one place that says how a
(prompt, answer) pair is encoded for the reward model: training, the score stage and the MLflow model all use
``encode`` below, so a reward served elsewhere is the reward the loop computed.
"""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, prompt: str, answer: str, max_length: int) -> list[int]:
    """Token ids of (prompt, answer) as the reward model reads them; the prompt's start is cut first when too long."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return list(ids[-max_length:])
    tokenizer.truncation_side = "left"  # a long prompt loses its start, not the instruction at its end
    return list(tokenizer(prompt, answer, truncation="longest_first", max_length=max_length)["input_ids"])


def score_texts(model: Any, tokenizer: Any, texts: list[tuple[str, str]], max_length: int,
                batch_size: int = 16) -> list[float]:
    """The model's scalar reward for each (prompt, answer), in order; batched with right padding."""
    import torch

    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        ids = [encode(tokenizer, p, a, max_length) for p, a in texts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        out.extend(float(v) for v in logits[:, 0])
    return out


def _rows(model_input: Any) -> list[tuple[str, str]]:
    if hasattr(model_input, "to_dict"):  # pandas
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    return [(str(r["prompt"]), str(r["response"])) for r in model_input]


def _set_mlflow_model() -> None:
    import mlflow
    from mlflow.pyfunc import PythonModel

    class RewardScorer(PythonModel):
        def load_context(self, context: Any) -> None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["hf"])
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModelForSequenceClassification.from_pretrained(context.artifacts["hf"],
                                                                            dtype=torch.float32).eval()
            self.max_length = int((context.model_config or {}).get("max_length", 256))

        # No type hints: MLflow reads them as a schema; the logged signature is the schema.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return score_texts(self.model, self.tokenizer, _rows(model_input), self.max_length)

    mlflow.models.set_model(RewardScorer())


# Imported as part of the package (the score stage, training): plain functions, no MLflow import. Executed by
# MLflow as a model's code (under a module name of its own): the model.
if __name__ != "tao_spark.mlflow_reward_model":
    _set_mlflow_model()
