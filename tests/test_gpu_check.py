"""bench/gpu_check.sh on CPU: the plan, a full run on the tiny model, and the fallback model it builds itself.

The runs block pyspark, vllm and deepspeed (None in sys.modules, set by a sitecustomize), as on the GPU machine,
where they are absent: what gpu_check imports of tao_spark must work without pyspark.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tao_spark.config import load_config

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("pyspark", "vllm", "deepspeed")
STAGES = ["generate transformers", "anchor generate dynamic", "anchor generate static", "engine / anchors",
          "generate vllm", "score", "train deepspeed-zero2", "train plain"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    hooks = tmp_path_factory.mktemp("no-spark")
    # None in sys.modules: `import pyspark` raises ModuleNotFoundError and find_spec says absent, as on that machine.
    (hooks / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n")
    return {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hooks), "TOKENIZERS_PARALLELISM": "false"}


def check(env: dict[str, str], *args: str) -> tuple[str, dict[str, str]]:
    """Run the script; return its output and the table's status per stage."""
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    table = {s: line for line in lines[header + 1:header + 1 + len(STAGES)] for s in STAGES if line.startswith(s + " ")}
    assert list(table) == STAGES, proc.stdout
    return proc.stdout, table


def test_dry_run_prints_the_plan(env: dict[str, str]) -> None:
    out, table = check(env, "--dry-run", "--wheels", "/nonexistent-wheels")
    assert "no .whl or .tar.gz in /nonexistent-wheels" in out
    assert "vllm no, deepspeed no" in out and "pyspark no" in out
    assert "would run" in table["generate transformers"] and "would run" in table["score"]
    assert "skipped: vllm not importable" in table["generate vllm"]
    assert "skipped: needs a CUDA device" in table["train deepspeed-zero2"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or __import__("torch").cuda.is_available(),
                    reason="the CPU run; on a GPU machine run bench/gpu_check.sh itself")
def test_cpu_run_on_the_tiny_model(env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    out, table = check(env, "--model", str(tiny_model), "--prompts", "3", "--n", "2", "--max-new-tokens", "6",
                       "--train-steps", "2", "--out", str(tmp_path))
    assert table["generate transformers"].split()[2] == "cpu"
    assert "tokens/s" in table["generate transformers"] and "  ok (load" in table["generate transformers"]
    # The library underneath, on the same prompts and sampling, and the engine's rate as a ratio of each.
    assert "tokens/s" in table["anchor generate dynamic"] and "ok (warm)" in table["anchor generate dynamic"]
    assert "ok (eager (no compile off CUDA))" in table["anchor generate static"]
    assert re.search(r"ok \(the engine's tokens/s: [\d.]+x dynamic, [\d.]+x static\)", table["engine / anchors"])
    assert "skipped: vllm not importable" in table["generate vllm"]
    n_rewards = len(load_config(Path(__file__).resolve().parent.parent / "conf" / "local.yaml").score.rewards)
    assert "samples/s" in table["score"] and f"ok ({n_rewards} rewards" in table["score"]
    assert "skipped: needs a CUDA device" in table["train deepspeed-zero2"]
    assert "ok (2 DPO steps" in table["train plain"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["stage"] for r in results["rows"]] == STAGES
    assert results["versions"]["torch"] and results["settings"]["n"] == 2 and results["commit"]
    assert (tmp_path / "train-plain" / "adapter" / "adapter_config.json").is_file()


def test_fallback_model_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --model the check builds a tiny random model whose tokenizer carries a chat template."""
    from tao_spark.engines import TransformersGenerator

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks its module up there
    spec.loader.exec_module(gpu_check)
    model = gpu_check.build_tiny_model(tmp_path / "tiny")
    outs = TransformersGenerator(str(model)).generate(gpu_check.load_chats(2), n=2, temperature=1.0, top_p=1.0,
                                                      max_new_tokens=5, seeds=[0, 1])
    assert [len(o) for o in outs] == [2, 2] and all(1 <= c.tokens <= 5 for o in outs for c in o)
