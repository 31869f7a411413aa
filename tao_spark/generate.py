"""Generate: sample N candidate answers per prompt with the current policy, fanned out over Spark.

    tao generate --round ROUND_ID
    generate.run(tables, rnd, cfg)      # the stage; generate.sample(...) for any prompts and policy,
    generate.sample_all(tables, [Request(...), ...], round_id=R)   # several requests, one pass

The engine is loaded once per Python worker (``tao_spark.engines.get_generator``) and each partition's
prompts go to it in batches (transformers) or in one call (vLLM batches continuously). Prompts are processed
in chunks, one Delta MERGE each, so a crashed run keeps what it finished and a re-run generates only the
prompts still missing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from tao_spark.config import Config, GenerateConfig, ModelConfig
from tao_spark.rounds import Generated, Round, StageResult, policy, split, versions
from tao_spark.tables import SCHEMAS, Tables, columns

log = logging.getLogger("tao.generate")

CANDIDATE_SCHEMA = SCHEMAS["candidates"]


@dataclass(frozen=True)
class Sampling:
    """What, besides the policy, decides a candidate: part of every row, so rows can be reused exactly. The dtype
    is part of it: bfloat16 weights give other answers than float32 ones."""

    engine: str
    dtype: str
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    greedy_answer: bool

    @classmethod
    def of(cls, cfg: GenerateConfig, dtype: str) -> Sampling:
        # Only where there are samples beside it: a greedy request's one answer is greedy anyway.
        greedy = cfg.greedy_answer and cfg.temperature > 0 and cfg.n > 1
        return cls(cfg.engine, dtype, cfg.n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed, greedy)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Per-prompt seed: a prompt's samples do not depend on which partition or batch it lands in."""
    return int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:12], 16)


def torch_threads(cfg: GenerateConfig) -> int:
    # Threads x concurrent partitions must not exceed the cores: oversubscribed CPU runs were 5-10x slower.
    return cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.partitions)


@dataclass(frozen=True)
class Job:
    """What a worker needs to generate one request's rows: picklable, unlike the request's DataFrame."""

    model_path: str
    dtype: str
    engine: str
    batch_size: int | str
    llm_args: dict[str, Any]
    sampling: Sampling
    purpose: str
    policy: str
    policy_id: str


def _generate_partition(batches: Iterator[pd.DataFrame], *, jobs: list[Job], threads: int, round_id: str
                        ) -> Iterator[pd.DataFrame]:
    """mapInPandas worker: prompts in (each with the index of its request in ``jobs``), one row per candidate out."""
    from tao_spark.engines import get_generator, set_torch_threads

    set_torch_threads(threads)
    for pdf in batches:
        for req, rows_of_req in pdf.groupby("req", sort=True):
            job = jobs[int(req)]
            gen = get_generator(job.engine, job.model_path, dtype=job.dtype, batch_size=job.batch_size,
                                llm_args=job.llm_args)
            yield from _generate_rows(gen, rows_of_req, job, round_id)


def _candidates(gen: Any, chats: list[Any], seeds: list[int], s: Sampling) -> list[list[Any]]:
    """A prompt's ``s.n`` candidates; with ``s.greedy_answer``, candidate 0 of a prompt that asks for a short final
    answer is the greedy one.

    Why: on the project's arithmetic prompts SmolLM2-135M's greedy answer is right 12% of the time and its samples at
    temperature 0.9 3%, so a pair of two samples carries no correctness signal (chosen right 2 of 68, rejected 1);
    with the greedy answer it carries some (chosen right 11 of 90, rejected 1: ``bench/answer_pairs.py``).

    The samples are drawn as without it (same seeds) and candidate 0's sample is replaced, so candidates 1..n-1 do
    not depend on the setting; the one wasted stream per answer-type prompt buys that.
    """
    outs = gen.generate(chats, n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                        seeds=seeds)
    if not s.greedy_answer:
        return outs
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.verifiers import asks_short_answer

    asked = [i for i, chat in enumerate(chats) if asks_short_answer(reward_text(chat))]
    if asked:
        greedy = gen.generate([chats[i] for i in asked], n=1, temperature=0.0, top_p=1.0,
                              max_new_tokens=s.max_new_tokens, seeds=[seeds[i] for i in asked])
        for i, g in zip(asked, greedy, strict=True):
            outs[i] = [g[0], *outs[i][1:]]
    return outs


def _generate_rows(gen: Any, pdf: pd.DataFrame, job: Job, round_id: str) -> Iterator[pd.DataFrame]:
    sampling, sampling_json = job.sampling, job.sampling.to_json()
    # The engine's own batch size; vLLM's is None: the whole batch in one call, scheduled by vLLM.
    step = gen.batch_size or max(len(pdf), 1)
    for start in range(0, len(pdf), step):
        part = pdf.iloc[start:start + step]
        chats = [json.loads(m) for m in part["messages_json"]]
        seeds = [prompt_seed(sampling.seed, pid) for pid in part["prompt_id"]]
        outs = _candidates(gen, chats, seeds, sampling)
        now = datetime.now(UTC)
        rows = [
            {"round_id": round_id, "purpose": job.purpose, "prompt_id": pid, "candidate_idx": i, "task": task,
             "completion": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason, "policy": job.policy,
             "policy_id": job.policy_id, "sampling": sampling_json, "seed": seed, "reused_from": None,
             "created_at": now}
            for pid, task, seed, cands in zip(part["prompt_id"], part["task"], seeds, outs, strict=True)
            for i, c in enumerate(cands)
        ]
        yield pd.DataFrame(rows, columns=columns("candidates"))


@dataclass
class GenerateResult:
    prompts: int
    generated_prompts: int
    candidates: int
    tokens: int
    seconds: float
    reused: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def run(tables: Tables, rnd: Round, cfg: Config) -> StageResult:
    """The generate stage: ``generate.n`` candidates for each of the round's training prompts, sampled by the
    round's policy; candidates an earlier round made with the same policy and sampling are reused."""
    train, holdout = split(tables, rnd, cfg)
    uri, path, pid = policy(cfg, rnd.base_model)
    # The round's policy (the champion when loop.start_from is champion) is what the rows record as theirs.
    res = sample(tables, train, round_id=rnd.round_id, purpose="train", model=dataclasses.replace(cfg.model, path=uri),
                 model_path=path, policy_id=pid, cfg=cfg.generate)
    if cfg.generate.mend:
        add_mends(tables, train, round_id=rnd.round_id)
    cands = tables.read("candidates").where((F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train"))
    # Tokens and the length cap are the sampler's: a mend generated nothing. One job for every count (each job is
    # a fixed cost on a cluster).
    sampled, is_mend = F.col("finish_reason") != "mend", F.col("finish_reason") == "mend"
    agg = cands.agg(F.count("*").alias("n"), F.sum(F.when(sampled, F.col("tokens"))).alias("tok"),
                    F.avg(F.when(sampled, (F.col("finish_reason") == "length").cast("double"))).alias("capped"),
                    F.count(F.when(F.col("reused_from").isNotNull(), 1)).alias("reused"),
                    F.count(F.when(is_mend, 1)).alias("mended")).first()
    reused, mended = int(agg.reused), int(agg.mended)
    log.info(f"tao: generate[train]: {mended} mended candidates (samples edited to meet an instruction they missed)")
    return StageResult(
        fields={"policy_id": pid, "n_train": res.prompts, "n_holdout": holdout.count(),
                "n_prompts": tables.read("prompts", version=rnd.prompts_version).count(),
                "reused_candidates": reused, "new_candidates": agg.n - reused - mended},
        record=Generated(candidates=agg.n, candidates_reused=reused, candidates_new=agg.n - reused - mended,
                         candidates_mended=mended, tokens_generated=agg.tok or 0, candidates_length_capped=agg.capped,
                         generate_tokens_per_s_last_run=res.tokens_per_second),
        versions=versions(tables, "candidates"),
    )


# With generate.batch_size: auto the driver cannot see the executors' cards: chunks are sized as for this many streams.
AUTO_CHUNK_STREAMS = 256


@dataclass(frozen=True)
class Request:
    """Candidates of one policy for some prompts, under one purpose: what ``sample_all`` generates."""

    prompts: DataFrame  # prompt_id, task, messages at least
    purpose: str
    model: ModelConfig
    model_path: str
    policy_id: str
    cfg: GenerateConfig

    def job(self) -> Job:
        return Job(self.model_path, self.model.dtype, self.cfg.engine, self.cfg.batch_size, self.cfg.vllm_args(),
                   Sampling.of(self.cfg, self.model.dtype), self.purpose, self.model.path, self.policy_id)


def sample(
    tables: Tables, prompts: DataFrame, *, round_id: str, purpose: str, model: ModelConfig, model_path: str,
    policy_id: str, cfg: GenerateConfig, chunk_prompts: int | None = None,
) -> GenerateResult:
    """Generate ``cfg.n`` candidates for every prompt of ``prompts`` that this round does not have yet.

    ``prompts`` has at least prompt_id, task and messages. Returns counts for this call (0 when all done).
    """
    return sample_all(tables, [Request(prompts, purpose, model, model_path, policy_id, cfg)], round_id=round_id,
                      chunk_prompts=chunk_prompts)[0]


def sample_all(tables: Tables, requests: list[Request], *, round_id: str, chunk_prompts: int | None = None
               ) -> list[GenerateResult]:
    """``sample`` for several requests (the evaluation's two models, greedy and sampled) in as few Spark passes as
    the engine allows: each pass is one job and one commit per chunk, where a request apiece cost seconds of fixed
    work on a cluster. vLLM keeps one model loaded, so its requests share a pass only with the same model's."""
    if len({r.purpose for r in requests}) < len(requests):
        raise ValueError("sample_all: one request per purpose")
    tables.ensure("candidates")
    # Every request's look in the same few jobs (its prompts, what the round has, what earlier rounds made with the
    # same policy): a look per request was three jobs apiece, each seconds of fixed work on a cluster.
    wanted, missing = _missing(tables, requests, round_id)
    reused = _reuse(tables, requests, missing, round_id=round_id)
    todos: list[tuple[DataFrame, list[str]]] = []
    results = []
    for i, r in enumerate(requests):
        if reused[i]:
            log.info(f"tao: generate[{r.purpose}]: reused {sum(reused[i].values())} candidates of "
                     f"{len(reused[i])} prompts from earlier rounds (same policy, sampling and seed)")
        ids = sorted(missing[i] - reused[i].keys())
        if not ids:
            log.info(f"tao: generate[{r.purpose}]: all {len(wanted[i])} prompts have candidates")
        todo = r.prompts.select("prompt_id", "task", F.to_json("messages").alias("messages_json"))
        todos.append((todo, ids))
        results.append(GenerateResult(len(wanted[i]), len(ids), 0, 0, 0.0, sum(reused[i].values())))
    passes: dict[Any, list[int]] = {}
    for i, r in enumerate(requests):
        if todos[i][1]:
            passes.setdefault(r.model_path if r.cfg.engine == "vllm" else None, []).append(i)
    for members in passes.values():
        _one_pass(tables, requests, todos, members, results, round_id=round_id, chunk_prompts=chunk_prompts)
    return results


def _one_pass(tables: Tables, requests: list[Request], todos: list[tuple[DataFrame, list[str]]], members: list[int],
              results: list[GenerateResult], *, round_id: str, chunk_prompts: int | None) -> None:
    """Generate the missing prompts of ``requests[members]`` in one mapInPandas pass per chunk, one MERGE each."""
    cfg = requests[members[0]].cfg  # partitions and threads: the round's generate section, shared
    jobs = [r.job() for r in requests]
    worker = functools.partial(_generate_partition, jobs=jobs, threads=torch_threads(cfg), round_id=round_id)

    def chunk_of(r: Request) -> int:
        # A chunk is one Spark job and one commit: small enough to lose little on a crash, large enough that every
        # partition gets whole batches.
        batch = AUTO_CHUNK_STREAMS if r.cfg.batch_size == "auto" else r.cfg.batch_size  # auto: sized on the executor
        return r.cfg.partitions * max(1, int(batch) // (r.cfg.n if r.cfg.temperature > 0 else 1)) * 2

    chunk = chunk_prompts or min(chunk_of(requests[i]) for i in members)
    items = [(i, pid) for i in members for pid in todos[i][1]]
    label = "+".join(requests[i].purpose for i in members)
    by_purpose = {requests[i].purpose: i for i in members}
    t0 = time.perf_counter()
    tokens = cands = 0
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        srcs = [todos[i][0].where(F.col("prompt_id").isin([p for j, p in part if j == i])).withColumn("req", F.lit(i))
                for i in dict.fromkeys(j for j, _ in part)]
        src = functools.reduce(DataFrame.unionByName, srcs).repartition(min(cfg.partitions, len(part)))
        # Materialise the chunk once, then MERGE from those rows: a MERGE whose source is the UDF may
        # evaluate its source twice (delta-spark does), which would sample twice. A chunk is small.
        rows = src.mapInPandas(worker, CANDIDATE_SCHEMA).toPandas()
        tables.merge("candidates", tables.frame("candidates", rows))
        tokens += int(rows["tokens"].sum())
        cands += len(rows)
        for purpose, got in rows.groupby("purpose"):
            res = results[by_purpose[str(purpose)]]
            res.candidates += len(got)
            res.tokens += int(got["tokens"].sum())
        el = time.perf_counter() - t0
        log.info(f"tao: generate[{label}]: {min(start + chunk, len(items))}/{len(items)} prompts, {cands} "
                 f"candidates, {tokens / el:.0f} tokens/s")
    for i in members:
        results[i].seconds = time.perf_counter() - t0


def _mend_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas worker: sampled candidates in, their mends out (``rewards.mend``), one row per mended sample."""
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.mend import mend

    for pdf in batches:
        rows = []
        for r in pdf.itertuples(index=False):
            got = mend(reward_text(json.loads(r.messages_json)), r.completion)
            if got is None:
                continue
            text, kinds = got
            rows.append({**{c: getattr(r, c) for c in columns("candidates")}, "candidate_idx": r.mend_idx,
                         "completion": text, "finish_reason": "mend", "reused_from": None,  # made here, now
                         # The source's token count scaled by length: select orders equal scores by it.
                         "tokens": max(1, round(r.tokens * len(text) / max(len(r.completion), 1))),
                         "sampling": json.dumps({"mend_of": int(r.candidate_idx), "kinds": list(kinds)}),
                         "created_at": datetime.now(UTC)})
        yield pd.DataFrame(rows, columns=columns("candidates"))


# A mend's index: its source's plus this, clear of any sample index whatever generate.n is or later becomes.
MEND_OFFSET = 10_000


def add_mends(tables: Tables, prompts: DataFrame, *, round_id: str) -> int:
    """Add the mend of each training sample that an edit of its own text brings closer to its prompt's
    instructions (``rewards.mend``: case, commas, an opening or closing phrase, a word limit, bullets...) as a
    candidate of the round: index ``MEND_OFFSET +`` its source's, ``finish_reason`` ``mend``, its source and edits in
    ``sampling``. Scored and selected like any candidate, a mend is the chosen side its source could not be. A re-run
    inserts only mends not yet there. Returns how many this call added."""
    this = (F.col("round_id") == round_id) & (F.col("purpose") == "train")
    cands = tables.read("candidates").where(this)
    src = (cands.where(F.col("finish_reason") != "mend")
           .join(prompts.select("prompt_id", F.to_json("messages").alias("messages_json")), "prompt_id")
           .withColumn("mend_idx", F.col("candidate_idx") + F.lit(MEND_OFFSET)))
    rows = src.mapInPandas(_mend_partition, CANDIDATE_SCHEMA).toPandas()
    return tables.merge("candidates", tables.frame("candidates", rows)) if len(rows) else 0


def _missing(tables: Tables, requests: list[Request], round_id: str) -> tuple[list[set[str]], list[set[str]]]:
    """Per request, its prompt ids and those of them this round does not yet have all ``n`` candidates of."""
    asked = functools.reduce(DataFrame.unionByName, [r.prompts.select("prompt_id", F.lit(i).alias("req"))
                                                     for i, r in enumerate(requests)])
    wanted: list[set[str]] = [set() for _ in requests]
    for row in asked.collect():
        wanted[row.req].add(row.prompt_id)
    have = (tables.read("candidates")
            .where((F.col("round_id") == round_id) & F.col("purpose").isin([r.purpose for r in requests])
                   & (F.col("finish_reason") != "mend"))
            .groupBy("purpose", "prompt_id").count().collect())
    n = {r.purpose: r.cfg.n for r in requests}
    done: dict[str, set[str]] = {r.purpose: set() for r in requests}
    for row in have:
        if row["count"] >= n[row.purpose]:
            done[row.purpose].add(row.prompt_id)
    return wanted, [wanted[i] - done[r.purpose] for i, r in enumerate(requests)]


def _reuse(tables: Tables, requests: list[Request], missing: list[set[str]], *, round_id: str
           ) -> list[dict[str, int]]:
    """Copy candidates that an earlier round generated with the same policy, sampling and seed, for every
    request's missing prompts at once; returns per request the prompts served this way and their rows.

    Seeds derive from (seed, prompt_id), so those rows are exactly what generating again would give.
    Only original rows are copied (never copies of copies), from the earliest round that has all n.
    """
    out: list[dict[str, int]] = [{} for _ in requests]
    keys = [(i, pid, r.policy_id, Sampling.of(r.cfg, r.model.dtype).to_json(), r.cfg.n, r.purpose)
            for i, r in enumerate(requests) for pid in sorted(missing[i])]
    if not keys:
        return out
    want = tables.spark.createDataFrame(keys, "req int, prompt_id string, policy_id string, sampling string, "
                                              "n int, dst_purpose string")
    src = (tables.read("candidates").where(F.col("reused_from").isNull())
           .join(want, ["prompt_id", "policy_id", "sampling"])
           .where(~((F.col("round_id") == round_id) & (F.col("purpose") == F.col("dst_purpose")))))
    complete = (src.groupBy("req", "prompt_id", "round_id", "purpose", "n").count()
                .where(F.col("count") >= F.col("n")))
    first = Window.partitionBy("req", "prompt_id").orderBy("round_id", "purpose")
    pick = (complete.withColumn("rk", F.row_number().over(first)).where("rk = 1")
            .select("req", "prompt_id", "round_id", "purpose", "count"))
    # Nothing to copy is the common case (a first round, a new policy): a look costs one job, a MERGE a dozen.
    picked = pick.collect()
    if not picked:
        return out
    for row in picked:
        out[row.req][row.prompt_id] = int(row["count"])
    rows = (src.join(pick.drop("count"), ["req", "prompt_id", "round_id", "purpose"])
            .withColumn("reused_from", F.concat_ws("/", "round_id", "purpose"))
            .withColumn("round_id", F.lit(round_id)).withColumn("purpose", F.col("dst_purpose"))
            .select(*columns("candidates")))
    tables.merge("candidates", rows)
    return out
