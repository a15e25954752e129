"""The HTTP front: OpenAI-compatible API, auth, validation, dispatch, metrics. Holds no model.

Everything a client can get wrong is rejected here, before any model replica sees it: a bad
request costs a tokenizer call at most, and replicas only ever receive valid token ids.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /healthz`` (liveness) and ``GET /readyz`` (every model deployment answers); neither of the
last two needs the key. There is no ``/docs`` or ``/openapi.json``.

Whatever goes wrong, a client gets an OpenAI error object: 4xx naming the field when the request
is at fault, 503 when a deployment's queue is full (retry later), 500 otherwise (logged here),
never a traceback; a stream that fails after its headers ends with an error event and ``[DONE]``.
"""

import asyncio
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from transformers import AutoConfig, AutoTokenizer

from loramix.checkpoint import read_manifest, resolve_base
from loramix.routers import ROUTERS
from loramix.serve_config import ServeConfig
from loramix.versions import resolve
from serve_app.dispatch import Dispatcher, Plan
from serve_app.schemas import APIError, ChatCompletionRequest, CompletionRequest, parse

logger = logging.getLogger(__name__)

app = FastAPI(title="loramix", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return exc.response()


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception):
    return internal_error(exc).response()


def internal_error(exc: BaseException) -> APIError:
    """What a client sees of a failure that is not its request's fault (503 for backpressure)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        message = "the server is at capacity (`serve.*.max_queued_requests`); retry shortly."
        return APIError(503, message, code="overloaded")
    logger.exception("request failed", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); the server logged it.", code="internal_error")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# Defined before the deployment: `serve.ingress` serialises the routes when the class is created.
def _none_safe(chunk):
    """The usage-only closing chunk reuses the envelope of a normal chunk."""
    return lambda delta: chunk(delta or {"text": "", "finish_reason": None})


def _usage(plan: Plan, result: dict) -> dict:
    n, m = len(plan.prompt_ids), result["completion_tokens"]
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def _total_usage(plans: list[Plan], results: list[dict]) -> dict:
    parts = [_usage(p, r) for p, r in zip(plans, results)]
    return {k: sum(u[k] for u in parts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@serve.deployment
@serve.ingress(app)
class IngressDeployment:
    """Validates and dispatches requests to the model deployments.

    Args:
        source: the run folder or artifact the app was started from (read for expert names,
            tokenizer and context length of the version it serves).
        serve_config: a :class:`ServeConfig` as a dict.
        fused, router, experts: handles of the fused deployment, the router deployment and
            each expert's deployment (the last two only in the routed topology).

    ``user_config: {version: N}`` sets the version new requests are planned for; a request keeps
    the version it was planned for until it ends (the model replicas decode it with that one).
    """

    def __init__(self, source: str, serve_config: dict, fused, router=None, experts: dict | None = None):
        self.cfg = ServeConfig(**serve_config)
        self.source, self.handles = source, (fused, router, experts or {})
        self.dispatcher = self._dispatcher(None)
        self.api_key = self.cfg.api_key or os.environ.get("LORAMIX_API_KEY")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("LORAMIX_API_KEY is set but blank, which would leave the server open; set a real key.")
        tags = ("model", "expert", "target")
        self.m_requests = metrics.Counter("loramix_requests", "Completed requests.", tag_keys=tags)
        self.m_tokens = metrics.Counter("loramix_completion_tokens", "Generated tokens.", tag_keys=tags)
        self.m_prompt = metrics.Counter("loramix_prompt_tokens", "Prompt tokens.", tag_keys=tags)
        self.m_latency = metrics.Histogram(
            "loramix_latency_s",
            "Request latency (s).",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
            tag_keys=tags,
        )

    def _dispatcher(self, version: int | None) -> Dispatcher:
        artifact = resolve(self.source, version)
        manifest = read_manifest(artifact)
        tokenizer = AutoTokenizer.from_pretrained(artifact / "tokenizer")
        base_config = AutoConfig.from_pretrained(resolve_base(manifest["base_model"], artifact))
        recipe = (manifest.get("router") or {}).get("recipe")
        return Dispatcher(
            self.cfg,
            manifest["expert_names"],
            tokenizer,
            base_config.max_position_embeddings,
            *self.handles,
            sequence_router=recipe is not None and ROUTERS[recipe].fixed_per_prompt,
            version=(manifest.get("release") or {}).get("version"),
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's lightweight update (``loramix serve-update``): plan new requests for another version."""
        self.dispatcher = await asyncio.to_thread(self._dispatcher, user_config.get("version"))
        logger.info("serving artifact v%s", self.dispatcher.version)

    def describe(self) -> dict:
        """What ``loramix serve-update`` rebuilds the app from: the same source and settings."""
        return {"source": self.source, "serve": self.cfg.model_dump(), "version": self.dispatcher.version}

    # -------------------------------------------------------------------------------- plumbing
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")

    async def _body(self, request: Request, schema):
        self._auth(request)
        limit = self.cfg.max_body_bytes
        too_big = APIError(413, f"the request body exceeds {limit} bytes (`serve.max_body_bytes`).")
        if int(request.headers.get("content-length") or 0) > limit:  # declared size: refuse unread
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():  # chunked bodies declare nothing: count as they come
            raw += chunk
            if len(raw) > limit:
                raise too_big
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise APIError(400, f"the request body is not valid JSON: {err}.", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body nests JSON too deeply.", code="invalid_json") from None
        return parse(schema, data)

    def _observe(self, plan: Plan, result: dict, start: float) -> None:
        tags = {"model": plan.model, "expert": plan.top_expert(result["route"]), "target": result["deployment"]}
        self.m_requests.inc(1, tags)
        self.m_prompt.inc(len(plan.prompt_ids), tags)
        if result["completion_tokens"]:  # Ray's counters refuse 0: an answer that is EOS at once has no tokens
            self.m_tokens.inc(result["completion_tokens"], tags)
        self.m_latency.observe(time.perf_counter() - start, tags)

    async def _run(self, d: Dispatcher, plan: Plan) -> dict:
        start = time.perf_counter()
        try:
            result = await d.collect(plan)
        except BackPressureError as exc:  # as an APIError: Serve answers a raw one itself, in plain text
            raise internal_error(exc) from None
        self._observe(plan, result, start)
        return result

    async def _stream(self, d: Dispatcher, plan: Plan, chunk, include_usage: bool):
        start, result = time.perf_counter(), None
        try:
            async for delta in d.deltas(plan):
                result = d.accumulate(result, delta)
                yield _sse(chunk(delta))
        except Exception as exc:  # the headers are sent: the error goes into the stream
            error = internal_error(exc)
            body = {"message": error.message, "type": "server_error", "param": error.param, "code": error.code}
            yield _sse({"error": body})
            yield "data: [DONE]\n\n"
            return
        self._observe(plan, result, start)
        if include_usage:
            yield _sse(chunk(None) | {"choices": [], "usage": _usage(plan, result)})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness: this process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        """Readiness: every model deployment answers within a few seconds (503 until then)."""
        d = self.dispatcher
        handles = {"fused": d.fused, **{f"expert:{n}": h for n, h in d.experts.items()}}
        if d.router is not None:
            handles["router"] = d.router
        waiting = []
        for name, handle in handles.items():
            try:
                await asyncio.wait_for(handle.ready.remote(), timeout=5)
            except Exception:
                waiting.append(name)
        if waiting:
            return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503)
        return {"status": "ready"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        d = self.dispatcher
        ids = [self.cfg.model_name] + [f"{self.cfg.model_name}:{n}" for n in d.expert_names]
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": 0, "owned_by": "loramix", "version": d.version} for i in ids
            ],
        }

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "`prompt` is an empty list; send at least one prompt.", param="prompt")
        d = self.dispatcher  # this request's version, whatever an update does meanwhile
        d.check_prompts(len(prompts))
        # Tokenising is CPU work: off the event loop, which keeps serving other requests meanwhile.
        ids = await asyncio.to_thread(lambda: [d.encode(p) for p in prompts])
        plans = d.plan(body, ids, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta):
            choice = {"index": 0, "text": delta["text"], "finish_reason": delta["finish_reason"], "logprobs": None}
            if delta.get("route"):
                choice["route"] = delta["route"]
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(d, plans[0], _none_safe(chunk), include), media_type="text/event-stream"
            )
        results = await asyncio.gather(*[self._run(d, p) for p in plans])  # they batch together in the replicas
        choices = [
            {"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None, "route": r["route"]}
            for i, r in enumerate(results)
        ]
        usage = _total_usage(plans, results)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._body(request, ChatCompletionRequest)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        d = self.dispatcher  # this request's version, whatever an update does meanwhile
        ids = await asyncio.to_thread(d.chat_prompt, body.messages)
        plans = d.plan(body, [ids], "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = {"sent": False}

        def chunk(delta):
            message = {"content": delta["text"]}
            if not first["sent"]:
                message["role"], first["sent"] = "assistant", True
            choice = {"index": 0, "delta": message, "finish_reason": delta["finish_reason"], "logprobs": None}
            if delta.get("route"):
                choice["route"] = delta["route"]
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [choice],
            }

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(d, plans[0], _none_safe(chunk), include), media_type="text/event-stream"
            )
        r = await self._run(d, plans[0])
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": r["text"]},
            "finish_reason": r["finish_reason"],
            "logprobs": None,
            "route": r["route"],
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": _usage(plans[0], r),
        }
