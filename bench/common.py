"""What every benchmark shares: the model, the bundled prompts, the default rewards, and a machine description."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tao_spark" / "data" / "prompts.jsonl"


def home() -> str:
    return os.environ.get("TAO_HOME") or str(ROOT / ".tao")


def model_path(tiny: bool = False) -> str:
    """The real SmolLM2-135M-Instruct (converted once under $TAO_HOME), or a tiny random model for smoke runs."""
    if tiny:
        sys.path.insert(0, str(ROOT))
        from tests.tiny import make_tiny_model

        out = Path(home()) / "models" / "bench-tiny"
        return str(out if (out / "config.json").exists() else make_tiny_model(out))
    from tao_spark.models import resolve_model

    return resolve_model("smollm2-135m-instruct", home())


def prompts(n: int) -> list[dict[str, Any]]:
    """The first ``n`` bundled prompts as (prompt_id, task, messages) rows, cycling if ``n`` exceeds the file."""
    recs = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    rows = []
    for i in range(n):
        r = recs[i % len(recs)]
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        rows.append({"prompt_id": f"{r['id']}#{i // len(recs)}", "task": r["task"], "messages": msgs})
    return rows


def reward_specs() -> list[Any]:
    """The rewards conf/local.yaml configures, read from it: the benchmarks measure the default."""
    from tao_spark.config import load_config

    return list(load_config(ROOT / "conf" / "local.yaml").score.rewards)


def machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE")
                                                                  * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(result: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(result, default=str))