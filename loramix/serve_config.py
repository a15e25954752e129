"""The `serve` section of the schema: topology, HTTP, limits and per-deployment resources.

Ray-free on purpose: `serve_app/` translates these fields into Serve options in one place
(:func:`serve_app.app.deployment_options`), the way Ray LLM's ``LLMConfig`` does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from loramix.section import Section


class AutoscalingConfig(Section):
    min_replicas: int = Field(0, ge=0)
    """Fewest replicas; 0 lets an idle deployment scale to zero (the first request then waits for a start)."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas the autoscaler may start."""
    target_ongoing_requests: float = Field(4.0, gt=0)
    """Requests in flight per replica the autoscaler aims for."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"`min_replicas` ({self.min_replicas}) exceeds `max_replicas` ({self.max_replicas}). "
                "Raise max_replicas or lower min_replicas."
            )
        return self


class DeploymentConfig(Section):
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when `autoscaling` is set)."""
    autoscaling: AutoscalingConfig | None = None
    """Autoscale between min and max replicas instead of a fixed count."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica (the autoscaler adds nodes to fit them)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica; 1 on a GPU cluster (fractions share a GPU)."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica accepts at once; more wait in Serve's queue."""
    max_queued_requests: int = Field(64, ge=1)
    """Requests that may wait for this deployment; beyond them a client gets 503 at once (backpressure)."""


def _experts_default() -> DeploymentConfig:
    return DeploymentConfig(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=2))


class ServeConfig(Section):
    topology: Literal["fused", "routed"] = "fused"
    """`fused`: replicas hold base + all experts; `routed`: confident requests go to per-expert merged replicas."""
    model_name: str = "loramix"
    """Model id of the mixture in the API; each expert is `<model_name>:<expert>`."""
    host: str = "127.0.0.1"
    """HTTP host (0.0.0.0 to accept remote clients)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port."""
    api_key: str | None = None
    """Bearer key every /v1 request must carry; None reads LORAMIX_API_KEY, and no key means open access."""

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("`serve.api_key` is empty or blank, which would leave the server open; set a real key.")
        return key

    route_threshold: float = Field(0.8, ge=0, le=1)
    """Routed topology: top-1 router weight at or above which a request goes to that expert's own replica."""
    max_tokens_limit: int = Field(512, ge=1)
    """Largest `max_tokens` a request may ask for."""
    max_body_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted (413 above it)."""
    max_prompts: int = Field(32, ge=1)
    """Prompts one completions request may carry (400 above it, before anything is tokenised)."""
    max_request_tokens: int = Field(16384, ge=1)
    """Prompt tokens + `max_tokens` summed over a request's prompts (400 above it)."""
    max_stop_strings: int = Field(4, ge=0)
    """`stop` strings per request (OpenAI's limit)."""
    max_stop_chars: int = Field(128, ge=1)
    """Characters per `stop` string."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request still unanswered after this long is cancelled (the client gets 408)."""
    graceful_shutdown_s: float = Field(20.0, ge=0)
    """On shutdown or a rolling update a replica finishes its in-flight requests for up to this long."""
    max_running_requests: int = Field(32, ge=1)
    """Requests a model replica decodes at once (continuous batching: a request joins at the next
    step and leaves the step it finishes); more wait in arrival order."""
    max_batched_tokens: int = Field(2048, ge=1)
    """Tokens one decoding step may run: one per running request plus the prompts it admits (a
    longer prompt is admitted alone)."""
    cuda_graphs: bool = True
    """On GPU replicas, run each decoding step as a CUDA graph (captured per batch size on first use;
    several times the tokens/s of eager decoding on small and mid-sized models). No effect on CPUs."""
    max_batch_size: int = Field(16, ge=1)
    """Prompts a router replica scores together (`@serve.batch`)."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a router replica waits to fill a batch."""
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.5, max_ongoing_requests=256, max_queued_requests=512)
    """The HTTP front (tokenises, validates, dispatches); holds no model."""
    fused: DeploymentConfig = DeploymentConfig()
    """Replicas holding base + all experts."""
    router: DeploymentConfig = DeploymentConfig()
    """Routed topology: the replicas that score prompts."""
    experts: DeploymentConfig = Field(default_factory=_experts_default)
    """Routed topology: each expert's own deployment (base with that LoRA merged in)."""


SERVE_JSON = "serve.json"


def saved_settings(cfg: ServeConfig) -> dict:
    """The run's serve settings as an artifact keeps them (``serve.json``), so ``loramix serve``
    deploys as configured: only what the user chose, so defaults can still adapt to the cluster
    the app lands on. The API key is never written to disk."""
    return cfg.model_dump(exclude={"api_key"}, exclude_unset=True)
