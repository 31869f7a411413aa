"""Build the sample Model Serving inference table: ``acme_assistant_payload/`` (a Delta table) beside this file.

    python -m tao_spark.data.build_inference_table

The rows follow the AI Gateway payload schema of Databricks inference tables (``PAYLOAD_SCHEMA``): chats built
from the bundled prompt log (some multi-turn, some with OpenAI content parts or a trailing assistant prefill,
a few asked twice), mixed with the rows a real endpoint logs and TAO must not learn from: failed requests,
oversize payloads the gateway did not log, unparsable bodies, completions, embeddings and Responses-API
requests. Change Data Feed is on, as on Databricks. Content is a pure function of the seed; a test checks
that rebuilding gives the same rows.
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

HERE = Path(__file__).resolve().parent
OUT = HERE / "acme_assistant_payload"
PROMPTS = HERE / "prompts.jsonl"

PAYLOAD_SCHEMA = pa.schema([
    ("databricks_request_id", pa.string()), ("client_request_id", pa.string()), ("request_date", pa.date32()),
    ("request_time", pa.timestamp("us", tz="UTC")), ("status_code", pa.int32()), ("sampling_fraction", pa.float64()),
    ("execution_duration_ms", pa.int64()), ("request", pa.string()), ("response", pa.string()),
    ("logging_error_codes", pa.list_(pa.string())), ("served_entity_id", pa.string()), ("requester", pa.string()),
])
GOOD = 240  # chats from the prompt log
START = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
ENTITY = "3f6c2a1e-acme-smollm2-135m"


def _chat(line: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" in line:
        return [dict(m) for m in line["messages"]]
    return [{"role": "user", "content": line["prompt"]}]


def _body(messages: list[dict[str, Any]], rng: random.Random) -> str:
    return json.dumps({"messages": messages, "max_tokens": rng.choice([128, 256, 512]),
                       "temperature": rng.choice([0.0, 0.7, 1.0])}, ensure_ascii=False)


def _response(text: str) -> str:
    return json.dumps({"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})


def rows(seed: int = 7) -> list[dict[str, Any]]:
    """The table's rows, oldest first."""
    rng = random.Random(seed)
    lines = [json.loads(x) for x in PROMPTS.read_text().splitlines()[:GOOD]]
    out: list[tuple[str, Any, dict[str, Any]]] = []  # (kind, request body or None, overrides)
    for i, line in enumerate(lines):
        chat = _chat(line)
        if i % 24 == 5:  # a follow-up: the earlier turns are context, the last user turn is the prompt
            chat = [{"role": "user", "content": "Hi, I have a question."},
                    {"role": "assistant", "content": "Of course, what would you like to know?"}, *chat]
        elif i % 24 == 11:  # OpenAI content parts
            chat = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in chat]
        elif i % 24 == 17:  # an assistant prefill: the request's last turn is not part of the prompt
            chat = [*chat, {"role": "assistant", "content": "Sure."}]
        out.append(("chat", _body(chat, rng), {}))
    for i in range(12):  # the same question asked again later: a duplicate prompt
        out.append(("chat", _body(_chat(lines[i * 7]), rng), {}))
    for code in [500, 500, 503, 429, 429, 429, 400, 400, 404, 500, 504, 429, 400, 503, 500]:
        out.append(("error", _body(_chat(rng.choice(lines)), rng), {"status_code": code}))
    for _ in range(8):  # over the gateway's size limit: logged without the body
        out.append(("oversize", None, {"logging_error_codes": ["MAX_REQUEST_SIZE_EXCEEDED"]}))
    for _ in range(4):  # logged, but longer than ingest.max_prompt_chars
        out.append(("long", _body([{"role": "user", "content": "Summarise this log: " + "x" * 17000}], rng), {}))
    for i in range(5):
        out.append(("unparsable", '{"messages": [{"role": "user", "content": "truncated' + "." * i, {}))
    for _ in range(5):
        out.append(("null", None, {}))
    for i in range(5):
        out.append(("completions", json.dumps({"prompt": f"Once upon a time {i}", "max_tokens": 64}), {}))
    for i in range(5):
        out.append(("embeddings", json.dumps({"input": [f"document {i}"]}), {}))
    for i in range(3):
        out.append(("responses", json.dumps({"model": "acme", "input": [{"role": "user", "content": f"Hi {i}"}]}),
                    {}))
    out.append(("bad_role", json.dumps({"messages": [{"role": "user", "content": "what's the weather?"},
                                                     {"role": "tool", "content": "{}"}]}), {}))
    out.append(("bad_role", json.dumps({"messages": []}), {}))
    out.append(("bad_role", json.dumps({"messages": "hello"}), {}))
    rng.shuffle(out)

    result = []
    t = START
    for n, (_kind, body, over) in enumerate(out):
        t += timedelta(seconds=rng.randint(5, 900))
        status = over.get("status_code", 200)
        result.append({
            "databricks_request_id": f"dbx-{seed:02d}-{n:05d}",
            "client_request_id": f"acme-web-{n:05d}" if n % 3 else None,
            "request_date": t.date(), "request_time": t, "status_code": status, "sampling_fraction": 1.0,
            "execution_duration_ms": rng.randint(80, 4000), "request": body,
            "response": _response("Here you go.") if status == 200 and body else
            (json.dumps({"error_code": "REQUEST_FAILED", "message": "upstream error"}) if status != 200 else None),
            "logging_error_codes": over.get("logging_error_codes", []), "served_entity_id": ENTITY,
            "requester": f"user{rng.randint(1, 40):02d}@acme.example",
        })
    return result


def write(path: Path, data: list[dict[str, Any]], *, mode: str = "error") -> None:
    """Write (or append) rows in the payload schema as a Delta table with Change Data Feed on."""
    from deltalake import write_deltalake

    write_deltalake(str(path), pa.Table.from_pylist(data, schema=PAYLOAD_SCHEMA), mode=mode,
                    configuration={"delta.enableChangeDataFeed": "true"} if mode == "error" else None)


def build(out: Path = OUT) -> Path:
    if out.exists():
        shutil.rmtree(out)
    write(out, rows())
    return out


if __name__ == "__main__":
    print(build())
