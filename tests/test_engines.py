"""Generation engines on the tiny random model (fast), plus one real-model check marked integration."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from tao_spark.engines import (
    DECODE_ATTENTION,
    Completion,
    TransformersGenerator,
    _decode_attention,
    get_generator,
    load_counts,
    loaded,
    set_torch_threads,
)

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "user", "content": "Write a haiku about the sea, the sky and the long road home at night."}],
]


@pytest.fixture(scope="module")
def gen(tiny_model: Path) -> TransformersGenerator:
    return TransformersGenerator(str(tiny_model), batch_size=8)


def sample(g: TransformersGenerator, chats: list, seeds: list[int], **kw: float) -> list[list[Completion]]:
    params = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6} | kw
    return g.generate(chats, seeds=seeds, **params)  # type: ignore[arg-type]


def texts(outs: list[list[Completion]]) -> list[list[str]]:
    return [[c.text for c in o] for o in outs]


def test_shapes_order_and_counts(gen: TransformersGenerator) -> None:
    outs = sample(gen, CHATS, [1, 2, 3], max_new_tokens=5)
    assert [len(o) for o in outs] == [3, 3, 3]
    for o in outs:
        for c in o:
            assert isinstance(c, Completion) and 1 <= c.tokens <= 5 and c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or c.tokens == 5
    # Order: each chat's row is what that chat gets alone with its seed.
    for chat, seed, o in zip(CHATS, [1, 2, 3], outs, strict=True):
        assert texts(sample(gen, [chat], [seed], max_new_tokens=5)) == texts([o])


def test_seeds_reproduce_and_differ(gen: TransformersGenerator) -> None:
    a = sample(gen, CHATS, [7, 8, 9])
    assert texts(a) == texts(sample(gen, CHATS, [7, 8, 9]))
    assert texts(a) != texts(sample(gen, CHATS, [10, 11, 12]))
    # Streams of one prompt differ from each other at temperature 1.
    assert len(set(texts(a)[2])) > 1


def test_prompt_samples_do_not_depend_on_batch(tiny_model: Path, gen: TransformersGenerator) -> None:
    one_by_one = TransformersGenerator(str(tiny_model), batch_size=1)
    for top_p in (1.0, 0.9):
        assert texts(sample(gen, CHATS, [4, 5, 6], top_p=top_p)) == texts(
            sample(one_by_one, CHATS, [4, 5, 6], top_p=top_p))


def reference_greedy(model_path: str, gen: TransformersGenerator, chats: list, max_new_tokens: int) -> list[str]:
    """``model.generate`` on a model loaded as transformers loads it (SDPA attention), prompts left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    tok.padding_side = "left"
    if tok.pad_token is None:  # transformers 4.x leaves it unset
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        ref = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=gen.stop_ids,
                             pad_token_id=gen.pad_id)
    return [tok.decode(r, skip_special_tokens=True) for r in ref[:, enc["input_ids"].shape[1]:]]


def test_greedy_matches_model_generate(tiny_model: Path, gen: TransformersGenerator) -> None:
    outs = gen.generate(CHATS, n=2, temperature=0, top_p=1.0, max_new_tokens=8, seeds=[0, 0, 0])
    assert all(o[0] == o[1] and o[0] is not o[1] for o in outs)  # n copies of one greedy answer
    assert gen.model.config._attn_implementation == DECODE_ATTENTION
    assert [o[0].text for o in outs] == reference_greedy(str(tiny_model), gen, CHATS, 8)


def test_decode_attention_equals_sdpa() -> None:
    """One query token against a cache, grouped heads, padded keys masked out: SDPA's numbers to float32 rounding."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    batch, groups, keys, dim = 5, 2, 37, 16
    query = torch.randn(batch, groups * 3, 1, dim)
    key, value = torch.randn(batch, groups, keys, dim), torch.randn(batch, groups, keys, dim)
    mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., :9] = False  # left padding of a shorter prompt
    mask[3, ..., :30] = False
    for m in (mask, None):
        ours, _ = _decode_attention(module, query, key, value, m, scaling=dim ** -0.5)
        ref, _ = sdpa_attention_forward(module, query, key, value, m, scaling=dim ** -0.5)
        assert ours.shape == ref.shape == (batch, 1, groups * 3, dim)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    narrow = torch.randn(batch, groups, keys, dim // 2)  # value heads narrower than query/key heads
    torch.testing.assert_close(_decode_attention(module, query, key, narrow, mask)[0],
                               sdpa_attention_forward(module, query, key, narrow, mask)[0], rtol=1e-5, atol=1e-6)
    # a masked key must not count: changing it leaves the padded row's output unchanged
    key2 = key.clone()
    key2[3, :, :30] = 100.0
    assert torch.equal(_decode_attention(module, query, key2, value, mask)[0][3],
                       _decode_attention(module, query, key, value, mask)[0][3])


def test_left_padding_equals_one_at_a_time(tiny_model: Path, gen: TransformersGenerator) -> None:
    one_by_one = TransformersGenerator(str(tiny_model), batch_size=1)
    kw = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 10, "seeds": [0, 0, 0]}
    assert texts(gen.generate(CHATS, **kw)) == texts(one_by_one.generate(CHATS, **kw))  # type: ignore[arg-type]


def test_finish_reasons_and_token_counts(tiny_model: Path) -> None:
    import torch

    g = TransformersGenerator(str(tiny_model))
    greedy = {"n": 1, "temperature": 0.0, "top_p": 1.0, "seeds": [0]}
    (long,) = g.generate(CHATS[:1], max_new_tokens=4, **greedy)  # type: ignore[arg-type]
    assert (long[0].tokens, long[0].finish_reason) == (4, "length")
    # The random model rarely says EOS (its greedy output repeats one token), so make that token a stop token.
    prompt = g.tokenizer(g.tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        first = g.model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    g.stop_ids = [first]
    (short,) = g.generate(CHATS[:1], max_new_tokens=10, **greedy)  # type: ignore[arg-type]
    assert (short[0].text, short[0].tokens, short[0].finish_reason) == ("", 1, "stop")


def test_rejects_bad_arguments(gen: TransformersGenerator) -> None:
    with pytest.raises(ValueError, match="one seed per chat"):
        gen.generate(CHATS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=2, seeds=[0])
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(CHATS[:1], n=1, temperature=1.0, top_p=0.0, max_new_tokens=2, seeds=[0])
    assert gen.generate([], n=2, temperature=1.0, top_p=1.0, max_new_tokens=2, seeds=[]) == []


def test_get_generator_loads_once_across_threads(tiny_model: Path) -> None:
    key = f"transformers:{tiny_model}:float32"
    before = load_counts().get(key, 0) if ("transformers", str(tiny_model), "float32") not in loaded() else None
    barrier = threading.Barrier(4)
    got: list[object] = []

    def worker() -> None:
        barrier.wait()
        got.append(get_generator("transformers", str(tiny_model)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)
    if before is not None:  # not loaded by an earlier test of this process: exactly one load now
        assert load_counts()[key] == before + 1


def test_the_engine_cache_keeps_two_and_forgets_the_least_recently_used(tiny_model: Path, tmp_path: Path) -> None:
    """A loop evaluates every round's model in one process: the cache must not keep them all."""
    import shutil

    paths = [str(tiny_model)]
    for i in (1, 2):
        paths.append(str(shutil.copytree(tiny_model, tmp_path / f"round-{i}")))
    first = get_generator("transformers", paths[0])
    get_generator("transformers", paths[1])
    assert get_generator("transformers", paths[0]) is first  # used again: now the most recent
    get_generator("transformers", paths[2])  # a third: paths[1], the least recently used, goes
    kept = [k[1] for k in loaded() if k[0] == "transformers"]
    assert kept == [paths[0], paths[2]]
    reloads = load_counts()[f"transformers:{paths[1]}:float32"]
    get_generator("transformers", paths[1])
    assert load_counts()[f"transformers:{paths[1]}:float32"] == reloads + 1


def test_unknown_and_missing_engines(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="unknown generation engine"):
        get_generator("tgi", str(tiny_model))
    with pytest.raises((RuntimeError, NotImplementedError), match="vllm engine"):
        get_generator("vllm", str(tiny_model))


@pytest.mark.integration
def test_real_model_converts_answers_and_is_fast(tmp_path: Path) -> None:
    from tao_spark.models import resolve_model

    set_torch_threads(2)
    t0 = time.perf_counter()
    path = resolve_model("smollm2-135m-instruct", str(tmp_path))
    convert_s = time.perf_counter() - t0
    files = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    assert "quantization_config" not in (Path(path) / "config.json").read_text()
    t0 = time.perf_counter()
    assert resolve_model("smollm2-135m-instruct", str(tmp_path)) == path  # converted once
    assert time.perf_counter() - t0 < 0.1
    t0 = time.perf_counter()
    g = TransformersGenerator(path)
    load_s = time.perf_counter() - t0

    (answer,), *_ = g.generate([[{"role": "user", "content": "What is 2+2?"}]], n=1, temperature=0.0, top_p=1.0,
                               max_new_tokens=32, seeds=[0])
    assert "4" in answer.text and answer.finish_reason == "stop"

    # Four prompts of different lengths (padding in the batch); speed is measured in bench/, not here.
    questions = ["What is 2+2?", "Name three colors.", "Give me a word that rhymes with cat.",
                 "Write one sentence about dogs."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    t0 = time.perf_counter()
    outs = g.generate(chats, n=2, temperature=0.8, top_p=0.95, max_new_tokens=48, seeds=list(range(len(chats))))
    sample_s = time.perf_counter() - t0
    tokens = sum(c.tokens for o in outs for c in o)
    print(f"\nconvert {convert_s:.1f} s, load {load_s:.1f} s, sampling {tokens} tokens in {sample_s:.1f} s "
          f"(n=2, {len(chats)} prompts, 2 threads)", file=sys.stderr)
    assert all(len(o) == 2 for o in outs) and tokens > 0

    # The real model's 30 layers of grouped-query attention through the decode kernel: the same greedy answers
    # as transformers' own generate with SDPA, to the token, over answers long enough for rounding to show.
    greedy = g.generate(chats, n=1, temperature=0.0, top_p=1.0, max_new_tokens=64, seeds=[0] * len(chats))
    assert [o[0].text for o in greedy] == reference_greedy(path, g, chats, 64)


def test_batch_size_auto_sizes_streams_to_free_memory(tiny_model: Path) -> None:
    """``batch_size: auto`` keeps the CPU's default off CUDA and, on a card, fits each stream's KV cache and logits
    in the free memory (the arithmetic checked here with SmolLM2-135M's shape; the card's figure in bench/)."""
    from tao_spark.config import load_config
    from tao_spark.engines import AUTO_MAX_STREAMS, CPU_STREAMS, auto_streams

    assert TransformersGenerator(str(tiny_model), batch_size="auto").batch_size == CPU_STREAMS
    assert load_config(None, ["generate.batch_size=auto"]).generate.batch_size == "auto"
    kv = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64 in bfloat16: 23,040 bytes a token
    per_stream = kv * 1024 + 8 * 49152
    assert auto_streams(10 * 2**30, kv, 1024, 49152) == int(10 * 2**30 * 0.8) // per_stream == 358
    assert auto_streams(200 * 2**30, kv, 1024, 49152) == AUTO_MAX_STREAMS and auto_streams(1, kv, 1024, 49152) == 1
