"""Model-holding Serve deployments: a thin shell around :class:`loramix.serving.Engine`.

- ``ModelDeployment`` with ``expert=None`` is the **fused** replica: base + every expert stacked,
  routing inside the forward; requests for different experts and routes decode in one batch.
- ``ModelDeployment`` with ``expert="<name>"`` is that expert's own replica in the **routed**
  topology: the LoRA merged into the base weights, so it runs at the base's speed.
- ``RouterDeployment`` scores prompts for the routed topology's dispatch.

Requests arrive as token ids (the ingress tokenises and validates) with the artifact version they
were planned for. A model replica feeds them to that version's continuous-batching scheduler
(:class:`loramix.batching.Scheduler`): a request joins the running batch at the next decoding
step and streams back one dict per token. ``user_config: {version: N}`` moves a running replica to
another version in place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from dataclasses import asdict

from ray import serve

from loramix.batching import Scheduler
from loramix.serving import Delta, Engine, GenerationRequest, SamplingParams
from loramix.versions import resolve

logger = logging.getLogger(__name__)


def _request(payload: dict) -> GenerationRequest | Exception:
    """A payload as a request, or the error building it (which then fails that request alone)."""
    try:
        params = SamplingParams(**payload["params"])
        return GenerationRequest(payload["prompt_ids"], params, payload.get("expert_weights"), payload.get("cancel"))
    except (TypeError, ValueError, KeyError) as err:
        return ValueError(f"bad request payload: {err}")


def _merged(deltas: list) -> dict:
    """Consecutive Deltas of one request as one (a stream chunk may carry several tokens)."""
    out = asdict(deltas[0])
    for d in deltas[1:]:
        out["text"] += d.text
        out["token_ids"] += d.token_ids
        out["finish_reason"], out["error"] = d.finish_reason, d.error
    return out


class Versions:
    """A replica's engines by artifact version: each request names the version it was planned
    for (its expert weights index that version's experts) and is decoded by that version's
    engine, so a rolling update never mixes versions within a request.

    ``reconfigure`` (Serve's ``user_config``: ``{"version": N}``) loads the new current version
    while the old one keeps decoding; the previous version stays loaded for the requests still
    planned for it, older ones are dropped (and loaded again, from their immutable folder, if a
    request still asks). Each version gets its own runner (a scheduler, a ``@serve.batch`` queue):
    a batch is always one version.
    """

    def __init__(self, source: str, load, runner):
        self.source = source
        self.load = load  # artifact folder -> Engine
        self.runner = runner  # engine -> what decodes its requests (a started Scheduler, a batched function)
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
            _, runner = self.loaded.pop(old)
            if hasattr(runner, "close"):  # a scheduler finishes what it holds, then its thread ends
                runner.close()
            logger.info("dropped artifact v%s", old)

    async def get(self, version: int | None):
        """``(engine, runner)`` for ``version``."""
        if version not in self.loaded:
            async with self._lock:
                if version not in self.loaded:
                    folder = str(resolve(self.source, version))
                    engine = await asyncio.to_thread(self.load, folder)
                    self.loaded[version] = (engine, self.runner(engine))
                    logger.info("loaded artifact v%s from %s on %s", version, folder, engine.device)
        return self.loaded[version]

    def any_engine(self) -> Engine | None:
        return next((engine for engine, _ in self.loaded.values()), None)


@serve.deployment
class ModelDeployment:
    """Decodes requests with continuous batching; ``expert`` selects a merged single-expert model.

    Args:
        source: the run folder or artifact the app was started from; each request's version of it
            is served (:class:`Versions`), the current one set by ``user_config: {version: N}``.
        expert: serve this expert merged into the base, or None for the fused mixture.
        max_running_requests: requests decoding at once (KV cache slots); more wait in arrival order.
        max_batched_tokens: tokens one decoding step may run (running rows + admitted prompts).
        cuda_graphs: on a GPU, decode through CUDA graphs (:mod:`loramix.decode_graphs`).
    """

    def __init__(
        self,
        source: str,
        expert: str | None = None,
        max_running_requests: int = 32,
        max_batched_tokens: int = 2048,
        cuda_graphs: bool = True,
    ):
        self.expert = expert
        self.requests = self.cancelled = 0
        limits = {
            "max_running": max_running_requests,
            "max_batched_tokens": max_batched_tokens,
            "cuda_graphs": cuda_graphs,
        }
        self.versions = Versions(
            source,
            functools.partial(Engine.from_artifact, expert=expert),
            lambda engine: Scheduler(engine, **limits).start(),
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's lightweight update (``loramix serve-update``): switch the current version in place."""
        await self.versions.switch(user_config.get("version"))

    async def generate(self, payload: dict):
        """Stream one request (``prompt_ids``, ``params``, ``expert_weights``, ``version``): it joins
        its version's running batch at the next decoding step; one dict per new token (or per run of
        tokens decoded while this generator was busy)."""
        scheduler, error = await self._scheduler(payload)
        if error:
            yield error
            return
        loop, queue, done = asyncio.get_running_loop(), asyncio.Queue(), False
        cancel = self._submit(scheduler, payload, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d))
        try:
            while not done:
                deltas = [await queue.get()]
                while not queue.empty():  # the consumer fell behind: one message for what piled up
                    deltas.append(queue.get_nowait())
                done = deltas[-1].finish_reason is not None
                yield _merged(deltas)
        finally:
            if not done:  # the client went away (Serve cancels this generator): its row leaves the batch
                self._cancel(cancel)

    async def complete(self, payload: dict) -> dict:
        """The whole of one request as one dict (non-streaming API calls): the replica wakes once per
        request, not per token, and sends one message back."""
        scheduler, error = await self._scheduler(payload)
        if error:
            return error
        loop, parts = asyncio.get_running_loop(), []
        finished = loop.create_future()

        def deliver(delta: Delta) -> None:  # on the scheduler's thread
            parts.append(delta)
            if delta.finish_reason is not None:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        cancel = self._submit(scheduler, payload, deliver)
        try:
            await finished
        except asyncio.CancelledError:  # the client went away (Serve cancels this call)
            self._cancel(cancel)
            raise
        return _merged(parts)

    async def _scheduler(self, payload: dict) -> tuple[Scheduler | None, dict | None]:
        try:
            return (await self.versions.get(payload.get("version")))[1], None
        except Exception as err:  # e.g. a version deleted from disk or failing its checksums
            return None, {"error": f"artifact v{payload.get('version')} cannot be served: {err}"}

    def _submit(self, scheduler: Scheduler, payload: dict, deliver) -> threading.Event:
        """Queue the request; setting the returned event makes its row leave the running batch at
        the next step and free its slot."""
        self.requests += 1
        cancel = threading.Event()
        scheduler.submit(_request({**payload, "cancel": cancel}), deliver)
        return cancel

    def _cancel(self, cancel: threading.Event) -> None:
        cancel.set()
        self.cancelled += 1

    def stats(self) -> dict:
        """What this replica served (tests use it to see where a request went)."""
        return {
            "pid": os.getpid(),
            "expert": self.expert,
            "requests": self.requests,
            "cancelled": self.cancelled,
            "versions": sorted(self.versions.loaded, key=str),
            "current": self.versions.current,
            "scheduler": {str(v): runner.stats() for v, (_, runner) in self.versions.loaded.items()},
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
        batching = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        self.versions = Versions(source, Engine.from_artifact, lambda engine: batching(self._router(engine)))

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
