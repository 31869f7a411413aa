"""Reward model: held-out metrics, Bradley-Terry training through TorchDistributor, the RewardFn that scores with it."""

from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tao_spark.config import RewardModelConfig, RewardSpec
from tao_spark.reward_model import encode, holdout_metrics, is_holdout, train
from tao_spark.rewards import model as model_reward
from tao_spark.score import get_reward, score_frame


def minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tao_spark.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6", "/nonexistent"))


def make_tiny_reward_model(out: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT sequence classifier (one label) with MiniLM's real tokenizer: a few MB."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"))


def test_holdout_split_is_stable_and_near_the_fraction():
    ids = [f"{random.Random(i).getrandbits(128):032x}" for i in range(2000)]
    share = sum(is_holdout(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23 and [is_holdout(i, 0.2) for i in ids[:50]] == [is_holdout(i, 0.2) for i in ids[:50]]


def test_holdout_metrics_accuracy_per_task_length_and_correlation():
    rows = [{"task": "a", "chosen_score": 2.0, "rejected_score": 1.0, "chosen_words": 10, "rejected_words": 5},
            {"task": "a", "chosen_score": 0.0, "rejected_score": 1.0, "chosen_words": 60, "rejected_words": 80},
            {"task": "b", "chosen_score": 1.0, "rejected_score": 1.0, "chosen_words": 30, "rejected_words": 30}]
    m = holdout_metrics(rows)
    assert m["holdout_accuracy"] == pytest.approx(0.5) and m["holdout_pairs"] == 3
    assert m["task.a.accuracy"] == 0.5 and m["task.b.accuracy"] == 0.5
    assert m["length.0-20.accuracy"] == 1.0 and m["length.20-50.accuracy"] == 0.5 and m["length.50-100.accuracy"] == 0
    assert -1 <= m["reward_length_corr"] <= 1


def test_encode_keeps_the_answer_end_when_the_prompt_is_long():
    tok = minilm_tokenizer()
    ids = encode(tok, "word " * 500, "the final answer is forty two", 64)
    assert len(ids) <= 64 and tok.decode(ids).endswith("the final answer is forty two [SEP]")


def _toy_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The preferred answer says it is helpful; lengths and filler are random, so only content separates them."""
    rng = random.Random(seed)
    filler = ["the", "river", "table", "blue", "seven", "window", "music", "paper", "green", "stone"]
    out = []
    for i in range(n):
        words = lambda: " ".join(rng.choices(filler, k=rng.randint(2, 8)))  # noqa: E731
        out.append({"pair_id": f"{rng.getrandbits(128):032x}", "task": "toy" if i % 2 else "toy2",
                    "prompt": f"Question {words()}?", "chosen": f"{words()} excellent helpful correct {words()}",
                    "rejected": f"{words()} terrible useless wrong {words()}"})
    return out


@pytest.mark.integration
def test_bradley_terry_training_drives_holdout_accuracy_up(tiny_rm: Path, tmp_path: Path, spark: Any):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tao_spark.reward_model import score_texts

    pairs = _toy_pairs(160)
    cfg = RewardModelConfig(holdout_fraction=0.25, max_length=32, lora_r=8, lora_alpha=16,
                            trl={"num_train_epochs": 4, "learning_rate": 3e-3, "per_device_train_batch_size": 16})
    holdout = [p for p in pairs if is_holdout(p["pair_id"], 0.25)]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm)
    s = score_texts(base, tok, [(p["prompt"], p[k]) for p in holdout for k in ("chosen", "rejected")], 32)
    before = sum(s[2 * i] > s[2 * i + 1] for i in range(len(holdout))) / len(holdout)

    report = train(pairs, str(tiny_rm), str(tmp_path / "rm"), cfg)
    after = holdout_metrics(report["holdout"])["holdout_accuracy"]
    print(f"held-out accuracy: {before:.2f} before, {after:.2f} after; loss {report['loss_history'][0]:.3f} -> "
          f"{report['loss_history'][-1]:.3f}")
    assert after >= 0.9 and after > before
    assert report["loss_history"][-1] < report["loss_history"][0]
    assert (tmp_path / "rm" / "model" / "config.json").is_file()
    assert not list((tmp_path / "rm" / "model").glob("adapter_*"))  # merged: loads as a plain classifier


def test_reward_model_loads_once_per_worker_and_scores_in_order(tiny_rm: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tao_spark.reward_model import score_texts

    spec = RewardSpec(name="rm", model=str(tiny_rm), params={"batch_size": 3, "normalize": "raw"})
    msgs = json.dumps([{"role": "user", "content": "Explain tides."}])
    answers = [f"answer number {i} " + "tide " * i for i in range(7)]
    pdf = pd.DataFrame({"messages_json": [msgs] * 7, "completion": answers})
    frames: list[pd.DataFrame] = []
    threads = [threading.Thread(target=lambda: frames.append(score_frame(pdf, [spec]))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    score_frame(pdf, [spec])
    assert model_reward.load_counts[str(tiny_rm)] == 1  # 4 scoring calls on 3 threads, one load
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    expected = score_texts(model, AutoTokenizer.from_pretrained(tiny_rm), [("Explain tides.", a) for a in answers], 256)
    for f in frames:
        assert list(f["rm"]) == pytest.approx(expected, abs=1e-5)
    sig = get_reward(RewardSpec(name="rm2", model=str(tiny_rm)))(["Explain tides."], ["Tides."])
    assert 0 < sig[0] < 1 and not math.isnan(sig[0])


def test_registered_reward_model_is_an_mlflow_model_that_scores_like_the_loop(tiny_rm: Path, tmp_path: Path):
    import shutil

    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tao_spark.config import load_config
    from tao_spark.reward_model import register, score_texts

    cfg = load_config(None, [f"home={tmp_path / 'home'}", "mlflow.experiment=rm-test"])
    out = tmp_path / "run"
    shutil.copytree(tiny_rm, out / "model")
    holdout = [{"task": "t", "chosen_words": 5, "chosen_score": 0.3, "rejected_words": 9, "rejected_score": 0.1}]
    r = register(cfg, "tao-reward", out, {"holdout_accuracy": 0.75}, holdout, {"path": str(tmp_path / "pairs")}, 3,
                 "reward-test")
    assert r.promoted and r.model_version == "1"
    rm = mlflow.pyfunc.load_model("models:/tao-reward@champion")
    assert [i.name for i in rm.metadata.signature.inputs.inputs] == ["prompt", "response"]
    rows = [{"prompt": "Explain tides.", "response": a} for a in ("The moon pulls the sea.", "no", "Tides! " * 20)]
    got = rm.predict(rows)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_rm).eval()
    want = score_texts(model, AutoTokenizer.from_pretrained(tiny_rm), [(x["prompt"], x["response"]) for x in rows],
                       cfg.reward_model.max_length)
    assert len(got) == 3 and all(abs(float(g) - w) < 1e-5 for g, w in zip(got, want, strict=True))
    files = [f for f in Path(mlflow.artifacts.download_artifacts(
        mlflow.MlflowClient().get_model_version("tao-reward", "1").source, dst_path=str(tmp_path / "dl"))).rglob("*")
        if f.is_file()]
    assert "MLmodel" in {f.name for f in files} and not [f for f in files if f.suffix in (".pkl", ".bin", ".pt")]
