"""Batched decoding for serving: many requests in one batch, each with its own sampling, stop
strings, length and route.

    engine = Engine.from_artifact("out/quickstart/artifact")
    for step in engine.stream([GenerationRequest(engine.encode("reverse hello="))]):
        ...  # one list per decode step: a Delta per request, None when it has nothing new

One prefill, then one token per step for the whole batch with a KV cache, run inside
:meth:`MixtureModel.decoding`, so greedy rows equal :meth:`MixtureModel.generate` token for
token. A request's last Delta carries its ``finish_reason``; its first carries the route.
The same engine serves a plain causal LM (an expert merged into the base: routed serving).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loramix.data import encode_prompt, pad_left
from loramix.loops import accelerator
from loramix.model import MixtureModel, position_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.max_tokens < 1:
            problems.append(f"`max_tokens` must be >= 1, got {self.max_tokens}.")
        if not 0 <= self.temperature <= 2:
            problems.append(f"`temperature` must be in [0, 2], got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            problems.append(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if any(not s for s in self.stop):
            problems.append("`stop` strings must be non-empty.")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            problems.append(f"`seed` must be in [0, 2^64), got {self.seed}.")
        if problems:
            raise ValueError(" ".join(problems))


@dataclass(frozen=True)
class GenerationRequest:
    """Token ids of a prompt (with BOS, as :meth:`Engine.encode` makes them) and how to decode it.

    ``expert_weights`` (mixture order) fix the gates; None lets the router decide. ``cancel`` (a
    ``threading.Event``, set when its client went away) ends the request at the next step: it
    emits nothing more, and a batch whose other rows are done stops decoding.
    """

    prompt_ids: Sequence[int]
    params: SamplingParams = SamplingParams()
    expert_weights: Sequence[float] | None = None
    cancel: threading.Event | None = field(default=None, compare=False, repr=False)


@dataclass
class Delta:
    """New output of one request in one step."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (eos or a stop string) | "length" | "error", on the last Delta
    route: list[float] | None = None  # expert weights used, on the first Delta (None for a plain LM)
    error: str | None = None  # why this request could not be decoded (finish_reason "error")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    route: list[float] | None
    prompt_tokens: int
    error: str | None = None

    @classmethod
    def of(cls, request: GenerationRequest | Exception, deltas: list[Delta]) -> Completion:
        """A request's Deltas, collected (none: it was cancelled)."""
        return cls(
            "".join(d.text for d in deltas),
            [t for d in deltas for t in d.token_ids],
            deltas[-1].finish_reason if deltas else "cancelled",
            deltas[0].route if deltas else None,
            0 if isinstance(request, Exception) else len(request.prompt_ids),
            deltas[-1].error if deltas else None,
        )


@dataclass
class _Row:
    """Detokenisation and stop rules of one request; text matching a stop prefix is held back."""

    request: GenerationRequest
    tokenizer: object
    route: list[float] | None
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    started: bool = False
    done: bool = False

    def push(self, token: int) -> Delta | None:
        if self.done:
            return None
        if self.request.cancel is not None and self.request.cancel.is_set():
            self.done = True  # its client is gone: no more output, and the batch need not wait for it
            return None
        p, finish = self.request.params, None
        eos = token == self.tokenizer.eos_token_id
        if eos:
            finish, text = "stop", self._text()
        else:
            self.ids.append(token)
            text = self._text()
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                finish, text = "stop", text[:cut]
            elif len(self.ids) >= p.max_tokens:
                finish = "length"
        if finish is None:
            hold = max((len(s) for s in p.stop), default=1) - 1
            text = text[: len(text) - hold] if hold else text
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                text = self.sent
        delta = Delta(text[len(self.sent) :], [] if eos else [token], finish)
        if not self.started:
            delta.route, self.started = self.route, True
        self.sent, self.done = text, finish is not None
        return delta

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class Engine:
    """Decodes batches of :class:`GenerationRequest` on a mixture or a plain causal LM.

    Args:
        model: a :class:`MixtureModel`, or a transformers causal LM (e.g. ``merged_base``).
        tokenizer: the tokenizer the model was trained with.
        context_length: longest prompt + completion (default: the config's ``max_position_embeddings``).
    """

    def __init__(self, model, tokenizer, *, context_length: int | None = None, pinned: str | None = None):
        self.mixture = model if isinstance(model, MixtureModel) else None
        self.lm = model.base_model if self.mixture else model
        # One expert served alone from the mixture (experts that cannot be merged, MoDULA-Res).
        self.pinned = None
        if pinned is not None:
            self.pinned = [float(n == pinned) for n in self.mixture.expert_names]
        self.lm.eval()
        # Newer transformers name the KV cache `cache`; older ones `past_key_values`.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
        self.tokenizer = tokenizer
        self.context_length = context_length or getattr(self.lm.config, "max_position_embeddings", None)

    @classmethod
    def from_artifact(
        cls, path: str | Path, *, expert: str | None = None, device: str = "auto", dtype: torch.dtype | None = None
    ) -> Engine:
        """Load ``path`` (a saved mixture with ``tokenizer/``); ``expert`` merges that one expert
        into the base and serves the plain model (zero adapter overhead).

        ``dtype``: the base's (default: as saved). The fused mixture holds its experts in the
        base's dtype, in which they compute (:meth:`MixtureModel.cast_experts`).
        """

        mm = MixtureModel.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}))
        tokenizer = AutoTokenizer.from_pretrained(Path(path) / "tokenizer")
        pinned = None
        if expert is not None and expert not in mm.expert_names:
            raise ValueError(f"unknown expert {expert!r}; the artifact holds {mm.expert_names}.")
        if expert is None or mm.variant == "res":  # Res experts read the trunk's output: not mergeable
            model, pinned = mm.cast_experts(next(mm.base_model.parameters()).dtype), expert
        else:  # merged from the weights as saved
            model = mm.merged_base([float(n == expert) for n in mm.expert_names])
        return cls(model.to(accelerator() if device == "auto" else device), tokenizer, pinned=pinned)

    @property
    def expert_names(self) -> list[str]:
        return list(self.mixture.expert_names) if self.mixture else []

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Prompt text to ids exactly as training saw prompts: BOS + tokens, no EOS."""
        return encode_prompt(self.tokenizer, text)

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request this engine cannot decode."""
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token.")
        if self.context_length and n + p.max_tokens > self.context_length:
            raise ValueError(
                f"the prompt has {n} tokens and `max_tokens` is {p.max_tokens}: together more than the "
                f"context length {self.context_length}. Shorten the prompt or lower max_tokens."
            )
        if request.expert_weights is not None:
            if self.mixture is None or self.pinned is not None:
                raise ValueError("this model serves one expert; it takes no `expert_weights`.")
            self.mixture.check_expert_weights(list(request.expert_weights), 1)
        elif self.mixture is not None and self.mixture.router is None and self.pinned is None:
            raise ValueError("this mixture has no router: every request needs `expert_weights`.")

    @torch.inference_mode()
    def route(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        """The router's expert weights per prompt (block/token routers: the mean over the route)."""
        if self.mixture is None:
            raise ValueError("a merged expert has no router.")
        batch = self._pad(prompts)
        return self.mixture.route(batch["input_ids"], batch["attention_mask"]).tolist()

    def stream(self, requests: Sequence[GenerationRequest | Exception]) -> Iterator[list[Delta | None]]:
        """Decode ``requests`` together; yields one list (aligned with ``requests``) per step.

        A request this engine cannot decode (or an exception in its place: a request that could not
        even be built) gets one Delta with ``finish_reason="error"`` and does not stop the others.
        """
        failed: dict[int, str] = {}
        for i, r in enumerate(requests):
            try:
                if isinstance(r, Exception):
                    raise r
                self.check(r)
            except (ValueError, TypeError) as err:
                failed[i] = str(err)
        if failed:
            yield [Delta("", [], "error", error=failed[i]) if i in failed else None for i in range(len(requests))]
        good = [i for i in range(len(requests)) if i not in failed]
        if not good:
            return
        todo = [requests[i] for i in good]
        if self.pinned is not None:
            todo = [GenerationRequest(r.prompt_ids, r.params, self.pinned, r.cancel) for r in todo]
        for rows, weights, routes in self._groups(todo):
            for step in self._decode([todo[i] for i in rows], weights, routes):
                out: list[Delta | None] = [None] * len(requests)
                for i, delta in zip(rows, step):
                    out[good[i]] = delta
                yield out

    def complete(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """:meth:`stream`, collected."""
        parts: list[list[Delta]] = [[] for _ in requests]
        for step in self.stream(requests):
            for i, delta in enumerate(step):
                if delta is not None:
                    parts[i].append(delta)
        return [Completion.of(r, ds) for r, ds in zip(requests, parts)]

    # ------------------------------------------------------------------------------------ internals
    def _pad(self, prompts: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        batch = pad_left(prompts, prompts, self.tokenizer.pad_token_id)
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _groups(self, requests):
        """Rows that can decode in one batch: ``(row indices, weights [b, E] or None, routes or None)``.

        Sequence routers are fixed per prompt, so routed rows join explicit-weight rows as weights.
        Block and token routers decide inside the forward; their routed rows decode as their own batch.
        """
        every = list(range(len(requests)))
        if self.mixture is None:
            yield every, None, [None] * len(requests)
            return
        if self.pinned is not None:  # served as one expert: no route to report, as a merged replica
            yield every, torch.tensor([self.pinned] * len(requests)), [None] * len(requests)
            return
        explicit = [i for i in every if requests[i].expert_weights is not None]
        routed = [i for i in every if requests[i].expert_weights is None]
        weights = {i: list(map(float, requests[i].expert_weights)) for i in explicit}
        if routed and self.mixture.router.fixed_per_prompt:
            for i, w in zip(routed, self.route([requests[i].prompt_ids for i in routed])):
                weights[i] = w
            routed = []
        if not routed:
            yield every, torch.tensor([weights[i] for i in every]), [weights[i] for i in every]
            return
        if explicit:
            yield explicit, torch.tensor([weights[i] for i in explicit]), [weights[i] for i in explicit]
        yield routed, None, None  # routes come from the prompt's own forward (see _decode)

    @torch.inference_mode()
    def _decode(self, requests, weights, routes) -> Iterator[list[Delta | None]]:
        batch = self._pad([r.prompt_ids for r in requests])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gens = [_generator(r.params.seed) for r in requests]
        record = self.mixture is not None and routes is None  # block/token routers decide in the forward
        routing = (
            nullcontext() if self.mixture is None else self.mixture.decoding(ids, mask, weights, record_route=record)
        )
        with routing:
            out = self.lm(
                input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1
            )
            if record:
                routes = self.mixture.take_route(mask).tolist()
            rows = [_Row(r, self.tokenizer, route) for r, route in zip(requests, routes)]
            for _ in range(max(r.params.max_tokens for r in requests)):
                tokens = _sample(out.logits[:, -1].float(), requests, gens)  # [batch], on the CPU
                yield [row.push(t) for row, t in zip(rows, tokens.tolist())]
                if all(row.done for row in rows):
                    return
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                out = self.lm(
                    input_ids=tokens[:, None].to(ids.device),
                    attention_mask=mask,
                    position_ids=position_ids(mask)[:, -1:],
                    use_cache=True,
                    **{self._cache_kw: getattr(out, self._cache_kw)},
                )


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _sample(logits: torch.Tensor, requests, gens) -> torch.Tensor:
    """The next token per row, on the CPU. Greedy rows take the argmax; sampled rows draw from
    temperature + nucleus (top-p) on the CPU with their own generator, so a seeded request gives
    the same tokens in any batch."""
    tokens = logits.argmax(-1).cpu()
    sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0]
    rows = logits[sampled].cpu() if sampled else None  # one device-to-host copy per step, not one per row
    for row, i in enumerate(sampled):
        p = requests[i].params
        probs = torch.softmax(rows[row].double() / p.temperature, -1)
        if not torch.isfinite(probs).all():  # logits that overflow at this temperature: its limit is greedy
            continue
        if p.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[drop], 0.0)
        tokens[i] = torch.multinomial(probs, 1, generator=gens[i]).item()
    return tokens
