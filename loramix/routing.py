"""Routing state: what a mixture's layers share during one call.

:class:`Routing` is created once per mixture and holds the router; :class:`CallState` is created
for each forward or decode (``MixtureModel`` opens and drops it) and holds that call's gates,
recorded decisions and the per-call caches (:func:`context_mean`'s running sums of a token
router's context). Nothing here is an ``nn.Module``: it holds tensors of one call, never parameters.
The losses and summaries of a call's recorded decisions (MoLE's balance loss, the label loss,
mean gates, load metrics) are functions of its :class:`RouteRecord` list, here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class RouteRecord:
    """One routing decision of one call, kept for the balance loss and for reporting.

    ``probs`` are the router's dense softmax probabilities (what the balance loss averages);
    ``gates`` what the layers applied (top-k, renormalised); ``mask`` ``[batch, seq]`` marks the
    positions that count for per-token gates; ``where`` names the decision (``sequence``,
    ``block.<i>`` or a module path) for the gate-pattern plot.
    """

    probs: torch.Tensor  # [batch, E] or [batch, seq, E]
    gates: torch.Tensor  # same shape
    mask: torch.Tensor | None
    where: str


@dataclass
class CallState:
    """Routing state of one forward or one decode, created by :class:`MixtureModel` per call.

    Attributes:
        pool_mask: ``[batch, seq]`` positions sequence/block gates may pool over (the prompt).
        attention_mask: ``[batch, seq]`` real tokens of the first forward (later decoding steps add one each).
        freeze: decoding after the prompt: keep the gates the prompt got (block gates).
        record: decisions of this call (None: not recorded).
        weights: ``[batch, E]`` gates fixed for the whole sequence (explicit, or a sequence router's).
        block_gates: MoLE: block index -> ``[batch, E]``.
        prefix: token routers reading their context: per layer, the running sum and count of inputs.
        prepared: static weights' per-layer ``(A, B, rank gates)``, reused by every decoding step;
            also sibling layers' shared shrink while their block runs (:class:`~loramix.layers.SharedShrink`).
        final_hidden: the decoder's output of this forward, all positions (the head sees only kept ones).
    """

    pool_mask: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # [batch, seq] real tokens of the first forward
    freeze: bool = False
    record: list[RouteRecord] | None = None
    weights: torch.Tensor | None = None
    active: tuple[bool, ...] | None = None  # experts with a nonzero gate somewhere in the batch
    row_experts: torch.Tensor | None = None  # [batch, k] each row's experts (per-row path)
    row_gates: torch.Tensor | None = None  # [batch, k] their gates
    block_gates: dict[int, torch.Tensor] = field(default_factory=dict)
    prefix: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # running sums, decoding
    prepared: dict[tuple, object] = field(default_factory=dict)
    final_hidden: torch.Tensor | None = None  # the decoder's output this call (what `lm_head` reads, unsliced)

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.prepared = {}
        # One host sync per call (not per layer) decides which experts the layers may skip, and
        # whether rows should each gather only their own experts (k per row < experts in the batch).
        nonzero = weights != 0
        stats = torch.cat([nonzero.any(0), nonzero.sum(-1).max().view(1)]).tolist()
        self.active, k = tuple(bool(a) for a in stats[:-1]), int(stats[-1])
        self.row_experts = self.row_gates = None
        if 0 < k < sum(self.active) and not weights.requires_grad:
            self.row_experts = weights.abs().topk(k, dim=-1).indices  # [batch, k]
            self.row_gates = weights.gather(-1, self.row_experts)  # [batch, k]

    def log(self, probs: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None, where: str) -> None:
        if self.record is not None:
            self.record.append(RouteRecord(probs, gates, mask, where))

    # What a decoding row carries from step to step, for continuous batching (:mod:`loramix.batching`):
    # its gates (fixed weights or MoLE's block gates) and a token router's running context sums.
    def rows(self, index: torch.Tensor) -> CallState:
        """The decoding state of rows ``index`` (a continuing decode: prompt masks dropped)."""
        return CallState.concat([self], index)

    @staticmethod
    def concat(states: Sequence[CallState], index: torch.Tensor | None = None) -> CallState:
        """One decoding state for the rows of ``states`` one after another (then ``index`` of them).

        Every state must be a decode past its prompt (``freeze``) of the same kind: all with fixed
        weights, or all routed inside the forward.
        """

        def cat(tensors):
            t = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
            return t if index is None else t.index_select(0, index)

        if len({s.weights is None for s in states}) > 1:
            raise ValueError("rows with fixed weights and rows routed in the forward decode as separate batches.")
        out = CallState(freeze=True)
        out.block_gates = {b: cat([s.block_gates[b] for s in states]) for b in states[0].block_gates}
        out.prefix = {
            k: (cat([s.prefix[k][0] for s in states]), cat([s.prefix[k][1] for s in states])) for k in states[0].prefix
        }
        if states[0].weights is not None:
            out.set_weights(cat([s.weights for s in states]))
        return out


class Routing:
    """What every :class:`MixtureLinear` of one mixture shares: the router and the current call.

    Not an ``nn.Module``: it holds per-call tensors, never parameters. Outside a call
    (``call is None``) or while ``disabled`` (router features, the ``base`` baseline) the layers
    are the plain base.
    """

    def __init__(self) -> None:
        self.router = None  # routers.Router that supplies block / token gates
        self.disabled = False
        self.call: CallState | None = None

    def begin(self, **kwargs) -> CallState:
        self.call = CallState(**kwargs)
        return self.call

    def end(self) -> None:
        self.call = None

    @contextmanager
    def using(self, call: CallState) -> Iterator[CallState]:
        """Run the layers under an existing call's state (a continuing decode), then close it."""
        self.call = call
        try:
            yield call
        finally:
            self.end()

    def gates_for(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        call = self.call
        if call.weights is not None:
            return expand_batch(call.weights, x.shape[0])
        if self.router is None:
            return None
        return self.router.layer_gates(call, layer, x)


def expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat per-prompt routing state for generate's expanded batch (num_return_sequences)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"routing was computed for batch {t.shape[0]} but the model ran batch {batch}.")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


def context_mean(
    call: CallState, key: str, x: torch.Tensor, full: torch.Tensor | None = None, grow: bool = True
) -> torch.Tensor:
    """``[batch, seq, d]``: for each token the mean of ``x`` over the whole prompt and the tokens
    after the prompt up to it (the prompt is known in full before anything is generated); with
    ``grow=False`` over the prompt alone, the same for every token.

    A forward over the whole sequence (training, a prompt, a decode without KV cache) computes it
    from scratch; a KV-cached decoding step continues the sums the prompt's forward left in
    ``call.prefix`` (one entry per layer). The output head of a prompt's forward sees only the
    positions whose logits are kept: ``full`` (the decoder's whole output, its input everywhere)
    gives it the prompt's context.
    """
    # A continuing decode (continuous batching merges rows' states and drops their prompt masks)
    # always continues its sums.
    prompt_len = call.pool_mask.shape[1] if call.pool_mask is not None else x.shape[1] + 1
    if x.shape[1] >= prompt_len:
        extra = x.shape[1] - prompt_len  # tokens generated after the prompt (a decode without cache)
        prompt = F.pad(expand_batch(call.pool_mask, x.shape[0]).float(), (0, extra))
        tokens = F.pad(expand_batch(call.attention_mask, x.shape[0]).float(), (0, extra), value=1.0)
        prompt, after = prompt[..., None], (tokens - prompt)[..., None]
        xf = x.float()
        total, count = (xf * prompt).sum(1, keepdim=True), prompt.sum(1, keepdim=True)
        if grow:
            total, count = total + (xf * after).cumsum(1), count + after.cumsum(1)
    else:
        earlier = call.prefix.get(key)
        if earlier is None and full is not None and full.shape[1] == prompt_len:
            # Every prompt position's context is the whole prompt: any kept positions read the same.
            return context_mean(call, key, full, grow=grow)[:, -x.shape[1] :].to(x.dtype)
        if earlier is None:
            raise RuntimeError(
                "a partial sequence without the prompt's forward first; run the prompt through the mixture."
            )
        total, count = earlier[0][:, None], earlier[1][:, None]
        if grow:
            steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[:, None]
            total, count = total + x.float().cumsum(1), count + steps
    if not grow:  # one context for every position
        total, count = total.expand(-1, x.shape[1], -1), count.expand(-1, x.shape[1], -1)
    if call.freeze:
        call.prefix[key] = (total[:, -1], count[:, -1])
    return (total / count.clamp_min(1.0)).to(x.dtype)


# ------------------------------------------------------------ what the decisions add up to
def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [batch, seq, H]`` over positions where ``mask [batch, seq]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _mean_probs(record: RouteRecord) -> torch.Tensor:
    """``[E]`` mean probability of one decision over the batch (and the counted tokens)."""
    p = record.probs.float()
    if p.dim() == 3 and record.mask is not None:
        m = record.mask.to(p.dtype)[..., None]
        return (p * m).sum((0, 1)) / m.sum().clamp_min(1.0)
    return p.reshape(-1, p.shape[-1]).mean(0)


def balance_loss(records: Sequence[RouteRecord]) -> torch.Tensor:
    """MoLE's gating balance loss ``-log prod_i q_i`` (MoLE, arXiv 2404.13628, Eqs. 14-15).

    ``q_i`` is expert ``i``'s probability averaged over the M gated blocks (or layers), as in
    the paper, and over the batch: the paper writes q for one input; averaging over the batch
    too (as Switch and GShard do) lets each input be routed sharply while the experts stay used.
    """
    q = torch.stack([_mean_probs(r) for r in records]).mean(0)
    return -torch.log(q.clamp_min(1e-6)).sum()


def label_loss(records: Sequence[RouteRecord], domain: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every routing decision's probabilities against the row's expert (a
    per-token decision: every real token of the row), averaged over decisions. Not in MoLE or
    MoDULA, whose routers see no labels; `router.label_coef` adds it (see the README for why)."""
    losses = []
    for r in records:
        logp = r.probs.float().clamp_min(1e-9).log()
        if logp.dim() == 2:
            losses.append(-logp.gather(-1, domain[:, None]).mean())
        else:
            picked = -logp.gather(-1, domain[:, None, None].expand(-1, logp.shape[1], 1))[..., 0]
            m = attention_mask.to(picked.dtype)
            losses.append((picked * m).sum() / m.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def mean_gates(records: Sequence[RouteRecord], mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence mean gates ``[batch, E]`` of each decision, averaged over the decisions."""
    return torch.stack([per_sequence(r, mask) for r in records]).mean(0)


def per_sequence(record: RouteRecord, mask: torch.Tensor | None) -> torch.Tensor:
    g = record.gates.detach()
    if g.dim() == 2:
        return g
    return masked_mean(g, mask if mask is not None else torch.ones(g.shape[:2], device=g.device))


def load_metrics(gates: torch.Tensor, expert_names: Sequence[str]) -> dict:
    """``router_entropy`` and ``expert_load/<name>`` of ``[batch, E]`` gates (reported every step)."""
    gates = gates.detach().float()
    entropy = -(gates * gates.clamp_min(1e-9).log()).sum(-1).mean()
    load = gates.mean(0)
    return {"router_entropy": float(entropy), **{f"expert_load/{n}": float(v) for n, v in zip(expert_names, load)}}
