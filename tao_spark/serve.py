"""Serve: an OpenAI-compatible endpoint for the registered model, with prompt capture, A/B arms and hot swap.

    TAO_API_KEYS=secret tao serve serve.port=8000 serve.challenger_share=0.1
    tao ab report

``POST /v1/chat/completions`` (plain or ``stream: true``, token by token), ``GET /v1/models``, ``GET /health`` and
``POST /v1/feedback``. Every answered request is appended to the server's own spool file under
``<home>/spool/`` (JSONL, fsync'd before the answer leaves); a background thread MERGEs the spool into ``prompts``
(source ``serving``), ``serving_log`` and ``feedback``, under a lock shared by every server on the home. The spool
is replayed at start and a dead server's file is claimed by a live one, so a killed server loses no acknowledged
request; a flush that runs twice writes nothing twice (MERGE by key); a record that cannot be written goes to
``quarantine`` with its reason, and ``/health`` (with a key) shows the backlog.

A request without ``temperature`` is answered greedily (``serve.temperature``, 0): a deployed model should
give one user the same answer twice, unlike OpenAI's default of 1. ``stop`` is honoured; ``response_format``
other than text, ``tools`` and ``logprobs`` are refused with 400; a ``model`` other than the served names is 404.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import random
import re
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
    """Append-only JSONL files of ``{"table", "row"}`` records under ``<home>/spool/``, one live file per server.

    ``append`` returns after fsync, so an acknowledged record is on disk. Each server appends to its own
    ``live-<pid>-<nonce>.jsonl`` and holds an exclusive ``flock`` on it while it lives, so several servers can share
    one home. ``flush`` runs under the folder's flush lock (one flusher at a time across processes): it renames its
    own live file aside (``*.flushing``), claims the live files of servers that died (their lock is free), hands
    every set-aside record to ``write`` and deletes the files only after that commit; a crash between the two
    leaves the files to be replayed, and the MERGE by key makes the replay write nothing twice.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # appends and the rename that rotates the live file
        self._flush_lock = threading.Lock()  # one flush at a time in this process (flock is per open file)
        # Created under the flush lock: a flusher elsewhere never sees this file before its owner has locked it.
        with self._folder_lock():
            self.live, self._file = self._open_live()

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        with open(self.folder / ".flush.lock", "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _open_live(self) -> tuple[Path, Any]:
        path = self.folder / f"live-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        f = open(path, "ab")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return path, f

    def append(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(json.dumps(r, ensure_ascii=False, default=str).encode() + b"\n" for r in records)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())

    def _rotate(self) -> None:
        """Set this server's live file aside (caller holds the folder lock)."""
        with self._lock:
            if self._file.tell() == 0:
                return
            old_path, old = self.live, self._file
            os.rename(old_path, self.folder / f"{time.time_ns():020d}-{old_path.stem}.flushing")
            self.live, self._file = self._open_live()
            old.close()

    def _claim_orphans(self) -> None:
        """Set aside the live files of servers that are gone (caller holds the folder lock); ``serve.jsonl`` is the
        single live file of earlier versions."""
        for path in [*self.folder.glob("live-*.jsonl"), *self.folder.glob("serve.jsonl")]:
            if path == self.live:
                continue
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            with f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live server's file
                if os.fstat(f.fileno()).st_size == 0:
                    path.unlink()
                else:
                    os.rename(path, self.folder / f"{time.time_ns():020d}-{path.stem}.flushing")

    def pending(self) -> list[Path]:
        """Set-aside files in the order they were set aside (their names start with the time): a key's later
        record (a changed rating) comes after its earlier one."""
        return sorted(self.folder.glob("*.flushing"))

    def backlog(self) -> int:
        """Records acknowledged and not yet committed: set-aside files and every live file of this home."""
        count = 0
        for path in [*self.pending(), *self.folder.glob("live-*.jsonl"), *self.folder.glob("serve.jsonl")]:
            with contextlib.suppress(FileNotFoundError):
                count += path.read_bytes().count(b"\n")
        return count

    def flush(self, write: Any) -> int:
        """Hand every spooled record to ``write(records)`` (which commits them); return how many went.

        ``write`` gets ``SpoolRecord`` items: the parsed record, or for a line that is not one (a corrupt file) the
        reason, so it can quarantine it. A last line cut by a crash mid-write was never acknowledged: it is dropped.
        """
        with self._flush_lock, self._folder_lock():
            self._rotate()
            self._claim_orphans()
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
            if self.live.exists() and self.live.stat().st_size == 0:
                self.live.unlink()


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled line: its source (file and line number), its raw bytes, and its record or why it is none."""

    source: str
    line: int
    raw: bytes
    record: dict[str, Any] | None
    reason: str | None = None


def _read_records(path: Path) -> Iterator[SpoolRecord]:
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines):  # no newline after it: cut by a crash mid-write, never acknowledged
                continue
            yield SpoolRecord(path.name, i, line, None, "unparsable spool record")
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("table"), str) and isinstance(rec.get("row"), dict)):
            yield SpoolRecord(path.name, i, line, None, "spool record without a table and a row")
            continue
        yield SpoolRecord(path.name, i, line, rec)


def write_records(tables: Tables, cfg: Config, records: list[SpoolRecord]) -> dict[str, int]:
    """MERGE spooled records into their tables; the last record of a key wins within one batch.

    A record that cannot be written (an unknown table, a missing key, a value of the wrong type, a corrupt line)
    goes to ``quarantine`` with its reason instead, so one bad record never holds back the others.
    """
    import pyarrow as pa

    from tao_spark.ingest import _escape
    from tao_spark.tables import KEYS, arrow_schema

    now = datetime.now(UTC)
    by_table: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for item in records:
        reason, rec = item.reason, item.record
        if rec is not None and reason is None:
            name, row = rec["table"], dict(rec["row"])
            try:
                if name not in KEYS:
                    raise ValueError(f"unknown table {name!r}")
                for k in ("created_at", "received_at", "ingested_at"):
                    if isinstance(row.get(k), str):
                        row[k] = datetime.fromisoformat(row[k])
                key = tuple(row.get(k) for k in KEYS[name])
                if any(v is None for v in key):
                    raise ValueError(f"a key column of {name} is missing")
                pa.Table.from_pylist([row], schema=arrow_schema(tables.spark, name))  # the types Delta will check
            except (ValueError, TypeError, OverflowError, pa.ArrowException) as e:
                reason = f"spool record not writable to {name}: {type(e).__name__}: {str(e)[:200]}"
            else:
                by_table.setdefault(name, {})[key] = row
                continue
        log.warning("serve: %s line %d quarantined: %s", item.source, item.line, reason)
        bad = {"target": rec["table"] if rec and isinstance(rec.get("table"), str) else "spool",
               "source_sha256": hashlib.sha256(item.raw).hexdigest(), "line": item.line, "batch_id": None,
               "source_file": f"spool/{item.source}", "raw": _escape(item.raw), "reason": reason, "ingested_at": now}
        by_table.setdefault("quarantine", {})[(bad["target"], bad["source_sha256"], bad["line"])] = bad
    written = {}
    # prompts first: a serving_log row then never names a prompt the log does not have.
    for name in sorted(by_table, key=lambda n: n != "prompts"):
        rows = list(by_table[name].values())
        written[name] = tables.merge(name, tables.frame(name, rows), update=name == "feedback",
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

    def __init__(self, cfg: Config, pinned: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        # Arms fixed to given models (a URI ``models:/name/N`` or a folder) instead of the registry's aliases: what
        # `tao ab replay` serves, a round's baseline against its tuned version.
        self.pinned = pinned
        self.engines: dict[str, Engine] = {}
        self.refresh()
        if "champion" not in self.engines:
            raise RuntimeError(f"serve: nothing to serve: no registered {self.cfg.serve.model} and no model.path")

    def _spec(self, arm: str) -> str | None:
        if self.pinned is not None:
            return None
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
            if self.pinned is not None and arm in self.pinned:
                target = self.pinned[arm]
                version = m[1] if (m := re.fullmatch(r"models:/[^@]+/(\d+)", target)) else None
            elif spec is not None and version is not None:
                target = f"{spec.rsplit('@', 1)[0]}/{version}"
            elif arm == "champion" and self.pinned is None:
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
        if "\x00" in content:
            raise BadRequest(400, f"messages[{i}].content contains a NUL character", code="invalid_messages")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(400, f"messages[{i}].content is not valid Unicode (a lone surrogate)",
                             code="invalid_messages") from None
        if m["role"] == "user" and not content.strip():
            raise BadRequest(400, f"messages[{i}].content is empty", code="invalid_messages")
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
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise BadRequest(400, "seed must be a 64-bit integer", code="invalid_seed")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop)):
        raise BadRequest(400, "stop must be a non-empty string or an array of up to 4 of them", code="invalid_stop")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadRequest(400, "response_format: only {\"type\": \"text\"} is supported (no JSON mode)",
                         code="unsupported_response_format")
    if body.get("tools") or body.get("functions"):
        raise BadRequest(400, "tools and functions are not supported by this endpoint", code="unsupported_tools")
    if body.get("best_of") not in (None, 1) or body.get("logprobs") not in (None, False):
        raise BadRequest(400, "logprobs and best_of are not supported", code="unsupported_parameter")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict)
                                    and isinstance(options.get("include_usage", False), bool)):
        raise BadRequest(400, "stream_options must be an object with a boolean include_usage", code="invalid_stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(400, "model must be a string", code="invalid_model")
    return {"chat": chat, "temperature": temperature, "top_p": top_p, "stream": stream,
            "max_tokens": min(asked or scfg.max_tokens_cap, scfg.max_tokens_cap), "stop": stop, "model": model,
            "include_usage": bool(stream and options and options.get("include_usage")),
            # torch seeds take 64 bits: a negative seed keeps its bits
            "seed": random.getrandbits(31) if seed is None else seed % 2**64}


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
        self.flush_errors = 0  # failed flushes since the last one that committed
        self.last_flush_error: str | None = None
        if self.spool is not None:  # replay whatever a previous server acknowledged but did not commit
            self._try("flush", self.flush)
        self.models = models or Models(cfg)

    def flush(self) -> int:
        if self.spool is None or self.tables is None:
            return 0
        tables = self.tables
        n = self.spool.flush(lambda records: write_records(tables, self.cfg, records))
        self.flush_errors, self.last_flush_error = 0, None
        return n

    def _try(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # keep serving; the spool keeps the records for the next try
            if what == "flush":
                self.flush_errors += 1
                self.last_flush_error = f"{type(e).__name__}: {str(e)[:300]}"
            log.warning("serve: %s failed: %s: %s", what, type(e).__name__, str(e)[:300])

    def _every(self, seconds: float, fn: Any, what: str) -> None:
        while not self._stop.wait(seconds):
            self._try(what, fn)

    def health(self, detailed: bool) -> dict[str, Any]:
        """``ok``, or ``degraded`` while flushes fail; with ``detailed`` (a valid key) the arms and the backlog."""
        out: dict[str, Any] = {"status": "degraded" if self.flush_errors else "ok"}
        if detailed:
            out["arms"] = {a: e.version for a, e in self.models.engines.items()}
            if self.spool is not None:
                out["capture"] = {"backlog": self.spool.backlog(), "failed_flushes": self.flush_errors,
                                  "last_error": self.last_flush_error}
        return out

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
            self._try("flush", self.flush)  # what does not commit now stays in the spool for the next start
            self.spool.close()

    def authorized(self, header: str | None) -> str | None:
        """The API key of a valid ``Authorization: Bearer`` header, "" when auth is off, None when refused."""
        if not self.cfg.serve.auth:
            return ""
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():  # the scheme is case-insensitive (RFC 9110)
            return None
        given = token.strip().encode()
        found = [k for k in self.keys if hmac.compare_digest(given, k.encode())]
        return found[0] if found else None

    def names(self) -> dict[str, str]:
        """The model names clients may send, each with its arm: the registered name (``tao-policy``, the champion),
        ``<name>@challenger`` while a challenger is served, and the full ``models:/`` URIs of both."""
        spec = self.cfg.serve.model
        base = spec.removeprefix("models:/").rsplit("@", 1)[0] if spec.startswith("models:/") else spec
        out = {base: "champion", spec: "champion"}
        if "challenger" in self.models.engines:
            out.update({f"{base}@challenger": "challenger", f"models:/{base}@challenger": "challenger"})
        return out

    def arm_for(self, model: str | None, user_key: str) -> str:
        """The arm a request names, or the user's A/B arm when it names none; an unknown name is a 404."""
        if model is None:
            return assign_arm(user_key, self.cfg.serve.challenger_share)
        names = self.names()
        if model not in names:
            raise BadRequest(404, f"The model {model!r} does not exist; served: {', '.join(sorted(names))}",
                             code="model_not_found")
        # The champion's name follows the A/B split (clients name the deployment, not an arm); the challenger's
        # name asks for it explicitly.
        return "challenger" if names[model] == "challenger" else assign_arm(user_key, self.cfg.serve.challenger_share)

    def answer(self, req: dict[str, Any], user_key: str, emit: Any = None, request_id: str | None = None
               ) -> dict[str, Any]:
        """Generate one answer (blocking) and spool its capture; return what the response needs. ``emit`` gets the
        answer's text piece by piece as it is decoded (streaming)."""
        from tao_spark.engines import chat_prompt_ids

        t0 = time.perf_counter()
        engine = self.models.pick(self.arm_for(req.get("model"), user_key))
        gen: Any = engine.generator
        out = gen.complete(req["chat"], temperature=req["temperature"], top_p=req["top_p"],
                           max_new_tokens=req["max_tokens"], seed=req["seed"], stop=req.get("stop", ()), emit=emit)
        with getattr(gen, "_tok_lock", contextlib.nullcontext()):
            prompt_tokens = len(chat_prompt_ids(gen.tokenizer, req["chat"])) if hasattr(gen, "tokenizer") else 0
        request_id = request_id or f"chatcmpl-{uuid.uuid4().hex}"
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
        except Reject as r:  # answered, but not a prompt the log can keep (too long...): quarantined with the reason
            from tao_spark.ingest import _escape

            log.info("serve: %s: prompt quarantined: %s", request_id, str(r).split(":")[0])
            raw = json.dumps([{"role": m["role"], "content": self.redact(m["content"])} for m in chat],
                             ensure_ascii=False).encode("utf-8", errors="backslashreplace")
            records.append({"table": "quarantine", "row": {
                "target": "prompts", "source_sha256": hashlib.sha256(request_id.encode()).hexdigest(), "line": 0,
                "batch_id": request_id, "source_file": "serving", "raw": _escape(raw), "reason": str(r),
                "ingested_at": now}})
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
    from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, e: StarletteHTTPException) -> Any:
        # An unknown path or method: OpenAI's error shape, as for every other refusal, not FastAPI's {"detail"}.
        what = {404: "no such route", 405: "method not allowed on"}.get(e.status_code, str(e.detail))
        return _error(e.status_code, f"{what} {request.method} {request.url.path}", "invalid_request_error",
                      {404: "not_found", 405: "method_not_allowed"}.get(e.status_code))

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> Any:
        log.error("serve: %s %s failed: %s", request.method, request.url.path, type(e).__name__)
        return _error(500, "internal error", "server_error")

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # Unauthenticated probes (load balancers) learn only up or degraded; a key also shows arms and backlog.
        return service.health(service.authorized(request.headers.get("authorization")) is not None)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        who(request)
        versions = {a: e.version for a, e in service.models.engines.items()}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tao", "arm": arm, "version": versions[arm]}
            for name, arm in service.names().items() if not name.startswith("models:/") or name == scfg.model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        user = who(request)
        req = parse_chat_request(await read_json(request), scfg)
        service.arm_for(req["model"], user)  # an unknown model is a 404 before anything is generated
        created = int(time.time())
        if not req["stream"]:
            out = await run_in_threadpool(service.answer, req, user)
            headers = {"x-request-id": out["id"], "x-tao-arm": out["arm"], "x-tao-model-version": out["version"]}
            return JSONResponse({
                "id": out["id"], "object": "chat.completion", "created": created,
                "model": f"{scfg.model}#{out['version']}",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": _usage(out)}, headers=headers)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        engine = service.models.pick(service.arm_for(req["model"], user))  # who answers, as for a plain response
        return StreamingResponse(_stream(service, req, user, created, request_id), media_type="text/event-stream",
                                 headers={"x-request-id": request_id, "x-tao-arm": engine.arm,
                                          "x-tao-model-version": engine.version})

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Any:
        user = who(request)
        body = await read_json(request)
        return await run_in_threadpool(service.feedback, body, user)

    return app


def _usage(out: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


async def _stream(service: Service, req: dict[str, Any], user: str, created: int, request_id: str
                  ) -> AsyncIterator[str]:
    """Server-sent chunks as the engine decodes: generation runs in a worker thread that hands each settled piece
    of text to this loop; the id is the one capture records, sent with the first chunk."""
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    model = service.cfg.serve.model

    def work() -> None:
        try:
            out = service.answer(req, user, emit=lambda piece: loop.call_soon_threadsafe(
                queue.put_nowait, ("piece", piece)), request_id=request_id)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", out))
        except Exception as e:  # the stream has started (200 sent): the error goes as its last event
            log.error("serve: streaming %s failed: %s", request_id, type(e).__name__)
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    def chunk(delta: dict[str, str], finish: str | None, **extra: Any) -> str:
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    threading.Thread(target=work, name=f"tao-stream-{request_id[-8:]}", daemon=True).start()
    yield chunk({"role": "assistant", "content": ""}, None)
    while True:
        kind, value = await queue.get()
        if kind == "piece":
            yield chunk({"content": value}, None)
        elif kind == "done":
            yield chunk({}, value["finish_reason"])
            if req["include_usage"]:  # stream_options.include_usage: one more chunk, no choices, the usage
                body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [], "usage": _usage(value)}
                yield f"data: {json.dumps(body)}\n\n"
            break
        else:
            err = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
            break
    yield "data: [DONE]\n\n"


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
    log.info(f"tao serve: http://{cfg.serve.host}:{cfg.serve.port}/v1  arms: "
             f"{ {a: e.version for a, e in service.models.engines.items()} }  capture: {service.capture}")
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


def replay(tables: Tables, cfg: Config, *, round_id: str | None = None, share: float = 0.5, url: str | None = None,
           api_key: str | None = None, max_prompts: int = 0, max_tokens: int | None = None) -> dict[str, Any]:
    """A/B before deploy: a round's held-out prompts sent through an OpenAI-compatible `tao serve` with a challenger
    share, every answer scored by the configured rewards; per arm the mean reward with a bootstrap 95% interval,
    answer tokens and latency, and the challenger-minus-champion difference with its interval. The report goes to
    the round's MLflow run (metrics ``ab_replay_*`` and ``ab_replay.json``).

    Without ``url`` a server is started on a free loopback port for the replay, its champion arm the round's
    baseline and its challenger the round's registered version, capture off (replayed prompts are already in the
    log). With ``url`` the prompts go to a running server, whose own aliases decide what each arm serves. Each
    prompt is a user of its own (``X-User-Id``), so the server's sticky split sends ``share`` of them to the
    challenger.
    """
    import dataclasses as dc

    import numpy as np
    import pandas as pd
    from openai import OpenAI
    from pyspark.sql import functions as F

    from tao_spark.config import UserError
    from tao_spark.rounds import finished, load
    from tao_spark.score import COMBINED, score_frame

    if not 0 < share < 1:
        raise UserError("--share must be in (0, 1): both arms need traffic")
    done = [r for r in finished(tables) if r.model_version] if round_id is None else [load(tables, round_id)]
    if not done or not done[-1].model_version:
        raise UserError(f"round {round_id} has no registered model yet: run `tao round` to its end first" if round_id
                        else "no round has registered a model yet: run `tao round` first")
    rnd = done[-1]
    held = (tables.read("evaluations").where(F.col("round_id") == rnd.round_id).select("prompt_id", "task")
            .join(tables.read("prompts").select("prompt_id", F.to_json("messages").alias("messages_json")),
                  "prompt_id").orderBy("prompt_id").toPandas())
    if max_prompts:
        held = held.head(max_prompts)
    if held.empty:
        raise UserError(f"round {rnd.round_id} has no held-out prompts in evaluations to replay")
    pinned = {"champion": rnd.baseline_model, "challenger": f"models:/{cfg.mlflow.model_name}/{rnd.model_version}"}
    server = None
    if url is None:
        from tao_spark.cluster import _free_port

        port = _free_port()
        scfg = dc.replace(cfg.serve, host="127.0.0.1", port=port, auth=False, capture=False, challenger_share=share,
                          poll_interval_s=0)
        service = Service(dc.replace(cfg, serve=scfg), None, models=Models(cfg, pinned=pinned))
        server = _background_server(service, port)
        url = f"http://127.0.0.1:{port}/v1"
    client = OpenAI(base_url=url, api_key=api_key or "none", max_retries=3, timeout=600)
    rows = []
    try:
        for i, r in enumerate(held.itertuples(index=False)):
            t0 = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=cfg.mlflow.model_name, messages=json.loads(r.messages_json), temperature=0,
                max_tokens=max_tokens or cfg.evaluate.max_new_tokens,
                extra_headers={"X-User-Id": f"tao-ab-replay-{r.prompt_id}"})
            out = raw.parse()
            rows.append({"prompt_id": r.prompt_id, "task": r.task, "messages_json": r.messages_json,
                         "completion": out.choices[0].message.content or "", "arm": raw.headers.get("x-tao-arm"),
                         "version": raw.headers.get("x-tao-model-version"),
                         "tokens": out.usage.completion_tokens if out.usage else 0,
                         "latency_ms": (time.perf_counter() - t0) * 1000})
            log.info(f"tao: ab replay: {i + 1}/{len(held)} prompts")
    finally:
        if server is not None:
            server.should_exit = True
    frame = pd.DataFrame(rows)
    frame["candidate_idx"] = 0
    frame["reward"] = score_frame(frame, list(cfg.score.rewards), cfg.score)[COMBINED].to_numpy()
    rng = np.random.default_rng(0)

    def boot(values: np.ndarray) -> tuple[float, float]:
        if len(values) < 2:
            return float("nan"), float("nan")
        means = values[rng.integers(0, len(values), (2000, len(values)))].mean(axis=1)
        return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

    arms: dict[str, Any] = {}
    for arm, part in frame.groupby("arm"):
        low, high = boot(part["reward"].to_numpy(dtype=float))
        arms[str(arm)] = {"requests": len(part), "version": str(part["version"].iloc[0]),
                          "reward": float(part["reward"].mean()), "reward_low": low, "reward_high": high,
                          "tokens": float(part["tokens"].mean()),
                          "p50_ms": float(np.percentile(part["latency_ms"], 50)),
                          "p95_ms": float(np.percentile(part["latency_ms"], 95))}
    report: dict[str, Any] = {"round_id": rnd.round_id, "prompts": len(frame), "share": share, "url": url if
                              server is None else None, "arms": arms}
    report["answers"] = frame[["prompt_id", "task", "arm", "version", "reward", "tokens", "latency_ms"]].to_dict(
        "records")
    if set(arms) == set(ARMS):
        a, b = (frame.loc[frame.arm == x, "reward"].to_numpy(dtype=float) for x in ("challenger", "champion"))
        diffs = [rng.choice(a, len(a)).mean() - rng.choice(b, len(b)).mean() for _ in range(2000)]
        report["difference"] = {"reward": float(a.mean() - b.mean()), "low": float(np.percentile(diffs, 2.5)),
                                "high": float(np.percentile(diffs, 97.5))}
        d = report["difference"]
        report["verdict"] = ("challenger better" if d["low"] > 0 else "champion better" if d["high"] < 0
                             else "no difference shown") + f": reward {d['reward']:+.3f} [{d['low']:+.3f}, " \
                                                          f"{d['high']:+.3f}]"
    else:
        report["verdict"] = f"only {', '.join(arms)} answered: raise --share or replay more prompts"
    if rnd.mlflow_run_id:
        from mlflow import MlflowClient

        from tao_spark.registry import log_stage, setup

        log_stage(cfg, rnd.mlflow_run_id, {f"ab_replay_{arm}_{k}": v for arm, m in arms.items()
                                           for k, v in m.items() if isinstance(v, float)})
        setup(cfg)
        MlflowClient().log_dict(rnd.mlflow_run_id, report, "ab_replay.json")
    return report


def _background_server(service: Service, port: int) -> Any:
    """uvicorn serving ``service`` on a thread of this process; returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="tao-ab-replay-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("ab replay: the local server did not start")
        time.sleep(0.05)
    return server


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
