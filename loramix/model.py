"""MixtureModel: a transformers causal LM with N LoRA experts and a router.

    mm = MixtureModel.from_adapters(base, {"reverse": "dir/a", "sort": "dir/b"}, router="moa")
    out = mm(input_ids=ids, attention_mask=am, labels=labels)            # routed
    out = mm(input_ids=ids, attention_mask=am, expert_weights=w)         # w [batch, E] overrides
    seq = mm.generate(input_ids=ids, attention_mask=am, max_new_tokens=16)
    mm.save_pretrained("out/mixture"); MixtureModel.from_pretrained("out/mixture")

Base and experts are frozen; only router parameters require grad.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loramix.experts import Expert, ExpertBank
from loramix.inject import find_blocks, inject
from loramix.layers import MixtureLinear, Routing
from loramix.routers import Router, RouterDims, balance_loss, build_router, masked_mean

logger = logging.getLogger(__name__)


class MixtureModel(nn.Module):
    """A base causal LM whose adapted linears mix LoRA experts under a router.

    Args:
        base_model: a transformers causal LM (modified in place; do not reuse it elsewhere).
        bank: the experts; their order is :attr:`expert_names`, the column order of gates.
        router: a recipe name (``moa``, ``mole``, ``modula``), a :class:`Router`, or None
            (then every call needs ``expert_weights``).
        top_k: experts kept per route (renormalised).
        universal: MoDULA's universal LoRA, applied to every input with gate 1.
        variant: ``flan`` or ``res``, how domain experts combine with the universal LoRA.
        router_kwargs: extra constructor arguments of the router (e.g. ``temperature``).
    """

    def __init__(
        self,
        base_model: nn.Module,
        bank: ExpertBank,
        router: str | Router | None = "moa",
        *,
        top_k: int = 1,
        universal: Expert | None = None,
        variant: str = "flan",
        router_kwargs: Mapping | None = None,
    ):
        super().__init__()
        if hasattr(base_model, "peft_config"):
            raise TypeError("base_model is a PeftModel; pass the plain transformers model (`get_base_model()`).")
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.expert_names: list[str] = bank.names
        self.variant = variant
        self.routing = Routing()
        self.layers = inject(base_model, bank, self.routing, universal=universal, variant=variant)
        self.universal = universal
        self._configs = {name: expert.config for name, expert in bank.experts.items()}
        self.blocks = find_blocks(base_model)
        self.router: Router | None = None
        if router is not None:
            if isinstance(router, str):
                router = build_router(router, self.expert_names, self.router_dims(), top_k, **(router_kwargs or {}))
            if list(router.expert_names) != self.expert_names:
                raise ValueError(f"router experts {router.expert_names} differ from the mixture's {self.expert_names}.")
            self.router = router.to(self._device())
        self.routing.router = self.router
        for i, path in enumerate(self.blocks):
            self.base_model.get_submodule(path).register_forward_pre_hook(self._block_hook(i))

    @classmethod
    def from_adapters(
        cls,
        base_model: nn.Module,
        adapters: Mapping[str, str | Path],
        router: str | Router | None = "moa",
        *,
        top_k: int = 1,
        universal: str | Path | Expert | None = None,
        variant: str = "flan",
        **router_kwargs,
    ) -> MixtureModel:
        """Build a mixture from PEFT LoRA adapter directories ``{expert_name: path}``."""
        bank = ExpertBank.from_dirs(adapters, variant=variant)
        if universal is not None and not isinstance(universal, Expert):
            universal = Expert.from_dir("universal", universal)
        return cls(
            base_model, bank, router, top_k=top_k, universal=universal, variant=variant, router_kwargs=router_kwargs
        )

    # ----------------------------------------------------------------------------- helpers
    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def config(self):
        return self.base_model.config

    def router_dims(self) -> RouterDims:
        return RouterDims(
            hidden_size=self.base_model.config.hidden_size,
            num_blocks=len(self.blocks),
            layer_in_features={k: layer.in_features for k, layer in self.layers.items()},
        )

    def _block_hook(self, block: int):
        def hook(module, args, kwargs=None):
            if self.router is not None and not self.routing.disabled and self.routing.weights is None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.router.block_start(self.routing, block, hidden)

        return hook

    def check_expert_weights(self, weights, batch: int) -> torch.Tensor:
        """Validate ``expert_weights`` (``[batch, E]`` or ``[E]``) into a float tensor on the model's device."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self._device())
        n = len(self.expert_names)
        if w.dim() == 1:
            w = w.expand(batch, -1)
        if w.dim() != 2 or w.shape != (batch, n):
            raise ValueError(
                f"`expert_weights` must have shape [batch={batch}, n_experts={n}] in the order {self.expert_names}, "
                f"got {tuple(w.shape)}."
            )
        if not torch.isfinite(w).all():
            raise ValueError("`expert_weights` contains NaN or inf.")
        return w

    @contextmanager
    def _routed(
        self, input_ids, attention_mask, expert_weights, *, freeze: bool, record: bool = True
    ) -> Iterator[Routing]:
        routing = self.routing
        routing.reset()
        try:
            routing.pool_mask = attention_mask
            routing.freeze = freeze
            routing.record = [] if record else None
            if expert_weights is not None:
                routing.set_weights(self.check_expert_weights(expert_weights, input_ids.shape[0]))
            elif self.router is None:
                raise ValueError("this mixture has no router: pass `expert_weights` [batch, n_experts].")
            elif self.router.granularity == "sequence":
                logits = self.router.sequence_logits(self, input_ids, attention_mask)
                routing.record = [(self.router.gates(logits), None)]
                routing.router_logits = logits
                routing.set_weights(routing.record[0][0])
            yield routing
        finally:
            routing.reset()

    def base_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of the plain base (experts off): embeddings + every block's output."""
        disabled = self.routing.disabled
        self.routing.disabled = True
        try:
            out = self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                output_hidden_states=True,
                logits_to_keep=1,
            )
        finally:
            self.routing.disabled = disabled
        return out.hidden_states

    # ----------------------------------------------------------------------------- public API
    def forward(self, input_ids, attention_mask=None, labels=None, expert_weights=None, route_mask=None, **kwargs):
        """Run the routed model.

        Args:
            expert_weights: ``[batch, E]`` (or ``[E]``) gates that override the router.
            route_mask: ``[batch, seq]`` positions sequence/block routers may pool over
                (default ``attention_mask``); training passes the prompt only, as inference sees.

        Returns:
            The base model's output plus ``router_logits`` (sequence routers, else None),
            ``aux_loss`` (balance loss of the gates used; 0 with ``expert_weights``) and
            ``gates`` (``[batch, E]`` mean gates, None with ``expert_weights``).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool = attention_mask if route_mask is None else route_mask
        with self._routed(input_ids, pool, expert_weights, freeze=False) as routing:
            kwargs.setdefault("position_ids", position_ids(attention_mask))
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            out.router_logits = getattr(routing, "router_logits", None)
            out.aux_loss = gate_balance_loss(routing.record) if expert_weights is None else out.logits.new_zeros(())
            out.gates = summarize_gates(routing.record, pool)
        return out

    @torch.no_grad()
    def route(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Gates ``[batch, E]`` the router gives each prompt (per block/token routers: the mean)."""
        if self.router is None:
            raise ValueError("this mixture has no router, so it cannot route; pass `expert_weights` instead.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.router.granularity == "sequence":
            return self.router.gates(self.router.sequence_logits(self, input_ids, attention_mask))
        return self(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).gates

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 16, expert_weights=None, **kwargs):
        """Greedy/sampled generation with KV cache. Sequence and block routers decide once on the
        prompt; token routers gate every new token. Extra kwargs go to ``transformers`` generate."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.setdefault("do_sample", False)
        with self.decoding(input_ids, attention_mask, expert_weights):
            return self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **kwargs
            )

    def decoding(self, input_ids, attention_mask, expert_weights=None, *, record_route: bool = False):
        """Context in which ``base_model`` calls (prefill, then one token at a time with a KV cache)
        decode as the mixture: routes are decided on the prompt (sequence/block routers) or per
        token (token routers), or fixed by ``expert_weights`` ``[batch, E]``. Custom decode
        loops (:mod:`loramix.serving`) run inside it; :meth:`generate` uses it too.

        ``record_route``: keep the gates of the prompt's forward for :meth:`take_route`.
        """
        return self._routed(input_ids, attention_mask, expert_weights, freeze=True, record=record_route)

    def take_route(self, attention_mask) -> torch.Tensor | None:
        """Inside ``decoding(record_route=True)``, after the prompt's forward: the mean gates
        ``[batch, E]`` the router gave each prompt (as :meth:`route` reports them), then stop
        recording. Saves block/token routers a second prompt forward just to report the route."""
        record, self.routing.record = self.routing.record, None
        return summarize_gates(record, attention_mask)

    def cast_experts(self, dtype: torch.dtype) -> MixtureModel:
        """Hold the experts (and universal LoRA) in ``dtype`` only.

        Experts compute in the activations' dtype anyway, through a cached cast of the weights as
        saved (float32 under a bf16 base). Serving casts them once instead: one bf16 copy rather
        than float32 plus the cast, a third of the memory, the same outputs. Saving afterwards
        writes the rounded weights.
        """
        for layer in self.layers.values():
            layer.cast_experts(dtype)
        return self

    def mask_experts(self, names: Sequence[str] = ()) -> None:
        """Exclude experts from routing (MoLE-style); the remaining gates renormalise. ``()`` unmasks."""
        if self.router is None:
            raise ValueError("masking needs a router; with explicit `expert_weights` just set zeros.")
        unknown = sorted(set(names) - set(self.expert_names))
        if unknown:
            raise ValueError(f"cannot mask unknown experts {unknown}; experts are {self.expert_names}.")
        if len(set(names)) >= len(self.expert_names):
            raise ValueError("cannot mask every expert; leave at least one unmasked.")
        self.router.masked.copy_(torch.tensor([n in names for n in self.expert_names]))

    def experts(self) -> dict[str, Expert]:
        """The experts as they are now held by the layers (for saving)."""
        return {name: self._expert_from_layers(i, name) for i, name in enumerate(self.expert_names)}

    def _expert_from_layers(self, i: int, name: str) -> Expert:
        lora_A, lora_B, scaling = {}, {}, {}
        for key, layer in self.layers.items():
            tensors = layer.expert_tensors(i)
            if tensors is not None:
                lora_A[key], lora_B[key] = tensors
                scaling[key] = float(layer.scale_of_rank[layer.expert_of_rank == i][0])
        return Expert(name, self._configs[name], lora_A, lora_B, scaling, self.variant)

    def save_pretrained(self, path: str | Path, *, base_path: str | None = None) -> None:
        """Write ``manifest.json``, ``experts/<name>/`` (PEFT format), ``universal/`` and ``router/``.

        Args:
            base_path: what ``from_pretrained(base_model=None)`` loads; defaults to the base's
                ``name_or_path``. A relative path is resolved against ``path``.
        """
        from loramix.checkpoint import save_mixture

        save_mixture(self, path, base_path=base_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, base_model: nn.Module | None = None, **base_kwargs) -> MixtureModel:
        """Load a saved mixture; ``base_model=None`` loads the base named in the manifest."""
        from loramix.checkpoint import load_mixture

        return load_mixture(cls, path, base_model, **base_kwargs)

    def merged_base(self, weights) -> nn.Module:
        """A plain copy of the base with ``sum_e w_e dW_e`` (+ universal) merged into its weights.

        Zero adapter overhead: what routed serving gives each expert's own deployment.
        """
        import copy

        w = self.check_expert_weights(weights, 1)[0]
        model = copy.deepcopy(self.base_model)
        for key, layer in self.layers.items():
            parent_name, _, attr = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            merged = copy.deepcopy(layer.base_layer)
            merged.weight.data += layer.delta_weight(w).to(merged.weight.dtype)
            setattr(parent, attr, merged)
        for hook_owner in model.modules():
            hook_owner._forward_pre_hooks.clear()
        return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def gate_balance_loss(record) -> torch.Tensor | None:
    if not record:
        return None
    return torch.stack([balance_loss(g if m is None else g[m.bool()]) for g, m in record]).mean()


def summarize_gates(record, attention_mask) -> torch.Tensor | None:
    """Mean gates per sequence ``[batch, E]`` over every recorded route (blocks, layers, tokens)."""
    if not record:
        return None
    per_route = [g if g.dim() == 2 else masked_mean(g, attention_mask) for g, _ in record]
    return torch.stack(per_route).mean(0)


__all__ = ["MixtureModel", "MixtureLinear", "position_ids"]
