"""`lowbit serve`: an OpenAI-compatible HTTP server over lowbit.BatchEngine (continuous batching).

POST /v1/completions and /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
/health and /metrics (Prometheus text). FastAPI + uvicorn, pydantic for the request bodies (the `server`
extra: pip install "lowbit[server]").

One worker thread owns the engine and steps it while any request runs; HTTP handlers hand it requests through
a queue and receive tokens through asyncio queues. A request whose client hangs up is cancelled at once, which
frees its sequence for the next step. Requests beyond --parallel wait in a bounded queue (503 past it).
"""

import asyncio
import base64
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ._core import LowbitError
from .batch import BatchEngine, Request
from .model import MAX_LOGPROBS, _TextStream

log = logging.getLogger("lowbit.server")


# ---- the engine's thread ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One HTTP request's generation: its engine request and the asyncio queue its tokens go to."""

    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    submit: dict
    req: Optional[Request] = None
    error: Optional[Exception] = None

    def push(self, *items: tuple) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, list(items))


def _deliver(batches: list) -> None:
    for job, items in batches:
        job.out.put_nowait(items)


class Worker:
    """Steps the engine on its own thread. submit/cancel are safe from any thread."""

    def __init__(self, engine: BatchEngine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self._cmds: queue.Queue = queue.Queue()
        self._jobs: dict[int, _Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "errors": 0, "cancelled": 0}
        self._recent: list[tuple[float, int]] = []  # (time, tokens) of recent steps, for tokens/s
        self._embeds: list[_Job] = []  # embedding jobs waiting for a free sequence
        self._thread.start()

    def pending(self) -> int:
        return self._cmds.qsize() + self.engine.queued + len(self._embeds)

    def submit(self, job: _Job) -> None:
        self._cmds.put(("submit", job))

    def embed(self, job: _Job) -> None:
        self._cmds.put(("embed", job))

    def cancel(self, job: _Job) -> None:
        self._cmds.put(("cancel", job))

    def stop(self) -> None:
        self._stop.set()
        self._cmds.put(("stop", None))
        self._thread.join(timeout=30)

    def tokens_per_second(self, horizon: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t <= horizon]
        self._recent = recent
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(1e-9, recent[-1][0] - recent[0][0])

    def _command(self, kind: str, job: Optional[_Job]) -> None:
        if kind == "submit":
            try:
                job.req = self.engine.submit(**job.submit)
                self._jobs[job.req.id] = job
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += int(job.req.prompt.size)
            except Exception as e:  # noqa: BLE001 - reported to the request's handler
                job.error = e
                self.stats["errors"] += 1
            job.push(("submitted", None))
            if job.req is not None and job.req.done:  # max_tokens 0
                self._jobs.pop(job.req.id, None)
                job.push(("done", job.req.finish_reason))
        elif kind == "embed":
            self._embeds.append(job)
        elif kind == "cancel" and job in self._embeds:
            self._embeds.remove(job)
        elif kind == "cancel" and job.req is not None and not job.req.done:
            self.engine.cancel(job.req)
            self.stats["cancelled"] += 1
            self._jobs.pop(job.req.id, None)

    def _embed(self) -> None:
        """Embedding jobs run between steps, each in a sequence no request is using."""
        while self._embeds and self.engine.free_sequence() is not None:
            job = self._embeds.pop(0)
            try:
                vectors = self.engine.embed(**job.submit)
                job.push(("embedding", (vectors, self.engine.last_embed_tokens)))
            except Exception as e:  # noqa: BLE001 - reported to the request's handler
                self.stats["errors"] += 1
                job.push(("error", str(e)))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                # Block only when there is nothing to step (or no sequence is free for a waiting embedding).
                kind, job = self._cmds.get(timeout=None if not self.engine.busy and not self._embeds else 0)
                self._command(kind, job)
                continue
            except queue.Empty:
                pass
            self._embed()
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step ends the requests in it, not the server
                log.exception("engine step failed")
                for job in list(self._jobs.values()):
                    self.engine.cancel(job.req)
                    job.push(("error", str(e)))
                self._jobs.clear()
                continue
            self._recent.append((time.monotonic(), len(events)))
            # One wake-up of each event loop per step, carrying every job's tokens of the step.
            out: dict[_Job, list] = {}
            for req, token in events:
                job = self._jobs.get(req.id)
                if job is not None:
                    self.stats["completion_tokens"] += 1
                    lp = req.logprobs[-1] if req.logprobs is not None else None  # this step's token's
                    out.setdefault(job, []).append(("token", (token, lp)))
            for rid, job in list(self._jobs.items()):
                if job.req.done:
                    del self._jobs[rid]
                    out.setdefault(job, []).append(("done", job.req.finish_reason))
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for job, items in out.items():
                by_loop.setdefault(job.loop, []).append((job, items))
            for loop, batches in by_loop.items():
                loop.call_soon_threadsafe(_deliver, batches)


# ---- request bodies (OpenAI's fields; unknown ones are accepted and ignored, as OpenAI clients send many) --


def _models():
    from pydantic import BaseModel, ConfigDict, Field

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: Optional[str] = None
        max_tokens: Optional[int] = Field(default=None)
        max_completion_tokens: Optional[int] = None
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        stop: Union[str, list[str], None] = None
        seed: Optional[int] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: int = 1
        ignore_eos: bool = False  # llama.cpp server's extension: generate past end-of-generation tokens
        response_format: Optional[dict[str, Any]] = None  # {"type": "text" | "json_object" | "json_schema"}
        json_schema: Optional[dict[str, Any]] = None      # llama.cpp server's extensions
        grammar: Optional[str] = None

    class CompletionRequest(Common):
        prompt: Union[str, list[int]]
        logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)  # top alternatives per token

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: Union[str, list[dict[str, Any]], None] = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        logprobs: bool = False
        top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    class EmbeddingRequest(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: Optional[str] = None
        input: Union[str, list[str], list[int], list[list[int]]]
        encoding_format: Literal["float", "base64"] = "float"
        dimensions: Optional[int] = None
        pooling: Literal["mean", "last", "cls"] = "mean"  # lowbit's extensions: Model.embed's options
        normalize: bool = True

    return CompletionRequest, ChatRequest, EmbeddingRequest


# ---- the app ------------------------------------------------------------------------------------------


def create_app(engine: BatchEngine, model_name: str, api_key: Optional[str] = None, max_queue: int = 64):
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    CompletionRequest, ChatRequest, EmbeddingRequest = _models()
    worker = Worker(engine, max_queue)
    app = FastAPI(title="lowbit", docs_url=None, redoc_url=None)
    app.state.worker = worker
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": None}})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return error(400, "; ".join(parts) or "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HttpRequest, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(exc.status_code, str(exc.detail), kind)

    if api_key:
        app.add_middleware(_ApiKey, key=api_key,
                           refuse=lambda: error(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                "authentication_error"))

    @app.on_event("shutdown")
    def _shutdown() -> None:
        worker.stop()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lowbit"}]}

    @app.get("/metrics")
    def metrics():
        s = worker.stats
        lines = [
            "# TYPE lowbit_requests_total counter", f"lowbit_requests_total {s['requests']}",
            "# TYPE lowbit_request_errors_total counter", f"lowbit_request_errors_total {s['errors']}",
            "# TYPE lowbit_requests_cancelled_total counter", f"lowbit_requests_cancelled_total {s['cancelled']}",
            "# TYPE lowbit_prompt_tokens_total counter", f"lowbit_prompt_tokens_total {s['prompt_tokens']}",
            "# TYPE lowbit_completion_tokens_total counter",
            f"lowbit_completion_tokens_total {s['completion_tokens']}",
            "# TYPE lowbit_queue_length gauge", f"lowbit_queue_length {worker.pending()}",
            "# TYPE lowbit_slots_in_use gauge", f"lowbit_slots_in_use {engine.running}",
            "# TYPE lowbit_slots gauge", f"lowbit_slots {engine.n_seq}",
            "# TYPE lowbit_tokens_per_second gauge", f"lowbit_tokens_per_second {worker.tokens_per_second():.3f}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def sampling(body) -> tuple[dict, list[str]]:
        if body.n != 1:
            raise LowbitError("n: only n = 1 is supported")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = 16 if isinstance(body, CompletionRequest) else engine.model.n_ctx
        if max_tokens <= 0:
            raise LowbitError(f"max_tokens must be at least 1, got {max_tokens}")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if isinstance(body, CompletionRequest):
            logprobs = body.logprobs
        else:
            if body.top_logprobs is not None and not body.logprobs:
                raise LowbitError("top_logprobs needs logprobs: true")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return dict(max_new_tokens=int(max_tokens), temperature=body.temperature, top_p=body.top_p, top_k=0,
                    min_p=0.0, seed=body.seed, stop_at_eos=not body.ignore_eos,
                    logprobs=logprobs, **constraint_of(body)), [s for s in stops if s]

    def constraint_of(body) -> dict:
        """OpenAI's response_format, or llama.cpp's json_schema / grammar fields, as generate()'s arguments."""
        rf, kw = body.response_format, {}
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                kw["json_schema"] = rf.get("schema") or {"type": "object"}
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise LowbitError("response_format.json_schema must be an object with a 'schema' object")
                kw["json_schema"] = spec.get("schema") or {"type": "object"}
            elif kind != "text":
                raise LowbitError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        if body.json_schema is not None:
            kw["json_schema"] = body.json_schema
        if body.grammar is not None:
            kw["grammar"] = body.grammar
        return kw

    async def run(http: HttpRequest, prompt, kw: dict, add_bos: bool, stops: list[str], usage: dict):
        """Submit, then the text pieces as they come: yields ("text", str, [TokenLogprob of the tokens that
        came with it]) and finally ("done", reason); usage gets the token counts when it ends."""
        if worker.pending() >= max_queue:
            raise _Busy()
        job = _Job(asyncio.get_running_loop(), asyncio.Queue(), dict(prompt=prompt, add_bos=add_bos, **kw))
        worker.submit(job)
        await job.out.get()  # [("submitted", None)]
        if job.error is not None:
            raise job.error

        async def watch() -> None:  # a client that hangs up, even while its request waits in the queue
            while not await http.is_disconnected():
                await asyncio.sleep(0.5)
            job.out.put_nowait([("hangup", None)])

        watcher = asyncio.get_running_loop().create_task(watch())
        text = _TextStream(engine.model.tokenizer, stops)
        n_tokens = 0
        try:
            while True:
                piece, lps = "", []
                for kind, value in await job.out.get():  # the tokens of one engine step
                    if kind == "hangup":
                        return
                    if kind == "error":
                        raise LowbitError(f"generation failed: {value}")
                    if kind == "done":
                        piece += text.finish()
                        if piece or lps:
                            yield "text", piece, lps
                        yield "done", value
                        return
                    token, lp = value
                    n_tokens += 1
                    if lp is not None:
                        lps.append(lp)
                    piece += text.feed(token)
                    if text.stopped:  # a stop string: the text up to it, and the request ends
                        if piece or lps:
                            yield "text", piece, lps
                        yield "done", "stop"
                        return
                if piece or lps:
                    yield "text", piece, lps
        finally:
            watcher.cancel()
            if job.req is not None and not job.req.done:
                worker.cancel(job)
            p = int(job.req.prompt.size) if job.req is not None else 0
            usage.update(prompt_tokens=p, completion_tokens=n_tokens, total_tokens=p + n_tokens)

    def logprobs_json(lps: list, chat: bool, offset: int) -> dict:
        """OpenAI's logprobs object for these tokens: chat's {"content": [...]}, or the completions API's
        tokens / token_logprobs / top_logprobs / text_offset (offsets from `offset` on)."""
        tok = engine.model.tokenizer

        def piece(i: int) -> tuple[str, list[int]]:
            b = tok.token_to_piece(i)
            return b.decode("utf-8", errors="replace"), list(b)

        if chat:
            content = []
            for lp in lps:
                text, raw = piece(lp.token)
                top = []
                for i, v in lp.top:
                    t, r = piece(i)
                    top.append({"token": t, "logprob": v, "bytes": r})
                content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
            return {"content": content}
        tokens, offsets = [], []
        for lp in lps:
            offsets.append(offset)
            text = piece(lp.token)[0]
            tokens.append(text)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{piece(i)[0]: v for i, v in lp.top} for lp in lps], "text_offset": offsets}

    def chat_prompt(body) -> list[int]:
        msgs = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if any(part.get("type") != "text" for part in content):
                    raise LowbitError("messages: only text content parts are supported")
                content = "".join(str(part.get("text", "")) for part in content)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        return engine.model.chat_ids(msgs)

    async def respond(http: HttpRequest, body, chat: bool):
        try:
            kw, stops = sampling(body)
            prompt = chat_prompt(body) if chat else body.prompt
        except LowbitError as e:
            return error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        counts: dict = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        gen = run(http, prompt, kw, True, stops, counts)
        try:
            first = await gen.__anext__()
        except _Busy:
            return error(503, f"the server is busy ({max_queue} requests waiting); retry later", "server_error")
        except LowbitError as e:
            return error(400, str(e))
        except StopAsyncIteration:
            first = None

        want_lp = kw["logprobs"] is not None
        if not body.stream:
            text, reason, lps = "", None, []
            item = first
            while item is not None:
                if item[0] == "text":
                    text += item[1]
                    lps += item[2]
                else:
                    reason = item[1]
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    item = None
            logprobs = logprobs_json(lps, chat, 0) if want_lp else None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                       "finish_reason": reason}
                      if chat else {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason})
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice],
                    "usage": counts}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        offset = 0  # characters of completion text streamed so far (text_offset of the legacy logprobs)

        def chunk(delta_or_text: Any, reason: Optional[str], lps: Optional[list] = None) -> str:
            nonlocal offset
            logprobs = None
            if want_lp and lps is not None:
                logprobs = logprobs_json(lps, chat, offset)
            if chat:
                c = {"index": 0, "delta": delta_or_text, "logprobs": logprobs, "finish_reason": reason}
                o = "chat.completion.chunk"
            else:
                c = {"index": 0, "text": delta_or_text, "logprobs": logprobs, "finish_reason": reason}
                o = "text_completion"
                offset += len(delta_or_text)
            return "data: " + json.dumps({"id": rid, "object": o, "created": now, "model": model_name,
                                          "choices": [c]}) + "\n\n"

        async def events():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                item = first
                while item is not None:
                    if item[0] == "text":
                        yield chunk({"content": item[1]} if chat else item[1], None, item[2])
                    else:
                        yield chunk({} if chat else "", item[1])
                    try:
                        item = await gen.__anext__()
                    except StopAsyncIteration:
                        item = None
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk" if chat else obj,
                                                 "created": now, "model": model_name, "choices": [],
                                                 "usage": counts}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await gen.aclose()  # a client that hung up: the request is cancelled now

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest, body: CompletionRequest):
        return await respond(http, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest, body: ChatRequest):
        return await respond(http, body, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(http: HttpRequest, body: EmbeddingRequest):
        n_embd = engine.model.config.n_embd
        if body.dimensions is not None and body.dimensions != n_embd:
            return error(400, f"dimensions: this model's embeddings have {n_embd}; other sizes are not supported",
                         param="dimensions")
        if worker.pending() >= max_queue:
            return error(503, f"the server is busy ({max_queue} requests waiting); retry later", "server_error")
        job = _Job(asyncio.get_running_loop(), asyncio.Queue(),
                   dict(texts=body.input, pooling=body.pooling, normalize=body.normalize))
        worker.embed(job)
        while True:
            try:
                items = await asyncio.wait_for(job.out.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    worker.cancel(job)
                    return error(400, "the client went away")
        kind, value = items[0]
        if kind == "error":
            return error(400, value)
        vectors, n_tokens = value
        vectors = vectors.reshape(-1, n_embd)
        data = []
        for i, v in enumerate(vectors):
            emb = (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                   else [float(x) for x in v])
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    return app


class _Busy(Exception):
    pass


class _ApiKey:
    """/v1/ paths need `Authorization: Bearer KEY`. A plain ASGI middleware: Starlette's BaseHTTPMiddleware
    (@app.middleware) would pass every streamed chunk through an extra memory stream."""

    def __init__(self, app: Any, key: str, refuse: Any):
        self.app = app
        self.expected = f"Bearer {key}".encode()
        self.refuse = refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                await self.refuse()(scope, receive, send)
                return
        await self.app(scope, receive, send)
