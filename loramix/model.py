"""MixtureModel: a transformers causal LM with N LoRA experts and a router.

    mm = MixtureModel.from_adapters(base, {"reverse": "dir/a", "sort": "dir/b"}, router="moa")
    out = mm(input_ids=ids, attention_mask=am, labels=labels)            # routed
    out = mm(input_ids=ids, attention_mask=am, expert_weights=w)         # w [batch, E] overrides
    seq = mm.generate(input_ids=ids, attention_mask=am, max_new_tokens=16)
    mm.save_pretrained("out/mixture"); MixtureModel.from_pretrained("out/mixture")

Base and experts are frozen; only router parameters require grad.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from loramix.experts import Expert, ExpertBank
from loramix.inject import find_blocks, inject
from loramix.routers import Router, RouterDims, build_router
from loramix.routing import CallState, Routing, balance_loss, mean_gates, per_sequence

logger = logging.getLogger(__name__)


class MixtureModel(nn.Module):
    """A base causal LM whose adapted linears mix LoRA experts under a router.

    Args:
        base_model: a transformers causal LM (modified in place; do not reuse it elsewhere).
        bank: the experts; their order is :attr:`expert_names`, the column order of gates.
        router: a recipe name (``moa``, ``mole``, ``modula``), a :class:`Router`, or None
            (then every call needs ``expert_weights``).
        top_k: experts kept per route (renormalised).
        universal: the MoDULA-Res trunk, applied to every input (``variant="res"``). A
            MoDULA-Flan universal LoRA is an ordinary expert of the bank instead.
        variant: ``flan`` (plain LoRA experts) or ``res`` (experts read the trunk's output).
        null_experts: routed slots that add nothing, placed first in :attr:`expert_names`
            (MoDULA-Res's ``universal``: a gate for "the trunk alone").
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
        null_experts: Sequence[str] = (),
        router_kwargs: Mapping | None = None,
    ):
        super().__init__()
        if hasattr(base_model, "peft_config"):
            raise TypeError("base_model is a PeftModel; pass the plain transformers model (`get_base_model()`).")
        clash = sorted(set(null_experts) & set(bank.names))
        if clash:
            raise ValueError(f"null experts {clash} are also experts of the bank; rename one.")
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.expert_names: list[str] = [*null_experts, *bank.names]
        self.null_experts = list(null_experts)
        self.variant = variant
        self.routing = Routing()
        self.layers = inject(
            base_model, bank, self.routing, expert_names=self.expert_names, universal=universal, variant=variant
        )
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
        decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else None
        if isinstance(decoder, nn.Module) and decoder is not base_model:
            decoder.register_forward_hook(self._keep_final_hidden)

    def _keep_final_hidden(self, module, args, output) -> None:
        """Keep the decoder's output (what the output head reads, before the logits it keeps are
        sliced) for a token router whose context needs every prompt position at an `lm_head` LoRA."""
        call = self.routing.call
        if call is not None:
            call.final_hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)

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
        null_experts: Sequence[str] = (),
        **router_kwargs,
    ) -> MixtureModel:
        """Build a mixture from PEFT LoRA adapter directories ``{expert_name: path}``."""
        bank = ExpertBank.from_dirs(adapters, variant=variant)
        if universal is not None and not isinstance(universal, Expert):
            universal = Expert.from_dir("universal", universal)
        return cls(
            base_model,
            bank,
            router,
            top_k=top_k,
            universal=universal,
            variant=variant,
            null_experts=null_experts,
            router_kwargs=router_kwargs,
        )

    # ----------------------------------------------------------------------------- helpers
    def _device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def config(self):
        return self.base_model.config

    def router_dims(self) -> RouterDims:
        gate_layers = {}  # MoLE reads a block's first square adapted linear (in module order: it runs first)
        for key, layer in self.layers.items():
            square = layer.in_features == layer.out_features
            if layer.block is not None and layer.ranks and square and layer.block not in gate_layers:
                gate_layers[layer.block] = (key, layer.out_features)
        return RouterDims(
            hidden_size=self.base_model.config.hidden_size,
            num_blocks=len(self.blocks),
            layer_in_features={k: layer.in_features for k, layer in self.layers.items()},
            gate_layers=gate_layers,
        )

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
        self, input_ids, attention_mask, expert_weights, *, freeze: bool, record: bool = True, tokens=None
    ) -> Iterator[CallState]:
        """Open one call's routing state: fixed weights (explicit, or a sequence router's), or none
        and the router decides inside the forward. Closed (dropped) whatever happens.

        ``attention_mask`` is what sequence/block routers pool over (the prompt); ``tokens`` the
        real tokens of the call (default: the same)."""
        tokens = attention_mask if tokens is None else tokens
        call = self.routing.begin(
            pool_mask=attention_mask, attention_mask=tokens, freeze=freeze, record=[] if record else None
        )
        try:
            if expert_weights is not None:
                call.set_weights(self.check_expert_weights(expert_weights, input_ids.shape[0]))
            elif self.router is None:
                raise ValueError("this mixture has no router: pass `expert_weights` [batch, n_experts].")
            else:
                weights = self.router.prompt_weights(self, input_ids, attention_mask, call)
                if weights is not None:
                    call.set_weights(weights)
            yield call
        finally:
            self.routing.end()

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
            The base model's output plus ``aux_loss`` (the balance loss of the router's decisions;
            0 with ``expert_weights``), ``gates`` (``[batch, E]`` mean gates, None with
            ``expert_weights``) and ``routes`` (every decision, :class:`RouteRecord`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pool = attention_mask if route_mask is None else route_mask
        with self._routed(input_ids, pool, expert_weights, freeze=False, tokens=attention_mask) as call:
            kwargs.setdefault("position_ids", position_ids(attention_mask))
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        routed = expert_weights is None and bool(call.record)
        out.aux_loss = balance_loss(call.record) if routed else out.logits.new_zeros(())
        out.gates = mean_gates(call.record, pool) if routed else None
        out.routes = call.record if routed else []
        return out

    @torch.no_grad()
    def route(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Gates ``[batch, E]`` the router gives each prompt (per block/token routers: the mean)."""
        if self.router is None:
            raise ValueError("this mixture has no router, so it cannot route; pass `expert_weights` instead.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.router.fixed_per_prompt:
            with self._routed(input_ids, attention_mask, None, freeze=False) as call:
                return call.weights
        return self(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).gates

    @torch.no_grad()
    def gate_pattern(self, input_ids, attention_mask=None) -> dict[str, torch.Tensor]:
        """Each routing decision's per-prompt gates ``{where: [batch, E]}``: ``sequence``,
        ``block.<i>`` (MoLE) or a module path (MoDULA), in the order the model takes them."""
        if self.router is None:
            raise ValueError("this mixture has no router, so it has no gate pattern.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        return {r.where: per_sequence(r, attention_mask) for r in out.routes}

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
        call = self.routing.call
        record, call.record = call.record, None
        return mean_gates(record, attention_mask) if record else None

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
        """The experts as they are now held by the layers (for saving); null experts hold nothing."""
        return {
            name: self._expert_from_layers(i, name)
            for i, name in enumerate(self.expert_names)
            if name not in self.null_experts
        }

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
        from loramix.checkpoint import save_mixture  # checkpoint imports this module

        save_mixture(self, path, base_path=base_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, base_model: nn.Module | None = None, **base_kwargs) -> MixtureModel:
        """Load a saved mixture; ``base_model=None`` loads the base named in the manifest."""
        from loramix.checkpoint import load_mixture  # checkpoint imports this module

        return load_mixture(cls, path, base_model, **base_kwargs)

    def merged_base(self, weights) -> nn.Module:
        """A plain copy of the base with ``sum_e w_e dW_e`` merged into its weights.

        Zero adapter overhead: what routed serving gives each expert's own deployment.
        """

        w = self.check_expert_weights(weights, 1)[0]
        model = copy.deepcopy(self.base_model)
        for key, layer in self.layers.items():
            parent_name, _, attr = key.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            merged = copy.deepcopy(layer.base_layer)
            merged.weight.data += layer.delta_weight(w).to(merged.weight.dtype)
            setattr(parent, attr, merged)
        return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


__all__ = ["MixtureModel", "position_ids"]
