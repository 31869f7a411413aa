"""tao serve: the OpenAI-compatible endpoint, capture through the spool, A/B arms, feedback pairs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tao_spark.config import ConfigError, load_config
from tao_spark.serve import Redactor, Spool, assign_arm, parse_chat_request, verdict, wilson

KEY = "test-key-123"


# --- unit ----------------------------------------------------------------------------------------------------------

def test_arm_assignment_is_sticky_and_respects_the_share() -> None:
    users = [f"user-{i}" for i in range(20000)]
    first = [assign_arm(u, 0.2) for u in users]
    assert first == [assign_arm(u, 0.2) for u in users]  # sticky: same user, same arm, every request
    share = first.count("challenger") / len(users)
    assert 0.18 < share < 0.22
    assert {assign_arm(u, 0.0) for u in users[:100]} == {"champion"}
    assert {assign_arm(u, 1.0) for u in users[:100]} == {"challenger"}


def test_redaction_removes_emails_phones_and_custom_patterns() -> None:
    r = Redactor(True, [r"ACCT-\d+"])
    out = r("mail jane.doe+x@example.co.uk or call +1 (555) 123-4567 about ACCT-991 in 2024")
    assert "jane" not in out and "555" not in out and "ACCT-991" not in out
    assert out == "mail [EMAIL] or call [PHONE] about [REDACTED] in 2024"
    assert Redactor(False)("a@b.io") == "a@b.io"


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ConfigError, match="serve.challenger_share"):
        load_config(None, ["serve.challenger_share=1.5"])
    with pytest.raises(ConfigError, match="serve.redact_patterns"):
        load_config(None, ["serve.redact_patterns=['(']"])
    assert load_config(None, []).serve.auth is True


def test_request_parsing_clamps_and_rejects() -> None:
    scfg = load_config(None, ["serve.max_tokens_cap=16"]).serve
    req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, scfg)
    assert req["max_tokens"] == 16 and req["temperature"] == 0.0 and not req["stream"]
    bad: Any
    for bad in ({"messages": []}, {"messages": [{"role": "bot", "content": "x"}]},
                {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
                {"messages": [{"role": "user", "content": "x"}], "n": 2}, []):
        with pytest.raises(Exception, match="must|only|supported"):
            parse_chat_request(bad, scfg)


def test_wilson_interval_and_verdict() -> None:
    low, high = wilson(80, 100)
    assert 0.70 < low < 0.80 < high < 0.88
    arms = {"champion": {"rated": 200, "ci_low": 0.40, "ci_high": 0.55},
            "challenger": {"rated": 200, "ci_low": 0.60, "ci_high": 0.72}}
    assert verdict(arms, 30).startswith("challenger wins")
    assert verdict({**arms, "champion": {**arms["champion"], "rated": 5}}, 30).startswith("not enough data")


def test_spool_replays_until_a_write_succeeds(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([{"table": "t", "row": {"i": 1}}])
    spool.append([{"table": "t", "row": {"i": 2}}])

    def fail(records: list[Any]) -> None:
        raise RuntimeError("delta down")

    with pytest.raises(RuntimeError):
        spool.flush(fail)
    spool.append([{"table": "t", "row": {"i": 3}}])
    spool._file.close()  # the server dies: its lock goes with it, its live file stays
    with open(spool.pending()[0], "ab") as f:
        f.write(b'{"table": "t", "ro')  # a line cut by a crash mid-write
    got: list[Any] = []
    again = Spool(tmp_path)  # a restarted server
    assert again.flush(got.extend) == 3
    assert [r.record["row"]["i"] for r in got] == [1, 2, 3]
    assert again.pending() == [] and again.flush(got.extend) == 0


def test_two_servers_share_one_spool_folder_and_lose_nothing(tmp_path: Path) -> None:
    """Two live spools (two servers on one home) appending and flushing concurrently: every record committed
    exactly once, and the live file of a server that died is claimed by the other."""
    spools = [Spool(tmp_path), Spool(tmp_path)]
    got: list[str] = []
    lock = threading.Lock()

    def write(records: list[Any]) -> None:
        with lock:
            got.extend(r.record["row"]["i"] for r in records)

    def server(k: int) -> None:
        for i in range(300):
            spools[k].append([{"table": "t", "row": {"i": f"{k}-{i}"}}])
            if i % 37 == k:
                spools[k].flush(write)

    threads = [threading.Thread(target=server, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dead = Spool(tmp_path)
    dead.append([{"table": "t", "row": {"i": "dead-0"}}])
    dead._file.close()  # killed: never flushed, never closed cleanly
    assert spools[0].backlog() > 0
    spools[0].flush(write)
    spools[1].flush(write)
    assert sorted(got) == sorted([f"{k}-{i}" for k in (0, 1) for i in range(300)] + ["dead-0"])
    assert spools[0].backlog() == 0 and not spools[0].pending()


# --- integration: a real server on a loopback port ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(home: Path, model: Path, port: int, *extra: str) -> list[str]:
    return [f"home={home}", f"model.path={model}", f"serve.port={port}", "serve.max_tokens_cap=12",
            "serve.poll_interval_s=0", "serve.flush_interval_s=1", "spark.shuffle_partitions=2", *extra]


def _post(port: int, path: str, body: bytes, key: str | None = KEY, user: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if user:
        headers["X-User-Id"] = user
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat(port: int, text: str, user: str | None = None) -> tuple[int, Any]:
    body = {"model": "tao-policy", "messages": [{"role": "user", "content": text}], "max_tokens": 6}
    return _post(port, "/v1/chat/completions", json.dumps(body).encode(), user=user)


def _delta_rows(home: Path, table: str) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    path = home / "lakehouse" / table
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist() if DeltaTable.is_deltatable(str(path)) else []


@pytest.fixture(scope="module")
def live(spark: Any, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Any]]:
    """The app in uvicorn on a thread of this process, auth on, capture on."""
    import uvicorn

    from tao_spark.serve import Service, create_app
    from tao_spark.tables import Tables

    home, port = tmp_path_factory.mktemp("serve-home"), _free_port()
    cfg = load_config(None, _overrides(home, tiny_model, port, f"serve.api_keys=['{KEY}']",
                                       "serve.challenger_share=0.5", "serve.redact_patterns=['SECRET-\\d+']",
                                       "serve.max_request_bytes=4096", "ingest.max_prompt_chars=300"))
    service = Service(cfg, Tables(spark, cfg.lakehouse))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield port, service
    server.should_exit = True
    thread.join(timeout=60)


@pytest.mark.integration
def test_openai_client_works_unchanged(live: tuple[int, Any]) -> None:
    from openai import OpenAI

    port, _ = live
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id
    hi = [{"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="tao-policy", messages=hi, max_tokens=5)
    assert r.id.startswith("chatcmpl-") and r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str) and r.usage and 1 <= r.usage.completion_tokens <= 5
    again = client.chat.completions.create(model="tao-policy", messages=hi, max_tokens=5)
    assert again.choices[0].message.content == r.choices[0].message.content  # temperature absent: greedy
    chunks = list(client.chat.completions.create(model="tao-policy", messages=hi,
                                                 max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


@pytest.mark.integration
def test_auth_and_bad_requests_get_openai_errors(live: tuple[int, Any]) -> None:
    port, _ = live
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    for key in ("wrong", None):
        status, err = _post(port, "/v1/chat/completions", body, key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key" and err["error"]["type"]
    status, err = _post(port, "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = _post(port, "/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert status == 400 and "messages" in err["error"]["message"]
    status, err = _post(port, "/v1/chat/completions", b"[" * 10_000)  # over serve.max_request_bytes
    assert status == 413
    # An unknown route or method is an OpenAI-shaped error too (openai clients read error.message).
    status, err = _post(port, "/v1/completion", body)
    assert status == 404 and err["error"]["code"] == "not_found" and "/v1/completion" in err["error"]["message"]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {KEY}"})
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("GET /v1/chat/completions answered")
    except urllib.error.HTTPError as e:
        assert e.code == 405 and json.loads(e.read())["error"]["code"] == "method_not_allowed"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.integration
def test_capture_redacts_and_feedback_becomes_a_preference_pair(live: tuple[int, Any]) -> None:
    from tao_spark.serve import ab_report, feedback_pairs

    port, service = live
    text = "Write to bob@example.com about SECRET-42"
    status, a = _chat(port, text, user="alice")
    assert status == 200
    # Two different sampled answers to the same prompt, rated +1 and -1: a preference pair.
    body = {"messages": [{"role": "user", "content": text}], "temperature": 1.0, "max_tokens": 8}
    answers: list[Any] = []
    for seed in range(40):
        status, b = _post(port, "/v1/chat/completions", json.dumps({**body, "seed": seed}).encode(), user="carol")
        content = b["choices"][0]["message"]["content"].strip()
        if content and content not in [x["choices"][0]["message"]["content"].strip() for x in answers]:
            answers.append(b)
        if len(answers) == 2:
            break
    assert len(answers) == 2
    for resp, rating in zip(answers, (1, -1), strict=True):
        status, ok = _post(port, "/v1/feedback", json.dumps({"request_id": resp["id"], "rating": rating}).encode())
        assert status == 200 and ok["stored"]
    status, err = _post(port, "/v1/feedback", json.dumps({"request_id": a["id"], "rating": 5}).encode())
    assert status == 400
    service.flush()
    home = Path(service.cfg.home)
    prompts = [p for p in _delta_rows(home, "prompts") if "about" in p["prompt"]]
    assert len(prompts) == 1 and prompts[0]["source"] == "serving"
    assert "bob@example.com" not in prompts[0]["prompt"] and "SECRET-42" not in prompts[0]["prompt"]
    meta = json.loads(prompts[0]["metadata"])
    assert set(meta) == {"model_version", "arm", "request_id"}
    logged = {r["request_id"]: r for r in _delta_rows(home, "serving_log")}
    assert {x["id"] for x in answers} <= set(logged) and logged[a["id"]]["prompt_id"] == prompts[0]["prompt_id"]
    assert {r["request_id"]: r["rating"] for r in _delta_rows(home, "feedback")} == {answers[0]["id"]: 1,
                                                                                     answers[1]["id"]: -1}
    assert feedback_pairs(service.tables, service.cfg) == 1
    pairs = _delta_rows(home, "preference_pairs")
    assert len(pairs) == 1 and pairs[0]["source"] == "feedback"
    assert pairs[0]["chosen"] == answers[0]["choices"][0]["message"]["content"].strip()
    report = ab_report(service.tables)
    assert sum(m["requests"] for m in report["arms"].values()) == len(logged)
    assert report["verdict"].startswith("not enough data")


@pytest.mark.integration
def test_streaming_sends_tokens_as_they_are_decoded_and_stop_is_honoured(live: tuple[int, Any]) -> None:
    from openai import OpenAI

    port, _ = live
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Tell me a long story about a cat"}]
    full = client.chat.completions.create(model="tao-policy", messages=messages, max_tokens=12)
    text = full.choices[0].message.content or ""
    t0 = time.perf_counter()
    arrivals: list[tuple[float, str]] = []
    stream = client.chat.completions.create(model="tao-policy", messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    last = None
    for c in stream:
        last = c
        if c.choices and c.choices[0].delta.content:
            arrivals.append((time.perf_counter() - t0, c.choices[0].delta.content))
    end = time.perf_counter() - t0
    assert "".join(p for _, p in arrivals) == text and last is not None and last.usage is not None
    # Token by token: several pieces, the first long before the answer is complete (it used to come with the rest).
    assert len(arrivals) >= 3 and arrivals[0][0] < 0.7 * end, arrivals
    # stop: the answer ends before the stop string, finish_reason "stop"
    assert len(text) >= 4, text
    mark = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model="tao-policy", messages=messages, max_tokens=12, stop=["@@", mark])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.find(mark)]


@pytest.mark.integration
def test_models_auth_scheme_and_health(live: tuple[int, Any]) -> None:
    port, service = live
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, err = _post(port, "/v1/chat/completions", json.dumps({**body, "model": "../../etc/passwd"}).encode())
    assert status == 404 and err["error"]["code"] == "model_not_found" and "tao-policy" in err["error"]["message"]
    status, models = _post(port, "/v1/chat/completions", json.dumps({**body, "model": "tao-policy"}).encode())
    assert status == 200
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:  # the scheme is case-insensitive
        ids = [m["id"] for m in json.loads(r.read())["data"]]
    assert "tao-policy" in ids
    for name in ids:
        status, _ = _post(port, "/v1/chat/completions", json.dumps({**body, "model": name}).encode())
        assert status == 200, name
    for extra in ({"response_format": {"type": "json_object"}}, {"tools": [{"type": "function"}]}):
        status, err = _post(port, "/v1/chat/completions", json.dumps({**body, **extra}).encode())
        assert status == 400 and "supported" in err["error"]["message"]
    streamed = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      data=json.dumps({**body, "stream": True}).encode(),
                                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(streamed, timeout=60) as r:  # a stream says who answers, as a plain answer does
        assert r.headers["x-tao-arm"] in ("champion", "challenger") and r.headers["x-tao-model-version"]
        assert r.read().endswith(b"data: [DONE]\n\n")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}  # no key: up or not, nothing about the models
    req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        health = json.loads(r.read())
    assert set(health["arms"]) >= {"champion"} and health["capture"]["failed_flushes"] == 0


@pytest.mark.integration
def test_content_that_cannot_be_a_prompt_is_refused_or_quarantined(live: tuple[int, Any]) -> None:
    port, service = live
    for content in ("", "   ", "\x00", "a \ud800"):
        raw = json.dumps({"messages": [{"role": "user", "content": content}]}).encode()  # \ud800 stays escaped
        status, err = _post(port, "/v1/chat/completions", raw)
        assert status == 400 and err["error"]["code"] == "invalid_messages", (content, err)
    status, err = _post(port, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
                                                     b'"seed": 18446744073709551616}')
    assert status == 400 and err["error"]["code"] == "invalid_seed"
    # Answerable but not a prompt the log keeps (over ingest.max_prompt_chars): answered, and quarantined with why.
    long = "word " * (service.cfg.ingest.max_prompt_chars // 5 + 10)
    status, answer = _chat(port, long)
    assert status == 200
    service.flush()
    home = Path(service.cfg.home)
    logged = {r["request_id"]: r for r in _delta_rows(home, "serving_log")}
    assert logged[answer["id"]]["prompt_id"] is None
    held = [q for q in _delta_rows(home, "quarantine") if q["batch_id"] == answer["id"]]
    assert len(held) == 1 and held[0]["reason"].startswith("text too long") and held[0]["target"] == "prompts"


@pytest.mark.integration
def test_a_spool_record_that_cannot_be_written_is_quarantined_and_capture_goes_on(live: tuple[int, Any]) -> None:
    port, service = live
    service.flush()
    service.spool.append([{"table": "serving_log", "row": {"request_id": "chatcmpl-" + "0" * 32, "arm": "champion",
                                                           "latency_ms": "not a number"}}])
    with open(service.spool.live, "ab") as f:
        f.write(b'{"table": "serving_log", "row": {\n')  # a corrupt line that is not the last one
    status, answer = _chat(port, "asked after a bad record")
    assert status == 200
    service.flush()
    assert service.flush_errors == 0
    home = Path(service.cfg.home)
    assert answer["id"] in {r["request_id"] for r in _delta_rows(home, "serving_log")}
    reasons = [q["reason"] for q in _delta_rows(home, "quarantine") if q["source_file"].startswith("spool/")]
    assert any("not writable to serving_log" in r for r in reasons) and "unparsable spool record" in reasons
    assert service.spool.backlog() == 0


@pytest.mark.integration
def test_fuzzed_requests_get_4xx_never_500(live: tuple[int, Any]) -> None:
    """Seeded and bounded: malformed bodies, lone surrogates, huge integers, wrong types and sizes."""
    import random

    port, _ = live
    rng = random.Random(20261206)
    values: list[Any] = [None, True, -1, 0, 2**64, -(2**70), 1e308, "x", "", "\ud800", [], {}, [1, "a"], {"a": [{}]},
                         "a" * 3000, [{"role": "user"}], [{"role": "user", "content": 5}]]
    keys = ["messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "stream", "seed",
            "stop", "model", "response_format", "tools", "stream_options", "logprobs", "user"]
    statuses = []
    for i in range(160):
        body: Any = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(keys)] = rng.choice(values)
        raw = json.dumps(body).encode()
        if i % 8 == 0:
            raw = raw[: rng.randint(0, len(raw))]  # truncated
        elif i % 8 == 1:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))  # not JSON, not even UTF-8
        elif i % 8 == 2:
            raw = raw.replace(b'"hi"', b'"\\ud800 \\udfff"')  # escaped lone surrogates
        status, _ = _post(port, "/v1/chat/completions", raw)
        statuses.append(status)
    assert all(s in (200, 400, 404, 413, 422) for s in statuses), sorted(set(statuses))
    assert statuses.count(200) >= 1 and statuses.count(400) > 50  # both paths exercised
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


# --- integration: load, SIGKILL, restart ------------------------------------------------------------------------

def _start(home: Path, model: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TAO_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    home.mkdir(parents=True, exist_ok=True)
    errors = home / "server.err"
    with open(errors, "ab") as err:  # a file, not a pipe: nobody drains a pipe, and a full one blocks the server
        proc = subprocess.Popen([sys.executable, "-m", "tao_spark.cli", "serve",
                                 *_overrides(home, model, port, *extra)], env=env, stderr=err)
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, errors.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not come up")


def _load(port: int, clients: int, seconds: float, max_requests: int) -> tuple[list[str], list[float], float]:
    """Closed-loop clients for ``seconds``: the acknowledged request ids, their latencies, the wall time."""
    acked: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client(c: int) -> None:
        i = 0
        while time.time() < stop_at:
            with lock:
                if len(acked) >= max_requests:
                    return
            t0 = time.perf_counter()
            try:
                status, body = _chat(port, f"client {c} question {i % 7}", user=f"u{c}")
            except (OSError, http.client.HTTPException):  # killed under this request, even mid-body: unacknowledged
                return
            i += 1
            if status == 200:
                with lock:
                    acked.append(body["id"])
                    latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return acked, latencies, time.perf_counter() - t0


def _stats(label: str, latencies: list[float], wall: float) -> str:
    q = statistics.quantiles(latencies, n=20)
    return (f"{label}: {len(latencies)} requests, p50 {statistics.median(latencies):.0f} ms, p95 {q[18]:.0f} ms, "
            f"{len(latencies) / wall:.1f} req/s")


@pytest.mark.integration
def test_every_acknowledged_request_logged_once_across_sigkill(tiny_model: Path, tmp_path: Path) -> None:
    home, port = tmp_path / "home", _free_port()
    proc = _start(home, tiny_model, port)
    acked, latencies, wall = [], [], 0.0
    try:
        killer = threading.Timer(2.5, lambda: proc.send_signal(signal.SIGKILL))
        killer.start()  # mid-load: some requests in flight die unacknowledged, acknowledged ones sit in the spool
        got, lat, wall = _load(port, clients=4, seconds=6, max_requests=400)
        killer.join()
        acked += got
        latencies += lat
        assert proc.wait(timeout=30) == -signal.SIGKILL and got
        proc = _start(home, tiny_model, port)  # replays the spool before it answers /health
        got, lat, _ = _load(port, clients=2, seconds=1.5, max_requests=100)
        acked += got
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: the last flush
        proc.wait(timeout=120)
    logged = [r["request_id"] for r in _delta_rows(home, "serving_log")]
    assert len(logged) == len(set(logged)) and set(acked) <= set(logged)  # every acknowledged request exactly once
    # A request spooled just before the kill but whose answer never reached its client is logged too: at most
    # one per client that was waiting.
    assert len(set(logged) - set(acked)) <= 4
    assert not list((home / "spool").glob("*.flushing"))
    assert len({p["prompt_id"] for p in _delta_rows(home, "prompts")}) == len(_delta_rows(home, "prompts")) <= 28
    print("\n" + _stats("tiny model, 4 clients, capture on", latencies, wall))


@pytest.mark.integration
def test_capture_on_stores_every_answer_and_off_stores_none(tiny_model: Path, tmp_path: Path) -> None:
    """Also prints the spool's cost at load (fsync per request, a flush per second): a figure, not a gate."""
    lines = []
    for capture in ("true", "false"):
        home, port = tmp_path / capture, _free_port()
        proc = _start(home, tiny_model, port, f"serve.capture={capture}")
        try:
            warm = _load(port, clients=1, seconds=0.5, max_requests=5)[0]
            acked, latencies, wall = _load(port, clients=4, seconds=4, max_requests=1000)
            acked += warm
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        # What could fail: every answered request stored once with capture on, none with it off.
        logged = [r["request_id"] for r in _delta_rows(home, "serving_log")]
        assert latencies and (sorted(logged) == sorted(set(acked)) if capture == "true" else not logged)
        lines.append(_stats(f"tiny model, 4 clients, capture {capture}", latencies, wall))
    print("\n" + "\n".join(lines))


def _wait_up(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 180) -> None:
    """Until ``url`` answers; fails with the server's log if it exits or takes longer than ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"{url} did not come up"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)


def _register(cfg: Any, model: Path, tmp: Path, promote: bool = True) -> str:
    """A registered version exactly as a round's register stage writes it; returns the version."""
    from tao_spark import registry

    adapter = tmp / f"adapter-{model.name}"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    reg = registry.register(cfg, round_id=f"r-{model.name}", prompts_source={"path": str(tmp / "prompts")},
                            prompts_version=0, metrics={"eval_win_rate": 0.6}, per_task={},
                            decision=registry.GateDecision(promote, "test"), adapter_dir=str(adapter),
                            merged_dir=str(model), tags={}, figures={})
    return reg.model_version


@pytest.mark.integration
def test_serve_starts_on_the_registered_champion_from_any_directory(tiny_model: Path, tmp_path: Path) -> None:
    from openai import OpenAI

    home, elsewhere, port = tmp_path / "home", tmp_path / "elsewhere", _free_port()
    cfg = load_config(None, [f"home={home}", "mlflow.experiment=serve-test"])
    version = _register(cfg, tiny_model, tmp_path)
    import mlflow

    mlflow.set_tracking_uri(None)  # the server must find the store from its config alone
    elsewhere.mkdir()
    env = {**os.environ, "TAO_HOME": str(home), "TAO_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(tmp_path / "server.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tao_spark.cli", "serve", f"serve.port={port}",
                                 "serve.capture=false", "serve.max_tokens_cap=8"], cwd=elsewhere, env=env, stderr=err)
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}/health", tmp_path / "server.err")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="tao-policy", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert raw.headers["x-tao-model-version"] == version and raw.headers["x-tao-arm"] == "champion"
        assert raw.parse().choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert [p.parent for p in tmp_path.rglob("mlflow.db")] == [home]


@pytest.mark.integration
def test_hot_swap_moves_with_a_real_alias_and_keeps_the_old_for_in_flight(tiny_model: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tao_spark.serve import Models
    from tests.tiny import make_tiny_model

    cfg = load_config(None, [f"home={tmp_path / 'home'}", "mlflow.experiment=swap-test"])
    other = make_tiny_model(tmp_path / "v2", seed=1)
    v1 = _register(cfg, tiny_model, tmp_path)
    v2 = _register(cfg, other, tmp_path, promote=False)  # registered, alias challenger only
    m = Models(cfg)
    started = m.pick("champion")
    assert started.version == v1 and m.refresh() == []  # the alias did not move: nothing reloaded
    MlflowClient(tracking_uri=cfg.tracking_uri).set_registered_model_alias(cfg.mlflow.model_name, "champion", v2)
    assert m.refresh() == ["champion"]
    assert m.pick("champion").version == v2
    from tao_spark.models import model_id

    assert model_id(m.pick("champion").path) == model_id(str(other))
    # A request that took the old engine before the swap still holds a working one.
    out = started.generator.generate([[{"role": "user", "content": "hi"}]], n=1, temperature=0, top_p=1,
                                     max_new_tokens=2, seeds=[0])
    assert out[0][0].tokens >= 1


@pytest.mark.integration
def test_mlflow_models_serve_answers_the_registered_alias(tiny_model: Path, tmp_path: Path) -> None:
    """The registered version is an MLflow model any MLflow server loads: `mlflow models serve` on loopback."""
    cfg = load_config(None, [f"home={tmp_path / 'home'}", "mlflow.experiment=mlflow-serve"])
    _register(cfg, tiny_model, tmp_path)
    port = _free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    # As in an activated venv: MLflow's server execs uvicorn from PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri, "MLFLOW_REGISTRY_URI": cfg.registry_uri,
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(tmp_path / "mlflow-serve.log", "wb") as log:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{cfg.mlflow.model_name}@champion",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_up(proc, f"http://127.0.0.1:{port}/ping", tmp_path / "mlflow-serve.log")
        status, body = _post(port, "/invocations", json.dumps(
            {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}).encode(), key=None)
        assert status == 200, body
        (answer,) = body["predictions"] if isinstance(body, dict) and "predictions" in body else body
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= answer["usage"]["completion_tokens"] <= 4
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
