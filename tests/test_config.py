"""Config: every conf/*.yaml loads, dotted overrides apply, bad values fail naming their dotted key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tao_spark.config import Config, ConfigError, GenerateConfig, RewardSpec, default_config_path, load_config

CONF = Path(__file__).resolve().parent.parent / "conf"
YAMLS = sorted(CONF.glob("*.yaml"))


def test_conf_dir_has_yaml_files() -> None:
    assert CONF / "local.yaml" in YAMLS


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_conf_yaml_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for f in dataclasses.fields(cfg):  # every section is built into its dataclass, none left as a dict
        value = getattr(cfg, f.name)
        assert not isinstance(value, dict), f.name
    assert all(isinstance(r, RewardSpec) for r in cfg.score.rewards)
    assert cfg.digest() == load_config(path).digest()


def test_local_yaml_values_reach_the_dataclasses() -> None:
    raw = yaml.safe_load((CONF / "local.yaml").read_text())
    cfg = load_config(CONF / "local.yaml")
    assert cfg.spark.shuffle_partitions == raw["spark"]["shuffle_partitions"]
    assert cfg.spark.remote is None  # embedded Sail
    assert [(r.name, r.fn, r.weight) for r in cfg.score.rewards] == [
        (r["name"], r["fn"], pytest.approx(r["weight"])) for r in raw["score"]["rewards"]]


def test_overrides_apply_over_the_file() -> None:
    cfg = load_config(CONF / "local.yaml", [
        "generate.n=8",
        "train.trl.learning_rate=1e-5",
        "train.trl.lr_scheduler_kwargs.min_lr=0",
        "train.merge=false",
        "ingest.max_prompt_chars=8000",
        "ingest.default_task=support",
    ])
    assert cfg.generate.n == 8 and type(cfg.generate.n) is int
    lr = cfg.train.trl["learning_rate"]
    assert type(lr) is float and lr == pytest.approx(1e-5)
    assert cfg.train.trl["lr_scheduler_kwargs"] == {"min_lr": 0}
    assert cfg.train.merge is False
    assert cfg.ingest.max_prompt_chars == 8000
    assert cfg.ingest.default_task == "support"
    file_value = yaml.safe_load((CONF / "local.yaml").read_text())["generate"]["temperature"]
    assert cfg.generate.temperature == pytest.approx(file_value)


def test_override_without_file_and_int_to_float() -> None:
    cfg = load_config(None, ["generate.temperature=1", "select.min_margin=0"])
    assert type(cfg.generate.temperature) is float and cfg.generate.temperature == 1.0
    assert cfg.select.min_margin == 0.0
    assert cfg.generate == dataclasses.replace(GenerateConfig(), temperature=1.0)


def test_a_spark_conf_override_keeps_its_dotted_key() -> None:
    # Spark's keys are dotted; after spark.conf. the rest is one key, as spark-submit's --conf takes it.
    cfg = load_config(None, ["spark.conf.spark.python.daemon.module=pyspark.daemon",
                             "spark.conf.spark.executor.memory=4g"])
    assert cfg.spark.conf["spark.python.daemon.module"] == "pyspark.daemon"
    assert cfg.spark.conf["spark.executor.memory"] == "4g"
    assert load_config(None, ["spark.shuffle_partitions=3"]).spark.shuffle_partitions == 3


def test_digest_follows_the_values() -> None:
    assert load_config(None, ["generate.n=8"]).digest() != load_config(None, ["generate.n=9"]).digest()


@pytest.mark.parametrize(("overrides", "key"), [
    (["generate.nn=3"], "generate.nn"),
    (["bogus.x=1"], "bogus"),
    (["generate.n=abc"], "generate.n"),
    (["generate.n=2.5"], "generate.n"),
    (["generate.n=true"], "generate.n"),
    (["train.lora_target_modules=q_proj"], "train.lora_target_modules"),
    (["train.trl=5"], "train.trl"),
    (["generate.top_p=1.5"], "generate.top_p"),
    (["generate.n=0"], "generate.n"),
    (["ingest.max_prompt_chars=0"], "ingest.max_prompt_chars"),
    (["ingest.max_json_depth=5000"], "ingest.max_json_depth"),
    (["spark.remote=http://x"], "spark.remote"),
    (["train.backend=deepspeed"], "train.backend"),
    (["score.rewards=[{name: a}]"], "score.rewards[0].fn"),
    (["score.rewards=[{name: a, fn: f, weight: heavy}]"], "score.rewards[0].weight"),
    (["score.rewards=[{name: a, fn: f}, {name: b, fn: g, colour: red}]"], "score.rewards[1].colour"),
    (["score.rewards=[{name: a, fn: f}, {name: a, fn: g}]"], "score.rewards"),
    (["score.rewards=[{name: my-reward, fn: f}]"], "score.rewards[0].name"),
    (["score.rewards=[{name: a_failed, fn: f}]"], "score.rewards[0].name"),
    (["generate"], "generate"),
    (["generate.batch_size=x"], "generate.batch_size"),  # int | "auto": one key, both types named
    (["generate.batch_size=-1"], "generate.batch_size"),
])
def test_invalid_values_name_the_dotted_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONF / "local.yaml", overrides)
    assert str(e.value).startswith(f"{key}:"), str(e.value)
    assert "\n" not in str(e.value)


def test_a_field_of_two_types_names_both() -> None:
    with pytest.raises(ConfigError, match=r"^generate\.batch_size: input should be a valid integer or input should "
                                          r"be 'auto', got 'x'$"):
        load_config(CONF / "local.yaml", ["generate.batch_size=x"])


def test_invalid_value_in_a_yaml_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  n: 4\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"^generate\.temprature: unknown key"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_home_and_lakehouse_follow_tao_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "h"))
    cfg = load_config(None)
    assert cfg.home == str(tmp_path / "h")
    assert cfg.lakehouse == str(tmp_path / "h" / "lakehouse")
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow.db'}"
    assert load_config(None, [f"lakehouse={tmp_path / 'l'}"]).lakehouse == str(tmp_path / "l")


def test_default_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAO_CONFIG", raising=False)
    assert default_config_path().resolve() == (CONF / "local.yaml").resolve()  # tao_spark/conf links to conf/
    monkeypatch.setenv("TAO_CONFIG", str(tmp_path / "other.yaml"))
    assert default_config_path() == tmp_path / "other.yaml"


@pytest.mark.parametrize("word", ["nan", "inf", "Infinity", "1_000x"])
def test_override_string_that_float_would_swallow_stays_a_string(word: str) -> None:
    assert load_config(None, [f"ingest.default_task={word}"]).ingest.default_task == word


def test_section_with_every_key_commented_out_means_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("spark:\n  # remote: sc://cluster:15002\ngenerate:\n  n: 2\n")
    cfg = load_config(p)
    assert cfg.spark.remote is None and cfg.generate.n == 2


def test_unity_catalog_model_names_are_checked_up_front() -> None:
    ok = load_config(None, ["mlflow.registry_uri=databricks-uc", "mlflow.model_name=main.tao.policy"])
    assert ok.registry_uri == "databricks-uc" and ok.mlflow.model_name == "main.tao.policy"
    for bad in ("tao-policy", "main.tao", "main.tao.tao-policy", "a.b.c.d"):
        with pytest.raises(ConfigError, match="mlflow.model_name: Unity Catalog needs a three-level name"):
            load_config(None, ["mlflow.registry_uri=databricks-uc", f"mlflow.model_name={bad}"])
    with pytest.raises(ConfigError, match="mlflow.model_name"):
        load_config(None, ["mlflow.model_name=main.tao"])  # dotted: meant for UC, so it must be three levels
    assert load_config(None, []).registry_uri == load_config(None, []).tracking_uri


def test_tao_config_prints_what_runs_and_its_schema_validates_every_shipped_config(tmp_path: Path, capsys) -> None:
    import json

    import jsonschema

    from tao_spark.cli import main

    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    conf = Path(__file__).resolve().parent.parent / "conf"
    for f in sorted(conf.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(f.read_text()), schema)
    # What an editor would flag, as load_config does: a misspelt key, a value of the wrong type, out of its bounds,
    # not one of its choices.
    for bad in ({"generate": {"temprature": 0.5}}, {"generate": {"n": "four"}}, {"gate": {"min_win_rate_low": []}},
                {"generate": {"n": 0}}, {"generate": {"top_p": 1.5}}, {"generate": {"engine": "tpu"}},
                {"score": {"rewards": [{"name": "a", "fn": "f", "weight": -1}]}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            load_config(_write(tmp_path / "bad.yaml", bad))

    gen = schema["$defs"]["GenerateConfig"]["properties"]
    assert gen["engine"]["enum"] == ["transformers", "vllm"] and gen["n"]["minimum"] == 1
    assert gen["n"]["description"] == "candidates sampled per prompt"  # each key's help, for an editor's hover
    # The resolved config, overrides applied, is itself a valid config file that loads back to the same config.
    assert main(["config", "generate.n=7", "train.trl.learning_rate=2e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    jsonschema.validate(printed, schema)
    assert printed["generate"]["n"] == 7 and printed["train"]["trl"]["learning_rate"] == 2e-4
    assert load_config(_write(tmp_path / "printed.yaml", printed)).to_dict() == printed


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path
