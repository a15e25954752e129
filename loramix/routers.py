"""Routers: who decides the expert gates, and at what granularity.

| recipe  | class          | granularity    | input                                   | trained with                |
|---------|----------------|----------------|-----------------------------------------|-----------------------------|
| moa     | SequenceRouter | per sequence   | base hidden states, pooled, all layers  | domain labels (cross-entropy) |
| mole    | BlockGate      | per block, seq | the block's input, pooled               | LM loss + balance loss      |
| modula  | TokenRouter    | per token      | each adapted linear's input             | LM loss (+ balance loss)    |

Every router ends in ``softmax -> top-k -> renormalise``; experts can be masked at inference
(their logits set to -inf before the softmax, so the rest renormalise). Routers start at zero
weights, i.e. uniform gates. New routers register in :data:`ROUTERS`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loramix.layers import MixtureLinear, Routing, expand_batch
from loramix.names import safe_key

logger = logging.getLogger(__name__)


@dataclass
class RouterDims:
    """What a router needs to know about the model it routes."""

    hidden_size: int
    num_blocks: int
    layer_in_features: dict[str, int] = field(default_factory=dict)  # MixtureLinear key -> d_in


def topk_gates(logits: torch.Tensor, k: int, masked: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dim, keep the ``k`` largest, renormalise to sum 1.

    Args:
        logits: ``[..., E]`` router logits.
        k: experts kept per row.
        masked: ``[E]`` bool, experts excluded (before the softmax, so the others renormalise).
    """
    if masked is not None and masked.any():
        logits = logits.masked_fill(masked, float("-inf"))
    probs = logits.float().softmax(-1)
    if k < probs.shape[-1]:
        top, idx = probs.topk(k, dim=-1)
        probs = torch.zeros_like(probs).scatter(-1, idx, top)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-9)
    return probs


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [batch, seq, H]`` over positions where ``mask [batch, seq]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """MoLE's balance loss ``-log prod_i q_i`` with ``q_i`` the mean gate of expert ``i``."""
    q = gates.reshape(-1, gates.shape[-1]).float().mean(0)
    return -torch.log(q.clamp_min(1e-6)).sum()


class Router(nn.Module):
    """Base class. Subclasses set ``recipe`` and ``granularity`` and implement their hooks."""

    recipe: ClassVar[str]
    granularity: ClassVar[str]  # "sequence" | "block" | "token"

    def __init__(self, expert_names: Sequence[str], dims: RouterDims, top_k: int = 1):
        super().__init__()
        n = len(expert_names)
        if not 1 <= top_k <= n:
            raise ValueError(
                f"`top_k` must be in [1, {n}] (the number of experts), got {top_k}. Lower top_k or add experts."
            )
        self.expert_names = list(expert_names)
        self.dims = dims
        self.top_k = top_k
        self.register_buffer("masked", torch.zeros(n, dtype=torch.bool), persistent=False)

    def config(self) -> dict:
        """Constructor kwargs beyond names/dims/top_k, saved in ``router/config.json``."""
        return {}

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        return topk_gates(logits, self.top_k, self.masked)

    # Hooks; the defaults mean "this granularity does not use it".
    def sequence_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block_start(self, routing: Routing, block: int, hidden: torch.Tensor) -> None:
        return None

    def layer_gates(self, routing: Routing, layer: MixtureLinear, x: torch.Tensor) -> torch.Tensor | None:
        return None


class SequenceRouter(Router):
    """MoA: a linear classifier over the base model's hidden states, pooled over the prompt.

    Each layer's hidden states (embeddings included) are averaged over non-padding positions
    and layer-normalised; the concatenation is classified into the experts. Pooling over all
    layers separated the demo domains far better than the last layer or last token alone.
    """

    recipe = "moa"
    granularity = "sequence"

    def __init__(self, expert_names, dims: RouterDims, top_k: int = 1):
        super().__init__(expert_names, dims, top_k)
        n_states = dims.num_blocks + 1
        self.classifier = nn.Linear(n_states * dims.hidden_size, len(expert_names))
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def features(self, hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = [masked_mean(h, attention_mask) for h in hidden_states]
        pooled = [F.layer_norm(p.float(), p.shape[-1:]) for p in pooled]
        return torch.cat(pooled, -1)  # [batch, (blocks + 1) * hidden]

    def sequence_logits(self, model, input_ids, attention_mask):
        hidden_states = model.base_hidden_states(input_ids, attention_mask)
        return self.classifier(self.features(hidden_states, attention_mask))


class BlockGate(Router):
    """MoLE: a learnable gate per transformer block, ``softmax(e_l . pool(h_l) / tau_l)``.

    The gate of block ``l`` reads that block's input (so it sees what earlier blocks' experts
    did), pooled over the sequence; the temperature ``tau_l`` is learned (log-parameterised).
    """

    recipe = "mole"
    granularity = "block"

    def __init__(self, expert_names, dims: RouterDims, top_k: int = 1, temperature: float = 1.0):
        super().__init__(expert_names, dims, top_k)
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        self.temperature = temperature
        self.gate = nn.ModuleList(nn.Linear(dims.hidden_size, len(expert_names)) for _ in range(dims.num_blocks))
        for g in self.gate:
            nn.init.zeros_(g.weight)
            nn.init.zeros_(g.bias)
        self.log_temperature = nn.Parameter(torch.full((dims.num_blocks,), math.log(temperature)))

    def config(self) -> dict:
        return {"temperature": self.temperature}

    def block_start(self, routing, block, hidden):
        if routing.freeze and block in routing.block_gates:
            return  # generation after the prompt: keep the prompt's gates
        mask = expand_batch(routing.pool_mask, hidden.shape[0])
        if mask.shape[1] != hidden.shape[1]:
            raise RuntimeError("block gates need the whole prompt; got a partial sequence without cached gates.")
        pooled = F.layer_norm(masked_mean(hidden, mask).float(), hidden.shape[-1:])
        logits = self.gate[block](pooled) / self.log_temperature[block].exp()
        gates = self.gates(logits)  # [batch, E]
        routing.block_gates[block] = gates
        if routing.record is not None:
            routing.record.append((gates, None))

    def layer_gates(self, routing, layer, x):
        if layer.block is None:
            raise ValueError(f"MoLE gates are per transformer block, but {layer.key!r} is outside every block.")
        return routing.block_gates[layer.block]


class TokenRouter(Router):
    """MoDULA: a soft router per adapted linear that gates each token from that layer's
    (layer-normalised) input."""

    recipe = "modula"
    granularity = "token"

    def __init__(self, expert_names, dims: RouterDims, top_k: int = 1):
        super().__init__(expert_names, dims, top_k)
        if not dims.layer_in_features:
            raise ValueError("TokenRouter needs the adapted layers (`dims.layer_in_features`).")
        self.gate = nn.ModuleDict(
            {safe_key(k): nn.Linear(d, len(expert_names)) for k, d in sorted(dims.layer_in_features.items())}
        )
        for lin in self.gate.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def layer_gates(self, routing, layer, x):
        lin = self.gate[safe_key(layer.key)]
        # Normalised input: layer inputs differ in scale by orders of magnitude (MLP down_proj
        # vs attention q_proj), and raw inputs made the gates saturate after a few steps.
        features = F.layer_norm(x.to(lin.weight.dtype), x.shape[-1:])
        gates = self.gates(lin(features))  # [batch, seq, E]
        if routing.record is not None:
            mask = routing.pool_mask if routing.pool_mask is not None and not routing.freeze else None
            routing.record.append((gates, mask))
        return gates


ROUTERS: dict[str, type[Router]] = {cls.recipe: cls for cls in (SequenceRouter, BlockGate, TokenRouter)}


def build_router(recipe: str, expert_names: Sequence[str], dims: RouterDims, top_k: int = 1, **kwargs) -> Router:
    """Construct the router registered for ``recipe``."""
    if recipe not in ROUTERS:
        raise ValueError(f"unknown router {recipe!r}; choose one of {sorted(ROUTERS)} or None.")
    return ROUTERS[recipe](expert_names, dims, top_k=top_k, **kwargs)
