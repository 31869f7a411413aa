"""A whole TAO round on real Spark (Sail), Delta and MLflow with a tiny model; crash and resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from pyspark.sql import functions as F

from tao_spark import generate, loop
from tao_spark.config import load_config
from tao_spark.data import SAMPLE_PROMPTS
from tao_spark.ingest import ingest
from tao_spark.tables import Tables

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _overrides(home: Path, model: Path) -> list[str]:
    return [
        f"home={home}", f"model.path={model}", "generate.n=3", "generate.max_new_tokens=12", "generate.max_prompts=10",
        "generate.batch_size=4", "generate.temperature=1.0", "evaluate.max_prompts=6", "evaluate.max_new_tokens=12",
        "evaluate.bootstrap=200", "select.min_margin=0.0", "train.trl.max_steps=3",
        "train.trl.per_device_train_batch_size=2", "train.trl.learning_rate=0.001", "mlflow.experiment=test",
    ]


def e_rate(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that tells a random tiny model's samples apart (the built-in checks all fail on noise)."""
    return [c.count("e") / max(1, len(c)) for c in completions]


def _config_file(tmp: Path) -> Path:
    """conf/local.yaml plus a reward that varies on noise, as a file a subprocess can read too."""
    data = yaml.safe_load((ROOT / "conf" / "local.yaml").read_text())
    data["score"]["rewards"].append({"name": "e_rate", "fn": "tests.test_round:e_rate", "weight": 1.0})
    path = tmp / "conf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sample(tmp: Path, n: int = 60) -> Path:
    lines = SAMPLE_PROMPTS.read_text().splitlines()[:n]
    out = tmp / "sample.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_round_end_to_end(spark, tmp_path, tiny_model):
    cfg = load_config(_config_file(tmp_path), _overrides(tmp_path / "home", tiny_model))
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_sample(tmp_path)], cfg.ingest)
    rnd = loop.run_round(tables, cfg)

    assert rnd.status == "done" and rnd.n_train == 10 and rnd.n_holdout == 6
    # Coverage was measured before generating: every prompt of the snapshot, and e_rate reads them all.
    cov = rnd.metrics["coverage"]
    assert cov["prompts"] == 60 and cov["prompts_version"] == rnd.prompts_version
    assert all(t["floor_only"] == 0 and t["rewards"]["e_rate"] == t["prompts"] for t in cov["tasks"].values())
    cands = tables.read("candidates").where(F.col("purpose") == "train")
    sampled = cands.where(F.col("finish_reason") != "mend")
    assert sampled.count() == 10 * 3
    assert sampled.select("round_id", "prompt_id", "candidate_idx").distinct().count() == 30
    assert {r.policy_id for r in cands.select("policy_id").distinct().collect()} == {rnd.policy_id}
    # Mends: a sample edited to meet a format instruction it missed, indexed after the samples, naming its source.
    by_key = {(r.prompt_id, r.candidate_idx): r for r in sampled.collect()}
    mends = cands.where(F.col("finish_reason") == "mend").collect()
    assert mends and len(mends) == rnd.metrics["candidates_mended"]
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.verifiers import instruction_following

    texts = {r.prompt_id: reward_text([m.asDict() for m in r.messages]) for r in tables.read("prompts").collect()}
    for m in mends:
        src = by_key[(m.prompt_id, json.loads(m.sampling)["mend_of"])]
        assert m.candidate_idx == src.candidate_idx + generate.MEND_OFFSET and m.completion != src.completion
        assert instruction_following([texts[m.prompt_id]], [m.completion]) > \
            instruction_following([texts[m.prompt_id]], [src.completion])

    scores = tables.read("scores").where(F.col("purpose") == "train")
    names = {r.reward_name for r in scores.select("reward_name").distinct().collect()}
    assert names == {r.name for r in cfg.score.rewards} | {"combined"}
    assert scores.count() == (30 + len(mends)) * len(names)

    prefs = tables.read("preferences").collect()
    assert len(prefs) == rnd.metrics["pairs"] > 0
    assert all(p.chosen_score > p.rejected_score and p.chosen != p.rejected for p in prefs)

    evals = tables.read("evaluations").collect()
    assert len(evals) == 6 and {e.winner for e in evals} <= {"challenger", "champion", "tie"}
    ev = rnd.evaluation()  # the typed record the gate decided on, read back from `rounds`
    assert ev and 0.0 <= ev.overall.win_rate_low <= ev.overall.win_rate <= ev.overall.win_rate_high
    assert ev.overall.prompts == len(evals) and set(ev.per_task) == {e.task for e in evals}
    # The held-out prompts that ask for a short answer were sampled k times per arm, for the consistency check.
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.verifiers import asks_short_answer

    held = tables.read("prompts").where(F.col("prompt_id").isin([e.prompt_id for e in evals])).collect()
    asked = {r.prompt_id for r in held if asks_short_answer(reward_text([m.asDict() for m in r.messages]))}
    samples = tables.read("candidates").where(F.col("purpose").endswith("_samples"))
    per = samples.groupBy("purpose", "prompt_id").count().collect()
    assert asked and {r.prompt_id for r in per} == asked and ev.overall.consistency_prompts == len(asked)
    assert {r.purpose for r in per} == {"eval_challenger_samples", "eval_champion_samples"}
    assert {r["count"] for r in per} == {cfg.evaluate.consistency_samples}
    assert 0 <= ev.overall.challenger_consistency <= 1 and ev.overall.consistency_drop_low is not None

    # A row appended to round_stages per stage, the round's row as each left it; `rounds` itself written twice
    # (start and done), not after every stage (each write there is a MERGE: seconds on a cluster).
    log_rows = tables.read("round_stages").where(F.col("round_id") == rnd.round_id).orderBy("recorded_at").collect()
    assert [r.stage for r in log_rows] == list(loop.STAGES)
    assert [r.status for r in log_rows] == [*list(loop.STAGES)[:-1], "done"] and all(r.seconds > 0 for r in log_rows)
    assert json.loads(log_rows[2].metrics)["pairs"] == rnd.metrics["pairs"]
    assert sum(h["operation"] == "MERGE" for h in tables.history("rounds")) == 2

    # MLflow: the run, the dataset lineage, the registered version and its aliases.
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient()
    run = client.get_run(rnd.mlflow_run_id)
    assert run.data.tags["tao.prompts_version"] == str(rnd.prompts_version)
    assert run.data.metrics["pairs"] == rnd.metrics["pairs"]
    assert run.data.metrics["eval_win_rate_low"] == pytest.approx(ev.overall.win_rate_low)  # MLflow: the same record
    # Every stage's typed record reads back from the saved row, agrees with the tables and MLflow, and a figure
    # renamed under the record's feet is a one-line error rather than a silent gap.
    from tao_spark.config import UserError
    from tao_spark.rounds import Generated, Scored, Selected, Trained, load

    saved = load(tables, rnd.round_id)
    gen, sel, trained = saved.record(Generated), saved.record(Selected), saved.record(Trained)
    assert gen.candidates == tables.read("candidates").where(
        (F.col("round_id") == rnd.round_id) & (F.col("purpose") == "train")).count()
    assert gen.candidates_mended == len(mends) and sel.pairs == len(prefs) and saved.record(Scored) is not None
    assert trained.steps == run.data.metrics["train_steps"] and len(trained.loss_history) >= 1
    broken = {**saved.metrics, "candidates_made": gen.candidates}
    del broken["candidates"]
    with pytest.raises(UserError, match=f"round {rnd.round_id}: its generated record does not validate"):
        dataclasses.replace(saved, metrics=broken).record(Generated)
    (ds,) = run.inputs.dataset_inputs
    source = json.loads(ds.dataset.source)
    assert source["path"].endswith("/prompts") and source["delta_table_version"] == rnd.prompts_version
    artifacts = {a.path for a in client.list_artifacts(rnd.mlflow_run_id)}
    assert {"adapter", "plots", "config.json"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(rnd.mlflow_run_id, "plots")}
    assert plots == {"reward_histogram.png", "win_rate_by_task.png", "reward_vs_length.png"}
    mv = client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger")
    assert str(mv.version) == rnd.model_version and mv.run_id == rnd.mlflow_run_id
    # The version is an MLflow model (a LoggedModel of the run) with a chat signature, loadable by pyfunc.
    assert mv.source.startswith("models:/m-")
    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.source_run_id == rnd.mlflow_run_id and logged.name == "model"
    policy = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}/{mv.version}")
    assert [i.name for i in policy.metadata.signature.inputs.inputs] == ["messages"]
    (answer,) = policy.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_tokens": 3})
    assert answer["object"] == "chat.completion" and 1 <= answer["usage"]["completion_tokens"] <= 3
    # Nothing that unpickles: the model's files and the run's adapter are safetensors, JSON, YAML and text.
    got = Path(mlflow.artifacts.download_artifacts(mv.source, dst_path=str(tmp_path / "mv")))
    got_adapter = Path(client.download_artifacts(rnd.mlflow_run_id, "adapter", str(tmp_path / "adapter")))
    files = [f for f in [*got.rglob("*"), *got_adapter.rglob("*")] if f.is_file()]
    assert {f.name for f in files} >= {"MLmodel", "model.safetensors", "adapter_model.safetensors"}
    assert not [f for f in files if f.suffix in (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")]
    if rnd.promoted:
        assert str(client.get_model_version_by_alias(cfg.mlflow.model_name, "champion").version) == rnd.model_version
    row = tables.read("rounds").where(F.col("round_id") == rnd.round_id).first()
    assert row.status == "done" and row.mlflow_run_id == rnd.mlflow_run_id and row.gate_reason

    # A/B before deploy: the held-out prompts replayed through a real server (openai client, X-User-Id per prompt),
    # the server's sticky split honoured, the baseline and the tuned version each on its arm, rewards scored.
    from tao_spark.serve import assign_arm, replay

    rep = replay(tables, cfg, share=0.5, max_tokens=4)
    assert rep["round_id"] == rnd.round_id and rep["prompts"] == len(evals) == len(rep["answers"])
    for a in rep["answers"]:
        assert a["arm"] == assign_arm(f"tao-ab-replay-{a['prompt_id']}", 0.5)
        assert a["version"] == (rnd.model_version if a["arm"] == "challenger" else a["version"])
        assert math.isfinite(a["reward"]) and 1 <= a["tokens"] <= 4
    assert sum(m["requests"] for m in rep["arms"].values()) == rep["prompts"]
    assert all(m["reward_low"] <= m["reward"] <= m["reward_high"] for m in rep["arms"].values() if m["requests"] > 1)
    if set(rep["arms"]) == {"champion", "challenger"}:
        assert rep["arms"]["champion"]["version"].startswith("path:")  # the round's baseline: the base model folder
        assert rep["difference"]["low"] <= rep["difference"]["reward"] <= rep["difference"]["high"]
    logged = client.get_run(rnd.mlflow_run_id).data.metrics
    assert {f"ab_replay_{arm}_reward" for arm in rep["arms"]} <= set(logged)
    assert "ab_replay.json" in {a.path for a in client.list_artifacts(rnd.mlflow_run_id)}

    # Re-running a finished stage is a no-op; the next round is compared against the champion when there is one.
    assert loop.run_stage(tables, rnd, "select", cfg).metrics["pairs"] == rnd.metrics["pairs"]
    assert tables.read("preferences").count() == len(prefs)
    extra = tmp_path / "one-more.jsonl"
    extra.write_text(json.dumps({"prompt": "One more question for the next round?"}) + "\n")
    ingest(spark, tables, [extra], cfg.ingest)
    nxt = loop.start(tables, cfg)
    champion = f"models:/{cfg.mlflow.model_name}@champion"
    assert nxt.baseline_model == (champion if rnd.promoted else cfg.model.path)
    assert nxt.base_model == cfg.model.path  # loop.start_from: base


def test_sft_labels_trains_on_the_references_of_training_prompts_only(spark, tmp_path, tiny_model, capsys):
    from tao_spark import train
    from tao_spark.config import ConfigError
    from tao_spark.rounds import folder, split

    refs = tmp_path / "references.jsonl"
    base = _overrides(tmp_path / "home", tiny_model)
    with pytest.raises(ConfigError, match="train.references"):
        load_config(_config_file(tmp_path), [*base, "train.method=sft_labels"])
    cfg = load_config(_config_file(tmp_path), [*base, "train.method=sft_labels", f"train.references={refs}",
                                                "train.trl.max_steps=2"])
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_sample(tmp_path)], cfg.ingest)
    rnd = loop.start(tables, cfg)
    train_rows, held = (part.select("prompt_id", "client_id").orderBy("prompt_id").collect()
                        for part in split(tables, rnd, cfg))
    # Three labels by the log line's id, one by prompt_id; a held-out prompt's label and an unknown id are not used.
    lines = [{"id": r.client_id, "reference": f"reference {i}"} for i, r in enumerate(train_rows[:3])]
    lines += [{"prompt_id": train_rows[3].prompt_id, "reference": "reference 3"},
              {"id": held[0].client_id, "reference": "held out"}, {"id": "no-such-line", "reference": "x"}]
    refs.write_text("".join(json.dumps(x) + "\n" for x in lines))

    res = train.run(tables, rnd, cfg)
    assert "sft_labels on 4 of 10 training prompts" in capsys.readouterr().err
    rows = [json.loads(x) for x in (folder(cfg, rnd) / "train" / "pairs.jsonl").read_text().splitlines()]
    assert sorted(r["completion"][0]["content"] for r in rows) == [f"reference {i}" for i in range(4)]
    assert res.metrics["train_steps"] == 2 and Path(res.fields["tuned_model"]).exists()

    refs.write_text('{"id": "instruct-0001"}\n')
    with pytest.raises(ValueError, match="references.jsonl:1: needs a string id"):
        train.run(tables, rnd, cfg)


def test_candidates_name_the_rounds_policy_and_reuse_keys_on_dtype(spark, tmp_path, tiny_model):
    """A round whose policy is not model.path (start_from: champion) records that policy on its candidates; the
    reuse key includes the dtype, so bfloat16 sampling never reuses float32 candidates."""
    import dataclasses
    import shutil

    from tao_spark.models import model_id

    cfg = load_config(_config_file(tmp_path), _overrides(tmp_path / "home", tiny_model) + ["generate.max_prompts=4"])
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_sample(tmp_path, 12)], cfg.ingest)
    other = tmp_path / "champion-copy"
    shutil.copytree(tiny_model, other)
    rnd = loop.start(tables, cfg)
    rnd.base_model = str(other)  # what loop.start sets when the round starts from a champion
    loop.run_stage(tables, rnd, "generate", cfg)
    # Mid-round, `rounds` still has the row as the round started; load, a resume and `tao status` see the stage.
    from tao_spark import rounds

    assert tables.read("rounds").where(F.col("round_id") == rnd.round_id).first().status == "started"
    assert rounds.load(tables, rnd.round_id).status == "generate" == rounds.latest_open(tables).status
    assert list(rounds.history(tables).status) == ["generate"]
    cands = tables.read("candidates").where(F.col("round_id") == rnd.round_id)
    assert {(r.policy, r.policy_id) for r in cands.select("policy", "policy_id").distinct().collect()} == {
        (str(other), model_id(str(other)))}

    prompts = tables.read("prompts").limit(3)
    common = {"tables": tables, "purpose": "train", "model_path": str(tiny_model), "policy_id": "p",
              "cfg": dataclasses.replace(cfg.generate, n=2)}
    fp32, bf16 = cfg.model, dataclasses.replace(cfg.model, dtype="bfloat16")
    assert generate.sample(prompts=prompts, round_id="ra", model=fp32, **common).reused == 0
    assert generate.sample(prompts=prompts, round_id="rb", model=bf16, **common).reused == 0
    assert generate.sample(prompts=prompts, round_id="rc", model=fp32, **common).reused == 6


def test_several_requests_in_one_pass_give_what_each_alone_gives(spark, tmp_path, tiny_model):
    """The evaluation's requests (two models, greedy and sampled) share one Spark pass and one commit per chunk;
    each request's rows are its own (purpose, policy, sampling, count), and its answers are the ones it gets
    alone. Two purposes are then scored in one pass as each is alone: the other model's answers never vote."""
    from tao_spark import score

    cfg = load_config(_config_file(tmp_path), _overrides(tmp_path / "home", tiny_model))
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_sample(tmp_path)], cfg.ingest)
    # Answer-type prompts: the rewards that compare a prompt's answers (self-consistency) read them.
    prompts = tables.read("prompts").where(F.col("task") == "arithmetic").orderBy("prompt_id").limit(4)
    fp32, bf16 = cfg.model, dataclasses.replace(cfg.model, dtype="bfloat16")  # two engines, as two models
    greedy = dataclasses.replace(cfg.generate, n=1, temperature=0.0, max_new_tokens=12)
    sampled = dataclasses.replace(cfg.generate, n=3, max_new_tokens=12)
    requests = [generate.Request(prompts, "eval_a", fp32, str(tiny_model), "pa", greedy),
                generate.Request(prompts.limit(2), "eval_b", bf16, str(tiny_model), "pb", sampled)]
    together = generate.sample_all(tables, requests, round_id="r-both")
    assert [(r.generated_prompts, r.candidates) for r in together] == [(4, 4), (2, 6)]
    for r in requests:
        generate.sample(tables, r.prompts, round_id="r-alone", purpose=r.purpose, model=r.model,
                        model_path=r.model_path, policy_id=r.policy_id, cfg=r.cfg)

    def rows(round_id: str) -> dict:
        got = tables.read("candidates").where(F.col("round_id") == round_id).collect()
        return {(c.purpose, c.prompt_id, c.candidate_idx): (c.completion, c.policy_id, c.sampling) for c in got}

    assert rows("r-both") == rows("r-alone") and len(rows("r-both")) == 10

    for round_id, purposes in (("r-both", [["eval_a", "eval_b"]]), ("r-alone", [["eval_a"], ["eval_b"]])):
        for p in purposes:
            score.score_candidates(tables, prompts, round_id=round_id, purpose=p, cfg=cfg.score)

    def values(round_id: str) -> dict:
        got = tables.read("scores").where(F.col("round_id") == round_id).collect()
        return {(s.purpose, s.prompt_id, s.candidate_idx, s.reward_name): s.value for s in got}

    assert values("r-both") == values("r-alone") and len(values("r-both")) == 10 * (len(cfg.score.rewards) + 1)


def test_greedy_answer_makes_candidate_0_the_policys_mode_on_answer_prompts(spark, tmp_path, tiny_model):
    """generate.greedy_answer: on a prompt that asks for a short answer, candidate 0 is the greedy answer (what a
    temperature-0 request gives) and candidates 1..n-1 are the samples drawn without the setting; other prompts'
    candidates are unchanged. The setting is part of the reuse key."""
    from tao_spark.rewards import reward_text
    from tao_spark.rewards.verifiers import asks_short_answer

    cfg = load_config(_config_file(tmp_path), _overrides(tmp_path / "home", tiny_model))
    tables = Tables(spark, cfg.lakehouse)
    ingest(spark, tables, [_sample(tmp_path)], cfg.ingest)
    prompts = tables.read("prompts").where(F.col("task").isin("arithmetic", "instruct")).orderBy("prompt_id").limit(8)
    asked = {r.prompt_id for r in prompts.select("prompt_id", F.to_json("messages").alias("m")).collect()
             if asks_short_answer(reward_text(json.loads(r.m)))}
    assert 0 < len(asked) < 8
    common = {"tables": tables, "prompts": prompts, "purpose": "train", "model": cfg.model,
              "model_path": str(tiny_model), "policy_id": "p"}
    on = dataclasses.replace(cfg.generate, n=3, greedy_answer=True)
    generate.sample(round_id="on", cfg=on, **common)
    generate.sample(round_id="off", cfg=dataclasses.replace(on, greedy_answer=False), **common)
    generate.sample(round_id="greedy", cfg=dataclasses.replace(on, n=1, temperature=0.0), **common)

    def rows(round_id: str) -> dict:
        got = tables.read("candidates").where(F.col("round_id") == round_id).collect()
        return {(c.prompt_id, c.candidate_idx): c.completion for c in got}

    got, off, greedy = rows("on"), rows("off"), rows("greedy")
    assert len(got) == len(off) == 24
    for (pid, idx), text in got.items():
        assert text == (greedy[(pid, 0)] if pid in asked and idx == 0 else off[(pid, idx)])
    assert any(got[(pid, 0)] != off[(pid, 0)] for pid in asked)
    # The reuse key tells the two apart: a later round with the setting off reuses "off"'s rows, not "on"'s.
    again = generate.sample(round_id="off2", cfg=dataclasses.replace(on, greedy_answer=False), **common)
    assert again.reused == 24 and rows("off2") == off
