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
    # On CPU bf16 is left to the worker, which knows whether its CPU has bf16 matmuls; train.trl.bf16 overrides.
    assert args["use_cpu"] is True and "bf16" not in args and args["gradient_checkpointing"] is False
    assert training_args(TrainConfig(trl={"bf16": False}), "/tmp/o")["bf16"] is False
    assert training_args(TrainConfig(use_gpu=True), "/tmp/o")["bf16"] is True
    assert args["report_to"] == [] and "deepspeed" not in args
    # Checkpoints every train.checkpoint_steps (the last one kept), or none.
    assert (args["save_strategy"], args["save_steps"], args["save_total_limit"]) == ("steps", 10, 1)
    assert training_args(TrainConfig(checkpoint_steps=0), "/tmp/o")["save_strategy"] == "no"
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


_TRAIN_IN_A_CHILD = """
import sys
import pandas as pd
from tao_spark.config import TrainConfig
from tao_spark.session import get_spark
from tao_spark.train import train_on_pairs
from tests.test_train import _pairs, _resume_cfg
get_spark()
train_on_pairs(_pairs(16), sys.argv[1], sys.argv[2], _resume_cfg(sys.argv[3]), seed=0)
"""


def _resume_cfg(method: str = "dpo") -> TrainConfig:
    return TrainConfig(method=method, lora_r=4, lora_alpha=8, checkpoint_steps=2,
                       trl={"per_device_train_batch_size": 4, "num_train_epochs": 2, "learning_rate": 1e-3})


@pytest.mark.integration
# SFT resumes through the same TRL checkpoint code as DPO: its run is in `make test-slow`, not in every CI run.
@pytest.mark.parametrize("method", ["dpo", pytest.param("sft", marks=pytest.mark.slow)])
def test_training_killed_mid_way_resumes_to_the_same_model(method: str, tiny_model: Path, tmp_path: Path,
                                                           spark: Any) -> None:
    """SIGKILL after a checkpoint, re-run: the same number of optimizer steps in total and the same adapter as a
    run never killed (no batch seen twice or skipped, the optimizer and RNG states restored)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    ref = train_on_pairs(_pairs(16), str(tiny_model), str(tmp_path / "ref"), _resume_cfg(method), seed=0,
                         spark=spark)
    assert ref.metrics["steps"] == 8 and len(ref.loss_history) == 8

    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _TRAIN_IN_A_CHILD, str(tiny_model), str(out), method],
                             cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "trainer" / "checkpoint-4" / "trainer_state.json").exists():
        assert child.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(child.pid, signal.SIGKILL)  # the driver and its torchrun workers, mid-epoch 2
    child.wait()
    assert not (out / "metrics.json").exists()

    resumed = train_on_pairs(_pairs(16), str(tiny_model), str(out), _resume_cfg(method), seed=0, spark=spark)
    assert resumed.metrics["steps"] == 8 and len(resumed.loss_history) == 8
    assert resumed.loss_history[:4] == pytest.approx(ref.loss_history[:4], rel=1e-4)
    assert resumed.loss_history == pytest.approx(ref.loss_history, rel=1e-3, abs=1e-4)
    a = load_file(Path(ref.adapter_dir) / "adapter_model.safetensors")
    b = load_file(Path(resumed.adapter_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    # One checkpoint kept, in the round's folder; the logged artifacts never include it.
    assert [p.name for p in (out / "trainer").glob("checkpoint-*")] == ["checkpoint-8"]


def test_changed_pairs_drop_old_checkpoints(tmp_path: Path) -> None:
    from tao_spark.train import _drop_stale_checkpoints

    (tmp_path / "trainer" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "pairs.jsonl").write_text("a\n")
    spec = {"pairs_path": str(tmp_path / "pairs.jsonl"), "args": {"output_dir": str(tmp_path / "trainer")}}
    _drop_stale_checkpoints(tmp_path, spec)
    _drop_stale_checkpoints(tmp_path, spec)  # same data: the checkpoint stays
    assert (tmp_path / "trainer" / "checkpoint-2").exists()
    (tmp_path / "pairs.jsonl").write_text("b\n")
    _drop_stale_checkpoints(tmp_path, spec)
    assert not (tmp_path / "trainer").exists()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_cpu_bf16_follows_the_cpus_flags() -> None:
    from tao_spark.train import cpu_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
