"""Ingest: append prompt files to the Delta prompt log, quarantining what cannot be used.

    tao ingest prompts.jsonl more.csv --task support --json

Every offered row ends up in exactly one place: inserted into ``prompts``, counted as a duplicate of a
prompt already there (this batch or an earlier one), or written to ``quarantine`` with its reason, so
``offered == accepted + duplicates + quarantined``. Re-ingesting a file inserts nothing new.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import logging
import unicodedata
import uuid
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
from pyspark.sql import SparkSession

from tao_spark.config import IngestConfig, UserError
from tao_spark.tables import Tables

log = logging.getLogger("tao.ingest")

ROLES = ("system", "user", "assistant")
KNOWN_FIELDS = {"prompt", "messages", "task", "id", "metadata", "received_at"}
# How much of a rejected line the quarantine keeps: enough to debug, not a copy of a 1 MB blob.
RAW_KEEP_CHARS = 4096


class Reject(Exception):
    """A row that goes to quarantine; the message is the reason."""


@dataclasses.dataclass
class IngestResult:
    """One batch's counts; ``offered == accepted + duplicates + quarantined``."""

    batch_id: str
    offered: int
    accepted: int
    duplicates: int
    quarantined: int
    table: str
    version: int  # the Delta version of ``table`` after the write
    reasons: dict[str, int]
    source_version: int | None = None  # an inference table: the version read up to
    source_rows: int | None = None  # an inference table: rows read this run

    @property
    def prompts_version(self) -> int:
        return self.version

    def to_json(self) -> dict[str, Any]:
        out = {"batch_id": self.batch_id, "offered": self.offered, "accepted": self.accepted,
               "duplicates": self.duplicates, "quarantined": self.quarantined, f"{self.table}_version": self.version}
        if self.source_version is not None:
            out.update(source_version=self.source_version, source_rows=self.source_rows)
        return out


def prompt_id(task: str, messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt: task plus the normalized chat (NFC, stripped content)."""
    canon = json.dumps([task, [[m["role"], m["content"]] for m in messages]], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]


def _norm(text: str) -> str:
    return unicodedata.normalize("NFC", text).strip()


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, iteratively, so a deep value cannot blow the stack."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _check_text(text: str, what: str) -> None:
    if "\x00" in text:
        raise Reject(f"NUL character in {what}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject(f"invalid unicode (lone surrogate) in {what}") from None


def _parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise Reject("malformed chat: messages must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise Reject(f"malformed chat: messages[{i}] must be an object with exactly role and content")
        if m["role"] not in ROLES:
            raise Reject(f"malformed chat: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise Reject(f"malformed chat: messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise Reject("malformed chat: the last turn must be from the user")
    return out


def _parse_time(value: Any, now: datetime) -> datetime:
    if value is None:
        return now
    if not isinstance(value, str):
        raise Reject("received_at must be an ISO-8601 string")
    try:
        text = value.strip()
        # Python 3.10's fromisoformat does not read the "Z" suffix that most logs write.
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise Reject(f"unparsable received_at: {value[:64]!r}") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def build_row(
    obj: Any, cfg: IngestConfig, *, task: str | None, source: str, now: datetime
) -> dict[str, Any]:
    """Validate one parsed record and return its ``prompts`` row; raise ``Reject`` with the reason."""
    if not isinstance(obj, dict):
        raise Reject(f"not a JSON object ({type(obj).__name__})")
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt and has_messages:
        raise Reject("both prompt and messages given")
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            raise Reject("prompt must be a string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    elif has_messages:
        messages = _parse_messages(obj["messages"])
    else:
        raise Reject("missing field: prompt or messages")
    row_task = obj.get("task")
    if row_task is None:  # absent and null alike, as for every other optional field
        row_task = task or cfg.default_task
    if not isinstance(row_task, str) or not row_task.strip():
        raise Reject("task must be a non-empty string")
    row_task = _norm(row_task)
    client_id = obj.get("id")
    if client_id is not None and not isinstance(client_id, str):
        raise Reject("id must be a string")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise Reject("metadata must be an object")
    extra = {k: v for k, v in obj.items() if k not in KNOWN_FIELDS}
    metadata = {**extra, **metadata}

    for i, m in enumerate(messages):
        _check_text(m["content"], f"messages[{i}].content")
        m["content"] = _norm(m["content"])
        if not m["content"]:
            raise Reject(f"empty text in messages[{i}]")
    total = sum(len(m["content"]) for m in messages)
    if total > cfg.max_prompt_chars:
        raise Reject(f"text too long: {total} > ingest.max_prompt_chars={cfg.max_prompt_chars}")
    _check_text(row_task, "task")
    meta_json = json.dumps(metadata, ensure_ascii=False, default=str)
    _check_text(meta_json, "metadata")
    return {
        "prompt_id": prompt_id(row_task, messages),
        "task": row_task,
        "messages": messages,
        "prompt": messages[-1]["content"],
        "client_id": client_id,
        "source": source,
        "received_at": _parse_time(obj.get("received_at"), now),
        "metadata": meta_json,
    }


def _escape(raw: bytes) -> str:
    return raw[:RAW_KEEP_CHARS].decode("utf-8", errors="backslashreplace")


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")  # type: ignore[return-value]


def sha256_of(path: Path) -> str:
    """sha256 of a file's (decompressed) bytes, read in blocks: the key of its quarantine rows."""
    h = hashlib.sha256()
    with _open(path) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def iter_records(path: Path, cfg: IngestConfig) -> Iterator[tuple[int, bytes, Any]]:
    """Yield (line number, raw bytes, parsed object or Reject) for every non-blank record of a file, streaming."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        yield from _iter_jsonl(path, cfg)
    elif name.endswith(".csv"):
        yield from _iter_csv(path)
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path)
    else:
        raise UserError(f"{path}: unsupported file type (use .jsonl, .jsonl.gz, .csv or .parquet)")


def _lines(path: Path, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(line number, the line without its newline, its length), holding at most ``limit`` bytes of one line: of a
    longer line only its first bytes come back (the rest is skipped over, never read whole)."""
    with _open(path) as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 2)  # room for the limit plus "\r\n"
            if not raw:
                return
            lineno += 1
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    size += len(more)
                size += len(more.rstrip(b"\r\n"))
                yield lineno, raw, size
                continue
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            yield lineno, raw, len(raw)


def _iter_jsonl(path: Path, cfg: IngestConfig) -> Iterator[tuple[int, bytes, Any]]:
    for lineno, raw, size in _lines(path, cfg.max_line_bytes):
        if size > cfg.max_line_bytes:
            yield lineno, raw, Reject(f"line too long: {size} bytes > ingest.max_line_bytes={cfg.max_line_bytes}")
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, raw, Reject(f"invalid UTF-8 at byte {e.start}")
            continue
        try:
            obj = json.loads(text)
        except RecursionError:
            yield lineno, raw, Reject(f"JSON nested deeper than ingest.max_json_depth={cfg.max_json_depth}")
            continue
        except json.JSONDecodeError as e:
            yield lineno, raw, Reject(f"unparsable JSON: {e.msg} at column {e.colno}")
            continue
        # Nesting depth is at most the count of opening brackets (some may sit inside strings): walking the
        # parsed value is needed only for the rare line with many of them.
        deep = raw.count(b"[") + raw.count(b"{") > cfg.max_json_depth
        if deep and _depth(obj, cfg.max_json_depth) > cfg.max_json_depth:
            yield lineno, raw, Reject(f"JSON nested deeper than ingest.max_json_depth={cfg.max_json_depth}")
            continue
        yield lineno, raw, obj


def _tabular_record(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV/Parquet row as a JSONL-style record: prompt, task, id; other columns become metadata."""
    rec: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for k, v in row.items():
        if v is None or (isinstance(v, float) and v != v):
            continue
        if k in ("prompt", "messages", "task", "id", "received_at"):
            rec[k] = v
        else:
            meta[k] = v
    if meta:
        rec["metadata"] = meta
    return rec


def _iter_csv(path: Path) -> Iterator[tuple[int, bytes, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:  # type: ignore[operator]
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "prompt" not in reader.fieldnames:
            raise UserError(f"{path}: CSV needs a 'prompt' column (found: {reader.fieldnames})")
        for row in reader:
            # The reader's line counter sits on the row's last line; a header is line 1.
            raw = json.dumps(row, ensure_ascii=False).encode("utf-8", errors="surrogateescape")
            rec = {k: (v if v != "" or k == "prompt" else None) for k, v in row.items() if k is not None}
            try:
                for v in rec.values():
                    if isinstance(v, str):
                        v.encode("utf-8")
            except UnicodeEncodeError:
                yield reader.line_num, raw, Reject("invalid UTF-8")
                continue
            yield reader.line_num, raw, _tabular_record(rec)


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row) of a Parquet file, one record batch in memory at a time."""
    import pyarrow.parquet as pq

    with _open(path) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if "prompt" not in names and "messages" not in names:
            raise UserError(f"{path}: Parquet needs a 'prompt' column (found: {names})")
        i = 0
        for batch in pf.iter_batches(batch_size=8192):
            for row in batch.to_pylist():
                i += 1
                yield i, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, bytes, Any]]:
    for i, row in _parquet_rows(path):
        raw = json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", errors="backslashreplace")
        rec = _tabular_record(row)
        if isinstance(rec.get("received_at"), datetime):
            rec["received_at"] = rec["received_at"].isoformat()
        yield i, raw, rec


def ingest(
    spark: SparkSession,
    tables: Tables,
    paths: list[str | Path],
    cfg: IngestConfig,
    *,
    task: str | None = None,
    source: str = "file",
) -> IngestResult:
    """Append the prompts of ``paths`` to ``prompts``; quarantine bad rows; return the batch's counts."""
    return append(spark, tables, files(paths, cfg, iter_records), cfg, target="prompts", key="prompt_id",
                  build=build_row, task=task, source=source)


Records = Iterator[tuple[int, bytes, Any]]  # (line, raw bytes, parsed record or Reject)


def check_paths(paths: list[str | Path]) -> None:
    """Refuse, before anything is written, a path that is not a regular file of a kind ingest reads."""
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"no such file: {p}")
        if p.is_dir():
            raise UserError(f"{p} is a directory: pass the files in it (for example {p}/*.jsonl)")
        if not p.is_file():
            raise UserError(f"{p} is not a regular file (a pipe or a device): write it to a file first")
        if not p.name.lower().removesuffix(".gz").endswith((".jsonl", ".json", ".ndjson", ".csv", ".parquet")):
            raise UserError(f"{p}: unsupported file type (use .jsonl, .jsonl.gz, .csv or .parquet)")


# What reading a file that is not what its name says raises: a corrupt gzip stream, bytes that are not Parquet, a
# CSV whose header is not text.
UNREADABLE = (OSError, EOFError, zlib.error, pa.ArrowException, csv.Error, UnicodeDecodeError, ValueError)


def _guarded(name: str, records: Records) -> Records:
    try:
        yield from records
    except UNREADABLE as e:
        raise UserError(f"{name}: cannot be read as its extension says ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); rows of it read before this "
                        "point are committed, and re-running after fixing the file adds only the rest") from None


def files(paths: list[str | Path], cfg: IngestConfig, records: Any) -> Iterator[tuple[str, str, Records]]:
    """Each file as (name, sha256 of its bytes, its records streamed), one file at a time. A file that cannot be
    read is a ``UserError`` naming it, never a traceback."""
    check_paths(paths)
    for p in map(Path, paths):
        try:
            sha = sha256_of(p)
        except UNREADABLE as e:
            raise UserError(f"{p}: cannot be read ({type(e).__name__}: {str(e)[:160]})") from None
        yield str(p), sha, _guarded(str(p), records(p, cfg))


def append(
    spark: SparkSession, tables: Tables, sources: Iterable[tuple[str, str, Records]],
    cfg: IngestConfig, *, target: str, key: str, build: Any, task: str | None, source: str,
) -> IngestResult:
    """Validate every record of ``sources`` with ``build``, MERGE the good rows into ``target`` by ``key`` and the
    rejected ones into ``quarantine`` (keyed by the source's sha256 and line); return the batch's counts
    (offered = accepted + duplicates + quarantined).

    Records are MERGEd ``cfg.chunk_rows`` at a time, so memory does not grow with the input. The batch keeps one
    ``batch_id`` across its chunks; a duplicate is whatever valid row the MERGEs did not insert (seen earlier in
    this batch or in an earlier one), so no set of keys is held. A batch killed between chunks leaves its first
    chunks in place; re-running it inserts exactly the rest (the earlier rows count as duplicates) and MERGEs
    its rejected lines onto the same (sha256, line) keys, so the tables end as after one whole run.
    """
    batch_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    rows: dict[str, dict[str, Any]] = {}
    bad: list[dict[str, Any]] = []
    offered = valid = accepted = quarantined = chunks = 0
    reasons: dict[str, int] = {}

    def flush(progress: bool = True) -> None:
        nonlocal accepted, chunks
        if rows:
            accepted += tables.merge(target, tables.frame(target, list(rows.values())), retries=cfg.commit_retries)
        if bad:
            tables.merge("quarantine", tables.frame("quarantine", bad), retries=cfg.commit_retries)
        rows.clear()
        bad.clear()
        chunks += 1
        if progress:
            log.info(f"tao: ingest {target}: chunk {chunks} committed, {offered} read")

    for name, sha, records in sources:
        for lineno, raw, rec in records:
            offered += 1
            try:
                if isinstance(rec, Reject):
                    raise rec
                row = build(rec, cfg, task=task, source=source, now=now)
            except Reject as r:
                reason = str(r)
                reasons[reason.split(":")[0]] = reasons.get(reason.split(":")[0], 0) + 1
                quarantined += 1
                bad.append({"target": target, "source_sha256": sha, "line": lineno, "batch_id": batch_id,
                            "source_file": name, "raw": _escape(raw), "reason": reason, "ingested_at": now})
            else:
                valid += 1
                rows.setdefault(row[key], {**row, "source_file": name, "ingested_at": now, "batch_id": batch_id})
            if len(rows) + len(bad) >= cfg.chunk_rows:
                flush()
    if rows or bad or not chunks:
        flush(progress=False)
    tables.ensure(target)
    result = IngestResult(batch_id, offered, accepted, valid - accepted, quarantined, target,
                          tables.snapshot(target), reasons)
    log.info(f"tao: ingest {target}: {offered} offered, {accepted} accepted, {result.duplicates} duplicates, "
             f"{quarantined} quarantined -> {target} v{result.version}")
    return result


# --- preference pairs --------------------------------------------------------------------------------------------

PAIR_FIELDS = ("chosen", "rejected", "source")


def pair_id(task: str, messages: list[dict[str, str]], chosen: str, rejected: str) -> str:
    """Stable id of a preference: task, normalized chat, chosen and rejected answers."""
    canon = json.dumps([task, [[m["role"], m["content"]] for m in messages], chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:32]


def build_pair_row(
    obj: Any, cfg: IngestConfig, *, task: str | None, source: str, now: datetime
) -> dict[str, Any]:
    """Validate one preference record and return its ``preference_pairs`` row; raise ``Reject`` with the reason.

    The prompt part (``prompt`` or ``messages``, ``task``, ``id``, ``metadata``) follows the prompt log's rules
    (``build_row``); ``chosen`` and ``rejected`` must be non-empty strings that differ after NFC and stripping.
    """
    if not isinstance(obj, dict):
        raise Reject(f"not a JSON object ({type(obj).__name__})")
    answers = {}
    for k in ("chosen", "rejected"):
        v = obj.get(k)
        if v is None:
            raise Reject(f"missing field: {k}")
        if not isinstance(v, str):
            raise Reject(f"{k} must be a string")
        _check_text(v, k)
        answers[k] = _norm(v)
        if not answers[k]:
            raise Reject(f"empty text in {k}")
        if len(answers[k]) > cfg.max_prompt_chars:
            raise Reject(f"text too long: {k} has {len(answers[k])} > ingest.max_prompt_chars={cfg.max_prompt_chars}")
    if answers["chosen"] == answers["rejected"]:
        raise Reject("identical chosen and rejected")
    row_source = obj.get("source")
    if row_source is not None and (not isinstance(row_source, str) or not row_source.strip()):
        raise Reject("source must be a non-empty string")
    prompt = build_row({k: v for k, v in obj.items() if k not in PAIR_FIELDS}, cfg, task=task,
                       source=_norm(row_source) if row_source else source, now=now)
    return {
        "pair_id": pair_id(prompt["task"], prompt["messages"], answers["chosen"], answers["rejected"]),
        "prompt_id": prompt["prompt_id"], "task": prompt["task"], "messages": prompt["messages"],
        "prompt": prompt["prompt"], "chosen": answers["chosen"], "rejected": answers["rejected"],
        "client_id": prompt["client_id"], "source": prompt["source"], "metadata": prompt["metadata"],
    }


def _iter_pair_records(path: Path, cfg: IngestConfig) -> Iterator[tuple[int, bytes, Any]]:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        yield from _iter_jsonl(path, cfg)
    elif name.endswith(".parquet"):
        for i, row in _parquet_rows(path):
            raw = json.dumps(row, ensure_ascii=False, default=str).encode("utf-8", errors="backslashreplace")
            yield i, raw, {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()
                           if v is not None}
    else:
        raise UserError(f"{path}: unsupported file type for preferences (use .jsonl, .jsonl.gz or .parquet)")


def ingest_preferences(
    spark: SparkSession,
    tables: Tables,
    paths: list[str | Path],
    cfg: IngestConfig,
    *,
    task: str | None = None,
    source: str = "file",
) -> IngestResult:
    """Append the pairs of ``paths`` to ``preference_pairs``; quarantine bad rows (target ``preference_pairs``).

    The same contract as ``ingest``: ``offered == accepted + duplicates + quarantined``, re-ingesting inserts nothing.
    """
    return append(spark, tables, files(paths, cfg, _iter_pair_records), cfg, target="preference_pairs",
                  key="pair_id", build=build_pair_row, task=task, source=source)
