"""`lowbit serve` through the real `openai` client: a server started on a free loopback port over a tiny model,
chat and completions, streamed and not, equal to the library's generate()/chat() at temperature 0, alone and
with concurrent clients; every bad input gets an OpenAI-style 4xx body; a client that hangs up frees its
sequence; --api-key is enforced."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import lowbit
from model_helpers import N_THREADS
from test_architectures import tiny_gguf

openai = pytest.importorskip("openai", reason="the server tests need the openai client (the test extra)")
pytest.importorskip("fastapi", reason="the server tests need fastapi and uvicorn (the server extra)")

KEY = "test-key"
PROMPTS = ["Once upon a time", "The capital of France", "def fibonacci(n):", "Hello, world!", "In 1969, 3",
           "She sells sea shells"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    path = tiny_gguf("llama3", "f32")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "-m", str(path), "--port", str(port),
                             "--parallel", "3", "-c", "16384", "-t", str(N_THREADS), "--api-key", KEY,
                             "--max-queue", "32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read()}")
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("the server did not come up in 30 s")
    yield base, path
    proc.terminate()  # SIGTERM: uvicorn drains, shuts down, then ends the process with the signal it got
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def local(server):
    # The same KV cache type as the server's default (f16), so both run the same computation.
    with lowbit.load(server[1], n_ctx=2048, n_threads=N_THREADS, kv_f16=True) as m:
        yield m


def _client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models_and_health(server):
    models = _client(server[0]).models.list()
    assert [m.id for m in models.data] == [server[1].name]


def test_completion_equals_generate(server, local):
    c = _client(server[0])
    for prompt in PROMPTS[:3]:
        r = c.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
        want = local.generate(prompt, max_new_tokens=12, temperature=0.0)
        assert r.choices[0].text == want
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens == len(local.tokenize(prompt))


def test_chat_equals_chat_streamed_or_not(server, local):
    c = _client(server[0])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    want = local.chat(msgs, max_new_tokens=16, temperature=0.0)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    pieces, usage, reasons = [], None, []
    for ch in c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for choice in ch.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == want
    assert reasons[-1] in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_logprobs_equal_the_library(server, local):
    """Completions' logprobs=n and chat's logprobs/top_logprobs carry each token's log-probability and its top
    alternatives: the values generate(logprobs=n) records (tests/test_generate.py ties those to log-softmax of
    logits()), streamed or not."""
    c = _client(server[0])
    ids = local.generate_tokens(PROMPTS[1], max_new_tokens=8, temperature=0.0, logprobs=3)
    want = local.last_logprobs
    piece = lambda i: local.tokenizer.token_to_piece(i).decode("utf-8", errors="replace")  # noqa: E731
    r = c.completions.create(model="x", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp.tokens == [piece(i) for i in ids]
    assert lp.token_logprobs == pytest.approx([w.logprob for w in want], abs=1e-5)
    for got, w in zip(lp.top_logprobs, want):
        # The legacy format keys alternatives by their text: tokens with the same text (say, two partial UTF-8
        # bytes, both shown as U+FFFD) share one entry, the last one written.
        expect = {piece(i): v for i, v in w.top}
        assert list(got) == list(expect) and list(got.values()) == pytest.approx(list(expect.values()), abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    msgs = [{"role": "user", "content": "What is the capital?"}]
    ids = local.generate_tokens(local.chat_ids(msgs), max_new_tokens=6, temperature=0.0, logprobs=2)
    want = local.last_logprobs
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                  top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == [piece(i) for i in ids]
    assert [t.logprob for t in content] == pytest.approx([w.logprob for w in want], abs=1e-5)
    assert [[a.token for a in t.top_logprobs] for t in content] == [[piece(i) for i, _ in w.top] for w in want]
    assert content[0].bytes == list(local.tokenizer.token_to_piece(ids[0]))
    streamed = []
    for ch in c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=2, stream=True):
        for choice in ch.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = c.chat.completions.create(model="x", messages=msgs, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_embeddings_equal_the_library(server, local):
    """/v1/embeddings: Model.embed's mean-pooled, unit-length vectors (the same KV type as the server's), as
    float lists or base64 (what the openai client asks for by default); token ids are accepted too."""
    import numpy as np

    c = _client(server[0])
    texts = ["The sea at dawn.", "def fibonacci(n):"]
    want = local.embed(texts)
    r = c.embeddings.create(model="x", input=texts)  # base64 on the wire
    got = np.asarray([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1] and np.allclose(got, want, rtol=0, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(local.tokenize(t)) for t in texts)
    r = c.embeddings.create(model="x", input=texts[0], encoding_format="float")
    assert np.allclose(np.asarray(r.data[0].embedding, dtype=np.float32), want[0], rtol=0, atol=1e-5)
    ids = local.tokenize(texts[1])
    r = c.embeddings.create(model="x", input=ids, encoding_format="float")
    assert np.allclose(np.asarray(r.data[0].embedding, dtype=np.float32), want[1], rtol=0, atol=1e-5)
    code, payload = _post(server[0], "/v1/embeddings", json.dumps({"input": "hi", "dimensions": 3}).encode())
    assert code == 400 and "dimensions" in payload["error"]["message"]
    code, payload = _post(server[0], "/v1/embeddings", json.dumps({"input": []}).encode())
    assert code == 400 and "at least one" in payload["error"]["message"]


def test_response_format_constrains_the_reply(server, local):
    """response_format json_schema / json_object and llama.cpp's grammar field give the library's constrained
    text (generate(json_schema=...) / grammar=); the JSON validates."""
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}, "w": {"enum": ["a", "b"]}},
              "required": ["n", "w"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    c = _client(server[0])
    msgs = [{"role": "user", "content": "Give me JSON."}]
    want = local.chat(msgs, max_new_tokens=40, temperature=0.0, json_schema=schema)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=40, temperature=0,
                                  response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(want), schema)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=60, temperature=0,
                                  response_format={"type": "json_object"})
    assert r.choices[0].message.content == local.chat(msgs, max_new_tokens=60, temperature=0.0,
                                                      json_schema={"type": "object"})
    r = c.completions.create(model="x", prompt="Answer:", max_tokens=8, temperature=0,
                             extra_body={"grammar": 'root ::= " yes" | " no"'})
    assert r.choices[0].text in (" yes", " no")
    code, payload = _post(server[0], "/v1/chat/completions", json.dumps(
        {"messages": msgs, "response_format": {"type": "xml"}}).encode())
    assert code == 400 and "response_format" in payload["error"]["message"]
    code, payload = _post(server[0], "/v1/completions", json.dumps(
        {"prompt": "x", "grammar": "root ::= (", "max_tokens": 4}).encode())
    assert code == 400 and "grammar" in payload["error"]["message"]


def test_stop_strings_end_the_text(server, local):
    c = _client(server[0])
    full = local.generate(PROMPTS[0], max_new_tokens=20, temperature=0.0)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = c.completions.create(model="x", prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_their_own_answers(server, local):
    """Eight clients at once on three sequences (five queue): each text equals generate() alone."""
    want = {p: local.generate(p, max_new_tokens=10, temperature=0.0) for p in PROMPTS}
    got, errors = {}, []

    def ask(prompt: str, stream: bool) -> None:
        try:
            c = _client(server[0])
            if stream:
                text = "".join(ch.choices[0].text for ch in c.completions.create(
                    model="x", prompt=prompt, max_tokens=10, temperature=0, stream=True) if ch.choices)
            else:
                text = c.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0).choices[0].text
            got[(prompt, stream)] = text
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(p, k % 2 == 0)) for k, p in enumerate(PROMPTS + PROMPTS[:2])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (prompt, _), text in got.items():
        assert text == want[prompt], prompt


def _post(base: str, path: str, body: bytes, key: str = KEY):
    req = urllib.request.Request(base + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 7}', 400, "temperature"),
    ("/v1/completions", b'{"max_tokens": 4}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role"),
    ("/v1/completions", json.dumps({"prompt": "word " * 20000, "max_tokens": 4}).encode(), 400, "context"),
    ("/v1/completions", b'{"prompt": [1, 2, 99999], "max_tokens": 4}', 400, "outside the vocabulary"),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 50}', 400, "logprobs"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', 400,
     "logprobs"),
    ("/v1/nothing", b"{}", 404, "Not Found"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, words):
    code, payload = _post(server[0], path, body)
    assert code == status, payload
    assert set(payload) == {"error"} and words.lower() in payload["error"]["message"].lower(), payload
    assert payload["error"]["type"]


def test_api_key_is_required(server):
    code, payload = _post(server[0], "/v1/completions", b'{"prompt": "hi"}', key="wrong")
    assert code == 401 and payload["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        _client(server[0], key="wrong").models.list()


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def test_hang_up_frees_the_sequence(server):
    base = server[0]
    port = int(base.rsplit(":", 1)[1])
    # 16,000 tokens keep the sequence busy for seconds even on this tiny model: freed within half a second
    # means cancelled (and the cancellation counter says so).
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 16000, "temperature": 0, "stream": True,
                       "ignore_eos": True})
    cancelled = _metric(base, "lowbit_requests_cancelled_total")
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    seen = b""
    while b"data:" not in seen:  # streaming has begun (the headers may come in a packet of their own)
        part = s.recv(4096)
        assert part, seen
        seen += part
    assert _metric(base, "lowbit_slots_in_use") >= 1
    s.close()
    for _ in range(10):
        if _metric(base, "lowbit_slots_in_use") == 0:
            break
        time.sleep(0.05)
    assert _metric(base, "lowbit_slots_in_use") == 0
    assert _metric(base, "lowbit_requests_cancelled_total") == cancelled + 1


def test_queue_is_bounded_and_sigterm_drains():
    """One sequence and room for one waiting request: with three requests at once the third gets 503 and an
    OpenAI error body; a request in flight when SIGTERM arrives still completes."""
    path = tiny_gguf("llama3", "f32")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "-m", str(path), "--port", str(port),
                             "--parallel", "1", "--max-queue", "1", "-c", "8192", "-t", str(N_THREADS)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        long_body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1000, "temperature": 0,
                                "ignore_eos": True}).encode()
        results: dict = {}

        def ask(k: int) -> None:
            results[k] = _post(base, "/v1/completions", long_body)

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        while _metric(base, "lowbit_slots_in_use") < 1:
            time.sleep(0.01)
        second = threading.Thread(target=ask, args=(1,))
        second.start()
        while _metric(base, "lowbit_queue_length") < 1:
            time.sleep(0.01)
        code, payload = _post(base, "/v1/completions", long_body)
        assert code == 503 and payload["error"]["type"] == "server_error", payload
        proc.terminate()  # both accepted requests are still answered
        first.join(120)
        second.join(120)
        assert results[0][0] == 200 and results[0][1]["usage"]["completion_tokens"] == 1000
        assert results[1][0] == 200 and results[1][1]["usage"]["completion_tokens"] == 1000
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
