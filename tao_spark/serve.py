"""Serve: an OpenAI-compatible endpoint for the registered model, with prompt capture, A/B arms and hot swap.

    TAO_API_KEYS=secret tao serve serve.port=8000 serve.challenger_share=0.1
    tao ab report

``POST /v1/chat/completions`` (plain or ``stream: true``), ``GET /v1/models``, ``GET /health`` and
``POST /v1/feedback``. Every answered request is appended to a local spool file (JSONL, fsync'd before the
answer leaves) that a background thread MERGEs into ``prompts`` (source ``serving``), ``serving_log`` and
``feedback``; the spool is replayed at start, so a killed server loses no acknowledged request, and a
flush that runs twice writes nothing twice (MERGE by key).

A request without ``temperature`` is answered greedily (``serve.temperature``, 0): a deployed model should
give one user the same answer twice, unlike OpenAI's default of 1. Streaming sends the finished answer in
chunks: the engine decodes a whole batch at once, so the stream is not token by token.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Module level, not inside create_app: FastAPI resolves the handlers' string annotations in this module's globals.
from fastapi import Request

from tao_spark.config import Config, ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tao_spark.engines import Generator
    from tao_spark.tables import Tables

ARMS = ("champion", "challenger")
ROLES = ("system", "user", "assistant")
log = logging.getLogger("tao.serve")

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# International or national numbers of 8+ digits with the usual separators; short numbers (years, counts) stay.
PHONE = re.compile(r"(?<![\w.])\+?\d(?:[ ().-]*\d){7,14}(?![\w.])")


# --- pure pieces: redaction, arm assignment, the rating interval ----------------------------------------------------

class Redactor:
    """Replace e-mail addresses, phone numbers and configured patterns with placeholders."""

    def __init__(self, enabled: bool = True, patterns: list[str] | None = None) -> None:
        self.rules = [(EMAIL, "[EMAIL]"), (PHONE, "[PHONE]")] if enabled else []
        self.rules += [(re.compile(p), "[REDACTED]") for p in patterns or []]

    def __call__(self, text: str) -> str:
        for pattern, placeholder in self.rules:
            text = pattern.sub(placeholder, text)
        return text


def assign_arm(user_key: str, challenger_share: float) -> str:
    """``challenger`` for a stable ``challenger_share`` of users, by a hash of their key; else ``champion``."""
    if challenger_share <= 0:
        return "champion"
    u = int.from_bytes(hashlib.sha256(f"tao-ab\n{user_key}".encode()).digest()[:8], "big") / 2**64
    return "challenger" if u < challenger_share else "champion"


def user_hash(user_key: str) -> str:
    return hashlib.sha256(f"tao-user\n{user_key}".encode()).hexdigest()[:16]


def wilson(positives: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion; (nan, nan) with no observations."""
    if n == 0:
        return float("nan"), float("nan")
    p = positives / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# --- the spool: acknowledged writes survive a crash until Delta has them ------------------------------------------

class Spool:
    """An append-only JSONL file of ``{"table", "row"}`` records under ``<home>/spool/``.

    ``append`` returns after fsync, so an acknowledged record is on disk. ``flush`` renames the live file aside
    (``*.flushing``), MERGEs every set-aside file into Delta and deletes them only after the commit; a crash
    between the two leaves the file to be replayed, and the MERGE by key makes the replay write nothing twice.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.live = folder / "serve.jsonl"
        self._lock = threading.Lock()  # appends and the rename that rotates the live file
        self._flush_lock = threading.Lock()  # one flush at a time
        self._file = open(self.live, "ab")

    def append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n" for r in records)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        with self._lock:
            if self._file.tell() == 0:
                return
            self._file.close()
            os.rename(self.live, self.folder / f"serve-{time.time_ns()}.flushing")
            self._file = open(self.live, "ab")

    def pending(self) -> list[Path]:
        return sorted(self.folder.glob("*.flushing"))

    def flush(self, write: Any) -> int:
        """Hand every spooled record to ``write(records)`` (which commits them); return how many went."""
        with self._flush_lock:
            self._rotate()
            files = self.pending()
            records = [r for f in files for r in _read_records(f)]
            if records:
                write(records)
            for f in files:
                f.unlink()
            return len(records)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_bytes().split(b"\n"):
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write: never acknowledged, so never promised
            continue


def write_records(tables: Tables, cfg: Config, records: list[dict[str, Any]]) -> dict[str, int]:
    """MERGE spooled records into their tables; the last record of a key wins within one batch."""
    from tao_spark.ingest import _frame
    from tao_spark.tables import KEYS

    by_table: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for r in records:
        row = dict(r["row"])
        for k in ("created_at", "received_at", "ingested_at"):
            if isinstance(row.get(k), str):
                row[k] = datetime.fromisoformat(row[k])
        by_table.setdefault(r["table"], {})[tuple(row[k] for k in KEYS[r["table"]])] = row
    written = {}
    # prompts first: a serving_log row then never names a prompt the log does not have.
    for name in sorted(by_table, key=lambda n: n != "prompts"):
        rows = list(by_table[name].values())
        written[name] = tables.merge(name, _frame(tables.spark, name, rows), update=name == "feedback",
                                     retries=cfg.ingest.commit_retries)
    return written


# --- models: the arms and their hot swap -------------------------------------------------------------------------

@dataclass(frozen=True)
class Engine:
    arm: str
    version: str  # registry version, or "path:<model_id>" when serving model.path
    path: str
    generator: Generator


class Models:
    """The engine of each arm. ``engines[arm]`` is replaced whole, so a request keeps the engine it started with."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.engines: dict[str, Engine] = {}
        self.refresh()
        if "champion" not in self.engines:
            raise RuntimeError(f"serve: nothing to serve: no registered {self.cfg.serve.model} and no model.path")

    def _spec(self, arm: str) -> str | None:
        if arm == "champion":
            return self.cfg.serve.model
        if self.cfg.serve.challenger_share > 0 and "@" in self.cfg.serve.model:
            return self.cfg.serve.model.rsplit("@", 1)[0] + "@challenger"
        return None

    def _version(self, spec: str) -> str | None:
        """The registry version an alias points at now; None when the registry has no such alias."""
        if not (spec.startswith("models:/") and "@" in spec):
            return None
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        from tao_spark.models import store_exists

        if not store_exists(self.cfg.registry_uri):
            return None  # nothing registered yet; asking would create an empty store
        name, alias = spec[len("models:/"):].rsplit("@", 1)
        try:
            return str(MlflowClient(tracking_uri=self.cfg.tracking_uri, registry_uri=self.cfg.registry_uri)
                       .get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None

    def refresh(self) -> list[str]:
        """Load what each arm's alias points at, if it moved; return the arms that changed."""
        from tao_spark.engines import get_generator
        from tao_spark.models import model_id, resolve_model

        changed = []
        for arm in ARMS:
            spec = self._spec(arm)
            version = self._version(spec) if spec else None
            if spec is not None and version is not None:
                target = f"{spec.rsplit('@', 1)[0]}/{version}"
            elif arm == "champion":
                target = self.cfg.model.path
            else:
                self.engines.pop(arm, None)
                continue
            current = self.engines.get(arm)
            if version is not None and current is not None and current.version == version:
                continue  # the alias has not moved: no download, no load
            path = resolve_model(target, self.cfg.home, self.cfg.tracking_uri, self.cfg.registry_uri)
            if current is not None and current.path == path:
                continue
            gen = get_generator("transformers", path, dtype=self.cfg.model.dtype, batch_size=1)
            self.engines[arm] = Engine(arm, version or f"path:{model_id(path)}", path, gen)
            changed.append(arm)
            log.info("serve: arm %s now serves version %s", arm, self.engines[arm].version)
        return changed

    def pick(self, arm: str) -> Engine:
        return self.engines.get(arm) or self.engines["champion"]


# --- the app -----------------------------------------------------------------------------------------------------

class BadRequest(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _error(status: int, message: str, type_: str, code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


def parse_chat_request(body: Any, scfg: ServeConfig) -> dict[str, Any]:
    """Validate a chat-completions body; return messages and sampling params, or raise ``BadRequest``."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty array", code="invalid_messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadRequest(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", code="invalid_messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(400, f"messages[{i}].content: only text parts are supported", code="invalid_messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(400, f"messages[{i}].content must be a string", code="invalid_messages")
        chat.append({"role": m["role"], "content": content})
    if chat[-1]["role"] != "user":
        raise BadRequest(400, "the last message must be from the user", code="invalid_messages")

    def number(key: str, default: float, lo: float, hi: float) -> float:
        v = body.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise BadRequest(400, f"{key} must be a number in [{lo}, {hi}]", code=f"invalid_{key}")
        return float(v)

    temperature = number("temperature", scfg.temperature, 0, 2)
    top_p = number("top_p", 1.0, 0, 1)
    if top_p == 0:
        raise BadRequest(400, "top_p must be > 0", code="invalid_top_p")
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int) or asked < 1):
        raise BadRequest(400, "max_tokens must be a positive integer", code="invalid_max_tokens")
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise BadRequest(400, "only n=1 is supported", code="invalid_n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, "stream must be true or false", code="invalid_stream")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(400, "seed must be an integer", code="invalid_seed")
    return {"chat": chat, "temperature": temperature, "top_p": top_p, "stream": stream,
            "max_tokens": min(asked or scfg.max_tokens_cap, scfg.max_tokens_cap),
            "seed": random.getrandbits(31) if seed is None else seed}


def api_keys(scfg: ServeConfig) -> list[str]:
    env = [k.strip() for k in os.environ.get("TAO_API_KEYS", "").split(",") if k.strip()]
    return [*scfg.api_keys, *env]


class Service:
    """What the app needs: config, models, redaction, the spool and its flusher, the registry poller."""

    def __init__(self, cfg: Config, tables: Tables | None, models: Models | None = None) -> None:
        self.cfg = cfg
        self.tables = tables
        self.keys = api_keys(cfg.serve)
        if cfg.serve.auth and not self.keys:
            raise RuntimeError("serve: serve.auth is on but no API key is set: set serve.api_keys or $TAO_API_KEYS, "
                               "or serve.auth=false to serve without keys")
        self.redact = Redactor(cfg.serve.redact, cfg.serve.redact_patterns)
        self.capture = cfg.serve.capture and tables is not None
        self.spool = Spool(Path(cfg.home) / "spool") if self.capture else None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.flush_errors = 0
        if self.spool is not None:  # replay whatever a previous server acknowledged but did not commit
            self.flush()
        self.models = models or Models(cfg)

    def flush(self) -> int:
        if self.spool is None or self.tables is None:
            return 0
        tables = self.tables
        return self.spool.flush(lambda records: write_records(tables, self.cfg, records))

    def _every(self, seconds: float, fn: Any, what: str) -> None:
        while not self._stop.wait(seconds):
            try:
                fn()
            except Exception as e:  # keep serving; the spool keeps the records for the next try
                self.flush_errors += what == "flush"
                log.warning("serve: %s failed: %s: %s", what, type(e).__name__, str(e)[:300])

    def start(self) -> None:
        jobs: list[tuple[float, Any, str]] = []
        if self.spool is not None:
            jobs.append((self.cfg.serve.flush_interval_s, self.flush, "flush"))
        if self.cfg.serve.poll_interval_s > 0:
            jobs.append((self.cfg.serve.poll_interval_s, self.models.refresh, "registry poll"))
        for seconds, fn, what in jobs:
            t = threading.Thread(target=self._every, args=(seconds, fn, what), name=f"tao-{what}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        if self.spool is not None:
            self.flush()
            self.spool.close()

    def authorized(self, header: str | None) -> str | None:
        """The API key of a valid ``Authorization: Bearer`` header, "" when auth is off, None when refused."""
        if not self.cfg.serve.auth:
            return ""
        if not header or not header.startswith("Bearer "):
            return None
        given = header[len("Bearer "):].strip().encode()
        found = [k for k in self.keys if hmac.compare_digest(given, k.encode())]
        return found[0] if found else None

    def answer(self, req: dict[str, Any], user_key: str) -> dict[str, Any]:
        """Generate one answer (blocking) and spool its capture; return what the response needs."""
        from tao_spark.engines import chat_prompt_ids

        t0 = time.perf_counter()
        arm = assign_arm(user_key, self.cfg.serve.challenger_share)
        engine = self.models.pick(arm)
        gen: Any = engine.generator
        out = gen.generate([req["chat"]], n=1, temperature=req["temperature"], top_p=req["top_p"],
                           max_new_tokens=req["max_tokens"], seeds=[req["seed"]])[0][0]
        with getattr(gen, "_tok_lock", contextlib.nullcontext()):
            prompt_tokens = len(chat_prompt_ids(gen.tokenizer, req["chat"])) if hasattr(gen, "tokenizer") else 0
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        latency_ms = (time.perf_counter() - t0) * 1000
        if self.spool is not None:
            self.spool.append(self._capture(req["chat"], out.text, request_id, engine, prompt_tokens, out.tokens,
                                            latency_ms, user_key))
        return {"id": request_id, "arm": engine.arm, "version": engine.version, "text": out.text,
                "finish_reason": out.finish_reason, "prompt_tokens": prompt_tokens, "completion_tokens": out.tokens}

    def _capture(self, chat: list[dict[str, str]], text: str, request_id: str, engine: Engine, prompt_tokens: int,
                 completion_tokens: int, latency_ms: float, user_key: str) -> list[dict[str, Any]]:
        from tao_spark.ingest import Reject, build_row

        now = datetime.now(UTC)
        records = []
        pid = None
        meta = {"model_version": engine.version, "arm": engine.arm, "request_id": request_id}
        try:
            row = build_row({"messages": [{"role": m["role"], "content": self.redact(m["content"])} for m in chat],
                             "metadata": meta}, self.cfg.ingest, task=self.cfg.serve.task, source="serving", now=now)
            pid = row["prompt_id"]
            records.append({"table": "prompts", "row": {**row, "source_file": None, "ingested_at": now,
                                                        "batch_id": request_id}})
        except Reject as r:  # answered, but not a prompt the log can keep (too long, empty...): log the answer only
            log.info("serve: %s: prompt not captured: %s", request_id, str(r).split(":")[0])
        records.append({"table": "serving_log", "row": {
            "request_id": request_id, "arm": engine.arm, "model_version": engine.version, "prompt_id": pid,
            "response": self.redact(text), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_ms": latency_ms, "user_hash": user_hash(user_key), "created_at": now}})
        return records

    def feedback(self, body: Any, user_key: str) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        rid, rating, comment = body.get("request_id"), body.get("rating"), body.get("comment")
        if not isinstance(rid, str) or not re.fullmatch(r"chatcmpl-[0-9a-f]{32}", rid):
            raise BadRequest(400, "request_id must be the id of a chat completion", code="invalid_request_id")
        if isinstance(rating, bool) or rating not in (1, -1):
            raise BadRequest(400, "rating must be 1 or -1", code="invalid_rating")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 4000):
            raise BadRequest(400, "comment must be a string of at most 4000 characters", code="invalid_comment")
        row = {"request_id": rid, "rating": rating, "comment": self.redact(comment) if comment else None,
               "user_hash": user_hash(user_key), "created_at": datetime.now(UTC)}
        if self.spool is not None:
            self.spool.append([{"table": "feedback", "row": row}])
        return {"request_id": rid, "stored": self.spool is not None}


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over ``service``; its lifespan starts the background threads and flushes on shutdown."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="tao serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    scfg = service.cfg.serve

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > scfg.max_request_bytes:
            raise BadRequest(413, f"request body over serve.max_request_bytes={scfg.max_request_bytes}",
                             code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > scfg.max_request_bytes:
                raise BadRequest(413, f"request body over serve.max_request_bytes={scfg.max_request_bytes}",
                                 code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise BadRequest(400, f"the request body is not valid JSON: {type(e).__name__}",
                             code="invalid_json") from None

    def who(request: Request) -> str:
        key = service.authorized(request.headers.get("authorization"))
        if key is None:
            raise BadRequest(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                             "invalid_request_error", "invalid_api_key")
        return request.headers.get("x-user-id") or key

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> Any:
        return _error(e.status, e.message, e.type, e.code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> Any:
        log.error("serve: %s %s failed: %s", request.method, request.url.path, type(e).__name__)
        return _error(500, "internal error", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "arms": {a: e.version for a, e in service.models.engines.items()}}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        who(request)
        return {"object": "list", "data": [
            {"id": service.cfg.serve.model if e.arm == "champion" else f"{e.arm}:{e.version}", "object": "model",
             "created": 0, "owned_by": "tao", "version": e.version} for e in service.models.engines.values()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        user = who(request)
        req = parse_chat_request(await read_json(request), scfg)
        out = await run_in_threadpool(service.answer, req, user)
        created = int(time.time())
        headers = {"x-request-id": out["id"], "x-tao-arm": out["arm"], "x-tao-model-version": out["version"]}
        model = f"{service.cfg.serve.model}#{out['version']}"
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        if not req["stream"]:
            return JSONResponse({
                "id": out["id"], "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": usage}, headers=headers)

        def chunk(delta: dict[str, str], finish: str | None) -> str:
            body = {"id": out["id"], "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            for piece in re.findall(r"\S*\s*", out["text"]):
                if piece:
                    yield chunk({"content": piece}, None)
            yield chunk({}, out["finish_reason"])
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Any:
        user = who(request)
        body = await read_json(request)
        return await run_in_threadpool(service.feedback, body, user)

    return app


def _check_port(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As uvicorn binds: a port whose old connections linger in TIME_WAIT is free; one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            from tao_spark.config import UserError

            raise UserError(f"port {port} on {host} is in use ({e.strerror}): stop what holds it, or pass "
                            "--port N") from None


def serve(cfg: Config, tables: Tables | None) -> None:
    """Run the server until interrupted (the ``tao serve`` command)."""
    import uvicorn

    _check_port(cfg.serve.host, cfg.serve.port)  # before the model loads: a taken port fails in a second
    service = Service(cfg, tables if cfg.serve.capture else None)
    print(f"tao serve: http://{cfg.serve.host}:{cfg.serve.port}/v1  arms: "
          f"{ {a: e.version for a, e in service.models.engines.items()} }  capture: {service.capture}",
          file=sys.stderr, flush=True)
    # access_log off: paths and statuses only would be harmless, but one log line per request is noise at load.
    uvicorn.run(create_app(service), host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                access_log=False)


# --- A/B report and feedback pairs -------------------------------------------------------------------------------

def ab_report(tables: Tables, min_rated: int = 30) -> dict[str, Any]:
    """Per arm: requests, rated, positives, rating rate with a Wilson 95% interval, latency p50/p95; and a verdict."""
    from tao_spark.tables import TableNotFound

    try:
        log_df = tables.read("serving_log")
    except TableNotFound:
        return {"arms": {}, "verdict": "no serving_log yet: nothing served with capture on"}
    tables.ensure("feedback")
    log_df.createOrReplaceTempView("tao_ab_log")
    tables.read("feedback").createOrReplaceTempView("tao_ab_feedback")
    rows = tables.spark.sql("""
        SELECT l.arm, count(*) AS requests, count(f.rating) AS rated,
               coalesce(sum(CASE WHEN f.rating = 1 THEN 1 ELSE 0 END), 0) AS positives,
               percentile_approx(l.latency_ms, 0.5) AS p50_ms, percentile_approx(l.latency_ms, 0.95) AS p95_ms
        FROM tao_ab_log l LEFT JOIN tao_ab_feedback f ON l.request_id = f.request_id
        GROUP BY l.arm ORDER BY l.arm""").collect()
    arms = {}
    for r in rows:
        low, high = wilson(int(r.positives), int(r.rated))
        arms[r.arm] = {"requests": int(r.requests), "rated": int(r.rated), "positives": int(r.positives),
                       "rating_rate": r.positives / r.rated if r.rated else float("nan"), "ci_low": low,
                       "ci_high": high, "p50_ms": float(r.p50_ms), "p95_ms": float(r.p95_ms)}
    return {"arms": arms, "verdict": verdict(arms, min_rated)}


def verdict(arms: dict[str, dict[str, Any]], min_rated: int) -> str:
    if set(arms) != set(ARMS):
        return f"not enough data yet: only {', '.join(arms) or 'no arm'} served"
    short = [a for a in ARMS if arms[a]["rated"] < min_rated]
    if short:
        return f"not enough data yet: {', '.join(short)} has fewer than {min_rated} rated answers"
    c, h = arms["challenger"], arms["champion"]
    if c["ci_low"] > h["ci_high"]:
        return "challenger wins: its rating-rate interval lies above the champion's"
    if h["ci_low"] > c["ci_high"]:
        return "champion wins: its rating-rate interval lies above the challenger's"
    return "no winner yet: the rating-rate intervals overlap"


def feedback_pairs(tables: Tables, cfg: Config) -> int:
    """Turn a +1 and a -1 rating of different answers to one prompt into ``preference_pairs`` rows (source feedback).

    Goes through ``ingest_preferences``, so pairs get its validation, quarantine and dedup. Returns pairs accepted.
    """
    import tempfile

    from tao_spark.ingest import ingest_preferences
    from tao_spark.tables import TableNotFound

    try:
        for name in ("serving_log", "feedback", "prompts"):
            tables.read(name).createOrReplaceTempView(f"tao_fp_{name}")
    except TableNotFound:
        return 0
    rated = tables.spark.sql("""
        SELECT l.prompt_id, p.task, p.messages, l.response, f.rating, l.request_id
        FROM tao_fp_serving_log l JOIN tao_fp_feedback f ON l.request_id = f.request_id
        JOIN tao_fp_prompts p ON l.prompt_id = p.prompt_id
        ORDER BY l.prompt_id, l.request_id""").collect()
    by_prompt: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rated:
        by_prompt.setdefault(r.prompt_id, {}).setdefault(int(r.rating), {})[r.response] = r
    records = []
    for answers in by_prompt.values():
        good, bad = answers.get(1, {}), answers.get(-1, {})
        # Blank or equal-after-stripping answers would only be quarantined by ingest_preferences.
        pair = next(((g, b) for g in good for b in bad if g.strip() and b.strip() and g.strip() != b.strip()), None)
        if pair is None:
            continue
        first = good[pair[0]]
        records.append({"messages": [m.asDict() for m in first.messages], "task": first.task, "chosen": pair[0],
                        "rejected": pair[1], "metadata": {"chosen_request_id": first.request_id,
                                                          "rejected_request_id": bad[pair[1]].request_id}})
    if not records:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "feedback_pairs.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return ingest_preferences(tables.spark, tables, [path], cfg.ingest, source="feedback").accepted
