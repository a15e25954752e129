"""Model-holding Serve deployments: a thin shell around :class:`loramix.serving.Engine`.

- ``ModelDeployment`` with ``expert=None`` is the **fused** replica: base + every expert stacked,
  routing inside the forward; requests for different experts and routes decode in one batch.
- ``ModelDeployment`` with ``expert="<name>"`` is that expert's own replica in the **routed**
  topology: the LoRA merged into the base weights, so it runs at the base's speed.
- ``RouterDeployment`` scores prompts for the routed topology's dispatch.

Requests arrive as token ids (the ingress tokenises and validates) with the artifact version they
were planned for, are batched per version by ``@serve.batch`` and stream back one dict per
decode step. ``user_config: {version: N}`` moves a running replica to another version in place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from dataclasses import asdict

from ray import serve

from loramix.serving import Engine, GenerationRequest, SamplingParams
from loramix.versions import resolve

logger = logging.getLogger(__name__)


async def _steps(iterator):
    """Run each decode step off the event loop so the replica keeps accepting requests."""
    while True:
        step = await asyncio.to_thread(next, iterator, None)
        if step is None:
            return
        yield step


def _request(payload: dict) -> GenerationRequest | Exception:
    """A payload as a request, or the error building it (which then fails that request alone)."""
    try:
        params = SamplingParams(**payload["params"])
        return GenerationRequest(payload["prompt_ids"], params, payload.get("expert_weights"), payload.get("cancel"))
    except (TypeError, ValueError, KeyError) as err:
        return ValueError(f"bad request payload: {err}")


class Versions:
    """A replica's engines by artifact version: each request names the version it was planned
    for (its expert weights index that version's experts) and is decoded by that version's
    engine, so a rolling update never mixes versions within a request.

    ``reconfigure`` (Serve's ``user_config``: ``{"version": N}``) loads the new current version
    while the old one keeps decoding; the previous version stays loaded for the requests still
    planned for it, older ones are dropped (and loaded again, from their immutable folder, if a
    request still asks). Each version gets its own ``@serve.batch`` queue: a batch is one version.
    """

    def __init__(self, source: str, load, decode, max_batch_size: int, batch_wait_timeout_s: float):
        self.source = source
        self.load = load  # artifact folder -> Engine
        self.decode = decode  # engine -> the function to batch (list of inputs -> results, or a stream of them)
        self.batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s}
        self.loaded: dict[int | None, tuple[Engine, object]] = {}
        self.current: int | None = None
        self.previous: int | None = None
        self._lock = asyncio.Lock()

    async def switch(self, version: int | None) -> None:
        """Make ``version`` current (loading it first, off the event loop)."""
        await self.get(version)
        if version != self.current:
            self.previous, self.current = self.current, version
        for old in [v for v in self.loaded if v not in (self.current, self.previous)]:
            del self.loaded[old]
            logger.info("dropped artifact v%s", old)

    async def get(self, version: int | None):
        """``(engine, batched decode)`` for ``version``."""
        if version not in self.loaded:
            async with self._lock:
                if version not in self.loaded:
                    folder = str(resolve(self.source, version))
                    engine = await asyncio.to_thread(self.load, folder)
                    batched = serve.batch(**self.batching)(self.decode(engine))
                    self.loaded[version] = (engine, batched)
                    logger.info("loaded artifact v%s from %s on %s", version, folder, engine.device)
        return self.loaded[version]

    def any_engine(self) -> Engine | None:
        return next((engine for engine, _ in self.loaded.values()), None)


@serve.deployment
class ModelDeployment:
    """Decodes batches of requests; ``expert`` selects a merged single-expert model.

    Args:
        source: the run folder or artifact the app was started from; each request's version of it
            is served (:class:`Versions`), the current one set by ``user_config: {version: N}``.
        expert: serve this expert merged into the base, or None for the fused mixture.
        max_batch_size: requests decoded together.
        batch_wait_timeout_s: how long to wait to fill a batch.
    """

    def __init__(self, source: str, expert: str | None = None, max_batch_size=16, batch_wait_timeout_s=0.01):
        self.expert = expert
        self.requests = self.cancelled = 0
        self.versions = Versions(
            source,
            functools.partial(Engine.from_artifact, expert=expert),
            self._decoder,
            max_batch_size,
            batch_wait_timeout_s,
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's lightweight update (``loramix serve-update``): switch the current version in place."""
        await self.versions.switch(user_config.get("version"))

    async def generate(self, payload: dict):
        """Stream one request (``prompt_ids``, ``params``, ``expert_weights``, ``version``); it decodes
        in a batch with whatever else arrived for the same version at the same time."""
        try:
            _, batched = await self.versions.get(payload.get("version"))
        except Exception as err:  # e.g. a version deleted from disk or failing its checksums
            yield {"error": f"artifact v{payload.get('version')} cannot be served: {err}"}
            return
        # A client that goes away cancels this generator (Serve propagates the disconnect): its row
        # stops decoding at the next step, and a batch waits only for its other rows.
        cancel, done = threading.Event(), False
        try:
            async for delta in batched({**payload, "cancel": cancel}):
                done = done or bool(delta and delta.get("finish_reason"))
                yield delta
        finally:
            if not done:
                cancel.set()
                self.cancelled += 1

    def _decoder(self, engine: Engine):
        async def decode(payloads: list[dict]):
            """Stream a batch: yields one list per step with a dict (new text/tokens), None (nothing
            new this step) or StopIteration (that request has finished) per request."""
            self.requests += len(payloads)
            finished = [False] * len(payloads)
            async for step in _steps(engine.stream([_request(p) for p in payloads])):
                out = []
                for i, delta in enumerate(step):
                    if finished[i]:
                        out.append(StopIteration)
                        continue
                    out.append(None if delta is None else asdict(delta))
                    finished[i] = delta is not None and delta.finish_reason is not None
                yield out

        return decode

    def stats(self) -> dict:
        """What this replica served (tests use it to see where a request went)."""
        return {
            "pid": os.getpid(),
            "expert": self.expert,
            "requests": self.requests,
            "cancelled": self.cancelled,
            "versions": sorted(self.versions.loaded, key=str),
            "current": self.versions.current,
        }

    def ready(self) -> bool:
        """The ingress's readiness probe (`/readyz`): this replica holds its model."""
        return bool(self.versions.loaded)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model lost its weights is restarted."""
        engine = self.versions.any_engine()
        if engine is not None and next(engine.lm.parameters(), None) is None:
            raise RuntimeError("the replica's model has no parameters")


@serve.deployment
class RouterDeployment:
    """Scores prompts with the mixture's router: expert weights per prompt (of the request's version)."""

    def __init__(self, source: str, max_batch_size=16, batch_wait_timeout_s=0.01):
        self.requests = 0
        self.versions = Versions(source, Engine.from_artifact, self._router, max_batch_size, batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict) -> None:
        await self.versions.switch(user_config.get("version"))

    async def route(self, request: dict) -> list[float]:
        """``{"prompt_ids", "version"}`` -> that version's expert weights for the prompt."""
        _, batched = await self.versions.get(request.get("version"))
        return await batched(request["prompt_ids"])

    def _router(self, engine: Engine):
        async def route(prompts: list[list[int]]) -> list[list[float]]:
            self.requests += len(prompts)
            return await asyncio.to_thread(engine.route, prompts)

        return route

    def stats(self) -> dict:
        return {"pid": os.getpid(), "expert": None, "requests": self.requests, "current": self.versions.current}

    def ready(self) -> bool:
        return bool(self.versions.loaded)
