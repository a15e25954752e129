"""Routers: who decides the expert gates, at what granularity, and how they are trained.

| recipe | class          | granularity  | reads                                       | trained with                  |
|--------|----------------|--------------|---------------------------------------------|-------------------------------|
| moa    | SequenceRouter | per sequence | base hidden states, pooled over the prompt  | domain labels (cross-entropy) |
| mole   | BlockGate      | per block    | the block's LoRA branches, normalised       | LM loss + balance loss        |
| modula | TokenRouter    | per token    | each adapted linear's input                 | LM loss                       |

(`router.label_coef` adds a cross-entropy against the row's expert to MoLE's and MoDULA's losses.)

Every router turns logits into dense probabilities (softmax; masked experts excluded before it,
so the rest renormalise), then keeps the top-k and renormalises them. A renormalised top-1 gate is
the constant 1, so sparse gates are trained with a straight-through estimator: the forward uses
exactly the gates inference uses, the backward flows through the dense probabilities, so every
expert's logit gets the gradient of "more of this expert" (see :func:`topk_gates`). Routers start
at zero weights, i.e. uniform probabilities. New routers register in :data:`ROUTERS`.
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

from loramix.data import prompt_mask
from loramix.layers import MixtureLinear
from loramix.names import safe_key
from loramix.routing import CallState, context_mean, expand_batch, label_loss, load_metrics, masked_mean

logger = logging.getLogger(__name__)


@dataclass
class RouterDims:
    """What a router needs to know about the model it routes."""

    hidden_size: int
    num_blocks: int
    layer_in_features: dict[str, int] = field(default_factory=dict)  # MixtureLinear key -> d_in
    gate_layers: dict[int, tuple[str, int]] = field(default_factory=dict)  # block -> (first adapted layer, d_out)


def topk_gates(
    logits: torch.Tensor, k: int, masked: torch.Tensor | None = None, *, straight_through: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, gates)``: the softmax over the last dim, and its top ``k`` renormalised to sum 1.

    Args:
        logits: ``[..., E]`` router logits.
        k: experts kept per row.
        masked: ``[E]`` bool, experts excluded before the softmax (always applied on a GPU: no host sync).
        straight_through: training: ``gates + probs - probs.detach()``. The forward value is the
            sparse gates, the gradient is the dense softmax's. Without it a renormalised top-1
            gate is constant and its router never learns; keeping the unrenormalised top
            probability (Switch) would instead train a model that inference does not run.
    """
    if masked is not None and (logits.is_cuda or masked.any()):
        logits = logits.masked_fill(masked, float("-inf"))
    probs = logits.float().softmax(-1)
    if k >= probs.shape[-1]:
        return probs, probs
    top, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True).clamp_min(1e-9))
    if straight_through:
        gates = gates.detach() + probs - probs.detach()
    return probs, gates


class Router(nn.Module):
    """Base class. Subclasses set ``recipe`` and ``granularity`` and implement their hooks.

    Hooks (a granularity uses some): :meth:`prompt_weights` decides fixed per-sequence weights
    before the forward; :meth:`layer_gates` decides inside it, layer by layer. :meth:`loss` is
    what the router is trained on (LM loss + ``balance_coef`` x balance loss unless overridden).
    """

    recipe: ClassVar[str]
    granularity: ClassVar[str]  # "sequence" | "block" | "token"
    fixed_per_prompt: ClassVar[bool] = False  # weights known before the forward (serving batches them as such)
    per_expert: ClassVar[tuple[str, ...]] = ()  # parameters (name prefixes) with one row per expert (dim 0)

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

    @torch.no_grad()
    def warm_start(self, state: dict[str, torch.Tensor], expert_names: Sequence[str]) -> list[str]:
        """Start from another router's weights ``state`` over ``expert_names`` (the run's router
        before an expert was added, replaced or removed): each expert both routers have keeps its
        rows, a new expert's rows keep their zero init, the rest is copied. Returns the experts kept.

        Raises:
            ValueError: if ``state`` is not a router of this kind and shape (other recipe or model).
        """
        old = {n: i for i, n in enumerate(expert_names)}
        kept = [n for n in self.expert_names if n in old]
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(f"cannot warm-start a {self.recipe!r} router from another kind of router's weights.")
        for key, param in own.items():
            src = state[key].to(param.device, param.dtype)
            if key.startswith(self.per_expert):
                if src.shape[1:] != param.shape[1:] or src.shape[0] != len(expert_names):
                    raise ValueError(f"cannot warm-start {key!r}: shape {tuple(src.shape)} vs {tuple(param.shape)}.")
                for name in kept:
                    param[self.expert_names.index(name)] = src[old[name]]
            elif src.shape == param.shape:
                param.copy_(src)
            else:
                raise ValueError(f"cannot warm-start {key!r}: shape {tuple(src.shape)} vs {tuple(param.shape)}.")
        return kept

    def gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probs, gates)`` of ``logits``; straight-through top-k while training."""
        return topk_gates(logits, self.top_k, self.masked, straight_through=self.training)

    def prompt_weights(self, mm, input_ids: torch.Tensor, attention_mask: torch.Tensor, call: CallState):
        """Fixed ``[batch, E]`` weights for the whole sequence, or None when gates are decided in the forward."""
        return None

    def layer_gates(self, call: CallState, layer: MixtureLinear, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def loss(self, mm, batch: dict, balance_coef: float, label_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
        """LM loss of the routed mixture on the completion + ``balance_coef`` x balance loss
        (+ ``label_coef`` x :func:`label_loss`, off in the papers)."""
        out = mm(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            route_mask=prompt_mask(batch),
        )
        loss = out.loss + balance_coef * out.aux_loss if balance_coef else out.loss
        labels = label_loss(out.routes, batch["domain"], batch["attention_mask"])
        if label_coef:
            loss = loss + label_coef * labels
        gates = out.gates.detach()
        acc = (gates.argmax(-1) == batch["domain"]).float().mean()
        metrics = {
            "lm_loss": float(out.loss.detach()),
            "balance_loss": float(out.aux_loss.detach()),
            "label_loss": float(labels.detach()),
        }
        return loss, {**metrics, "router_accuracy": float(acc), **load_metrics(gates, self.expert_names)}


class SequenceRouter(Router):
    """MoA (arXiv 2403.03432): a classifier over the base model's hidden states, pooled over the prompt,
    trained on domain labels; its top-k experts serve the whole sequence.

    Each layer's hidden states (embeddings included) are averaged over the prompt's positions and
    layer-normalised; the concatenation is classified into the experts. Pooling over all layers
    separated the demo domains far better than the last layer or last token alone.
    """

    recipe = "moa"
    granularity = "sequence"
    per_expert = ("classifier.",)
    fixed_per_prompt = True

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

    def sequence_logits(self, mm, input_ids, attention_mask) -> torch.Tensor:
        hidden_states = mm.base_hidden_states(input_ids, attention_mask)
        return self.classifier(self.features(hidden_states, attention_mask))

    def prompt_weights(self, mm, input_ids, attention_mask, call):
        probs, gates = self.gates(self.sequence_logits(mm, input_ids, attention_mask))
        call.log(probs, gates, None, "sequence")
        return gates

    def loss(self, mm, batch, balance_coef, label_coef=0.0):
        """Cross-entropy against the domain label, on the prompt alone (what inference routes on)."""
        logits = self.sequence_logits(mm, batch["input_ids"], prompt_mask(batch))
        loss = F.cross_entropy(logits, batch["domain"])
        acc = (logits.argmax(-1) == batch["domain"]).float().mean()
        return loss, {"router_accuracy": float(acc), **load_metrics(logits.softmax(-1), self.expert_names)}


class BlockGate(Router):
    r"""MoLE (arXiv 2404.13628, §3.2): a learnable gating function per transformer block that reads
    that block's LoRA outputs.

    For block ``l`` with input ``x`` (a prompt of ``L`` tokens), each expert's branch on the
    block's first square adapted linear (input and output widths agree: q_proj, o_proj), with the
    residual it adds to as in Eq. 6 (``E_i(x) = x + f(x | LoRA_i)``), is normalised and the gate is
    a softmax at a learned temperature:

        E_i(x)     = x + s_i B_i A_i x                                            (Eqs. 6-7)
        E_Omega(x) = Normalization(E_0(x) (+) ... (+) E_{N-1}(x))                 (Eq. 8)
        eps_i      = <Flatten(E_Omega(x))_i, e_i>                                 (Eq. 9)
        G_i        = exp(eps_i / tau_l) / sum_j exp(eps_j / tau_l)                (Eq. 10)
        output     = W0 x + sum_i G_i s_i B_i A_i x  on every adapted linear of block l (Eq. 11)

    Normalization is a layer norm of each expert's branch per token. The paper's ``e`` has
    ``L x d`` entries per expert, so it fits one sequence length; here ``e_i`` is shared by the
    positions (``d`` entries) and ``eps_i`` is the mean over the prompt's tokens: the paper's gate
    with position-tied weights, for any length. Without the residual the gate sees only what each
    LoRA projects, and a LoRA trained on one domain learns to drop the words that name its domain
    (a linear probe of the pooled LoRA outputs told the demo domains apart 56% of the time at
    best, with the residual 100%). The balance loss is :func:`balance_loss` (Eqs. 14-15). Gates
    are decided on the prompt and kept while decoding.
    """

    recipe = "mole"
    granularity = "block"
    per_expert = ("gate.",)

    def __init__(self, expert_names, dims: RouterDims, top_k: int = 1, temperature: float = 1.0):
        super().__init__(expert_names, dims, top_k)
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        if not dims.gate_layers:
            raise ValueError(
                "MoLE gates read each block's LoRA outputs plus the block's input (Eqs. 6-8), so every block needs "
                "an adapted linear whose input and output widths agree (q_proj, o_proj, ...); none was found. "
                "Adapt such a module (e.g. `expert.target_modules: all-linear`)."
            )
        self.temperature = temperature
        self.gate_layer = {block: key for block, (key, _) in dims.gate_layers.items()}
        n = len(expert_names)
        self.gate = nn.ParameterDict(
            {str(b): nn.Parameter(torch.zeros(n, d)) for b, (_, d) in sorted(dims.gate_layers.items())}
        )
        self.log_temperature = nn.Parameter(torch.full((dims.num_blocks,), math.log(temperature)))

    def config(self) -> dict:
        return {"temperature": self.temperature}

    def layer_gates(self, call, layer, x):
        # A module outside every block (an `lm_head` LoRA) reads the last block's output: its gates.
        block = layer.block if layer.block is not None else max(self.gate_layer)
        gates = call.block_gates.get(block)
        if gates is not None:
            return gates
        if layer.key != self.gate_layer.get(block):
            raise RuntimeError(
                f"block {block}'s MoLE gate reads {self.gate_layer.get(block)!r}, but {layer.key!r} ran first."
            )
        mask = expand_batch(call.pool_mask, x.shape[0])
        if mask.shape[1] != x.shape[1]:
            raise RuntimeError("block gates need the whole prompt; got a partial sequence without cached gates.")
        # Each expert's branch with the residual it adds to (Eq. 6: x + f(x | LoRA_i)), normalised.
        branches = layer.expert_outputs(x).float() + x.float()[..., None, :]  # [batch, seq, E, d]
        normed = F.layer_norm(branches, branches.shape[-1:])
        scores = torch.einsum("bted,ed->bte", normed, self.gate[str(block)])
        logits = masked_mean(scores, mask) / self.log_temperature[block].exp()  # [batch, E]
        probs, gates = self.gates(logits)
        call.block_gates[block] = gates
        call.log(probs, gates, None, f"block.{block}")
        return gates


class TokenRouter(Router):
    """MoDULA (arXiv 2412.07405): a soft router per adapted linear that gates each token from that
    layer's input, ``G(x_t) = TopK(softmax(W_g LN(x_t)))``, trained with the LM loss only (the
    experts, universal included, stay frozen: the paper's third stage).

    ``context="prompt"`` (not in the paper): token ``t``'s router reads the mean of the layer's inputs
    over the prompt and the tokens generated up to ``t``, not ``x_t``: in the first block a token's
    input is its embedding, which cannot tell apart domains sharing their words (the paper's input
    everywhere but the first block's q/k/v: 0.33 vs the experts' 0.98 on the demo world).
    ``"prompt_only"``: the prompt's mean alone, one gate per layer per sequence: generated tokens do
    not dilute the cue (``prompt`` sent 4.6% of long answers' tokens elsewhere; fresh 0.943 -> 0.971).

    A gate's input is what the gates before it shaped, and it is read as data: no gradient flows
    through it to those gates. Otherwise the label loss of every later gate pulls an early gate
    towards whichever expert makes the later inputs easiest to route, whatever its own loss says
    (demo world: the first block's v_proj gate sent 80-95% of `rotate` to `shift`'s expert and the
    later gates learned to read that; mixture 0.712 against the oracle's 0.929, 0.930 detached).
    """

    recipe = "modula"
    granularity = "token"
    per_expert = ("gate.",)

    def __init__(self, expert_names, dims: RouterDims, top_k: int = 1, context: str = "token"):
        super().__init__(expert_names, dims, top_k)
        if context not in ("token", "prompt", "prompt_only"):
            raise ValueError(f"`context` must be 'token' (the paper's), 'prompt' or 'prompt_only', got {context!r}.")
        self.context = context
        if not dims.layer_in_features:
            raise ValueError("TokenRouter needs the adapted layers (`dims.layer_in_features`).")
        self.gate = nn.ModuleDict(
            {safe_key(k): nn.Linear(d, len(expert_names)) for k, d in sorted(dims.layer_in_features.items())}
        )
        for lin in self.gate.values():
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def config(self) -> dict:
        return {"context": self.context}

    def layer_gates(self, call, layer, x):
        lin = self.gate[safe_key(layer.key)]
        if self.context != "token":
            full, grow = call.final_hidden if layer.block is None else None, self.context == "prompt"
            x = context_mean(call, layer.key, x, full=full, grow=grow)
        # Normalised input: layer inputs differ in scale by orders of magnitude (MLP down_proj
        # vs attention q_proj), and raw inputs made the gates saturate after a few steps. Detached:
        # a decision's loss trains its own gate, not the gates before it (see the class docstring).
        features = F.layer_norm(x.detach().to(lin.weight.dtype), x.shape[-1:])
        probs, gates = self.gates(lin(features))  # [batch, seq, E]
        if call.record is not None:
            mask = call.pool_mask if call.pool_mask is not None and not call.freeze else None
            call.log(probs, gates, mask, layer.key)
        return gates


ROUTERS: dict[str, type[Router]] = {cls.recipe: cls for cls in (SequenceRouter, BlockGate, TokenRouter)}


def build_router(recipe: str, expert_names: Sequence[str], dims: RouterDims, top_k: int = 1, **kwargs) -> Router:
    """Construct the router registered for ``recipe``."""
    if recipe not in ROUTERS:
        raise ValueError(f"unknown router {recipe!r}; choose one of {sorted(ROUTERS)} or None.")
    return ROUTERS[recipe](expert_names, dims, top_k=top_k, **kwargs)
