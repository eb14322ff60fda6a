"""The HTTP server: FastAPI routes over the batcher and the prefix store.

    app = create_app(model, tokenizer, PrefixStore("prefixes.db", model=model))
    run_server("smollm2-135m", "prefixes.db", host="127.0.0.1", port=8000)

Routes: POST /v1/completions, GET /v1/models, POST /v1/prefixes, GET|DELETE /v1/prefixes/{name},
GET /health, GET /metrics. Every /v1 route needs `Authorization: Bearer KEY`; a key belongs to an
owner, who sees their own prefixes plus public ones. Another owner's private prefix answers 404,
exactly like a name nobody uses. The key and the body's size are checked before the body is read
(`RequestGuard`); a completion whose client leaves or times out is cancelled in the batcher.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from .. import models
from ..models import fingerprint, model_name
from ..files import PrefixFileError
from ..precision import cast_model, choose
from .batcher import Batcher, Completion, GenerationRequest, PrefixRemoved, QueueFull, RequestHandle, ShuttingDown
from .config import ServeConfig
from .metrics import CONTENT_TYPE, ServerMetrics
from .prefix_cache import LoadedPrefix, PrefixCache, watch_store
from .sampling import SamplingParams
from .schemas import CompletionRequest, choice, completion_body, error_body, usage
from .store import PrefixRecord, PrefixStore
from .store_errors import InvalidName, NotOwner, PrefixExists, PrefixIntegrityError, PrefixNotFound, StoreError

log = logging.getLogger("prefixtune.serve")


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", ...}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers, self.param = status, message, type, headers or {}, param


class ErrorResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an error message that quotes client input (even a
    lone surrogate) always encodes, so an error is always answered, never a dropped connection."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _not_found(name: str, param: str = "model") -> ApiError:
    shown = name if len(name) <= 80 else name[:80] + "..."
    return ApiError(404, f"The model {shown!r} does not exist or you do not have access to it.", "not_found_error",
                    param=param)


@dataclass
class ServerState:
    """Everything the routes share; one per app."""

    model: object
    tokenizer: object
    store: PrefixStore
    config: ServeConfig
    model_id: str
    fingerprint: str
    batcher: Batcher
    prefixes: PrefixCache
    metrics: ServerMetrics
    shutting_down: bool = False
    precision: str = "fp32"  # the served model's number format (ServeConfig.precision, "auto" resolved)

    def lookup(self, name: str, owner: str) -> LoadedPrefix | None:
        """The prefix a request names (None: the base model), as `owner` may see it. Runs in a thread."""
        if name == self.model_id:
            return None
        try:
            record = self.store.get(name, owner)
            if record.fingerprint != self.fingerprint:
                raise ApiError(400, param="model", message=f"prefix {name!r} was made for base model {record.base_model!r} (fingerprint "
                                    f"{record.fingerprint}); this server runs {self.model_id!r} ({self.fingerprint})")
            return self.prefixes.get(record)
        except PrefixNotFound:
            raise _not_found(name) from None
        except (PrefixIntegrityError, PrefixFileError) as e:  # details (paths) go to the log, not the client
            log.error("refusing to serve prefix %r: %s", name, e)
            why = ("is missing or changed since it was added" if isinstance(e, PrefixIntegrityError) else
                   "is not a prefix file this server accepts (e.g. stored by an older version)")
            raise ApiError(500, f"prefix {name!r} cannot be served: its stored file {why} (the server log has the "
                                "details)", "prefix_integrity_error") from None


UPLOAD_SLACK_BYTES = 64 * 1024  # multipart boundaries and the name/public fields around the file


class RequestGuard:
    """ASGI middleware for /v1 routes, run before any byte of the body is read: a missing or
    unknown API key gets 401 and a declared Content-Length over the route's cap gets 413 at once;
    a body that grows past its cap while being read (chunked uploads) gets 413 too."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        config = self.state.config
        headers = Headers(scope=scope)
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/prefixes":
            cap, what = int(config.max_upload_mb * 2**20) + UPLOAD_SLACK_BYTES, f"{config.max_upload_mb} MB upload"
        else:
            cap, what = config.max_request_kb * 1024, f"{config.max_request_kb} KB request"
        try:
            who = await authenticate(self.state.store, headers.get("authorization", ""))
            declared = headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > cap):
                raise ApiError(413, f"the body ({declared} bytes) is larger than this server's limit of a {what}",
                               "request_too_large", param="body")
        except ApiError as e:  # answered without reading the body
            await _error_response(e)(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = who
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:  # handled by the app's handler: a JSON 413
                    raise StarletteHTTPException(413, f"the body is larger than this server's limit of a {what}")
            return message

        await self.app(scope, capped_receive, send)


async def authenticate(store: PrefixStore, header: str) -> str:
    """The owner of the `Authorization: Bearer KEY` header, else ApiError 401."""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                       "authentication_error", {"WWW-Authenticate": "Bearer"}, param="Authorization")
    who = await run_in_threadpool(store.owner_of, key.strip())
    if who is None:
        raise ApiError(401, "invalid API key (header Authorization)", "authentication_error",
                       {"WWW-Authenticate": "Bearer"}, param="Authorization")
    return who


def _error_response(e: ApiError) -> JSONResponse:
    return ErrorResponse(error_body(e.message, e.type, e.status, e.param), status_code=e.status, headers=e.headers)


def _form_bool(value, field: str) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ApiError(400, f"invalid request: {field}: expected true or false, got {str(value)[:40]!r}", param=field)


def _describe(record: PrefixRecord) -> dict:
    return {"id": record.name, "object": "model", "created": _unix(record.created), "owned_by": record.owner,
            "public": record.public, "length": record.length, "method": record.method, "sha256": record.sha256,
            "size_bytes": record.size_bytes}


def _unix(iso: str) -> int:
    return calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))


def create_app(model, tokenizer, store: PrefixStore, config: ServeConfig | None = None,
               model_id: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` with the prefixes in `store`.

    `model_id`: the name under which clients ask for the base model without a prefix (default: the
    model's own name). The model worker starts with the app (lifespan) and drains on shutdown.
    `config.precision` "bf16" (or "auto" where bf16 measured faster) casts `model`'s weights to bf16 in
    place, once: the server owns the model. Prefixes are then loaded in bf16 too (the prefix cache keeps
    the model's dtype), and the KV cache is bf16.
    """
    config = config or ServeConfig()
    precision = choose(config.precision, device=model.device.type)
    cast_model(model, torch.bfloat16 if precision.bf16 else None)  # before anything records the model's dtype
    metrics = ServerMetrics()
    if store.model is None:
        store.model = model  # uploads must be validated against the served model
    elif store.model is not model:
        raise ValueError("the store validates against a different model object than the one served")
    state = ServerState(
        model=model, tokenizer=tokenizer, store=store, config=config, model_id=model_id or model_name(model),
        fingerprint=fingerprint(model), batcher=Batcher(model, tokenizer, config, metrics),
        prefixes=PrefixCache(store, capacity=config.prefix_cache_size, dtype=model.dtype,
                             max_bytes=config.prefix_cache_bytes), metrics=metrics, precision=precision.name)
    metrics.cached_prefixes.fn = lambda: len(state.prefixes)
    metrics.cached_prefix_bytes.fn = lambda: state.prefixes.nbytes

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        stop_watch = threading.Event()  # other replicas' removals reach our cache (serve/prefix_cache.py)
        watcher = threading.Thread(target=watch_store, name="store-watch", daemon=True, args=(
            store, state.prefixes, stop_watch, config.store_poll_s, config.store_sweep_s))
        watcher.start()
        log.info("serving %s (fingerprint %s) with prefixes from %s (files in %s); precision %s", state.model_id,
                 state.fingerprint, store.backend.location, store.files_dir, precision.reason)
        yield
        state.shutting_down = True  # uvicorn has let open requests finish; now finish the worker
        stop_watch.set()
        await run_in_threadpool(state.batcher.stop, True, config.shutdown_timeout_s)
        await run_in_threadpool(watcher.join, 5.0)

    uploads_in_memory = asyncio.Semaphore(2)  # upload bodies read into memory at once (each <= max_upload_mb)
    app = FastAPI(title="prefixtune server", version="1", lifespan=lifespan,
                  description="Many users' prefixes served from one frozen model.")
    app.state.prefixtune = state
    _install_error_handlers(app)
    app.add_middleware(RequestGuard, state=state)  # added first: inside count_requests, so its answers count

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        try:
            response = await call_next(request)
        except Exception as e:  # a bug: answered here (500, logged once), so the connection stays usable
            response = _unexpected(request, e)
        route = request.scope.get("route")
        metrics.requests.inc(1, getattr(route, "path", "other"), str(response.status_code))
        return response

    async def owner(request: Request) -> str:
        who = request.scope.get("state", {}).get("owner")  # RequestGuard checked the key before the body
        return who if who is not None else await authenticate(store, request.headers.get("authorization", ""))

    @app.get("/health")
    async def health():
        ok = state.batcher.alive and not state.shutting_down
        body = {"status": "ok" if ok else "unavailable", "model": state.model_id, "precision": state.precision,
                "queue_depth": state.batcher.queue_depth, "running": state.batcher.running}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(who: str = Depends(owner)):
        records = await run_in_threadpool(store.list, who)
        base = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "system", "public": True}
        return {"object": "list", "data": [base] + [_describe(r) for r in records if r.fingerprint == state.fingerprint]}

    @app.get("/v1/prefixes/{name}")
    async def show_prefix(name: str, who: str = Depends(owner)):
        try:
            record = await run_in_threadpool(store.get, name, who)
        except PrefixNotFound:
            raise _not_found(name, "name") from None
        return {**_describe(record), "object": "prefix", "fingerprint": record.fingerprint,
                "base_model": record.base_model}

    @app.post("/v1/prefixes", status_code=201)
    async def upload_prefix(request: Request, who: str = Depends(owner)):
        """multipart/form-data: name (the prefix's name), file (a .safetensors prefix file), public
        (true/false). Parsed here, after the key check, as a stream: the file is spooled to a temp
        file, and the body is capped (RequestGuard)."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "invalid request: body: send multipart/form-data with fields name, file and public",
                           param="body")
        parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=2,
                                 max_part_size=64 * 1024)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, f"invalid request: body: {e.message}", param="body") from None
        held = False
        try:
            name, file = form.get("name"), form.get("file")
            if not isinstance(name, str):
                raise ApiError(400, "invalid request: name: Field required", param="name")
            if not isinstance(file, UploadFile):
                raise ApiError(400, "invalid request: file: Field required (a file part)", param="file")
            public = _form_bool(form.get("public", "false"), "public")
            if name == state.model_id:
                raise ApiError(400, f"name: {name!r} is the base model's name; pick another prefix name", param="name")
            limit = int(config.max_upload_mb * 2**20)
            await uploads_in_memory.acquire()  # the body is on disk (spooled); at most 2 are in memory at once
            held = True
            data = await file.read(limit + 1)
            if len(data) > limit:
                raise ApiError(413, f"file: larger than the limit of {config.max_upload_mb} MB", "request_too_large",
                               param="file")
        except BaseException:
            if held:
                uploads_in_memory.release()
            raise
        finally:
            await form.close()  # removes the spooled temp file
        notes: list[str] = []
        try:
            record = await run_in_threadpool(store.add_bytes, name, who, data, public, file.filename or "uploaded file",
                                             notes)
        except PrefixExists as e:
            raise ApiError(409, str(e), "conflict_error", param="name") from None
        except (PrefixFileError, InvalidName) as e:
            file_error = isinstance(e, PrefixFileError)
            raise ApiError(400, str(e), "invalid_prefix_file" if file_error else "invalid_request_error",
                           param="file" if file_error else "name") from None
        finally:
            del data
            uploads_in_memory.release()
        log.info("owner %s added prefix %r (%s bytes, public=%s)", who, name, record.size_bytes, record.public)
        return {**_describe(record), "object": "prefix", "base_model": record.base_model, "warnings": notes}

    @app.delete("/v1/prefixes/{name}")
    async def delete_prefix(name: str, who: str = Depends(owner)):
        try:
            record = await run_in_threadpool(store.remove, name, who)  # also drops the cached copy
        except PrefixNotFound:
            raise _not_found(name, "name") from None
        except NotOwner as e:
            raise ApiError(403, str(e), "permission_error", param="name") from None
        log.info("owner %s removed prefix %r", who, name)
        return {"id": record.name, "object": "prefix", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, who: str = Depends(owner)):
        arrived = time.monotonic()
        prompts = body.prompts
        if len(prompts) > config.max_prompts_per_request:
            raise ApiError(400, f"prompt: {len(prompts)} prompts; at most {config.max_prompts_per_request} per request",
                           param="prompt")
        max_tokens = body.max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        prefix = await run_in_threadpool(state.lookup, body.model, who)
        prompt_ids = [_encode(tokenizer, p) for p in prompts]
        params = [SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                 stop=tuple(body.stop), seed=None if body.seed is None else body.seed + i)
                  for i in range(len(prompts))]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            return _stream(state, body, prompt_ids, prefix, params, meta, arrived)
        requests = [GenerationRequest(ids, prefix, p) for ids, p in zip(prompt_ids, params)]
        handles = _submit(state, requests)
        results = await _wait_all(state, handles, arrived, body.model, request)
        metrics.request_latency.observe(time.monotonic() - arrived)
        return completion_body(**meta, choices=[choice(i, c.text, c.finish_reason) for i, c in enumerate(results)],
                               usage=usage(sum(c.prompt_tokens for c in results),
                                           sum(c.completion_tokens for c in results)))

    return app


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if not ids and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id]  # an empty prompt continues from the start-of-text token
    if not ids:
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    return ids


def _submit(state: ServerState, requests: list[GenerationRequest]) -> list[RequestHandle]:
    try:
        return state.batcher.submit_all(requests)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", {"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), "service_unavailable") from None
    except ValueError as e:  # could never fit: the prompt (with its prefix and max_tokens) is too long
        raise ApiError(400, str(e), param="prompt") from None


def _worker_error(e: BaseException, model: str) -> ApiError:
    if isinstance(e, PrefixRemoved):
        return _not_found(model)
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), "service_unavailable")
    log.error("generation failed: %r", e)
    return ApiError(500, f"generation failed: {e}", "server_error")


async def _wait_all(state: ServerState, handles: list[RequestHandle], arrived: float, model: str,
                    request: Request) -> list[Completion]:
    """The completions, unless the request times out (504) or its client leaves first: either way
    its rows are cancelled and leave the batch at the next step."""
    left = state.config.request_timeout_s - (time.monotonic() - arrived)
    results = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(h.future) for h in handles)))
    results.add_done_callback(_retrieve)  # cancelled rows fail their futures after we stopped waiting
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({results, gone}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        if results in done:
            try:
                return results.result()
            except Exception as e:  # raised by the worker: a removed prefix, shutdown, a failed batch
                raise _worker_error(e, model) from None
        reason = "disconnect" if gone in done else "timeout"
        _cancel(state, handles, reason)
        if reason == "disconnect":  # nobody reads this answer; the status shows in logs and metrics
            raise ApiError(499, "the client closed the connection", "client_closed_request")
        raise ApiError(504, f"the request did not finish within {state.config.request_timeout_s} s", "timeout_error")
    finally:
        gone.cancel()
        results.cancel()
        for h in handles:  # a failed request frees its rows at the next step
            if not h.future.done():
                h.cancel()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a future's exception as seen (else asyncio logs 'exception was never retrieved')."""
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so that is the next message)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel(state: ServerState, handles: list[RequestHandle], reason: str) -> None:
    live = [h for h in handles if not h.future.done()]
    for h in live:
        h.cancel()
    if live:
        state.metrics.cancelled.inc(len(live), reason)
        log.info("cancelled %d unfinished prompt(s): %s", len(live), reason)


def _stream(state: ServerState, body: CompletionRequest, prompt_ids, prefix, params, meta, arrived) -> StreamingResponse:
    """Server-sent events: one chunk per streamed text piece, a final chunk per choice, then [DONE]."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_text_for(index: int):
        return lambda piece: loop.call_soon_threadsafe(events.put_nowait, ("text", index, piece))

    requests = [GenerationRequest(ids, prefix, p, on_text=on_text_for(i))
                for i, (ids, p) in enumerate(zip(prompt_ids, params))]
    handles = _submit(state, requests)  # errors here are still plain HTTP errors (429, 503, 400)
    for i, h in enumerate(handles):
        h.future.add_done_callback(
            lambda fut, i=i: loop.call_soon_threadsafe(events.put_nowait, ("done", i, fut)))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(payload) -> str:
        return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"

    async def event_source():
        remaining, prompt_tokens, completion_tokens = len(handles), 0, 0
        deadline = arrived + state.config.request_timeout_s
        why = "disconnect"  # unless the loop below ends otherwise
        try:
            while remaining:
                try:
                    kind, index, value = await asyncio.wait_for(events.get(), deadline - time.monotonic())
                except (TimeoutError, asyncio.TimeoutError):
                    why = "timeout"
                    yield sse(error_body(f"the request did not finish within {state.config.request_timeout_s} s",
                                         "timeout_error", 504))
                    break
                if kind == "text":
                    yield sse(completion_body(**meta, choices=[choice(index, value, None)], usage=None))
                    continue
                remaining -= 1
                if value.exception() is not None:
                    err = _worker_error(value.exception(), body.model)
                    why = "error"
                    yield sse(error_body(err.message, err.type, err.status))
                    break
                result: Completion = value.result()
                prompt_tokens += result.prompt_tokens
                completion_tokens += result.completion_tokens
                yield sse(completion_body(**meta, choices=[choice(index, "", result.finish_reason)], usage=None))
            else:
                state.metrics.request_latency.observe(time.monotonic() - arrived)
                if include_usage:
                    yield sse(completion_body(**meta, choices=[], usage=usage(prompt_tokens, completion_tokens)))
            yield sse("[DONE]")
        finally:  # the client left, the request timed out, or an error ended the stream: free the rows
            _cancel(state, handles, why)

    return StreamingResponse(event_source(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        problems, fields = [], []
        for err in e.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
            where = ".".join(loc) or "body"
            fields.append(where)
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return ErrorResponse(error_body("invalid request: " + "; ".join(problems), "invalid_request_error", 400,
                                        fields[0] if fields else "body"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        param = {400: "body", 404: "path", 405: "method", 413: "body"}.get(e.status_code)
        return ErrorResponse(error_body(str(e.detail), "invalid_request_error", e.status_code, param),
                             status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, e: StoreError):
        return ErrorResponse(error_body(str(e), "server_error", 500), status_code=500)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return _unexpected(request, e)


def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    return ErrorResponse(error_body(f"internal error: {type(e).__name__}", "server_error", 500), status_code=500)


def run_server(model_name_or_path: str, store_path: str, host: str = "127.0.0.1", port: int = 8000,
               config: ServeConfig | None = None, log_level: str = "info", files_dir: str | None = None) -> None:
    """Load the model, open the store and serve until interrupted (Ctrl-C / SIGTERM drain gracefully).

    `store_path`: a SQLite file, or a postgresql:// URL shared by replicas (then `files_dir` too).
    """
    config = config or ServeConfig()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = PrefixStore(store_path, files_dir=files_dir)  # a wrong store fails now, not after the model load
    model, tokenizer = models.load_model(model_name_or_path)  # looked up on the module: tests patch it there
    app = create_app(model, tokenizer, store, config, model_id=model_name_or_path)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(config.shutdown_timeout_s))
