"""train: LoRA DPO/SFT through Spark's TorchDistributor on a real Sail Spark Connect session.

    .venv/bin/pytest tests/test_train.py              # all, ~1 min
    .venv/bin/pytest tests/test_train.py -m "not integration"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tao_spark.config import TrainConfig
from tao_spark.train import DEEPSPEED_CONF_DIR, distributor_for, train_on_pairs, training_args


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _pairs(n: int = 16) -> pd.DataFrame:
    # Chosen and rejected differ systematically, so a preference is learnable even by a random tiny model.
    return pd.DataFrame([{"prompt": _chat(f"Tell me about item {i}."),
                          "chosen": f"Item {i} is fine and useful. Thank you.",
                          "rejected": f"no {i} bad bad bad",
                          "prompt_id": f"p{i}"} for i in range(n)])


@pytest.fixture(scope="module")
def spark() -> Any:
    from tao_spark.session import get_spark

    return get_spark()


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the commands TorchDistributor starts, to prove training ran under torchrun, not in-process."""
    from pyspark.ml.torch.distributor import TorchDistributor

    commands: list[list[str]] = []
    original = TorchDistributor._execute_command

    def spy(cmd: list[str], *args: Any, **kwargs: Any) -> None:
        commands.append(cmd)
        original(cmd, *args, **kwargs)

    monkeypatch.setattr(TorchDistributor, "_execute_command", staticmethod(spy))
    return commands


def test_empty_pairs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no pairs"):
        train_on_pairs(_pairs(0), "unused", str(tmp_path), TrainConfig())
    with pytest.raises(ValueError, match="no pairs"):  # an empty Spark result keeps its columns
        train_on_pairs(_pairs(1).iloc[:0], "unused", str(tmp_path), TrainConfig())


def test_missing_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing \['rejected'\]"):
        train_on_pairs(_pairs().drop(columns=["rejected"]), "unused", str(tmp_path), TrainConfig(method="dpo"))
    # SFT needs no rejected answer.
    with pytest.raises(ValueError, match=r"missing \['chosen'\]"):
        train_on_pairs(_pairs().drop(columns=["chosen"]), "unused", str(tmp_path), TrainConfig(method="sft"))


def test_prompt_must_be_a_chat(tmp_path: Path) -> None:
    pairs = _pairs(2)
    pairs["prompt"] = ["plain text", "more text"]
    with pytest.raises(ValueError, match="row 0: prompt must be a chat"):
        train_on_pairs(pairs, "unused", str(tmp_path), TrainConfig())
    pairs = _pairs(2)
    pairs.loc[1, "chosen"] = ""
    with pytest.raises(ValueError, match="row 1: chosen must be a non-empty string"):
        train_on_pairs(pairs, "unused", str(tmp_path), TrainConfig())


def test_training_args_defaults_and_overrides() -> None:
    args = training_args(TrainConfig(method="dpo", trl={"learning_rate": 3e-5, "max_length": 128}), "/tmp/o", seed=7)
    assert args["learning_rate"] == 3e-5 and args["max_length"] == 128  # train.trl wins over our defaults
    assert args["beta"] == 0.1 and args["seed"] == 7 and args["output_dir"] == "/tmp/o/trainer"
    assert args["use_cpu"] is True and args["bf16"] is False and args["gradient_checkpointing"] is False
    assert args["report_to"] == [] and args["save_strategy"] == "no" and "deepspeed" not in args
    sft = training_args(TrainConfig(method="sft"), "/tmp/o")
    assert "beta" not in sft and sft["completion_only_loss"] is True
    # Every default is a real field of the TRL config it is meant for.
    from trl import DPOConfig, SFTConfig

    assert set(training_args(TrainConfig(method="dpo"), "/tmp/o")) <= set(DPOConfig.__dataclass_fields__)
    assert set(sft) <= set(SFTConfig.__dataclass_fields__)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_deepspeed_configs(name: str, stage: int) -> None:
    conf = json.loads((DEEPSPEED_CONF_DIR / name).read_text())
    # torch_adam: DeepSpeed uses torch.optim.AdamW instead of compiling its fused CUDA/CPU Adam op.
    assert conf["optimizer"]["type"] == "AdamW" and conf["optimizer"]["params"]["torch_adam"] is True
    assert conf["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert conf[key] == "auto"  # the HF Trainer fills these from DPOConfig, so the two never disagree


def test_deepspeed_distributor_assembly(spark: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyspark.ml.deepspeed.deepspeed_distributor import DeepspeedTorchDistributor
    from pyspark.ml.torch.distributor import Distributor

    # GPU discovery on the driver is not what this checks, and there is no GPU here.
    monkeypatch.setattr(Distributor, "_get_num_tasks", lambda self: self.num_processes)
    zero3 = str(DEEPSPEED_CONF_DIR / "zero3.json")
    cfg = TrainConfig(backend="deepspeed", use_gpu=True, num_processes=4, trl={"deepspeed": zero3})
    d = distributor_for(cfg, zero3)
    assert isinstance(d, DeepspeedTorchDistributor)
    assert (d.num_processes, d.local_mode, d.use_gpu, d.deepspeed_config) == (4, True, True, zero3)
    cmd = DeepspeedTorchDistributor._create_torchrun_command(d.input_params, "train.py")
    assert "--nproc_per_node=4" in cmd and cmd[-2:] == ["--deepspeed_config", zero3]
    assert training_args(cfg, "/tmp/o", deepspeed_config=zero3)["deepspeed"] == zero3  # the worker's TRL config too


def test_torch_distributor_assembly(spark: Any) -> None:
    from pyspark.ml.torch.distributor import TorchDistributor

    d = distributor_for(TrainConfig(num_processes=2), None)
    assert type(d) is TorchDistributor
    assert (d.num_processes, d.local_mode, d.use_gpu) == (2, True, False)
    assert d.is_remote  # our Sail session is Spark Connect, and the distributor knows it


@pytest.mark.integration
def test_dpo_trains_every_lora_weight_through_torch_distributor(
    tiny_model: Path, tmp_path: Path, spark: Any, launched: list[list[str]]
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    cfg = TrainConfig(method="dpo", lora_r=4, lora_alpha=8,
                      trl={"per_device_train_batch_size": 4, "num_train_epochs": 3, "learning_rate": 1e-3})
    result = train_on_pairs(_pairs(16), str(tiny_model), str(tmp_path / "out"), cfg, seed=0, spark=spark)

    assert len(launched) == 1 and "--nproc_per_node=1" in launched[0]  # ran under torchrun
    assert result.metrics["steps"] == 12 and result.metrics["samples"] == 16
    assert len(result.loss_history) == 12
    first, last = result.loss_history[:3], result.loss_history[-3:]
    assert sum(last) / 3 < sum(first) / 3 - 0.05, result.loss_history
    assert result.metrics["rewards/margins"] > 0 and "rewards/accuracies" in result.metrics

    # Rebuild the adapter exactly as TRL initialised it (model loaded, then set_seed, then get_peft_model).
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    set_seed(0)
    fresh = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                            target_modules=cfg.lora_target_modules))
    init = {k.replace(".default", ""): v.detach() for k, v in fresh.named_parameters() if "lora_" in k}
    trained = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    assert len(init) == len(trained) == 2 * 2 * len(cfg.lora_target_modules)  # A and B, 2 layers
    for name, before in init.items():
        after = trained[name]
        moved = (after - before).norm() / max(before.norm().item(), 1e-3)
        assert moved > 0, f"{name} did not change"
        if "lora_A" in name:  # B starts at zero; A starts random and moves a little, so this is the same init
            assert moved < 0.5, f"{name} moved {moved:.2f}: not the init TRL used"

    assert result.merged_dir is not None
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    # Same inference cost as the base: the same parameters, and no adapter layers left.
    assert merged.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    assert not any("lora_" in k for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(result.merged_dir).chat_template is not None
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["loss_history"] == result.loss_history


@pytest.mark.integration
def test_sft_best_of_n(tiny_model: Path, tmp_path: Path, spark: Any) -> None:
    pairs = _pairs(16).drop(columns=["rejected"])
    cfg = TrainConfig(method="sft", lora_r=4, lora_alpha=8, merge=False,
                      trl={"per_device_train_batch_size": 4, "num_train_epochs": 2, "learning_rate": 1e-3})
    result = train_on_pairs(pairs, str(tiny_model), str(tmp_path / "out"), cfg, spark=spark)
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").exists()
    assert result.merged_dir is None and not (tmp_path / "out" / "merged").exists()
    assert result.metrics["steps"] == 8 and len(result.loss_history) == 8
    assert sum(result.loss_history[-2:]) < sum(result.loss_history[:2]), result.loss_history
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Item 0 is fine and useful. Thank you."}]
