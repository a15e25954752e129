r"""MixtureLinear: a base linear plus a gated sum of stacked LoRA experts.

    y = W0 x + sum_e g_e(x) * s_e * B_e A_e x            s_e = alpha_e / r_e (or alpha_e / sqrt(r_e), rsLoRA)

With a MoDULA universal LoRA (B_u, A_u, s_u) trained first and frozen:

    flan:  y = W0 x + s_u B_u A_u x + sum_e g_e s_e B_e A_e x
    res:   h = s_u B_u A_u x ;  y = W0 x + h + sum_e g_e s_e B_e silu(A_e h)

The experts of one module are stored concatenated along the rank dimension, ``A [R, d_in]``,
``B [d_out, R]`` with R = sum_e r_e, so the whole mixture is two GEMMs: the gate of each expert
is expanded to its ranks and folded in between (``(x A^T) * gate_per_rank) B^T``). Gates come
per sequence ``[batch, E]`` or per token ``[batch, seq, E]``; experts whose gate is zero for the
whole batch are sliced out before the matmuls. Experts are frozen (``requires_grad=False``):
they are trained elsewhere (PEFT / Ray Train); a mixture trains only its router.

Experts keep the dtype they were saved in (float32 under a bf16 base, as PEFT keeps them) and
compute in the activations' dtype, as serving systems do: a cached cast, so a bf16 forward pays
no casts of activations and the expert output accumulates into the base output inside the GEMM.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Below this many tokens per row (decoding steps), gathering each row's experts costs more memory
# traffic than running the batch's union of experts as two plain GEMMs.
PER_ROW_MIN_TOKENS = 8
# On a GPU a rank-R LoRA GEMM beside a d x d base GEMM costs launches, not FLOPs: up to this many
# ranks in total, every expert runs (gates zero the unused ones) as 3 kernels with no per-call
# slicing or gathering. Past it (or on a CPU, where FLOPs are the cost) inactive experts are sliced
# out and rows gather their own top-k.
GPU_ALL_RANKS_MAX = 256


class Routing:
    """Gate state shared by every :class:`MixtureLinear` of one mixture during one call.

    Not an ``nn.Module``: it holds per-call tensors, never parameters.
    """

    def __init__(self) -> None:
        self.router = None  # routers.Router that supplies block / token gates
        self.reset()

    def reset(self) -> None:
        self.weights: torch.Tensor | None = None  # [batch, E] per-sequence gates
        self.active: tuple[bool, ...] | None = None  # experts with a nonzero gate in the batch
        self.block_gates: dict[int, torch.Tensor] = {}  # MoLE: block -> [batch, E]
        self.pool_mask: torch.Tensor | None = None  # [batch, seq] mask for pooling the prompt
        self.freeze = False  # generation: keep gates computed on the prompt for later tokens
        self.disabled = False  # plain base forward (router features, the `base` baseline)
        self.record: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None  # (gates, token mask)
        self.row_experts: torch.Tensor | None = None  # [batch, k] each row's experts (per-row path)
        self.row_gates: torch.Tensor | None = None  # [batch, k] their gates
        # Static weights: each layer's (A, B, rank gates) computed once, reused by every decoding step.
        self.prepared: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.prepared = {}
        # One host sync per call (not per layer) decides which experts the layers may skip, and
        # whether rows should each gather only their own experts (k per row < experts in the batch).
        nonzero = weights != 0
        stats = torch.cat([nonzero.any(0), nonzero.sum(-1).max().view(1)]).tolist()
        self.active, k = tuple(bool(a) for a in stats[:-1]), int(stats[-1])
        self.row_experts = self.row_gates = None
        if 0 < k < sum(self.active):
            self.row_experts = weights.abs().topk(k, dim=-1).indices  # [batch, k]
            self.row_gates = weights.gather(-1, self.row_experts)  # [batch, k]

    def gates_for(self, layer: MixtureLinear, x: torch.Tensor) -> torch.Tensor | None:
        if self.weights is not None:
            return expand_batch(self.weights, x.shape[0])
        if self.router is None:
            return None
        return self.router.layer_gates(self, layer, x)


def expand_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat per-prompt routing state for generate's expanded batch (num_return_sequences)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"routing was computed for batch {t.shape[0]} but the model ran batch {batch}.")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


class MixtureLinear(nn.Module):
    """An ``nn.Linear`` with stacked LoRA experts mixed by gates.

    Args:
        base_layer: the frozen base linear (kept as ``base_layer``, as PEFT does).
        lora_A: ``[R, d_in]`` concatenated expert A matrices.
        lora_B: ``[d_out, R]`` concatenated expert B matrices.
        expert_of_rank: ``[R]`` index of the expert owning each rank.
        scale_of_rank: ``[R]`` LoRA scale of the owning expert.
        key: the module path in the base model (keys token routers).
        block: index of the transformer block holding the layer (keys block gates).
        universal: optional ``(A_u [r_u, d_in], B_u [d_out, r_u], s_u)`` MoDULA universal LoRA.
        variant: ``flan`` or ``res`` (see module docstring).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        expert_of_rank: torch.Tensor,
        scale_of_rank: torch.Tensor,
        *,
        key: str,
        block: int | None,
        routing: Routing,
        universal: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        variant: str = "flan",
    ):
        super().__init__()
        if variant not in ("flan", "res"):
            raise ValueError(f"`variant` must be 'flan' or 'res', got {variant!r}.")
        if variant == "res" and universal is None:
            raise ValueError("the `res` variant feeds experts the universal LoRA's output; pass `universal`.")
        self.base_layer = base_layer
        # Adapters keep the dtype they were saved in (PEFT likewise keeps LoRA weights in float32
        # under a bf16 base): saving a mixture writes them back losslessly; inputs are cast to it.
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(lora_A.to(device), requires_grad=False)
        self.lora_B = nn.Parameter(lora_B.to(device, lora_A.dtype), requires_grad=False)
        self.register_buffer("expert_of_rank", expert_of_rank.to(device), persistent=False)
        self.register_buffer("scale_of_rank", scale_of_rank.to(device, torch.float32), persistent=False)
        if universal is not None:
            self.universal_A = nn.Parameter(universal[0].to(device), requires_grad=False)
            self.universal_B = nn.Parameter(universal[1].to(device, universal[0].dtype), requires_grad=False)
            self.universal_scale = float(universal[2])
        else:
            self.universal_A = self.universal_B = None
        self.key, self.block, self.variant = key, block, variant
        object.__setattr__(self, "routing", routing)  # shared state, deliberately not a submodule
        self._slices: dict[tuple[bool, ...], torch.Tensor] = {}
        self._pad_cache: tuple[tuple, torch.Tensor, torch.Tensor, int] | None = None
        self._casts: dict[tuple[str, torch.dtype], tuple[int, torch.Tensor]] = {}
        # Layers whose ranks belong to the same experts with the same scales share rank gates.
        self._layout = (tuple(expert_of_rank.tolist()), tuple(scale_of_rank.tolist()))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _active_ranks(self, active: tuple[bool, ...] | None) -> torch.Tensor | None:
        """Indices of the ranks owned by active experts, or None when every rank is needed."""
        if active is None or all(active):
            return None
        idx = self._slices.get(active)
        if idx is None:
            keep = torch.tensor(active, device=self.expert_of_rank.device)[self.expert_of_rank]
            idx = self._slices[active] = keep.nonzero().flatten()
        return idx

    def _weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Parameter ``name`` in ``dtype``: itself, or a cached cast (renewed if the parameter changes)."""
        p = getattr(self, name)
        if p.dtype == dtype:
            return p
        hit = self._casts.get((name, dtype))
        if hit is None or hit[0] != p._version or hit[1].device != p.device:
            hit = self._casts[(name, dtype)] = (p._version, p.detach().to(dtype))
        return hit[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        routing = self.routing
        if routing.disabled:
            return y
        if not y.is_contiguous():  # expert outputs accumulate into y in place
            y = y.contiguous()
        dtype = x.dtype
        z = x
        if self.universal_A is not None:
            uA, uB = self._weight("universal_A", dtype), self._weight("universal_B", dtype)
            h = (F.linear(F.linear(x, uA), uB) * self.universal_scale).to(y.dtype)
            y = y + h
            if self.variant == "res":
                z = h.to(dtype)
        gates = routing.gates_for(self, x)  # None, [batch, E] or [batch, seq, E]
        if gates is None or self.lora_A.shape[0] == 0:
            return y
        all_ranks = self._runs_all_ranks(x)
        per_row = gates.dim() == 2 and routing.row_experts is not None and x.dim() == 3 and not all_ranks
        if per_row and x.shape[1] >= PER_ROW_MIN_TOKENS:
            return self._per_row(y, z, routing, gates.shape[-1])
        prepared = self._prepare(gates, routing, x, all_ranks)
        if prepared is None:
            return y
        A, B, rank_gates = prepared
        t = F.linear(z, A)  # [batch, seq, R]
        if self.variant == "res":
            t = F.silu(t)
        t = t * rank_gates
        if y.dtype != B.dtype:
            return y + F.linear(t, B).to(y.dtype)
        # y += t B^T inside the GEMM (beta = 1). In place: y is this layer's fresh base output (and
        # linear's backward does not need it); out of place the GEMM would first copy y.
        y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), B.t())
        return y

    def _runs_all_ranks(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.lora_A.shape[0] <= GPU_ALL_RANKS_MAX

    def _prepare(self, gates: torch.Tensor, routing: Routing, x: torch.Tensor, all_ranks: bool):
        """``(A, B, rank_gates)`` over the ranks to run, in ``x``'s dtype, or None if no expert is active.

        With static weights (``routing.weights``: generation, explicit weights) the result is the
        same for every call until the weights change, so it is kept in ``routing.prepared``; the
        rank gates are also shared by every layer with the same expert layout.
        """
        static = gates.dim() == 2 and routing.weights is not None
        key = (id(self), gates.shape[0], x.dtype)
        if static and key in routing.prepared:
            return routing.prepared[key]
        A, B = self._weight("lora_A", x.dtype), self._weight("lora_B", x.dtype)
        owner, scale = self.expert_of_rank, self.scale_of_rank
        idx = self._active_ranks(routing.active) if gates.dim() == 2 and not all_ranks else None
        if idx is not None:
            if idx.numel() == 0:
                return None
            A, B, owner, scale = A[idx], B[:, idx], owner[idx], scale[idx]
        gate_key = ("gates", self._layout, idx is None, gates.shape[0], x.dtype, x.device, x.dim())
        rank_gates = routing.prepared.get(gate_key) if static else None
        if rank_gates is None:
            rank_gates = (gates[..., owner].float() * scale).to(x.dtype)  # [batch, (seq,) R]
            if rank_gates.dim() == 2:  # per sequence: broadcast over every token position
                rank_gates = rank_gates.view(rank_gates.shape[0], *([1] * (x.dim() - 2)), -1)
            if static:
                routing.prepared[gate_key] = rank_gates
        if static:
            routing.prepared[key] = (A, B, rank_gates)
        return A, B, rank_gates

    def _padded(self, n_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-expert ``A [E, r_max, d_in]`` and ``s*B^T [E, r_max, d_out]`` in ``dtype``, zero-padded (cached)."""
        A_src, B_src = self.lora_A, self.lora_B
        key = (n_experts, dtype, A_src.device, A_src._version, B_src._version)
        if self._pad_cache is not None and self._pad_cache[0] == key:
            return self._pad_cache[1:]
        r_max = int(torch.bincount(self.expert_of_rank, minlength=n_experts).max())
        A = A_src.new_zeros(n_experts, r_max, A_src.shape[1], dtype=dtype)
        Bt = B_src.new_zeros(n_experts, r_max, B_src.shape[0], dtype=dtype)
        for e in range(n_experts):
            idx = (self.expert_of_rank == e).nonzero().flatten()
            A[e, : len(idx)] = A_src[idx]
            Bt[e, : len(idx)] = (B_src[:, idx] * self.scale_of_rank[idx].to(B_src.dtype)).T
        self._pad_cache = (key, A, Bt, r_max)
        return A, Bt, r_max

    def _per_row(self, y: torch.Tensor, z: torch.Tensor, routing: Routing, n_experts: int) -> torch.Tensor:
        """``y`` plus each row's own k experts: two batched GEMMs of rank ``k * r_max``.

        Punica/S-LoRA style: with top-k routing over many experts, the union of a batch's experts
        (the concatenated path) costs every row all of them; this costs each row its k.
        """
        A_pad, Bt_pad, r = self._padded(n_experts, z.dtype)
        idx = expand_batch(routing.row_experts, z.shape[0])  # [batch, k]
        gates = expand_batch(routing.row_gates, z.shape[0])  # [batch, k]
        b, k = idx.shape
        t = torch.bmm(z, A_pad[idx].view(b, k * r, -1).transpose(1, 2))  # [batch, seq, k*r]
        if self.variant == "res":
            t = F.silu(t)
        t = (t.view(b, -1, k, r) * gates.to(t.dtype)[:, None, :, None]).view(b, -1, k * r)
        Bt = Bt_pad[idx].view(b, k * r, -1)
        if y.dtype != Bt.dtype:
            return y + torch.bmm(t, Bt).to(y.dtype)
        return y.baddbmm_(t, Bt)  # y += t Bt inside the GEMM, as in forward

    def cast_experts(self, dtype: torch.dtype) -> None:
        """Hold the experts (and universal LoRA) in ``dtype`` only; see :meth:`MixtureModel.cast_experts`."""
        for name in ("lora_A", "lora_B", "universal_A", "universal_B"):
            p = getattr(self, name)
            if p is not None and p.dtype != dtype:
                p.data = p.data.to(dtype)
        self._casts.clear()
        self._pad_cache = None

    def expert_tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(A_i, B_i)`` of expert ``i`` on this module, or None if it does not adapt it."""
        idx = (self.expert_of_rank == i).nonzero().flatten()
        if idx.numel() == 0:
            return None
        return self.lora_A[idx].detach(), self.lora_B[:, idx].detach()

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """Dense ``sum_e w_e s_e B_e A_e`` (+ universal), ``[d_out, d_in]``, for static ``weights [E]``."""
        if self.variant == "res":
            raise ValueError("MoDULA-Res experts are non-linear in x and cannot be merged into W; use `flan`.")
        w = weights.to(self.lora_A.device, torch.float32)[self.expert_of_rank] * self.scale_of_rank.float()
        delta = (self.lora_B.float() * w) @ self.lora_A.float()
        if self.universal_A is not None:
            delta = delta + self.universal_scale * (self.universal_B.float() @ self.universal_A.float())
        return delta
