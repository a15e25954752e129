r"""MixtureLinear: a base linear plus a gated sum of stacked LoRA experts.

    y = W0 x + sum_e g_e(x) * s_e * B_e A_e x            s_e = alpha_e / r_e (or alpha_e / sqrt(r_e), rsLoRA)

MoDULA-Res (arXiv 2412.07405) feeds the experts the output of a frozen universal LoRA (the
"trunk", B_u A_u, s_u), through a LeakyReLU:

    res:   h = s_u B_u A_u x ;  y = W0 x + h + sum_e g_e s_e B_e LeakyReLU(A_e h)

(MoDULA-Flan needs no special layer: its universal LoRA is one more routed expert.) Experts
start as PEFT initialises a LoRA (A Kaiming-uniform, B = 0) when they are trained through this
layer (:class:`loramix.trainees.ResTrainee`); otherwise they are loaded frozen.

The experts of one module are stored concatenated along the rank dimension, ``A [R, d_in]``,
``B [d_out, R]`` with R = sum_e r_e, so the whole mixture is two GEMMs: the gate of each expert
is expanded to its ranks and folded in between (``(x A^T) * gate_per_rank) B^T``). Gates come
per sequence ``[batch, E]`` or per token ``[batch, seq, E]``; experts whose gate is zero for the
whole batch are sliced out before the matmuls. A mixture trains only its router, so experts are
frozen (``requires_grad=False``) unless a trainee unfreezes one.

Experts keep the dtype they were saved in (float32 under a bf16 base, as PEFT keeps them) and
compute in the activations' dtype, as serving systems do: a cached cast, so a bf16 forward pays
no casts of activations and the expert output accumulates into the base output inside the GEMM.

On a GPU, where each extra kernel and each pass over memory costs wall time: layers that read one
input (q/k/v, gate/up) run their shrinks as one GEMM (:class:`SharedShrink`), and the base GEMM
accumulates into the expert output (beta = 1) rather than a rank-R GEMM rewriting the base output.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from loramix.routing import CallState, Routing, expand_batch

logger = logging.getLogger(__name__)

# Below this many tokens per row (decoding steps), gathering each row's experts costs more memory
# traffic than running the batch's union of experts as two plain GEMMs.
PER_ROW_MIN_TOKENS = 8
# On a GPU a rank-R LoRA GEMM beside a d x d base GEMM costs launches, not FLOPs: up to this many
# ranks in total, every expert runs (gates zero the unused ones) as 3 kernels with no per-call
# slicing or gathering. Past it (or on a CPU, where FLOPs are the cost) inactive experts are sliced
# out and rows gather their own top-k.
GPU_ALL_RANKS_MAX = 256
# Sibling modules that read one input tensor in the decoder families PEFT targets by these names
# (Llama, Mistral, Qwen, Gemma): on the GPU path their experts' shrinks run as one GEMM.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# On the GPU path the expert output is computed first and the base GEMM accumulates into it
# (beta = 1, read in its epilogue) instead of a rank-R GEMM reading and rewriting the base output.
GPU_LORA_FIRST = True
GPU_SHARED_SHRINK = True
# MoDULA-Res's activation between A_e and B_e (the paper's LeakyReLU, PyTorch's default slope).
RES_NEGATIVE_SLOPE = 0.01


def res_activation(t: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(t, RES_NEGATIVE_SLOPE)


class MixtureLinear(nn.Module):
    """An ``nn.Linear`` with stacked LoRA experts mixed by gates.

    Args:
        base_layer: the frozen base linear (kept as ``base_layer``, as PEFT does).
        lora_A: ``[R, d_in]`` concatenated expert A matrices (``[R, d_out]`` for res experts).
        lora_B: ``[d_out, R]`` concatenated expert B matrices.
        expert_of_rank: ``[R]`` index of the expert owning each rank (a column of the gates).
        scale_of_rank: ``[R]`` LoRA scale of the owning expert.
        key: the module path in the base model (keys token routers).
        block: index of the transformer block holding the layer (keys block gates).
        n_experts: columns of the gates (experts that adapt no module of this layer own no rank).
        universal: ``(A_u [r_u, d_in], B_u [d_out, r_u], s_u)``, the MoDULA-Res trunk.
        variant: ``flan`` (plain LoRA experts) or ``res`` (experts read the trunk's output).
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
        n_experts: int | None = None,
        universal: tuple[torch.Tensor, torch.Tensor, float] | None = None,
        variant: str = "flan",
    ):
        super().__init__()
        if variant not in ("flan", "res"):
            raise ValueError(f"`variant` must be 'flan' or 'res', got {variant!r}.")
        if variant == "res" and universal is None:
            raise ValueError("the `res` variant feeds experts the universal LoRA's output; pass `universal`.")
        if variant == "flan" and universal is not None:
            raise ValueError(
                "a `flan` universal LoRA is an ordinary routed expert (MoDULA-Flan); only `res` takes a trunk."
            )
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
        if n_experts is None:
            n_experts = int(expert_of_rank.max()) + 1 if expert_of_rank.numel() else 0
        self.n_experts = n_experts
        self.key, self.block, self.variant = key, block, variant
        object.__setattr__(self, "routing", routing)  # shared state, deliberately not a submodule
        self._slices: dict[tuple[bool, ...], torch.Tensor] = {}
        self._pad_cache: tuple[tuple, torch.Tensor, torch.Tensor, int] | None = None
        self._casts: dict[tuple[str, torch.dtype], tuple[int, torch.Tensor]] = {}
        # Layers whose ranks belong to the same experts with the same scales share rank gates.
        self._layout = (tuple(expert_of_rank.tolist()), tuple(scale_of_rank.tolist()))
        self.siblings: SharedShrink | None = None  # set by inject for q/k/v and gate/up

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def ranks(self) -> int:
        return self.lora_A.shape[0]

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
        """Parameter ``name`` in ``dtype``: itself, a differentiable cast while it trains, or a cached
        cast (renewed if the parameter changes in place)."""
        p = getattr(self, name)
        if p.dtype == dtype:
            return p
        if p.requires_grad:
            return p.to(dtype)
        hit = self._casts.get((name, dtype))
        if hit is None or hit[0] != p._version or hit[1].device != p.device:
            hit = self._casts[(name, dtype)] = (p._version, p.detach().to(dtype))
        return hit[1]

    def trunk(self, x: torch.Tensor) -> torch.Tensor | None:
        """The MoDULA-Res trunk's output ``h = s_u B_u A_u x`` (None without one)."""
        if self.universal_A is None:
            return None
        uA, uB = self._weight("universal_A", x.dtype), self._weight("universal_B", x.dtype)
        return F.linear(F.linear(x, uA), uB) * self.universal_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        call = routing.call
        if routing.disabled or call is None:
            return self.base_layer(x)
        h = self.trunk(x)
        gates = routing.gates_for(self, x)  # None, [batch, E] or [batch, seq, E]
        all_ranks = self._runs_all_ranks(x)
        prepared = None
        if gates is not None and self.ranks:
            per_row = gates.dim() == 2 and call.row_experts is not None and x.dim() == 3 and not all_ranks
            if per_row and x.shape[1] >= PER_ROW_MIN_TOKENS:
                return self._per_row(self._base(x, h), x if h is None else h, call, gates.shape[-1])
            prepared = self._prepare(gates, call, x, all_ranks)
        if prepared is None:
            return self._base(x, h)
        A, B, rank_gates = prepared
        if h is None and all_ranks and GPU_SHARED_SHRINK and self.siblings is not None and not A.requires_grad:
            t = self.siblings.shrink(self, x, call, A)
        else:
            t = F.linear(x if h is None else h, A)  # [batch, seq, R]
        if self.variant == "res":
            t = res_activation(t)
        t = t * rank_gates
        base = self.base_layer
        if all_ranks and GPU_LORA_FIRST and h is None and type(base) is nn.Linear and base.weight.dtype == B.dtype:
            # The base GEMM adds itself to the expert output in its epilogue (beta = 1): cheaper than
            # a rank-R GEMM that reads and rewrites the wide base output (the MLP's up-projections).
            y = F.linear(t, B, base.bias)
            y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), base.weight.t())
            return y
        y = self._base(x, h)
        if y.dtype != B.dtype:
            return y + F.linear(t, B).to(y.dtype)
        # y += t B^T inside the GEMM (beta = 1). In place: y is this layer's fresh base output (and
        # linear's backward does not need it); out of place the GEMM would first copy y.
        y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), B.t())
        return y

    def _base(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """The base output (plus the MoDULA-Res trunk's), contiguous: expert outputs accumulate into it in place."""
        y = self.base_layer(x)
        if h is not None:
            return y + h.to(y.dtype)
        return y if y.is_contiguous() else y.contiguous()

    def _runs_all_ranks(self, x: torch.Tensor) -> bool:
        return x.is_cuda and self.ranks <= GPU_ALL_RANKS_MAX

    def _prepare(self, gates: torch.Tensor, call: CallState, x: torch.Tensor, all_ranks: bool):
        """``(A, B, rank_gates)`` over the ranks to run, in ``x``'s dtype, or None if no expert is active.

        With static weights (``call.weights``: generation, explicit weights) the result is the
        same for every call until the weights change, so it is kept in ``call.prepared``; the
        rank gates are also shared by every layer with the same expert layout.
        """
        static = gates.dim() == 2 and call.weights is not None and not self.lora_A.requires_grad
        key = (id(self), gates.shape[0], x.dtype)
        if static and key in call.prepared:
            return call.prepared[key]
        A, B = self._weight("lora_A", x.dtype), self._weight("lora_B", x.dtype)
        owner, scale = self.expert_of_rank, self.scale_of_rank
        idx = self._active_ranks(call.active) if gates.dim() == 2 and not all_ranks else None
        if idx is not None:
            if idx.numel() == 0:
                return None
            A, B, owner, scale = A[idx], B[:, idx], owner[idx], scale[idx]
        gate_key = ("gates", self._layout, idx is None, gates.shape[0], x.dtype, x.device, x.dim())
        rank_gates = call.prepared.get(gate_key) if static else None
        if rank_gates is None:
            rank_gates = (gates[..., owner].float() * scale).to(x.dtype)  # [batch, (seq,) R]
            if rank_gates.dim() == 2:  # per sequence: broadcast over every token position
                rank_gates = rank_gates.view(rank_gates.shape[0], *([1] * (x.dim() - 2)), -1)
            if static:
                call.prepared[gate_key] = rank_gates
        if static:
            call.prepared[key] = (A, B, rank_gates)
        return A, B, rank_gates

    def _padded(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-expert ``A [E, r_max, d_in]`` and ``s*B^T [E, r_max, d_out]`` in ``dtype``, zero-padded.

        Cached for frozen experts; rebuilt (differentiably) for a trained one.
        """
        A_src, B_src = self.lora_A, self.lora_B
        trains = A_src.requires_grad or B_src.requires_grad
        key = (self.n_experts, dtype, A_src.device, A_src._version, B_src._version)
        if not trains and self._pad_cache is not None and self._pad_cache[0] == key:
            return self._pad_cache[1:]
        r_max = max(1, int(torch.bincount(self.expert_of_rank, minlength=self.n_experts).max()))
        As, Bts = [], []
        for e in range(self.n_experts):
            idx = (self.expert_of_rank == e).nonzero().flatten()
            a = A_src[idx].to(dtype)
            bt = (B_src[:, idx] * self.scale_of_rank[idx].to(B_src.dtype)).T.to(dtype)
            pad = r_max - len(idx)
            As.append(F.pad(a, (0, 0, 0, pad)))
            Bts.append(F.pad(bt, (0, 0, 0, pad)))
        A, Bt = torch.stack(As), torch.stack(Bts)
        if not trains:
            self._pad_cache = (key, A, Bt, r_max)
        return A, Bt, r_max

    def expert_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's own output ``s_e B_e A_e x`` (res: of the trunk's output), ``[..., E, d_out]``.

        What a MoLE gate reads; an expert that does not adapt this layer contributes zeros.
        """
        A, Bt, _ = self._padded(x.dtype)
        h = self.trunk(x)
        z = x if h is None else h
        t = torch.einsum("...d,erd->...er", z, A)
        if self.variant == "res":
            t = res_activation(t)
        return torch.einsum("...er,ero->...eo", t, Bt)

    def _per_row(self, y: torch.Tensor, z: torch.Tensor, call: CallState, n_experts: int) -> torch.Tensor:
        """``y`` plus each row's own k experts: two batched GEMMs of rank ``k * r_max``.

        Punica/S-LoRA style: with top-k routing over many experts, the union of a batch's experts
        (the concatenated path) costs every row all of them; this costs each row its k.
        """
        A_pad, Bt_pad, r = self._padded(z.dtype)
        idx = expand_batch(call.row_experts, z.shape[0])  # [batch, k]
        gates = expand_batch(call.row_gates, z.shape[0])  # [batch, k]
        b, k = idx.shape
        t = torch.bmm(z, A_pad[idx].view(b, k * r, -1).transpose(1, 2))  # [batch, seq, k*r]
        if self.variant == "res":
            t = res_activation(t)
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
        """Dense ``sum_e w_e s_e B_e A_e``, ``[d_out, d_in]``, for static ``weights [E]``."""
        if self.variant == "res":
            raise ValueError("MoDULA-Res experts are non-linear in x and cannot be merged into W; use `flan`.")
        w = weights.to(self.lora_A.device, torch.float32)[self.expert_of_rank] * self.scale_of_rank.float()
        return (self.lora_B.float() * w) @ self.lora_A.float()


class SharedShrink:
    """The experts' shrinks ``x A_m^T`` of sibling layers that read one input (q/k/v, gate/up), as one GEMM.

    The first sibling called computes ``x [A_q; A_k; A_v]^T`` into the call's state; the others
    take their columns of it when they get the same tensor, and the last one drops it, so nothing
    outlives its block. A model that feeds the siblings different inputs is caught the first time
    a sibling finds another's shrink pending, and falls back to one shrink per layer for good.
    """

    def __init__(self, layers: list[MixtureLinear]):
        self.layers = tuple(layers)
        ends = torch.tensor([layer.ranks for layer in layers]).cumsum(0).tolist()
        self.columns = {id(layer): slice(end - layer.ranks, end) for layer, end in zip(layers, ends)}
        self.broken = False
        self._cat: tuple[tuple, torch.Tensor] | None = None

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``[A_q; A_k; A_v]`` in ``dtype``, cached until a sibling's experts change."""
        key = (dtype, tuple((layer.lora_A.data_ptr(), layer.lora_A._version) for layer in self.layers))
        if self._cat is None or self._cat[0] != key:
            self._cat = (key, torch.cat([layer._weight("lora_A", dtype) for layer in self.layers]))
        return self._cat[1]

    def shrink(self, layer: MixtureLinear, x: torch.Tensor, call: CallState, A: torch.Tensor) -> torch.Tensor:
        """``x A^T`` for ``layer`` (its own ``A``, in ``x``'s dtype, for the fallback)."""
        if self.broken:
            return F.linear(x, A)
        key = ("shrink", id(self))
        pending = call.prepared.get(key)
        if pending is not None and pending[0] is not x:
            self.broken = True
            del call.prepared[key]
            logger.warning("%s: sibling layers got different inputs; their shrinks run one by one", layer.key)
            return F.linear(x, A)
        if pending is None:
            pending = call.prepared[key] = [x, F.linear(x, self.weight(x.dtype)), 0]
        pending[2] += 1
        if pending[2] == len(self.layers):
            del call.prepared[key]
        return pending[1][..., self.columns[id(layer)]]


def share_shrinks(layers: dict[str, MixtureLinear]) -> int:
    """Group sibling layers (:data:`SIBLINGS` under one parent, with experts) for :class:`SharedShrink`.

    Returns the number of groups.
    """
    groups = 0
    for key in layers:
        parent, _, name = key.rpartition(".")
        for names in SIBLINGS:
            if name != names[0]:
                continue
            members = [layers.get(f"{parent}.{n}" if parent else n) for n in names]
            if all(m is not None and m.ranks and m.variant == "flan" for m in members):
                group = SharedShrink(members)
                for m in members:
                    m.siblings = group
                groups += 1
    return groups
