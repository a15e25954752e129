"""Model-holding Serve deployments: a thin shell around :class:`loramix.serving.Engine`.

- ``ModelDeployment`` with ``expert=None`` is the **fused** replica: base + every expert stacked,
  routing inside the forward; requests for different experts and routes decode in one batch.
- ``ModelDeployment`` with ``expert="<name>"`` is that expert's own replica in the **routed**
  topology: the LoRA merged into the base weights, so it runs at the base's speed.
- ``RouterDeployment`` scores prompts for the routed topology's dispatch.

Requests arrive as token ids (the ingress tokenises and validates), are batched by
``@serve.batch`` and stream back one dict per decode step.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict

from ray import serve

from loramix.checkpoint import read_manifest
from loramix.serving import Engine, GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)


async def _steps(iterator):
    """Run each decode step off the event loop so the replica keeps accepting requests."""
    while True:
        step = await asyncio.to_thread(next, iterator, None)
        if step is None:
            return
        yield step


def _request(payload: dict, version: int | None) -> GenerationRequest | Exception:
    """A payload as a request, or the error building it (which then fails that request alone)."""
    if payload.get("version") != version:
        return ValueError(
            f"version mismatch: the request is for v{payload.get('version')}, this replica serves v{version}"
        )
    try:
        params = SamplingParams(**payload["params"])
        return GenerationRequest(payload["prompt_ids"], params, payload.get("expert_weights"))
    except (TypeError, ValueError, KeyError) as err:
        return ValueError(f"bad request payload: {err}")


@serve.deployment
class ModelDeployment:
    """Decodes batches of requests; ``expert`` selects a merged single-expert model.

    Args:
        artifact: the mixture folder (``manifest.json``, ``experts/``, ``router/``, ``tokenizer/``).
        expert: serve this expert merged into the base, or None for the fused mixture.
        max_batch_size: requests decoded together.
        batch_wait_timeout_s: how long to wait to fill a batch.
    """

    def __init__(self, artifact: str, expert: str | None = None, max_batch_size=16, batch_wait_timeout_s=0.01):
        self.engine = Engine.from_artifact(artifact, expert=expert)
        self.version = (read_manifest(artifact).get("release") or {}).get("version")
        self.expert = expert
        self.requests = 0
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("replica ready: %s on %s", expert or "fused mixture", self.engine.device)

    async def generate(self, payload: dict):
        """Stream one request (``prompt_ids``, ``params``, ``expert_weights``); it decodes in a batch
        with whatever else arrived at the same time."""
        async for delta in self._generate_batch(payload):
            yield delta

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, payloads: list[dict]):
        """Stream a batch: yields one list per step with a dict (new text/tokens), None (nothing
        new this step) or StopIteration (that request has finished) per request."""
        self.requests += len(payloads)
        requests = [_request(p, self.version) for p in payloads]
        finished = [False] * len(requests)
        async for step in _steps(self.engine.stream(requests)):
            out = []
            for i, delta in enumerate(step):
                if finished[i]:
                    out.append(StopIteration)
                    continue
                out.append(None if delta is None else asdict(delta))
                finished[i] = delta is not None and delta.finish_reason is not None
            yield out

    def stats(self) -> dict:
        """What this replica served (tests use it to see where a request went)."""
        return {"pid": os.getpid(), "expert": self.expert, "requests": self.requests}

    def ready(self) -> bool:
        """The ingress's readiness probe (`/readyz`): this replica holds its model."""
        return True

    def check_health(self) -> None:
        """Serve's health check: a replica whose model lost its weights is restarted."""
        if next(self.engine.lm.parameters(), None) is None:
            raise RuntimeError("the replica's model has no parameters")


@serve.deployment
class RouterDeployment:
    """Scores prompts with the mixture's router: expert weights per prompt."""

    def __init__(self, artifact: str, max_batch_size=16, batch_wait_timeout_s=0.01):
        self.engine = Engine.from_artifact(artifact)
        self.requests = 0
        self.route.set_max_batch_size(max_batch_size)
        self.route.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def route(self, prompts: list[list[int]]) -> list[list[float]]:
        self.requests += len(prompts)
        return await asyncio.to_thread(self.engine.route, prompts)

    def stats(self) -> dict:
        return {"pid": os.getpid(), "expert": None, "requests": self.requests}

    def ready(self) -> bool:
        return True
