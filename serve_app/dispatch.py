"""From a validated request to model replicas: plans (tokens, sampling, expert choice) and
where each plan runs.

Dispatch rules:

- **fused** topology: every request goes to the fused replicas; a pinned expert becomes a
  one-hot weight vector, explicit weights pass through, otherwise the replica's router decides.
- **routed** topology: a pinned expert goes straight to that expert's own (merged) replicas;
  explicit weights go to the fused replicas; otherwise the router deployment scores the
  prompt and a top-1 weight >= ``serve.route_threshold`` sends it to that expert's replicas,
  anything less confident to the fused replicas. A sequence router's (MoA) weights go with it,
  so the fused replica decodes with them instead of routing the prompt a second time; block and
  token routers (MoLE, MoDULA) decide inside the forward, so the fused replica routes again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loramix.data import bos_ids, encode_prompt
from loramix.serve_config import ServeConfig
from loramix.serving import SamplingParams
from serve_app.schemas import APIError


@dataclass
class Plan:
    """One prompt of one request, ready for a replica."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    weights: list[float] | None  # explicit expert weights (a pinned expert: one-hot); None: route
    pinned: str | None
    expert_names: list[str]

    def top_expert(self, route: dict | None) -> str:
        if not route or not route.get("expert_weights"):
            return "none"
        weights = route["expert_weights"]
        return max(weights, key=weights.get)


class Dispatcher:
    def __init__(
        self,
        cfg: ServeConfig,
        expert_names,
        tokenizer,
        context_length,
        fused,
        router,
        experts,
        *,
        sequence_router: bool = False,
        version: int | None = None,
    ):
        self.cfg, self.expert_names, self.tokenizer = cfg, list(expert_names), tokenizer
        self.version = version  # the artifact version this dispatcher plans for; replicas decode with it
        self.context_length = context_length
        self.fused, self.router, self.experts = fused, router, experts
        self.sequence_router = sequence_router  # its route is a fixed weight vector per prompt

    # ----------------------------------------------------------------------------- validation
    def encode(self, text: str, field: str = "prompt") -> list[int]:
        """As training saw prompts: BOS + tokens."""
        try:
            return encode_prompt(self.tokenizer, text)
        except (UnicodeError, ValueError, TypeError) as err:
            raise APIError(400, f"`{field}` cannot be tokenized: {err}.", field) from None

    def chat_prompt(self, messages) -> list[int]:
        """The tokenizer's chat template with a generation prompt; without one, the messages'
        contents joined by newlines (roles dropped), which is how the demo world's prompts read."""
        if not self.tokenizer.chat_template:
            return self.encode("\n".join(m.content for m in messages), "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=True
            )
        except Exception as err:  # jinja2 TemplateError (e.g. roles the template refuses), encoding errors
            raise APIError(400, f"the model's chat template refused `messages`: {err}", "messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def check_prompts(self, count: int) -> None:
        """Refuse a request with too many prompts before anything is tokenised."""
        if count > self.cfg.max_prompts:
            message = (
                f"`prompt` holds {count} prompts; at most {self.cfg.max_prompts} (`serve.max_prompts`) per request."
            )
            raise APIError(400, message, "prompt")

    def _pin(self, body) -> str | None:
        name = self.cfg.model_name
        if body.model == name:
            pinned = None
        elif body.model.startswith(name + ":") and body.model[len(name) + 1 :] in self.expert_names:
            pinned = body.model[len(name) + 1 :]
        else:
            raise APIError(
                404,
                f"model `{body.model}` does not exist; use `{name}` or `{name}:<expert>` (GET /v1/models lists them).",
                param="model",
                code="model_not_found",
            )
        if body.expert is not None:
            if body.expert not in self.expert_names:
                raise APIError(400, f"unknown `expert` {body.expert!r}; experts are {self.expert_names}.", "expert")
            if pinned not in (None, body.expert):
                raise APIError(400, f"`model` pins {pinned!r} but `expert` is {body.expert!r}; pick one.", "expert")
            pinned = body.expert
        return pinned

    def _weights(self, given: dict[str, float] | None) -> list[float] | None:
        if given is None:
            return None
        unknown = sorted(set(given) - set(self.expert_names))
        if unknown:
            raise APIError(
                400,
                f"`expert_weights` names unknown experts {unknown}; experts are {self.expert_names}.",
                "expert_weights",
            )
        values = [float(given.get(n, 0.0)) for n in self.expert_names]
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise APIError(400, "`expert_weights` must be finite and >= 0.", "expert_weights")
        top = max(values)
        if top <= 0:
            message = "`expert_weights` are all zero; give at least one expert a positive weight."
            raise APIError(400, message, "expert_weights")
        scaled = [v / top for v in values]  # by the largest first: a sum of huge weights cannot overflow
        total = sum(scaled)
        return [v / total for v in scaled]

    def plan(self, body, prompts: list[list[int]], field: str) -> list[Plan]:
        """Validate ``body`` for ``prompts`` (token ids) and return one plan per prompt."""
        pinned = self._pin(body)
        weights = self._weights(body.expert_weights)
        if pinned is not None and weights is not None:
            raise APIError(400, "pass either a pinned expert or `expert_weights`, not both.", "expert_weights")
        if pinned is not None:
            weights = [float(n == pinned) for n in self.expert_names]
        if body.n != 1:
            raise APIError(400, f"`n` must be 1, got {body.n}; send separate requests for more samples.", "n")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "`stream` takes a single prompt; send a list without streaming.", "stream")
        body.check_stop(self.cfg.max_stop_strings, self.cfg.max_stop_chars)
        limit = self.cfg.max_tokens_limit
        longest = max(len(p) for p in prompts)
        max_tokens = body.max_tokens
        if max_tokens is None:  # chat without a limit: as much as the context allows
            max_tokens = max(1, min(limit, self.context_length - longest))
        if not 1 <= max_tokens <= limit:
            raise APIError(400, f"`max_tokens` must be in [1, {limit}], got {max_tokens}.", "max_tokens")
        for p in prompts:
            if len(p) <= len(bos_ids(self.tokenizer)):
                raise APIError(400, f"`{field}` is empty; send some text.", field)
            if len(p) + max_tokens > self.context_length:
                raise APIError(
                    400,
                    f"`{field}` has {len(p)} tokens and `max_tokens` is {max_tokens}: together more than the "
                    f"context length {self.context_length}. Shorten the prompt or lower max_tokens.",
                    field,
                )
        total = sum(len(p) + max_tokens for p in prompts)
        if total > self.cfg.max_request_tokens:
            message = (
                f"the request asks for {total} tokens (prompts + max_tokens per prompt); at most "
                f"{self.cfg.max_request_tokens} (`serve.max_request_tokens`). Split it."
            )
            raise APIError(400, message, field)
        params = SamplingParams(max_tokens, body.temperature, body.top_p, body.stop_strings(), body.seed)
        return [Plan(body.model, p, params, weights, pinned, self.expert_names) for p in prompts]

    # ------------------------------------------------------------------------------- dispatch
    async def _target(self, plan: Plan):
        """``(handle, deployment name, weights sent, route weights known in advance)``."""
        if self.cfg.topology == "fused" or (plan.pinned is None and plan.weights is not None):
            return self.fused, "fused", plan.weights, plan.weights
        if plan.pinned is not None:
            return self.experts[plan.pinned], f"expert:{plan.pinned}", None, plan.weights
        route = await self.router.route.remote({"prompt_ids": plan.prompt_ids, "version": self.version})
        top = max(range(len(route)), key=route.__getitem__)
        if route[top] >= self.cfg.route_threshold:
            name = self.expert_names[top]
            return self.experts[name], f"expert:{name}", None, route
        return self.fused, "fused", route if self.sequence_router else None, route

    async def deltas(self, plan: Plan):
        """Stream the plan's output: dicts ``{text, token_ids, finish_reason, route?}``."""
        handle, deployment, sent, known = await self._target(plan)
        first = True
        async for delta in handle.options(stream=True).generate.remote(self._payload(plan, sent)):
            yield self._checked(delta, plan, deployment, known, first)
            first = False

    async def collect(self, plan: Plan) -> dict:
        """The plan's whole output in one call to the replica (no stream of per-token messages)."""
        handle, deployment, sent, known = await self._target(plan)
        delta = await handle.complete.remote(self._payload(plan, sent))
        return self.accumulate(None, self._checked(delta, plan, deployment, known, first=True))

    def _payload(self, plan: Plan, sent: list[float] | None) -> dict:
        return {
            "prompt_ids": plan.prompt_ids,
            "params": _params(plan.params),
            "expert_weights": sent,
            "version": self.version,  # the replica decodes it with this version: weights index its experts
        }

    def _checked(self, delta: dict, plan: Plan, deployment: str, known, first: bool) -> dict:
        """A replica's message as the API's: its error raised; the first message says where the
        request went and with which expert weights (the replica's route, else those ``known``)."""
        if delta.get("error"):
            if delta["error"].startswith("artifact v"):  # that version's files are gone or changed
                raise APIError(503, f"{delta['error']}; retry.", code="version_unavailable")
            raise APIError(400, f"the model could not decode this request: {delta['error']}")
        if not first:
            delta.pop("route", None)
            return delta
        weights = delta.get("route") or known
        delta["route"] = {
            "deployment": deployment,
            "version": self.version,
            "pinned": plan.pinned,
            "expert_weights": dict(zip(self.expert_names, weights)) if weights else None,
        }
        return delta

    @staticmethod
    def accumulate(result: dict | None, delta: dict) -> dict:
        result = result or {"text": "", "completion_tokens": 0, "finish_reason": None, "route": None}
        result["text"] += delta["text"]
        result["completion_tokens"] += len(delta["token_ids"])
        result["finish_reason"] = delta["finish_reason"] or result["finish_reason"]
        if delta.get("route"):
            result["route"] = delta["route"]
            result["deployment"] = delta["route"]["deployment"]
        return result


def _params(p: SamplingParams) -> dict:
    return {"max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "stop": p.stop, "seed": p.seed}
